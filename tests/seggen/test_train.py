"""Training the SegGen models on Ray Train with tiny configs: specs, data order, checkpoints, resume, loading."""

from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import yaml
from helpers import REPO
from safetensors.torch import load_file

from factory.models.tiny_diffusion import tiny_sdxl_dir
from factory.sample import Sample
from factory.schema import SpecError
from factory.seggen.data import LoaderBatches, PairStream
from factory.seggen.spec import TrainResumeError, load_train_spec, parse_train_spec
from factory.seggen.train import main_train, train, train_mask2img, train_text2mask
from factory.sources.classes import class_set
from factory.sources.palettes import Palette
from factory.sources.scenes import make_scenes
from factory.stages import StageContext
from factory.stages.mask2img import Mask2ImgStage
from factory.stages.text2mask import Text2MaskStage

pytestmark = pytest.mark.timeout(900)

JOBS = REPO / "jobs"
ADE = class_set("ade150")


def make_source(root: Path) -> Path:
    make_scenes(root, count=4, size=48)
    return root


def spec_data(source: Path, out, **changes) -> dict:
    return {
        "name": "tiny",
        "source": {
            "kind": "folder",
            "path": str(source),
            "classes": "ade150",
            "image_suffix": "_image.png",
            "mask_suffix": "_mask.png",
        },
        "model": {"profile": "tiny"},
        "steps": 6,
        "batch_size": 1,
        "lr": 1e-3,
        "resolution": 32,
        "checkpoint_every": 3,
        "use_gpu": False,
        "loader_workers": 0,
        "output": {"url": str(out)},
        **changes,
    }


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("train-scenes"))


@pytest.fixture(scope="module")
def reference(ray_local, scenes, tmp_path_factory):
    """An uninterrupted 6-step Text2Mask run, checkpointed at steps 3 and 6."""
    out = tmp_path_factory.mktemp("train-reference")
    spec = parse_train_spec(spec_data(scenes, out))
    return spec, train_text2mask(spec), out


def unet_weights(folder: Path) -> dict:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_shipped_train_specs_validate():
    files = sorted(JOBS.glob("train_*.yaml"))
    assert {f.name for f in files} >= {
        "train_text2mask.yaml",
        "train_mask2img.yaml",
        "train_text2mask_tiny.yaml",
        "train_mask2img_tiny.yaml",
    }
    for f in files:
        spec = load_train_spec(f)
        tiny = f.stem.endswith("_tiny")
        assert (spec.model.profile == "tiny") == tiny
        if not tiny:  # the paper's settings
            assert (spec.steps, spec.resolution, spec.use_gpu) == (30000, 768, True)


def test_spec_errors_name_the_field_and_hash_ignores_where_and_how_long(tmp_path):
    good = spec_data(tmp_path, tmp_path / "out")
    with pytest.raises(SpecError, match="steps"):
        parse_train_spec({**good, "steps": 0})
    with pytest.raises(SpecError, match="learning_rate"):
        parse_train_spec({**good, "learning_rate": 1})
    with pytest.raises(SpecError, match="mixed_precision"):
        parse_train_spec({**good, "mixed_precision": "fp8"})
    base = parse_train_spec(good).content_hash()
    moved = {**good, "steps": 99, "checkpoint_every": 7, "output": {"url": "s3://elsewhere"}, "loader_workers": 3}
    assert parse_train_spec(moved).content_hash() == base
    assert parse_train_spec({**good, "lr": 1e-4}).content_hash() != base
    assert parse_train_spec({**good, "palette_seed": 1}).content_hash() != base


@pytest.mark.integration
def test_batches_are_a_pure_function_of_seed_rank_and_step(scenes, tmp_path):
    spec = parse_train_spec(spec_data(scenes, tmp_path, batch_size=2))
    palette = Palette.for_classes(ADE)
    stream = PairStream(spec, "mask2img", palette, 0, 1)
    epoch = [i for k in range(2) for i in stream.batch_ids(k)]
    assert sorted(epoch) == sorted(stream.ids) and len(stream.ids) == 4
    assert [stream.batch_ids(k) for k in range(4)] == [
        PairStream(spec, "mask2img", palette, 0, 1).batch_ids(k) for k in range(4)
    ]
    shares = [set(PairStream(spec, "mask2img", palette, r, 2).batch_ids(0)) for r in range(2)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(stream.ids)

    batch, again = stream.batch(5), stream.batch(5)
    assert batch["colour"].shape == (2, 3, 32, 32) and batch["image"].shape == (2, 3, 32, 32)
    assert batch["time_ids"].shape == (2, 6) and batch["time_ids"][0, 4:].tolist() == [32, 32]
    assert all(torch.equal(batch[k], again[k]) for k in ("colour", "image", "time_ids"))
    assert batch["prompt"] == again["prompt"] and batch["prompt"][0].startswith("a photo of ")
    # Loader processes deal the batches among themselves; the loader still yields them in order.
    loader = torch.utils.data.DataLoader(
        LoaderBatches(spec, "mask2img", palette, 0, 1, 3), batch_size=None, num_workers=2
    )
    for k, got in zip(range(3, 7), loader):
        want = stream.batch(k)
        assert got["prompt"] == want["prompt"] and torch.equal(got["image"], want["image"])
    pixels = (batch["colour"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, 3)
    colours = {tuple(c) for c in pixels.tolist()}
    assert colours <= {tuple(c) for c in palette._table().tolist()}


@pytest.mark.e2e
def test_text2mask_trains_checkpoints_and_loads_into_the_stage(reference, model_cache):
    spec, info, out = reference
    assert info["steps"] == 6 and info["starts"] == [0] and info["kind"] == "text2mask"
    assert info["probe_loss"] < info["probe_loss_start"]  # the loss on a fixed batch went down
    for step in (3, 6):
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        assert {p.name for p in ckpt.iterdir()} == {
            "unet",
            "optimizer.pt",
            "state.json",
            "palette.json",
            "seggen.json",
            "_COMPLETE",
        }
    final = out / "final"
    assert {p.name for p in final.iterdir()} == {"unet", "palette.json", "seggen.json", "_COMPLETE"}
    for a, b in zip(unet_weights(final).values(), unet_weights(out / "checkpoints" / "step-000006").values()):
        assert torch.equal(a, b)

    stage = Text2MaskStage(
        Text2MaskStage.Params(maps=1, steps=2, resolution=32),
        Text2MaskStage.Model(base=tiny_sdxl_dir(), weights=str(final)),
        StageContext(label="text2mask", job_seed=0, classes=ADE, device="cpu"),
    )
    stage.setup()
    trained = unet_weights(final)
    for name, param in stage.pipe.unet.state_dict().items():
        assert torch.equal(param, trained[name])
    assert np.array_equal(stage.palette.colors, Palette.for_classes(ADE).colors)
    out_sample = stage.process([Sample(shard=0, index=0, source_id="x", meta={"caption": "a room"})])[0]
    assert out_sample.ok and out_sample.mask.shape == (32, 32)
    assert stage.model_ids() == {"base": tiny_sdxl_dir(), "text2mask": str(final)}


@pytest.mark.e2e
def test_a_finished_run_is_not_redone_and_another_spec_is_refused(reference):
    spec, info, out = reference
    assert train_text2mask(spec) == info
    with pytest.raises(TrainResumeError, match="already holds a text2mask run"):
        train_text2mask(spec.model_copy(update={"lr": 1e-4}))
    with pytest.raises(TrainResumeError, match="text2mask"):
        train_mask2img(spec)


@pytest.mark.e2e
def test_a_failed_run_resumes_from_its_checkpoint_at_the_right_step(reference, ray_local, tmp_path):
    """An unreadable image in batch 3 fails the run right after the step-3 checkpoint; once repaired,
    the rerun resumes at step 3 and ends bit-identical to the uninterrupted run."""
    ref_spec, ref_info, ref_out = reference
    source = make_source(tmp_path / "scenes")
    out = tmp_path / "out"
    spec = parse_train_spec(spec_data(source, out))
    stream = PairStream(spec, "text2mask", Palette.for_classes(ADE), 0, 1)
    victim = stream.batch_ids(3)[0]
    assert victim not in {i for k in range(3) for i in stream.batch_ids(k)}
    image = source / f"{victim}_image.png"
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    with pytest.raises(Exception, match="unusable"):
        train_text2mask(spec)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert (out / "checkpoints" / "step-000003" / "_COMPLETE").exists() and not (out / "final").exists()

    image.write_bytes(good)
    info = train_text2mask(spec)
    assert info["starts"] == [0, 3] and info["steps"] == 6
    assert info["probe_loss_start"] == ref_info["probe_loss_start"]
    resumed, uninterrupted = unet_weights(out / "final"), unet_weights(ref_out / "final")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.e2e
def test_mask2img_trains_data_parallel_to_s3_and_loads_into_the_stage(ray_local, s3_server, scenes, tmp_path, capsys):
    _, options = s3_server
    spec_file = tmp_path / "train.yaml"
    # Two data-parallel workers (DDP over gloo), each reading through a loader process.
    data = spec_data(
        scenes,
        "s3://test/mask2img",
        steps=4,
        batch_size=2,
        checkpoint_every=2,
        keep_checkpoints=1,
        num_workers=2,
        cpus_per_worker=0.5,
        loader_workers=1,
    )
    data["output"] = {"url": "s3://test/mask2img", "storage_options": options}
    spec_file.write_text(yaml.safe_dump(data))
    assert main_train("mask2img", str(spec_file)) == 0
    assert "mask2img: 4 steps" in capsys.readouterr().out

    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    # keep_checkpoints: 1 deleted step 2 once step 4 was complete (SeaweedFS may still list the empty folder).
    ckpt = "test/mask2img/checkpoints"
    assert fs.exists(f"{ckpt}/step-000004/_COMPLETE") and fs.exists(f"{ckpt}/step-000004/optimizer.pt")
    assert not fs.exists(f"{ckpt}/step-000002/_COMPLETE") and not fs.exists(f"{ckpt}/step-000002/optimizer.pt")
    assert {p.rsplit("/", 1)[-1] for p in fs.ls("test/mask2img/final")} == {
        "controlnet",
        "palette.json",
        "seggen.json",
        "_COMPLETE",
    }
    info = train("mask2img", parse_train_spec(data))
    assert info["probe_loss"] < info["probe_loss_start"] and info["starts"] == [0]

    stage = Mask2ImgStage(
        Mask2ImgStage.Params(images=1, steps=2, resolution=32),
        Mask2ImgStage.Model(base=tiny_sdxl_dir(), weights="s3://test/mask2img/final", storage_options=options),
        StageContext(label="mask2img", job_seed=0, classes=ADE, device="cpu"),
    )
    stage.setup()
    mask = np.full((24, 24), ADE.index("grass"), dtype=np.uint8)
    out = stage.process([Sample(shard=0, index=0, source_id="m", mask=mask)])[0]
    assert out.ok and out.image.shape == (24, 24, 3) and np.array_equal(out.mask, mask)
