"""The engine at scale and under load, on this machine: planning, memory while processing, a stalled sample,
the engine against a plain loop, and resume over many committed shards on a real S3 server.

    .venv/bin/python bench/bench_scale.py [--process 100000]
        [--only plan,listing,loop,process,stall,stall_every_shard,resume,rows,cluster]

Writes bench/results/scale-<date>.json and prints a table. Each part:
- plan:    plan a `scenes` source of 10M ids (no files) in a child process: seconds, peak RSS.
- listing: plan a folder of 100k small files (the real listing path): seconds, peak RSS.
- process: N scenes at 32 px through two cheap stages (K=2 expansion, 25% rejection), shard_size 100:
           samples/s, driver RSS after 10% of the shards and at the end, largest worker RSS, spill.
- stall:   2,000 scenes, one sample sleeps 30 s in a pool of two: shards committed during the stall.
- stall_every_shard: 8 shards, one sample of each sleeps 30 s in a pool of two: the job's seconds against
           the sleeps' lower bound (8 x 30 / 2), and memory.
- loop:    a zero-stage job (read, encode, tar) against a single-process loop doing the same, in one run,
           at 128 px (2,000 scenes) and 512 px (400), shard_size 100; each runs twice, alternating: the
           first job on a fresh Ray also pays the imports of its new workers.
- resume:  an output on SeaweedFS holding 10,000 committed shards: seconds from start to the first new commit.
- rows, cluster: a stage worker's peak memory per shard row, and a job on a head and three worker nodes
           that loses one at 30%: each in its own process (bench/bench_cluster.py says how).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO / "tests")]
# Ray workers import the bench stages by module name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), str(REPO), os.environ.get("PYTHONPATH")]))


def _spec(source: dict, out: str, stages: list, shard_size: int, image_format: str = "png", **engine) -> dict:
    from factory.engine.spec import parse_spec

    return parse_spec(
        {
            "name": "bench",
            "seed": 0,
            "source": source,
            "stages": stages,
            "output": {"url": out, "shard_size": shard_size, "image_format": image_format},
            "engine": engine,
        }
    )


def _scenes(count: int, size: int) -> dict:
    return {"kind": "scenes", "count": count, "size": size, "seed": 0}


def _child_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _plan_in_child(source: dict, shard_size: int, out: Path) -> dict:
    """Plan in a fresh process, so its peak RSS is the planner's alone (imports included)."""
    code = (
        "import json, sys, time\n"
        "from factory.engine.shard_plan import plan_shards\nfrom factory.sources.base import open_source\n"
        "from factory.engine.spec import SourceSpec\n"
        f"source = open_source(SourceSpec.model_validate({source!r}))\n"
        "start = time.perf_counter()\n"
        f"plan = plan_shards(source.list_ids(), {shard_size}, lambda name: open({str(out)!r} + '/' + name, 'wb'))\n"
        "print(json.dumps({'seconds': round(time.perf_counter() - start, 2), 'samples': plan.num_samples, "
        "'shards': plan.num_shards}))\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {**json.loads(result.stdout), "peak_rss_mib": round(_child_rss_mib(), 1)}


def bench_plan(tmp: Path) -> dict:
    return _plan_in_child(_scenes(10_000_000, 32), 1000, tmp / "plan-10m")


def bench_listing(tmp: Path) -> dict:
    from bench_listing import write_empty_files

    folder = tmp / "folder-100k"
    folder.mkdir()
    write_empty_files(str(folder), 100_000, 10)
    source = {
        "kind": "folder",
        "path": str(folder),
        "classes": "ade150",
        "image_suffix": "_image.png",
        "mask_suffix": None,
    }
    return _plan_in_child(source, 1000, tmp / "plan-100k")


class MemorySampler:
    """Samples this process's RSS and the largest Ray worker's RSS every `every` seconds."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self.driver_peak = self.worker_peak = 0
        self.marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and p.info["memory_info"] is not None:
                    self.worker_peak = max(self.worker_peak, p.info["memory_info"].rss)

    def mark(self, name: str) -> None:
        self.marks[name] = psutil.Process().memory_info().rss

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _committed(out: Path) -> int:
    stats = out / "stats"
    return len(os.listdir(stats)) if stats.exists() else 0


def _spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    match = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) if match else 0.0


def bench_process(tmp: Path, count: int) -> dict:
    from factory.engine.driver import run_job

    out = tmp / "process"
    stages = [
        {"kind": "bench_stages:ExpandStage", "params": {"variants": 2}, "resources": {"batch_size": 32}},
        {"kind": "bench_stages:RejectStage", "params": {"fraction": 0.25}, "resources": {"batch_size": 64}},
    ]
    spec = _spec(_scenes(count, 32), str(out), stages, shard_size=100)
    shards = count // 100
    with MemorySampler() as mem:
        watcher = threading.Thread(target=_mark_when, args=(mem, out, shards // 10, "driver_rss_at_10pct"), daemon=True)
        watcher.start()
        start = time.perf_counter()
        index = run_job(spec)
        seconds = time.perf_counter() - start
        mem.mark("driver_rss_at_end")
    return {
        "sources": count,
        "samples": index["samples"],
        "rejected": index["rejected"],
        "seconds": round(seconds, 1),
        "samples_per_s": round(index["samples"] / seconds, 1),
        "driver_rss_mib_at_10pct": round(mem.marks.get("driver_rss_at_10pct", 0) / 2**20, 1),
        "driver_rss_mib_at_end": round(mem.marks["driver_rss_at_end"] / 2**20, 1),
        "driver_peak_rss_mib": round(mem.driver_peak / 2**20, 1),
        "largest_worker_rss_mib": round(mem.worker_peak / 2**20, 1),
        "spilled_mib": _spilled_mib(),
    }


def _mark_when(mem: MemorySampler, out: Path, shards: int, name: str) -> None:
    while _committed(out) < shards:
        time.sleep(0.2)
    mem.mark(name)


def bench_stall(tmp: Path) -> dict:
    from factory.engine.driver import run_job

    out, markers = tmp / "stall", tmp / "stall-markers"
    markers.mkdir()
    slow = "scene-0000350"  # in shard 3
    stages = [
        {"kind": "bench_stages:ExpandStage", "params": {"variants": 2}},
        {
            "kind": "bench_stages:RejectStage",
            "resources": {"concurrency": 2, "num_cpus": 0.25},
            "params": {"fraction": 0.25, "sleep_s": 30.0, "sleep_id": slow, "marker_dir": str(markers)},
        },
    ]
    commits: list[float] = []

    def watch() -> None:
        seen = 0
        while not (markers / "done").exists():
            now = _committed(out)
            commits.extend([time.time()] * (now - seen))
            seen = now
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with MemorySampler() as mem:
        start = time.perf_counter()
        index = run_job(_spec(_scenes(2000, 32), str(out), stages, shard_size=100))
        seconds = time.perf_counter() - start
    (markers / "done").write_text("")
    watcher.join()
    began = float((markers / "sleep-start").read_text())
    ended = float((markers / "sleep-end").read_text())
    return {
        "sources": 2000,
        "shards": index["num_shards"],
        "seconds": round(seconds, 1),
        "stall_s": round(ended - began, 1),
        "shards_committed_during_stall": sum(began <= t <= ended for t in commits),
        "driver_peak_rss_mib": round(mem.driver_peak / 2**20, 1),
        "largest_worker_rss_mib": round(mem.worker_peak / 2**20, 1),
    }


def plain_loop(spec, out: Path) -> int:
    """What a user writes by hand, in one process: list, read, encode, and write one tar per shard."""
    from webdataset import TarWriter

    from factory.engine.reader import ShardReader
    from factory.engine.writer import encode_files
    from factory.sources import open_source

    source = open_source(spec.source)
    reader = ShardReader(spec.source.model_dump_json(), "", {}, retries=0, backoff=0.0)
    out.mkdir(parents=True)
    n, f, tar = 0, None, None
    for i, sample_id in enumerate(source.list_ids()):
        shard, index = divmod(i, spec.output.shard_size)
        if index == 0:
            if tar is not None:
                tar.close()
                f.close()
            f = open(out / f"shard-{shard:06d}.tar", "wb")
            tar = TarWriter(f, mtime=0.0)
        sample = reader.load(source, shard, index, sample_id)
        tar.write({"__key__": sample.key, **encode_files(sample, spec.output.image_format, 95, {})})
        n += 1
    tar.close()
    f.close()
    return n


def bench_stall_every_shard(tmp: Path, shards: int = 8, sleep_s: float = 30.0, pool: int = 2) -> dict:
    """One sample of every shard sleeps: the sleeps overlap over the pool, so the job takes about
    shards x sleep / pool, and memory stays bounded (a shard waits in its actor, nothing piles up)."""
    from factory.engine.driver import run_job

    stages = [
        {"kind": "bench_stages:ExpandStage", "params": {"variants": 2}},
        {
            "kind": "bench_stages:RejectStage",
            "resources": {"concurrency": pool, "num_cpus": 0.25},
            "params": {"fraction": 0.25, "sleep_s": sleep_s, "sleep_index": 50},
        },
    ]
    with MemorySampler() as mem:
        start = time.perf_counter()
        index = run_job(_spec(_scenes(shards * 100, 32), str(tmp / "stall-every"), stages, shard_size=100))
        seconds = time.perf_counter() - start
    assert index["num_shards"] == shards and index["complete"]
    return {
        "shards": shards,
        "sleep_s_per_shard": sleep_s,
        "pool": pool,
        "seconds": round(seconds, 1),
        "sleeps_over_pool_s": shards * sleep_s / pool,
        "driver_peak_rss_mib": round(mem.driver_peak / 2**20, 1),
        "largest_worker_rss_mib": round(mem.worker_peak / 2**20, 1),
    }


def bench_loop(tmp: Path) -> dict:
    from factory.engine.driver import run_job
    from factory.sources.scenes import make_scenes

    results = {}
    for size, count in ((128, 2000), (512, 400)):
        scenes = tmp / f"scenes-{size}"
        make_scenes(scenes, count=count, size=size)
        source = {
            "kind": "folder",
            "path": str(scenes),
            "classes": "ade150",
            "image_suffix": "_image.png",
            "mask_suffix": "_mask.png",
        }
        spec = _spec(source, str(tmp / f"engine-{size}"), [], shard_size=100, read_cpus=1.0, write_cpus=1.0)
        # Each side runs twice, alternating: the first engine job on a fresh Ray also pays its workers'
        # imports, the first loop its own imports and a cold page cache. Ratios pair first with first,
        # second with second.
        loop_s, engine_s = {}, {}
        for run in ("first", "second"):
            start = time.perf_counter()
            n_loop = plain_loop(spec, tmp / f"loop-{size}-{run}")
            loop_s[run] = time.perf_counter() - start
            spec.output.url = str(tmp / f"engine-{size}-{run}")
            start = time.perf_counter()
            n_engine = run_job(spec)["samples"]
            engine_s[run] = time.perf_counter() - start
        assert n_loop == n_engine, (n_loop, n_engine)
        results[f"{size}px"] = {
            "samples": n_engine,
            **{f"loop_{run}_s": round(s, 2) for run, s in loop_s.items()},
            **{f"engine_{run}_job_s": round(s, 2) for run, s in engine_s.items()},
            **{f"engine_vs_loop_{run}": round(loop_s[run] / engine_s[run], 2) for run in loop_s},
        }
    return results


def bench_resume(tmp: Path, committed: int = 10_000, new: int = 10) -> dict:
    import s3fs
    import seaweed

    from factory.engine.driver import _plan, run_job
    from factory.output.layout import OutputStore
    from factory.sources import open_source

    ports = seaweed.free_ports()
    server = seaweed.start(tmp / "weed", ports)
    try:
        options = seaweed.options(ports)
        spec = _spec(_scenes(committed + new, 32), "s3://test/resume", [], shard_size=1)
        spec.output.endpoint_url = seaweed.endpoint(ports)
        spec.output.storage_options = {"key": seaweed.KEY, "secret": seaweed.SECRET}
        store = OutputStore.at(spec.output)
        _plan(spec, store, open_source(spec.source))
        fs = s3fs.S3FileSystem(**options)
        stats = {"samples": 1, "failed": 0, "rejected": 0}
        batch = 500
        for start in range(0, committed, batch):  # commit markers of the shards "already done"
            fs.pipe(
                {
                    store.stats_path(s): json.dumps(
                        {**stats, "shard": s, "url": store.public_url("shards", f"{s}")}
                    ).encode()
                    for s in range(start, min(start + batch, committed))
                }
            )
        first_new = store.stats_path(committed)
        times: dict[str, float] = {}

        def watch() -> None:
            probe = s3fs.S3FileSystem(**spec.output.options())
            while "first" not in times:
                probe.invalidate_cache()
                if probe.exists(first_new):
                    times["first"] = time.perf_counter()
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()
        start = time.perf_counter()
        index = run_job(spec)
        end = time.perf_counter()
        return {
            "committed_before": committed,
            "new_shards": new,
            "complete": index["complete"],
            "seconds_to_first_new_commit": round(times.get("first", end) - start, 2),
            "seconds_total": round(end - start, 2),
        }
    finally:
        seaweed.stop(server)


def main() -> None:
    parts = ("plan", "listing", "loop", "process", "stall", "stall_every_shard", "resume", "rows", "cluster")
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(parts), help=f"comma-separated parts of: {', '.join(parts)}")
    p.add_argument("--process", type=int, default=100_000, help="scenes in the process part")
    args = p.parse_args()
    chosen = args.only.split(",")
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, no GPU",
    }
    if {"process", "stall", "loop", "resume"} & set(chosen):
        import ray

        # Started once, before any timing: the parts measure the engine, not Ray's start-up.
        ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for part in parts:
            if part in chosen:
                print(f"running {part} ...", file=sys.stderr, flush=True)
                if part in ("rows", "cluster"):
                    from bench_cluster import run_part

                    results[part] = run_part(part)
                else:
                    fn = globals()[f"bench_{part}"]
                    results[part] = fn(tmp, args.process) if part == "process" else fn(tmp)
                print(json.dumps({part: results[part]}), file=sys.stderr, flush=True)
    out = BENCH / "results" / f"scale-{results['date']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
