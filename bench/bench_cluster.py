"""Two parts of bench/bench_scale.py that run in their own processes: a shard row's memory in a stage
worker, and a job on several Ray nodes that loses one.

- rows:    one stage hop (row in, an image per sample made, row out) on a shard of 100 samples at 512 px,
           in a fresh process for each way of carrying a row: the pickled `bytes` in an Arrow value (the
           engine before factory/engine/executors/rows.py) and the out-of-band buffers it uses now. Peak
           private memory above the process's before the hop (the input row is mapped from a file, as a
           block from the object store, so its pages are shared), per shard and in rows' sizes.
           Then each stage actor's peak private memory per shard inside a running job (bench_actors): the
           whole process, from the `peak_private_mib` each shard's stats record per stage, against the row.
- cluster: a head and three worker nodes (`ray.cluster_utils.Cluster`) on this machine, 20,000 scenes at
           32 px through two cheap stages (K=2, 25% rejected), shard_size 100; one worker node killed
           (raylet and workers, SIGKILL) once 30% of the shards are committed: samples/s before and after,
           seconds from the kill to the next commit and the longest pause after it, and every shard
           committed once (tars, stats and sample keys counted).

    .venv/bin/python bench/bench_cluster.py rows|cluster   # prints the part's JSON
    .venv/bin/python bench/bench_cluster.py rows SHARDS SHARD_SIZE PX   # the job of `rows` at another size
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def run_part(part: str) -> dict:
    """The part in a child process with its own Ray temp folder (a Cluster leaves its address file there)."""
    env = {
        **os.environ,
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, __file__, part], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench_cluster.py {part} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- rows ------------------------------------------------------------------------------------------------


def _bytes_row(work) -> pa.Table:
    """How a row was carried before rows.py: one pickle as `bytes`, copied into the Arrow value."""
    raw = pickle.dumps(work, protocol=5)
    return pa.table({"shard": pa.array([work.shard], pa.int64()), "work": pa.array([raw], pa.large_binary())})


def _bytes_works(table: pa.Table) -> list:
    return [pickle.loads(raw) for raw in table.column("work").to_pylist()]


def _codec(name: str):
    from factory.engine.executors.rows import shard_row, shard_works

    return (shard_row, shard_works) if name == "buffers" else (_bytes_row, _bytes_works)


def _write_row(codec: str, path: Path) -> int:
    """A shard of 100 samples at 512 px as a row, in an Arrow file the hop maps (as an object-store block)."""
    from factory.engine.records import ShardWork
    from factory.sample import Sample

    rng = np.random.default_rng(0)
    samples = [
        Sample(
            shard=0,
            index=i,
            source_id=f"s{i}",
            image=rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
            mask=rng.integers(0, 150, (512, 512), dtype=np.uint8),
        )
        for i in range(100)
    ]
    row = _codec(codec)[0](ShardWork(0, samples, 0.0))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, row.schema) as writer:
        writer.write_table(row)
    return path.stat().st_size


def _statm() -> tuple[int, int]:
    """(resident, shared) bytes of this process; resident less shared is its private memory."""
    resident, shared = (int(v) for v in Path("/proc/self/statm").read_text().split()[1:3])
    return resident * os.sysconf("SC_PAGE_SIZE"), shared * os.sysconf("SC_PAGE_SIZE")


def _hop(codec: str, path: str) -> dict:
    """One stage hop in this fresh process: its peak private memory above where it started. The input row
    is mapped from a file, as a block from the object store: its pages are shared, not private. The peak
    is the kernel's (ru_maxrss, resident) less the shared pages at the end, which only grew meanwhile."""
    import resource

    write, read = _codec(codec)
    resident, shared = _statm()
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    [work] = read(table)
    for s in work.samples:  # the stage: a new image per sample, as a synthesis stage makes
        s.image = 255 - s.image
    write(work)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - _statm()[1]
    return {"peak_growth_mib": round((peak - (resident - shared)) / 2**20, 1)}


def bench_rows(*job_size: str) -> dict:
    """Peak private memory of one hop, per way of carrying a row; the stage's own new images (3/4 of the
    row here) are in both. Then the job of bench_actors, at its default size or at `job_size` (shards,
    shard size, px: a test's smaller run)."""
    found = {}
    folder = Path(tempfile.mkdtemp())
    for codec in ("bytes", "buffers"):
        row_mib = _write_row(codec, folder / f"{codec}.arrow") / 2**20
        command = [sys.executable, __file__, "hop", codec, str(folder / f"{codec}.arrow")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        found[codec] = {**json.loads(done.stdout.strip().splitlines()[-1]), "row_mib": row_mib}
    return {
        "row_mib": round(found["buffers"]["row_mib"], 1),
        **{f"peak_mib_per_shard_{codec}": r["peak_growth_mib"] for codec, r in found.items()},
        **{f"rows_held_{codec}": round(r["peak_growth_mib"] / r["row_mib"], 2) for codec, r in found.items()},
        "in_a_job": bench_actors(*(int(v) for v in job_size)),
    }


def bench_actors(shards: int = 4, shard_size: int = 100, size: int = 512) -> dict:
    """Each stage actor's peak private memory per shard inside a running job (the `peak_private_mib` every
    shard's stats record per stage: the whole process, its interpreter, Ray and the stage included), against
    the shard row it was handed: a local Ray of two CPUs, scenes at `size` px through a stage that makes a
    new image per sample and one that passes rows on."""
    import ray

    from factory.engine.driver import run_job
    from factory.engine.spec import parse_spec
    from factory.output.layout import OutputStore
    from factory.sources.scenes import render_scene

    image, mask = render_scene(size, seed=0, index=0)
    row_mib = shard_size * (image.nbytes + mask.nbytes) / 2**20
    stages = [
        {"kind": "bench_stages:ExpandStage", "name": "expand", "params": {"variants": 1}},
        {"kind": "bench_stages:RejectStage", "name": "pass", "params": {"fraction": 0.0}},
    ]
    for st in stages:
        st["resources"] = {"num_cpus": 0.5, "batch_size": 25}
    out = Path(tempfile.mkdtemp()) / "out"
    source = {"kind": "scenes", "count": shards * shard_size, "size": size, "seed": 0}
    spec = {"name": "actors", "seed": 0, "source": source, "stages": stages}
    spec["output"] = {"url": str(out), "shard_size": shard_size, "image_format": "png"}
    job = parse_spec(spec)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        run_job(job)
    finally:
        ray.shutdown()
    peaks: dict[str, list[float]] = {}
    for _, stats in OutputStore.at(job.output).iter_stats():
        for label, step in stats["stages"].items():
            if step.get("peak_private_mib"):
                peaks.setdefault(label, []).append(step["peak_private_mib"])
    return {
        "row_mib": round(row_mib, 1),
        **{
            f"peak_private_mib_{label}": {"median": float(np.median(v)), "max": max(v), "shards": len(v)}
            for label, v in peaks.items()
        },
        **{f"peak_private_rows_{label}": round(max(v) / row_mib, 2) for label, v in peaks.items()},
    }


# -- cluster ---------------------------------------------------------------------------------------------


def bench_cluster(sources: int = 20_000, kill_at: float = 0.3) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from factory.engine.driver import run_job
    from factory.engine.spec import parse_spec

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    out = Path(tempfile.mkdtemp()) / "out"
    stages = [
        {"kind": "bench_stages:ExpandStage", "params": {"variants": 2}, "resources": {"batch_size": 32}},
        {"kind": "bench_stages:RejectStage", "params": {"fraction": 0.25}, "resources": {"batch_size": 64}},
    ]
    for st in stages:
        st["resources"].update(num_cpus=0.25, concurrency=3)
    spec = parse_spec(
        {
            "name": "bench-cluster",
            "seed": 0,
            "source": {"kind": "scenes", "count": sources, "size": 32, "seed": 0},
            "stages": stages,
            "output": {"url": str(out), "shard_size": 100, "image_format": "png", "shared_filesystem": True},
        }
    )
    shards = sources // 100
    commits: list[tuple[float, int]] = []
    found: dict = {}
    job = threading.Thread(target=lambda: found.update(index=run_job(spec, address=cluster.address)), daemon=True)
    start = time.time()
    job.start()
    killed = None
    while job.is_alive():
        done = len(os.listdir(out / "stats")) if (out / "stats").exists() else 0
        if not commits or commits[-1][1] != done:
            commits.append((time.time(), done))
        if killed is None and done >= kill_at * shards:
            killed = time.time()
            cluster.remove_node(workers[0], allow_graceful=False)
        time.sleep(0.1)
    end = time.time()
    ray.shutdown()
    cluster.shutdown()
    return {**_cluster_figures(found["index"], out, commits, start, killed, end), "sources": sources, "shards": shards}


def _cluster_figures(index: dict, out: Path, commits: list, start: float, killed: float | None, end: float) -> dict:
    assert killed is not None, "the job ended before 30% of its shards were committed"
    per_shard = index["samples"] / index["num_shards"]
    before = [c for c in commits if c[0] <= killed]
    after = [c for c in commits if c[0] > killed]
    first, at_kill = before[1] if len(before) > 1 else before[0], before[-1]
    gaps = [b[0] - a[0] for a, b in zip([before[-1], *after], after, strict=False)] or [end - killed]
    keys, tars = set(), sorted((out / "shards").glob("*.tar"))
    written = 0
    for path in tars:
        with tarfile.open(path) as tar:
            names = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        written += len(names)
        keys |= names
    return {
        "samples": index["samples"],
        "complete": index["complete"],
        "committed_shards": index["committed"],
        "tars": len(tars),
        "stats_files": len(list((out / "stats").glob("*.json"))),
        "unique_sample_keys": len(keys),
        "duplicate_sample_keys": written - len(keys),
        "samples_per_s_before_kill": round((at_kill[1] - first[1]) * per_shard / max(at_kill[0] - first[0], 1e-9), 1),
        "samples_per_s_after_kill": round((index["num_shards"] - at_kill[1]) * per_shard / (end - killed), 1),
        "seconds_from_kill_to_next_commit": round(after[0][0] - killed, 1) if after else None,
        "longest_pause_after_kill_s": round(max(gaps), 1),
        "job_seconds": round(end - start, 1),
    }


if __name__ == "__main__":
    if sys.argv[1] == "hop":
        print(json.dumps(_hop(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps(globals()[f"bench_{sys.argv[1]}"](*sys.argv[2:])))
