"""The engine end to end through a local Ray: folder source -> stages -> shards, with test plug-in stages."""

import json

import numpy as np
import pytest
from helpers import decode_image, decode_mask, folder_spec, load_json, read_tar, write_folder_source
from PIL import Image

from factory.engine.driver import ResumeError, run_job
from factory.engine.errors import JobIncomplete
from factory.engine.runner import GPU_STAND_IN_ENV
from factory.engine.shard_plan import PlanError
from factory.engine.spec import parse_spec
from factory.schema import SpecError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INVERT = "stages_for_tests:InvertStage"
FAST_RETRIES = {"retries": 2, "retry_backoff_s": 0.01}
# What the driver alone decides (which shards are pending, whether the output's spec matches) runs its
# shards in this process: every executor writes the same bytes (test_executors.py), and a Ray Data actor
# pool's start is most of a small job's time. The reruns after each fault in test_faults.py resume under
# Ray Data.
DRIVER = {"engine": {"executor": "in_process"}}


def stats_of(out, shard):
    return load_json(out / "stats" / f"shard-{shard:06d}.json")


def failures_of(out, shard):
    path = out / "failures" / f"shard-{shard:06d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pipeline_writes_every_sample_once(ray_local, tmp_path):
    src = write_folder_source(tmp_path / "src", 10)
    out = tmp_path / "out"
    spec = parse_spec(folder_spec(tmp_path / "src", out, [{"kind": INVERT, "params": {"variants": 2}}]))
    index = run_job(spec)
    assert index["complete"] and index["num_shards"] == 3 and index["samples"] == 20
    assert [s["samples"] for s in load_json(out / "index.json")["shards"]] == [8, 8, 4]
    manifest = load_json(out / "manifest.json")
    assert manifest["spec_hash"] == spec.content_hash() and manifest["plan"]["num_samples"] == 10
    seen = {}
    for shard in range(3):
        stats = stats_of(out, shard)
        samples = read_tar(out / "shards" / f"shard-{shard:06d}.tar")
        assert stats["samples"] == len(samples) == 2 * stats["sources"]
        assert stats["models"] == {INVERT: {"invert": "none"}}
        assert stats["stages"][INVERT]["rows_in"] == stats["sources"] and stats["stages"][INVERT]["retries"] == 0
        assert stats["stages"]["read"]["rows_out"] == stats["sources"]
        assert stats["stages"][INVERT]["peak_private_mib"] > 10  # the worker process's, while it ran this shard
        assert "failures" not in stats and stats["failures_url"] is None
        for key, files in samples.items():
            assert "." not in key and set(files) == {"png", "seg.png", "json"}
            meta = json.loads(files["json"])
            assert key == meta["key"] and key.endswith(f"-{meta['variant']}")
            image, mask = src[meta["source_id"]]
            np.testing.assert_array_equal(decode_mask(files["seg.png"]), mask)
            np.testing.assert_array_equal(decode_image(files["png"]), 255 - image)
            seen[key] = meta
    assert len(seen) == 20
    assert len({m["seed"] for m in seen.values()}) == 20
    # The stage's one actor loaded its model once, reported with the first shard it processed.
    assert sum("worker_setup_s" in stats_of(out, s)["stages"][INVERT] for s in range(3)) == 1
    assert not (out / "_tmp").exists() or not any((out / "_tmp").iterdir())
    assert not (out / "_lease.json").exists()


def test_bad_inputs_are_recorded_and_the_job_goes_on(ray_local, tmp_path):
    src_dir = tmp_path / "src"
    write_folder_source(src_dir, 12)
    (src_dir / "s-000_image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    data = (src_dir / "s-001_image.png").read_bytes()
    (src_dir / "s-001_image.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.new("L", (16, 16)).save(src_dir / "s-004_mask.png")  # size mismatch
    Image.fromarray(np.full((32, 32), 200, np.uint8), mode="L").save(src_dir / "s-005_mask.png")  # id 200
    stage = {"kind": INVERT, "params": {"bad_ids": ["s-008"]}}
    index = run_job(parse_spec(folder_spec(src_dir, tmp_path / "out", [stage])))
    assert index["complete"] and index["samples"] == 7 and index["failed"] == 5
    reasons = {
        f["source_id"]: (f["stage"], f["reason"]) for shard in range(3) for f in failures_of(tmp_path / "out", shard)
    }
    assert reasons == {
        "s-000": ("read", "corrupt_image"),
        "s-001": ("read", "corrupt_image"),
        "s-004": ("read", "size_mismatch"),
        "s-005": ("read", "unknown_class_id"),
        "s-008": (INVERT, "uninvertible"),
    }
    assert stats_of(tmp_path / "out", 0)["failures_by_reason"] == {"read:corrupt_image": 2}


def test_resume_skips_committed_and_regenerates_the_rest_identically(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 12)
    out = tmp_path / "out"
    spec = parse_spec({**folder_spec(tmp_path / "src", out, [{"kind": INVERT, "params": {"variants": 2}}]), **DRIVER})
    run_job(spec)
    shards = out / "shards"
    original = {p.name: p.read_bytes() for p in shards.glob("*.tar")}
    kept_mtime = (shards / "shard-000000.tar").stat().st_mtime_ns
    # Shard 1 crashed after its tar moved but before its stats; shard 2 never left _tmp.
    (out / "stats" / "shard-000001.json").unlink()
    (out / "stats" / "shard-000002.json").unlink()
    (shards / "shard-000002.tar").unlink()
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "shard-000002.dead.tar").write_bytes(b"partial")
    index = run_job(spec)
    assert index["complete"] and index["samples"] == 24
    assert {p.name: p.read_bytes() for p in shards.glob("*.tar")} == original
    assert (shards / "shard-000000.tar").stat().st_mtime_ns == kept_mtime
    assert not (out / "_tmp").exists() or not any((out / "_tmp").iterdir())


def test_changed_spec_is_refused_and_can_go_elsewhere(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4)
    run_job(parse_spec({**folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": INVERT}]), **DRIVER}))
    changed = {
        **folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": INVERT, "params": {"variants": 3}}]),
        **DRIVER,
    }
    with pytest.raises(ResumeError, match="--output"):
        run_job(parse_spec(changed))
    assert run_job(parse_spec(changed), overwrite=True)["samples"] == 12
    changed["output"]["url"] = str(tmp_path / "elsewhere")
    assert run_job(parse_spec(changed))["samples"] == 12


def test_a_stage_failing_on_everything_stops_the_job_and_commits_nothing(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 40)
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": "stages_for_tests:AlwaysFailStage"}], shard_size=2)
    spec["engine"] = {**FAST_RETRIES, "max_failed_shards": 2}
    with pytest.raises(JobIncomplete) as e:
        run_job(parse_spec(spec))
    assert "stages_for_tests:AlwaysFailStage" in str(e.value) and "model weights are garbage" in str(e.value)
    assert not list((tmp_path / "out" / "stats").glob("*.json")) if (tmp_path / "out" / "stats").exists() else True
    index = load_json(tmp_path / "out" / "index.json")
    assert (index["committed"], index["complete"]) == (0, False)


def test_a_transient_stage_error_is_retried_and_nothing_is_lost(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4)
    (tmp_path / "markers").mkdir()
    stage = {"kind": "stages_for_tests:FlakyStage", "params": {"marker_dir": str(tmp_path / "markers"), "failures": 2}}
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [stage])
    spec["engine"] = FAST_RETRIES
    index = run_job(parse_spec(spec))
    assert (index["samples"], index["failed"]) == (4, 0)
    assert stats_of(tmp_path / "out", 0)["stages"]["stages_for_tests:FlakyStage"]["retries"] == 2


def test_out_of_memory_splits_the_batch(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 8)
    stage = {"kind": "stages_for_tests:OomOverTwoStage", "resources": {"batch_size": 8}}
    index = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [stage], shard_size=8)))
    assert (index["samples"], index["failed"]) == (8, 0)
    assert stats_of(tmp_path / "out", 0)["stages"]["stages_for_tests:OomOverTwoStage"]["oom_splits"] == 3


def test_a_shard_above_the_failure_ceiling_is_not_committed(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 8)
    stage = {"kind": INVERT, "params": {"bad_ids": ["s-004", "s-005", "s-006"]}}
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [stage], max_failure_fraction=0.5)
    with pytest.raises(JobIncomplete, match=r"shard 1 at stage commit: 3 of 4 rows failed .*max_failure_fraction"):
        run_job(parse_spec(spec))
    assert (tmp_path / "out" / "stats" / "shard-000000.json").exists()
    assert not (tmp_path / "out" / "shards" / "shard-000001.tar").exists()


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    spec = parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", []))
    with pytest.raises(PlanError, match="no samples"):
        run_job(spec)


def test_rejected_samples_are_counted_and_optionally_kept(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4)
    stage = {"kind": INVERT, "params": {"variants": 2, "reject_ids": ["s-001", "s-002"]}}
    for keep in (False, True):
        out = tmp_path / f"out-{keep}"
        spec = parse_spec(folder_spec(tmp_path / "src", out, [stage], keep_rejected=keep))
        index = run_job(spec)
        assert (index["samples"], index["rejected"], index["failed"]) == (4, 4, 0)
        stats = stats_of(out, 0)
        assert stats["rejected_by_reason"] == {f"{INVERT}:too_dark": 4}
        assert [r["kind"] for r in failures_of(out, 0)] == ["rejected"] * 4
        assert len(read_tar(out / "shards" / "shard-000000.tar")) == 4
        if keep:
            kept = read_tar(out / "rejected" / "shard-000000.tar")
            assert len(kept) == 4
            assert all(json.loads(f["json"])["rejected"]["reason"] == "too_dark" for f in kept.values())
        else:
            assert not (out / "rejected").exists()


def test_two_expanding_stages_with_a_partial_rejection_between_them_never_collide(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 3)
    stages = [
        {"kind": INVERT, "name": "first", "params": {"variants": 2, "reject_variants": ["1"]}},
        {"kind": INVERT, "name": "second", "params": {"variants": 3}},
    ]
    spec = folder_spec(tmp_path / "src", tmp_path / "out", stages, keep_rejected=True)
    index = run_job(parse_spec(spec))
    # Per source: variant 1 rejected by the first stage; variant 0 expanded into 0-0, 0-1, 0-2.
    assert index["complete"] and (index["samples"], index["rejected"]) == (9, 3)
    written = read_tar(tmp_path / "out" / "shards" / "shard-000000.tar")
    rejected = read_tar(tmp_path / "out" / "rejected" / "shard-000000.tar")
    assert sorted(written) == [f"000000-{i:06d}-0-{j}" for i in range(3) for j in range(3)]
    assert sorted(rejected) == [f"000000-{i:06d}-1" for i in range(3)]


def test_shards_are_identical_however_the_pools_are_sized(ray_local, tmp_path):
    """Other pool sizes schedule shards and batches differently; the tars must not depend on that."""
    write_folder_source(tmp_path / "src", 24)
    tars = []
    for run, pool in (("a", 1), ("b", 2)):
        stage = {"kind": INVERT, "params": {"variants": 2}, "resources": {"batch_size": 3, "concurrency": pool}}
        run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / run, [stage], shard_size=8)))
        tars.append([(tmp_path / run / "shards" / f"shard-{s:06d}.tar").read_bytes() for s in range(3)])
    assert tars[0] == tars[1]
    keys = list(read_tar(tmp_path / "a" / "shards" / "shard-000000.tar"))
    assert keys == sorted(keys) and len(keys) == 16


def test_one_bad_input_with_many_variants_does_not_stop_the_job(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4)
    stage = {"kind": INVERT, "params": {"variants": 5, "bad_ids": ["s-000"]}}
    index = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [stage])))
    assert (index["samples"], index["failed"]) == (15, 5)


def test_a_sample_the_writer_cannot_encode_fails_alone(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 2)
    stages = [{"kind": "stages_for_tests:FloatImageStage"}]
    spec = folder_spec(tmp_path / "src", tmp_path / "out", stages, max_failure_fraction=1.0)
    index = run_job(parse_spec(spec))
    assert index["failed"] == 2
    assert set(stats_of(tmp_path / "out", 0)["failures_by_reason"]) == {"stages_for_tests:FloatImageStage:bad_output"}


def test_a_class_map_error_is_a_spec_error_before_anything_is_written(tmp_path):
    write_folder_source(tmp_path / "src", 2)
    spec = folder_spec(
        tmp_path / "src",
        tmp_path / "out",
        [{"kind": "controlnet", "model": {"profile": "tiny"}, "params": {"class_map": {"wall": "Wal"}}}],
    )
    with pytest.raises(SpecError, match=r"stages\[0\]\.params\.class_map"):
        run_job(parse_spec(spec))
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "resources, field",
    [
        (
            {"num_gpus": 1},
            r"stages\[0\]\.resources\.num_gpus: .* asks for 1 GPU per worker, but the largest node has 0",
        ),
        ({"num_cpus": 64}, r"stages\[0\]\.resources\.num_cpus: .* asks for 64 CPU"),
        (
            {"num_cpus": 1, "concurrency": 3},
            r"stages\[\]\.resources\.concurrency: .* need 3.5 CPU .* the cluster has 2",
        ),
    ],
)
def test_resources_the_cluster_cannot_give_are_refused_before_planning(ray_local, tmp_path, resources, field):
    write_folder_source(tmp_path / "src", 2)
    stage = {"kind": "controlnet", "model": {"profile": "tiny"}, "resources": resources}
    with pytest.raises(SpecError, match=field):
        run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [stage])))
    assert not (tmp_path / "out").exists()


def test_a_gpu_stand_in_that_no_node_holds_is_refused_never_run_on_cpus(ray_local, tmp_path, monkeypatch):
    """Tests of several nodes name a custom resource that stands in for GPUs (runner.GPU_STAND_IN_ENV);
    where no node holds it, a GPU stage is refused as on a cluster without GPUs, before anything runs."""
    monkeypatch.setenv(GPU_STAND_IN_ENV, "test_gpu")
    write_folder_source(tmp_path / "src", 2)
    stage = {"kind": INVERT, "resources": {"num_gpus": 1, "num_cpus": 0.5}}
    with pytest.raises(SpecError, match=r"stages\[0\]\.resources\.num_gpus: .* 1 GPU per worker, but .* has 0"):
        run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [stage])))
    assert not (tmp_path / "out").exists()


def test_an_autoscaling_wait_asks_for_the_pools_then_gives_up_with_the_field(ray_local, tmp_path, caplog):
    write_folder_source(tmp_path / "src", 2)
    spec = folder_spec(
        tmp_path / "src",
        tmp_path / "out",
        [{"kind": "controlnet", "model": {"profile": "tiny"}, "resources": {"num_gpus": 1, "concurrency": 2}}],
    )
    spec["engine"] = {"resource_wait_s": 1.0}
    with caplog.at_level("INFO", logger="factory"):
        with pytest.raises(SpecError, match=r"after waiting 1s: stages\[0\]\.resources\.num_gpus"):
            run_job(parse_spec(spec))
    assert "waiting up to 1s for the cluster" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_shard_too_large_for_the_object_store_is_refused(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4, size=64)
    stage = {"kind": INVERT, "params": {"variants": 50}}
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [stage], shard_size=1_000_000)
    with pytest.raises(SpecError, match=r"output\.shard_size: a shard of 1000000 sources .* Use shard_size <= \d+"):
        run_job(parse_spec(spec))
    assert not (tmp_path / "out").exists()
