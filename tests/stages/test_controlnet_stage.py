"""The ControlNet ImgSyn stage on the tiny pipeline: shapes, exact masks, seeds, prompts and failures."""

from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from factory.sample import Sample
from factory.sources.classes import IGNORE, ade150_palette, class_set
from factory.stages import StageContext, resolve_stage
from factory.stages.controlnet import ControlNetStage

pytestmark = pytest.mark.timeout(300)

K = 3
ADE = class_set("ade150")


def make_stage(job_seed=0, classes=ADE, **params):
    params = {"variants": K, "steps": 2, "resolution": 32, **params}
    stage = ControlNetStage(
        ControlNetStage.Params(**params),
        ControlNetStage.Model(profile="tiny"),
        StageContext(label="synth", job_seed=job_seed, classes=classes, device="cpu"),
    )
    stage.setup()
    return stage


class Recorder:
    """Wraps the pipeline to keep the arguments of every call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def mask_sample(index=0, shape=(40, 56), source_id=None, meta=None):
    mask = np.full(shape, ADE.index("wall"), dtype=np.uint8)
    mask[: shape[0] // 3] = ADE.index("sky")
    mask[-4:, :5] = IGNORE
    instances = np.zeros(shape, dtype=np.int32)
    instances[10:20, 10:30] = 7
    return Sample(
        shard=2,
        index=index,
        source_id=source_id or f"src-{index}",
        image=None,
        mask=mask,
        instances=instances,
        meta=dict(meta or {}),
    )


@pytest.fixture(scope="module")
def stage(model_cache):
    return make_stage()


def test_registered_and_validated():
    assert resolve_stage("controlnet") is ControlNetStage
    assert ControlNetStage.uses_gpu
    with pytest.raises(ValidationError):
        ControlNetStage.Params(variants=0)
    with pytest.raises(ValidationError):
        ControlNetStage.Params(steps=2, sampler="euler")
    with pytest.raises(ValidationError):
        ControlNetStage.Model(profile="huge")
    assert "sources_per_call" not in ControlNetStage.Params.model_fields


def test_k_variants_with_exact_masks(stage):
    src = mask_sample()
    mask, instances = src.mask.copy(), src.instances.copy()
    out = stage.process([src])
    assert stage.variants_per_input() == K and len(out) == K
    assert [s.variant for s in out] == [str(v) for v in range(K)]
    assert [s.key for s in out] == [f"000002-000000-{v}" for v in range(K)]
    for s in out:
        assert s.ok and s.source_id == "src-0"
        assert s.image.shape == (40, 56, 3) and s.image.dtype == np.uint8
        assert s.mask.dtype == np.uint8 and np.array_equal(s.mask, mask)
        assert np.array_equal(s.instances, instances)
    assert not np.array_equal(out[0].image, out[1].image)  # each variant has its own seed


def test_prompt_and_meta(stage):
    out = stage.process([mask_sample()])
    synthesis = {
        "stage": "synth",
        "steps": 2,
        "guidance": 7.5,
        "resolution": 32,
        "size": [24, 32],
        "models": {"base": "tiny:controlnet-seg-sd15-v1", "controlnet": "tiny:controlnet-seg-sd15-v1"},
    }
    for s in out:
        assert s.meta["prompt"] == "a photo of wall, sky"  # most pixels first
        assert "variant" not in s.meta and s.meta["seed"] == s.seed(0)
        assert s.meta["synthesis"] == synthesis
    assert stage.model_ids() == synthesis["models"]

    given = stage.process([mask_sample(meta={"prompt": "a cosy attic", "caption": "not this"})])
    assert {s.meta["prompt"] for s in given} == {"a cosy attic"}
    captioned = stage.process([mask_sample(meta={"caption": "a captioned attic"})])
    assert {s.meta["prompt"] for s in captioned} == {"a captioned attic"}  # the precedence of factory.stages.diffusion

    custom = make_stage(prompt="{classes} under a grey sky, photo", negative_prompt="blurry")
    custom.pipe = Recorder(custom.pipe)
    out = custom.process([mask_sample()])
    assert out[0].meta["prompt"] == "wall, sky under a grey sky, photo"
    assert custom.pipe.calls[0]["negative_prompt"] == ["blurry"] * K


def test_deterministic_per_job_seed(stage):
    first = stage.process([mask_sample()])
    again = make_stage().process([mask_sample()])  # a fresh worker, reloaded from the cache
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    other = make_stage(job_seed=1).process([mask_sample()])
    assert all(not np.array_equal(a.image, b.image) for a, b in zip(first, other))


def test_calls_batch_variants_and_keep_order(stage):
    stage.pipe = Recorder(stage.pipe)
    try:
        inputs = [mask_sample(0), Sample(shard=2, index=1, source_id="src-1"), mask_sample(2, shape=(32, 32))]
        out = stage.process(inputs)
        calls = stage.pipe.calls
    finally:
        stage.pipe = stage.pipe.pipe
    assert [(s.index, s.variant) for s in out] == [(i, str(v)) for i in range(3) for v in range(K)]
    assert [s.ok for s in out] == [True] * K + [False] * K + [True] * K
    assert out[-1].image.shape == (32, 32, 3)
    # One call per generation size, all K variants in it.
    assert [(c["height"], c["width"], len(c["prompt"]), len(c["generator"])) for c in calls] == [
        (24, 32, K, K),
        (32, 32, K, K),
    ]
    cond = np.asarray(calls[0]["image"][0])
    assert cond.shape == (24, 32, 3)
    colours = {tuple(c) for c in cond.reshape(-1, 3)}
    palette = ade150_palette()
    assert colours == {tuple(palette[ADE.index("wall")]), tuple(palette[ADE.index("sky")]), (0, 0, 0)}


def test_no_mask_fails_each_variant(stage):
    out = stage.process([Sample(shard=0, index=5, source_id="img-only", image=np.zeros((8, 8, 3), np.uint8))])
    assert len(out) == K and [s.variant for s in out] == [str(v) for v in range(K)]
    for s in out:
        assert not s.ok and s.image is None
        assert s.error["stage"] == "synth" and s.error["reason"] == "no_mask"


def test_one_call_per_generation_size(model_cache):
    stage = make_stage(variants=2)
    stage.pipe = Recorder(stage.pipe)
    inputs = [mask_sample(0), mask_sample(1, shape=(32, 32)), mask_sample(2)]
    out = stage.process(inputs)
    sizes = [(c["height"], c["width"], len(c["prompt"])) for c in stage.pipe.calls]
    assert sizes == [(24, 32, 4), (32, 32, 2)]
    assert [(s.index, s.variant) for s in out] == [(i, str(v)) for i in range(3) for v in range(2)]
    assert [s.image.shape[:2] for s in out] == [(40, 56)] * 2 + [(32, 32)] * 2 + [(40, 56)] * 2


def test_batched_calls_match_single_source_calls(model_cache):
    """A batch generated in one call gives the images each source gets alone, to within float rounding.

    Every image has its own generator and prompts pad to CLIP's fixed 77 tokens, so nothing but the
    arithmetic depends on the batch. On CPU the kernels give (nearly) the same bits at every batch size; on
    a GPU, cuBLAS/cuDNN pick algorithms per shape, so bits can differ with the batch size. That is fine:
    the engine fixes each batch's composition by the shard's contents, so a regenerated shard repeats the
    same calls and the same bits on the same hardware.
    """
    stage = make_stage(variants=2)
    inputs = [mask_sample(0), mask_sample(1, meta={"prompt": "a tall tower"}), mask_sample(2, shape=(32, 32))]
    batched = stage.process([replace(s, meta=dict(s.meta)) for s in inputs])
    single = [v for s in inputs for v in stage.process([s])]
    assert [(s.index, s.variant) for s in batched] == [(s.index, s.variant) for s in single]
    for a, b in zip(batched, single):
        assert a.meta == b.meta
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2


def test_class_map_and_unmapped_classes_are_black(model_cache):
    voc = class_set("voc")
    stage = make_stage(classes=voc, variants=1, class_map={"cat": "animal", "person": "person", "dog": None})
    stage.pipe = Recorder(stage.pipe)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :10] = voc.index("cat")
    mask[:, 10:20] = voc.index("person")
    mask[:, 20:] = voc.index("dog")
    out = stage.process([Sample(shard=0, index=0, source_id="voc-0", mask=mask)])
    assert out[0].ok and out[0].meta["prompt"] == "a photo of dog, cat, person"
    cond = np.asarray(stage.pipe.calls[0]["image"][0])
    palette = ade150_palette()
    assert cond.shape == (32, 32, 3)
    assert (cond[:, :10] == palette[ADE.index("animal")]).all()
    assert (cond[:, 10:20] == palette[ADE.index("person")]).all()
    assert (cond[:, 20:] == 0).all()


def test_generation_size_keeps_aspect_and_multiple(stage):
    assert stage.multiple == 8  # the tiny pipeline's own multiple is 4; the SD pipelines want 8
    assert stage.generation_size(480, 640) == (24, 32)
    assert stage.generation_size(640, 480) == (32, 24)
    assert stage.generation_size(10, 2000) == (8, 32)


def test_a_chosen_attention_backend_applies_to_the_denoisers_only(model_cache):
    """`model.speed.sdpa` holds inside the UNet and the ControlNet, never around the VAE (whose attention
    flash kernels cannot take)."""
    import torch

    stage = ControlNetStage(
        ControlNetStage.Params(variants=1, steps=2, resolution=32),
        ControlNetStage.Model(profile="tiny", speed={"sdpa": "math"}),
        StageContext(label="synth", job_seed=0, classes=ADE, device="cpu"),
    )
    stage.setup()
    flash_enabled: dict[str, list[bool]] = {}
    # Recorded inside each model's forward (by its first layer), where the backend applies.
    for name, module in (
        ("unet", stage.pipe.unet.conv_in),
        ("controlnet", stage.pipe.controlnet.conv_in),
        ("vae", stage.pipe.vae.decoder.conv_in),
    ):
        module.register_forward_pre_hook(
            lambda _m, _a, name=name: flash_enabled.setdefault(name, []).append(torch.backends.cuda.flash_sdp_enabled())
        )
    assert stage.process([mask_sample(shape=(32, 32))])[0].ok
    assert flash_enabled["unet"] and not any(flash_enabled["unet"])
    assert flash_enabled["controlnet"] and not any(flash_enabled["controlnet"])
    assert flash_enabled["vae"] == [True]
    assert torch.backends.cuda.flash_sdp_enabled()
