"""The engine end to end through a local Ray: folder source -> stages -> shards, with a test plug-in stage."""

import json

import numpy as np
import pytest
from helpers import decode_image, decode_mask, folder_spec, load_json, read_tar, write_folder_source
from PIL import Image

from factory.engine import ResumeError, StageFailed, run_job
from factory.plan import PlanError
from factory.spec import parse_spec

pytestmark = pytest.mark.timeout(300)

INVERT = "stages_for_tests:InvertStage"


def test_pipeline_writes_every_sample_once(ray_local, tmp_path):
    src = write_folder_source(tmp_path / "src", 10)
    out = tmp_path / "out"
    spec = parse_spec(folder_spec(tmp_path / "src", out, [{"kind": INVERT, "params": {"variants": 2}}]))
    index = run_job(spec)
    assert index["complete"] and index["num_shards"] == 3 and index["samples"] == 20
    manifest = load_json(out / "manifest.json")
    assert manifest["spec_hash"] == spec.content_hash() and manifest["plan"]["num_samples"] == 10
    seen = {}
    for shard in range(3):
        stats = load_json(out / "stats" / f"shard-{shard:06d}.json")
        samples = read_tar(out / "shards" / f"shard-{shard:06d}.tar")
        assert stats["samples"] == len(samples) == 2 * stats["sources"]
        assert stats["models"] == {INVERT: {"invert": "none"}}
        for key, files in samples.items():
            assert "." not in key and set(files) == {"png", "seg.png", "json"}
            meta = json.loads(files["json"])
            image, mask = src[meta["source_id"]]
            np.testing.assert_array_equal(decode_mask(files["seg.png"]), mask)
            np.testing.assert_array_equal(decode_image(files["png"]), 255 - image)
            seen[key] = meta
    assert len(seen) == 20
    assert len({m["seed"] for m in seen.values()}) == 20
    assert not (out / "_tmp").exists() or not any((out / "_tmp").iterdir())


def test_bad_inputs_are_recorded_and_the_job_goes_on(ray_local, tmp_path):
    src_dir = tmp_path / "src"
    write_folder_source(src_dir, 6)
    (src_dir / "s-000_image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    data = (src_dir / "s-001_image.png").read_bytes()
    (src_dir / "s-001_image.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.new("L", (16, 16)).save(src_dir / "s-002_mask.png")  # size mismatch
    Image.fromarray(np.full((32, 32), 200, np.uint8), mode="L").save(src_dir / "s-003_mask.png")  # id 200
    spec = parse_spec(folder_spec(src_dir, tmp_path / "out", [{"kind": INVERT, "params": {"fail_ids": ["s-004"]}}]))
    index = run_job(spec)
    assert index["samples"] == 1 and index["failed"] == 5
    reasons = {}
    for shard in range(2):
        stats = load_json(tmp_path / "out" / "stats" / f"shard-{shard:06d}.json")
        reasons.update({f["source_id"]: f["reason"] for f in stats["failures"]})
    assert reasons == {
        "s-000": "corrupt_image", "s-001": "corrupt_image", "s-002": "size_mismatch",
        "s-003": "unknown_class_id", "s-004": "model_error",
    }


def test_resume_skips_committed_and_regenerates_the_rest_identically(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 12)
    out = tmp_path / "out"
    spec = parse_spec(folder_spec(tmp_path / "src", out, [{"kind": INVERT, "params": {"variants": 2}}]))
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
    first = folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": INVERT}])
    run_job(parse_spec(first))
    changed = folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": INVERT, "params": {"variants": 3}}])
    with pytest.raises(ResumeError, match="--output"):
        run_job(parse_spec(changed))
    assert run_job(parse_spec(changed), overwrite=True)["samples"] == 12
    changed["output"]["url"] = str(tmp_path / "elsewhere")
    assert run_job(parse_spec(changed))["samples"] == 12


def test_a_stage_failing_on_everything_stops_the_job(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 8)
    spec = parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [{"kind": "stages_for_tests:AlwaysFailStage"}]))
    with pytest.raises(Exception) as e:
        run_job(spec)
    assert "failed on each of its first 4 samples" in str(e.value)
    assert "model weights are garbage" in str(e.value)
    assert not list((tmp_path / "out" / "shards").glob("*.tar")) if (tmp_path / "out" / "shards").exists() else True


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
        stats = load_json(out / "stats" / "shard-000000.json")
        assert stats["rejected_by_reason"] == {f"{INVERT}:too_dark": 4}
        assert len(read_tar(out / "shards" / "shard-000000.tar")) == 4
        if keep:
            kept = read_tar(out / "rejected" / "shard-000000.tar")
            assert len(kept) == 4
            assert all(json.loads(f["json"])["rejected"]["reason"] == "too_dark" for f in kept.values())
        else:
            assert not (out / "rejected").exists()


def test_a_variant_rejected_before_a_second_expansion_still_completes_its_shard(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 3)
    stages = [
        {"kind": INVERT, "name": "first", "params": {"variants": 2, "reject_ids": ["s-001"]}},
        {"kind": INVERT, "name": "second", "params": {"variants": 3}},
    ]
    index = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", stages)))
    # s-000 and s-002: 2 x 3 samples each; s-001: its 2 first-stage variants rejected, never expanded.
    assert index["complete"] and (index["samples"], index["rejected"]) == (12, 2)


def test_shards_are_identical_however_rows_arrive(ray_local, tmp_path):
    """Many small blocks and two actors per stage reorder rows; the tars must not depend on that."""
    write_folder_source(tmp_path / "src", 24)
    stage = {"kind": INVERT, "params": {"variants": 2}, "resources": {"batch_size": 2, "concurrency": 2}}
    tars = []
    for run in ("a", "b"):
        spec = folder_spec(tmp_path / "src", tmp_path / run, [stage], shard_size=24)
        spec["engine"] = {"read_chunk": 3, "encode_batch_size": 2}
        run_job(parse_spec(spec))
        tars.append((tmp_path / run / "shards" / "shard-000000.tar").read_bytes())
    assert tars[0] == tars[1]
    keys = list(read_tar(tmp_path / "a" / "shards" / "shard-000000.tar"))
    assert keys == sorted(keys) and len(keys) == 48


def test_one_bad_input_with_many_variants_does_not_stop_the_job(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 4)
    stage = {"kind": INVERT, "params": {"variants": 5, "fail_ids": ["s-000"]}}
    index = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", [stage])))
    assert (index["samples"], index["failed"]) == (15, 5)


def test_a_sample_the_writer_cannot_encode_fails_alone(ray_local, tmp_path):
    write_folder_source(tmp_path / "src", 2)
    stages = [{"kind": "stages_for_tests:FloatImageStage"}]
    spec = folder_spec(tmp_path / "src", tmp_path / "out", stages)
    spec["engine"] = {"stop_after_failures": 10}
    index = run_job(parse_spec(spec))
    stats = load_json(tmp_path / "out" / "stats" / "shard-000000.json")
    assert index["failed"] == 2 and set(stats["failures_by_reason"]) == {"stages_for_tests:FloatImageStage:bad_output"}


def test_a_class_map_error_is_a_spec_error_before_anything_is_written(tmp_path):
    from factory.spec import SpecError

    write_folder_source(tmp_path / "src", 2)
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [
        {"kind": "controlnet", "model": {"profile": "tiny"}, "params": {"class_map": {"wall": "Wal"}}},
    ])
    with pytest.raises(SpecError, match=r"stages\[0\]\.params\.class_map"):
        run_job(parse_spec(spec))
    assert not (tmp_path / "out" / "manifest.json").exists()
