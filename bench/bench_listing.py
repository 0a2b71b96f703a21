"""Listing a folder source: the streaming sorted walk against a whole-tree `fs.find` and a sorted set
(what the folder reader did before), in one run: seconds and tracemalloc peak of each; and the seconds
to list a `scenes` source of ten million ids.

    .venv/bin/python bench/bench_listing.py [--files 100000] [--dirs 10] [--scenes 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc

import fsspec

import factory.sources.listing
from factory.sources import open_source
from factory.sources.spec import SourceSpec

SUFFIX = "_image.png"


def write_empty_files(root: str, files: int, dirs: int) -> None:
    """`files` empty images over `dirs` folders, created in an order unlike the sorted one."""
    per_dir = files // dirs
    for d in range(dirs):
        sub = os.path.join(root, f"d{d:03d}")
        os.mkdir(sub)
        for i in range(per_dir):
            open(os.path.join(sub, f"s-{(i * 7919) % per_dir:07d}{SUFFIX}"), "wb").close()


def measure(count_ids) -> dict:
    """Seconds of a plain run, and the peak of a second run under tracemalloc (which slows it)."""
    start = time.perf_counter()
    n = count_ids()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    count_ids()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"ids": n, "seconds": round(seconds, 3), "peak_mb": round(peak / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--dirs", type=int, default=10)
    p.add_argument("--scenes", type=int, default=10_000_000)
    args = p.parse_args()
    results = {"files": args.files, "dirs": args.dirs}
    with tempfile.TemporaryDirectory() as root:
        write_empty_files(root, args.files, args.dirs)
        fs = fsspec.filesystem("file")

        def find_and_sort() -> int:
            found = {p[len(root) + 1 : -len(SUFFIX)] for p in fs.find(root) if p.endswith(SUFFIX)}
            return len(sorted(found))

        spec = SourceSpec(kind="folder", path=root, classes="voc", image_suffix=SUFFIX, mask_suffix=None)
        source = open_source(spec)

        def stream() -> int:
            return sum(1 for _ in source.list_ids())

        results["find_and_sort"] = measure(find_and_sort)
        results["stream"] = measure(stream)
        factory.sources.listing.RUN_SIZE = max(1, args.files // args.dirs // 5)  # every directory spilled in 5 runs
        results["stream_spilled"] = {"run_size": factory.sources.listing.RUN_SIZE, **measure(stream)}
    scenes = open_source(SourceSpec(kind="scenes", count=args.scenes))
    start = time.perf_counter()
    results["scenes"] = {"ids": sum(1 for _ in scenes.list_ids()), "seconds": round(time.perf_counter() - start, 3)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
