"""A job's weights are pinned when it is planned: recorded in the manifest, in every shard's stats and every
sample's json; a resume with other weights is refused; a worker that would load other weights fails.

The plug-in stage `test-brighten` loads a model's config through the loading code every model stage uses
(a local folder here and a hub id through an offline Hugging Face cache; the real S3 server in
tests/models/test_model_cache.py). The in-process executor runs the job: pinning happens on the driver
and in `StageRunner`, which every executor shares.
"""

import json

import numpy as np
import pytest
from helpers import decode_image, folder_spec, load_json, read_tar, write_folder_source
from model_weights import go_offline, hub_snapshot, model_folder

from factory.engine.driver import run_job
from factory.engine.errors import ResumeError, StageSetupFailed
from factory.engine.runner import StageRunner
from factory.engine.spec import parse_spec
from factory.models.weights import WeightsSource, pin
from factory.schema import SpecError
from factory.sources.classes import class_set

BRIGHTEN = "stages_for_tests:BrightenStage"


def brighten_job(tmp_path, out, model: dict, n: int = 4):
    src = write_folder_source(tmp_path / "src", n)
    spec = folder_spec(tmp_path / "src", out, [{"kind": BRIGHTEN, "model": model}], shard_size=2)
    spec["engine"] = {"executor": "in_process"}
    return parse_spec(spec), src


def test_a_job_records_its_weights_in_the_manifest_every_shards_stats_and_every_sample(model_cache, tmp_path):
    folder = model_folder(tmp_path / "model", offset=3)
    spec, src = brighten_job(tmp_path, tmp_path / "out", {"config": str(folder)})
    assert run_job(spec)["samples"] == 4
    out = tmp_path / "out"
    pinned = pin(WeightsSource(str(folder)))
    assert load_json(out / "manifest.json")["weights"] == {BRIGHTEN: {"config": pinned.to_json()}}
    for shard in range(2):
        stats = load_json(out / "stats" / f"shard-{shard:06d}.json")
        assert stats["weights"] == {BRIGHTEN: {"config": pinned.record()}}
        for files in read_tar(out / "shards" / f"shard-{shard:06d}.tar").values():
            meta = json.loads(files["json"])
            assert meta["weights"][BRIGHTEN]["config"]["files"] == {
                "model.safetensors": pinned.files["model.safetensors"]
            }
            image = src[meta["source_id"]][0]
            np.testing.assert_array_equal(decode_image(files["png"]), np.clip(image.astype(int) + 3, 0, 255))


def test_a_resume_with_other_weights_is_refused_naming_the_model_and_the_file(model_cache, tmp_path):
    folder = model_folder(tmp_path / "model")
    out = tmp_path / "out"
    spec, _ = brighten_job(tmp_path, out, {"config": str(folder)})
    run_job(spec)
    (out / "stats" / "shard-000001.json").unlink()  # a shard left to do
    (folder / "model.safetensors").write_bytes(b"fine-tuned since")
    with pytest.raises(ResumeError, match=r"model config of stage .*BrightenStage .*model.safetensors: pinned sha256"):
        run_job(spec)
    assert not (out / "stats" / "shard-000001.json").exists()
    (folder / "model.safetensors").write_bytes(b"\x01\x02")  # the weights it was planned with
    assert run_job(spec)["complete"]
    # --overwrite starts the job over, with the weights of now.
    (folder / "model.safetensors").write_bytes(b"fine-tuned since")
    run_job(spec, overwrite=True)
    assert load_json(out / "manifest.json")["weights"][BRIGHTEN]["config"] == pin(WeightsSource(str(folder))).to_json()


def test_a_worker_whose_model_changed_after_planning_does_not_start(model_cache, tmp_path):
    folder = model_folder(tmp_path / "model")
    pinned = pin(WeightsSource(str(folder)))
    stage = {"kind": BRIGHTEN, "model": {"config": str(folder)}}
    classes = class_set("ade150")
    assert StageRunner(stage, 7, classes, pins={BRIGHTEN: (pinned,)}).stage.offset == 3
    (folder / "config.json").write_text(json.dumps({"offset": 4}))
    with pytest.raises(StageSetupFailed, match=r"holds other files than when the job was planned \(config.json"):
        StageRunner(stage, 7, classes, pins={BRIGHTEN: (pinned,)})


def test_a_hub_model_is_pinned_to_the_commit_its_branch_had_when_planned(model_cache, tmp_path, monkeypatch):
    offline_hub = go_offline(tmp_path / "hf-cache", monkeypatch)
    files = {"config.json": b'{"offset": 2}', "model.safetensors": b"a"}
    planned = hub_snapshot(offline_hub, "factory-test/brighten", files)
    out = tmp_path / "out"
    spec, src = brighten_job(tmp_path, out, {"config": "factory-test/brighten"})
    run_job(spec)
    assert load_json(out / "manifest.json")["weights"][BRIGHTEN]["config"]["revision"] == planned
    first = read_tar(out / "shards" / "shard-000001.tar")

    # main moves to new weights; the resumed job regenerates its shard at the commit it was planned with.
    hub_snapshot(offline_hub, "factory-test/brighten", {"config.json": b'{"offset": 9}', "model.safetensors": b"b"})
    for part in ("stats/shard-000001.json", "shards/shard-000001.tar"):
        (out / part).unlink()
    run_job(spec)
    assert read_tar(out / "shards" / "shard-000001.tar") == first
    assert json.loads(next(iter(first.values()))["json"])["weights"][BRIGHTEN]["config"]["revision"] == planned


def test_a_revision_that_names_no_hub_model_is_a_spec_error(model_cache, tmp_path):
    folder = model_folder(tmp_path / "model")
    spec, _ = brighten_job(tmp_path, tmp_path / "out", {"config": str(folder), "revision": "v1.0"})
    with pytest.raises(SpecError, match=r"^stages\[0\]\.model\.revision: one revision needs exactly one hub model"):
        run_job(spec)
    spec, _ = brighten_job(tmp_path, tmp_path / "out", {"config": str(tmp_path / "absent")})
    with pytest.raises(SpecError, match=r"stages\[0\] .*model config: model path .*absent.* does not exist"):
        run_job(spec)
    assert not (tmp_path / "out").exists()
