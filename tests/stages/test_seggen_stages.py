"""The SegGen stages on tiny SDXL models: Text2Mask decoding, Mask2Img conditioning, variants, seeds, meta."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from factory.engine.writer import encode_files
from factory.sample import Sample
from factory.sources.classes import IGNORE, class_set
from factory.sources.palettes import EDGE_COLOR, Palette
from factory.stages import StageContext, resolve_stage
from factory.stages.mask2img import Mask2ImgStage
from factory.stages.text2mask import Text2MaskStage

pytestmark = pytest.mark.timeout(400)

ADE = class_set("ade150")


def make(cls, job_seed=0, classes=ADE, label=None, **params):
    defaults = {"steps": 2, "resolution": 32, ("maps" if cls is Text2MaskStage else "images"): 2}
    stage = cls(
        cls.Params(**{**defaults, **params}),
        cls.Model(profile="tiny"),
        StageContext(label=label or cls.name, job_seed=job_seed, classes=classes, device="cpu"),
    )
    stage.setup()
    return stage


def real_sample(index=0, shape=(40, 56), meta=None):
    rng = np.random.default_rng(index)
    mask = np.full(shape, ADE.index("wall"), dtype=np.uint8)
    mask[: shape[0] // 3] = ADE.index("sky")
    mask[-4:, :5] = IGNORE
    instances = np.zeros(shape, dtype=np.int32)
    instances[10:20, 10:30] = 3
    mask[10:20, 10:30] = ADE.index("person")
    return Sample(
        shard=1,
        index=index,
        source_id=f"real-{index}",
        image=rng.integers(0, 256, (*shape, 3), np.uint8),
        mask=mask,
        instances=instances,
        meta=dict(meta or {}),
    )


class Recorder:
    """Keeps every pipeline call's arguments; with `images` it returns those instead of running the model."""

    def __init__(self, pipe, images=None):
        self.pipe, self.images, self.calls = pipe, images, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.images is None:
            return self.pipe(**kwargs)
        return SimpleNamespace(images=np.stack([self.images] * len(kwargs["prompt"])).astype(np.float32) / 255)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.fixture(scope="module")
def text2mask(model_cache):
    return make(Text2MaskStage)


@pytest.fixture(scope="module")
def mask2img(model_cache):
    return make(Mask2ImgStage)


def test_registered_and_validated():
    assert resolve_stage("text2mask") is Text2MaskStage and resolve_stage("mask2img") is Mask2ImgStage
    assert Text2MaskStage.uses_gpu and Mask2ImgStage.uses_gpu
    assert (Text2MaskStage.Params().steps, Text2MaskStage.Params().scheduler) == (200, "euler_karras")
    assert (Mask2ImgStage.Params().steps, Mask2ImgStage.Params().resolution) == (40, 768)
    with pytest.raises(ValidationError, match="weights"):
        Text2MaskStage.Model()
    with pytest.raises(ValidationError):
        Mask2ImgStage.Params(images=0)
    with pytest.raises(ValidationError):
        Text2MaskStage.Params(scheduler="ddim")
    with pytest.raises(ValidationError):
        Mask2ImgStage.Model(profile="tiny", controlnet="x")


def test_text2mask_makes_n_new_masks_from_the_colour_maps(text2mask):
    src = real_sample(meta={"caption": "a street at dusk"})
    out = text2mask.process([src])
    assert len(out) == text2mask.variants_per_input() == 2
    assert [s.variant for s in out] == ["0", "1"]
    for s in out:
        assert s.ok and s.image.shape == (32, 32, 3) and s.mask.shape == (32, 32) and s.mask.dtype == np.uint8
        assert s.instances is None  # the tiny model's palette has no outlines
        assert np.array_equal(s.source_image, src.image)
        # The stored mask is the decoded colour map, never the human mask.
        ids, _ = text2mask.palette.decode(s.image)
        assert np.array_equal(s.mask, ids)
        assert s.meta["prompt"] == "a street at dusk" and s.meta["image_kind"] == "color_map"
        t2m = s.meta["text2mask"]
        assert t2m["seed"] == s.seed(0, "text2mask") and t2m["steps"] == 2 and t2m["size"] == [32, 32]
        assert t2m["scheduler"] == "euler_karras" and t2m["cap"] is None
        assert t2m["ignore_fraction"] == round(float(np.mean(s.mask == IGNORE)), 4)
        assert t2m["models"] == {"base": "tiny:sdxl-base-v1", "text2mask": "tiny:seggen-text2mask-v1"}
    assert not np.array_equal(out[0].image, out[1].image)


def test_text2mask_sampler_prompt_and_determinism(text2mask):
    scheduler = text2mask.pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and scheduler.config.use_karras_sigmas
    first = text2mask.process([real_sample()])
    assert first[0].meta["prompt"] == "a photo of wall, sky, person"  # the template, most pixels first
    again = make(Text2MaskStage).process([real_sample()])
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    other = make(Text2MaskStage, job_seed=5, scheduler="dpmpp_2m_karras")
    assert type(other.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    given = text2mask.process([real_sample(meta={"prompt": "a kitchen", "caption": "ignored"})])
    assert {s.meta["prompt"] for s in given} == {"a kitchen"}


def test_text2mask_decodes_classes_instances_and_maps_to_the_source_classes(text2mask):
    palette = Palette.for_classes(ADE, outlines=True)
    assert np.array_equal(palette.colors, text2mask.palette.colors)
    mask = np.full((32, 32), ADE.index("floor"), dtype=np.uint8)
    instances = np.zeros((32, 32), dtype=np.int32)
    mask[4:14, 4:14], instances[4:14, 4:14] = ADE.index("chair"), 5
    mask[18:28, 6:30], instances[18:28, 6:30] = ADE.index("person"), 8
    mask[0:3, 20:30] = IGNORE
    drawn = palette.encode(mask, instances)
    noisy = np.clip(drawn.astype(int) + np.random.default_rng(0).integers(-2, 3, drawn.shape), 0, 255)
    text2mask.pipe, text2mask.palette = Recorder(text2mask.pipe, noisy), palette
    try:
        out = text2mask.process([real_sample()])
    finally:
        text2mask.pipe, text2mask.palette = text2mask.pipe.pipe, Palette.for_classes(ADE)
    for s in out:
        assert np.array_equal(s.mask, mask)
        assert np.array_equal(s.instances > 0, instances > 0)
        assert len(np.unique(s.instances[instances == 5])) == 1 and len(np.unique(s.instances[instances == 8])) == 1

    # A source with another class set gets the palette's classes by name; the rest is ignore.
    voc = class_set("voc")
    stage = make(Text2MaskStage, classes=voc, maps=1)
    stage.pipe = Recorder(stage.pipe, drawn)
    s = stage.process([real_sample()])[0]
    expected = np.full(mask.shape, IGNORE, dtype=np.uint8)
    expected[mask == ADE.index("chair")] = voc.index("chair")
    expected[mask == ADE.index("person")] = voc.index("person")
    edge = (drawn == EDGE_COLOR).all(-1)
    assert np.array_equal(s.mask[~edge], expected[~edge]) and (s.mask[edge] == IGNORE).all()


def test_a_text2mask_sample_written_alone_is_valid(text2mask):
    s = text2mask.process([real_sample()])[0]
    files = encode_files(s, "png", 95, {"job": "t"})
    assert set(files) == {"png", "seg.png", "json"}
    meta = json.loads(files["json"])
    assert meta["image_kind"] == "color_map" and "text2mask" in meta


def test_mask2img_keeps_masks_exact_and_draws_m_images(mask2img):
    src = real_sample()
    mask, instances, real = src.mask.copy(), src.instances.copy(), src.image.copy()
    mask2img.pipe = Recorder(mask2img.pipe)
    try:
        out = mask2img.process([src])
        call = mask2img.pipe.calls[0]
    finally:
        mask2img.pipe = mask2img.pipe.pipe
    assert [s.variant for s in out] == ["0", "1"]
    for s in out:
        assert s.ok and s.image.shape == (40, 56, 3) and s.image.dtype == np.uint8
        assert np.array_equal(s.mask, mask) and np.array_equal(s.instances, instances)
        assert np.array_equal(s.source_image, real)
        assert s.meta["image_kind"] == "synthetic" and s.meta["prompt"] == "a photo of wall, sky, person"
        m2i = s.meta["mask2img"]
        assert m2i["seed"] == s.seed(0, "mask2img") and m2i["size"] == [24, 32] and m2i["steps"] == 2
    assert not np.array_equal(out[0].image, out[1].image)
    # The conditioning is the mask in the model's palette, at the generation size, no outlines.
    assert (call["height"], call["width"], len(call["prompt"]), call["negative_prompt"]) == (24, 32, 2, None)
    cond = np.asarray(call["image"][0])
    colours = {tuple(c) for c in cond.reshape(-1, 3)}
    palette = mask2img.palette
    assert colours == {tuple(palette.colors[ADE.index(n)]) for n in ("wall", "sky", "person")} | {(0, 0, 0)}


def test_mask2img_after_text2mask_keeps_the_real_image_as_source(text2mask, mask2img):
    src = real_sample()
    new = text2mask.process([src])
    out = mask2img.process(new)
    assert len(out) == 4 and [s.variant for s in out] == ["0-0", "0-1", "1-0", "1-1"]
    for s, parent in zip(out, [new[0], new[0], new[1], new[1]]):
        assert np.array_equal(s.source_image, src.image)
        assert np.array_equal(s.mask, parent.mask) and s.image.shape == (32, 32, 3)
        assert s.meta["image_kind"] == "synthetic" and "text2mask" in s.meta and "mask2img" in s.meta
    assert len({s.meta["mask2img"]["seed"] for s in out}) == 4


def test_mask2img_outlines_class_map_and_missing_masks(model_cache):
    voc = class_set("voc")
    stage = make(Mask2ImgStage, classes=voc, images=1, class_map={"cat": "animal"})
    stage.palette = Palette.for_classes(ADE, outlines=True)
    stage.pipe = Recorder(stage.pipe)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = voc.index("cat")
    mask[8:16, 2:12] = voc.index("person")
    instances = np.zeros((32, 32), dtype=np.int32)
    instances[8:16, 2:12] = 1
    out = stage.process(
        [
            Sample(shard=0, index=0, source_id="v", mask=mask, instances=instances),
            Sample(shard=0, index=1, source_id="no-mask", image=np.zeros((8, 8, 3), np.uint8)),
        ]
    )
    cond = np.asarray(stage.pipe.calls[0]["image"][0])
    assert (cond[:, 20:] == stage.palette.colors[ADE.index("animal")]).all()
    assert (cond[:, :2] == 0).all()  # voc background has no ADE150 name: unlabeled
    assert (cond[8, 2:12] == EDGE_COLOR).all()
    assert (cond[10:14, 4:10] == stage.palette.colors[ADE.index("person")]).all()
    assert len(stage.pipe.calls) == 1 and out[0].ok
    assert not out[1].ok and out[1].error["reason"] == "no_mask" and out[1].image is None
