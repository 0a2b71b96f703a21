"""The SENSE stages on tiny models, without Ray: dense captions, text-to-image, scoring and selection.

`PaletteLabeler` (support/stages_for_tests.py) is a test labeling stage (test_report.py runs it in Ray too):
it labels each pixel with the ADE150 class whose palette colour is nearest, so an image painted in
palette colours gets its own mask back exactly, which gives the fidelity scores known answers.
"""

from dataclasses import replace

import numpy as np
import pytest
from pydantic import ValidationError

from factory.models.tiny_t2i import tiny_t2i_dir
from factory.sample import Sample
from factory.sources.classes import ade150_palette, class_set
from factory.stages import StageContext, resolve_stage
from factory.stages.dense_caption import DenseCaptionStage
from factory.stages.keep import KeepStage
from factory.stages.score import ScoreStage
from factory.stages.t2i import TextToImageStage

pytestmark = pytest.mark.timeout(300)

ADE = class_set("ade150")


LABELER = {"kind": "stages_for_tests:PaletteLabeler"}


def context(label):
    return StageContext(label=label, job_seed=0, classes=ADE, device="cpu")


def painted(index=0, source_id=None, prompt=None):
    """A sample whose image is its mask painted in the ADE150 palette (wall, sky, a person)."""
    mask = np.full((24, 32), ADE.index("wall"), np.uint8)
    mask[:8] = ADE.index("sky")
    mask[12:20, 4:10] = ADE.index("person")
    meta = {"prompt": prompt} if prompt else {}
    return Sample(
        shard=1, index=index, source_id=source_id or f"p-{index}", image=ade150_palette()[mask], mask=mask, meta=meta
    )


# ---------------------------------------------------------------- dense captions


@pytest.fixture(scope="module")
def captioner(model_cache):
    stage = DenseCaptionStage(
        DenseCaptionStage.Params(max_new_tokens=24), DenseCaptionStage.Model(profile="tiny"), context("caption")
    )
    stage.setup()
    return stage


def test_dense_caption_writes_caption_and_prompt(captioner):
    assert resolve_stage("dense_caption") is DenseCaptionStage
    out = captioner.process([painted(i) for i in range(3)])
    assert [s.index for s in out] == [0, 1, 2] and all(s.ok for s in out)
    for s in out:
        caption = s.meta["dense_caption"]
        assert caption and caption == s.meta["prompt"] == caption.strip()
        assert 0 < s.meta["dense_caption_tokens"] <= 24
        assert s.meta["dense_caption_truncated"] == (s.meta["dense_caption_tokens"] == 24)
    assert captioner.model_ids() == {"vlm": "tiny:dense-caption-llava-v1"}
    again = captioner.process([painted(0)])
    assert again[0].meta["dense_caption"] == out[0].meta["dense_caption"]  # greedy: the same every time


def test_generation_keeps_to_the_ids_the_tokenizer_can_decode(captioner, monkeypatch):
    """A random VLM with a small tokenizer (the random profile's Gemma-3: 262k ids, a character tokenizer)
    must only generate ids the tokenizer decodes: here the limit is set below the tiny model's vocabulary."""
    from factory.models.tokenizers import within_vocabulary

    generated = []
    generate = captioner.vlm.generate

    def recording(**kw):
        out = generate(**kw)
        generated.append(out[:, kw["input_ids"].shape[1] :])
        return out

    limit = 40
    assert captioner.vlm.config.get_text_config().vocab_size > limit
    monkeypatch.setattr(captioner, "known_ids", within_vocabulary(limit))
    monkeypatch.setattr(captioner.vlm, "generate", recording)
    out = captioner.process([painted(i) for i in range(2)])
    assert generated and int(generated[0].max()) < limit
    assert all(s.ok and s.meta["dense_caption"] for s in out)


def test_dense_caption_params(captioner, model_cache):
    stage = DenseCaptionStage(
        DenseCaptionStage.Params(max_new_tokens=5, set_prompt=False, prompt="List objects."),
        DenseCaptionStage.Model(profile="tiny"),
        context("caption"),
    )
    stage.setup()
    assert "List objects." in stage.text
    out = stage.process([painted(0, prompt="kept")])
    assert out[0].meta["prompt"] == "kept" and out[0].meta["dense_caption_tokens"] <= 5
    with pytest.raises(ValidationError):
        DenseCaptionStage.Params(max_new_tokens=0)
    with pytest.raises(ValidationError):
        DenseCaptionStage.Model(profile="tiny", temperature=1.0)


# ---------------------------------------------------------------- text to image


def t2i_stage(generators=None, n=2, profile="tiny", **params):
    generators = generators or [
        {"name": "sd35", "family": "sd3", "steps": 2, "resolution": 32},
        {"name": "flux", "family": "flux", "steps": 2, "resolution": 32, "max_sequence_length": 64},
    ]
    stage = TextToImageStage(
        TextToImageStage.Params(generators=generators, images_per_generator=n, **params),
        TextToImageStage.Model(profile=profile),
        context("t2i"),
    )
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def t2i(model_cache):
    return t2i_stage()


def test_t2i_variants_per_generator_without_masks(t2i):
    src = painted(0, prompt="a wall under the sky and a person")
    out = t2i.process([src, painted(1, prompt="a second scene")])
    assert t2i.variants_per_input() == 4 and len(out) == 8
    assert [(s.index, s.variant) for s in out] == [(i, str(v)) for i in range(2) for v in range(4)]
    assert [s.meta["synthesis"]["generator"] for s in out[:4]] == ["sd35", "sd35", "flux", "flux"]
    for s in out:
        assert s.ok and s.mask is None and s.instances is None
        assert np.array_equal(s.source_image, painted(0).image)
        assert s.image.dtype == np.uint8 and s.image.shape == (24, 32, 3)  # long side 32, aspect kept
        assert s.meta["synthesis"]["conditioning"] == "text" and s.meta["synthesis"]["size"] == [24, 32]
        assert s.meta["seed"] == s.seed(0)
    assert out[0].meta["prompt"] == "a wall under the sky and a person"
    assert len({s.meta["seed"] for s in out}) == 8
    assert not np.array_equal(out[0].image, out[1].image)
    assert t2i.model_ids() == {"sd35": "tiny:t2i-sd3-v1", "flux": "tiny:t2i-flux-v1"}


def test_t2i_is_deterministic(t2i, model_cache):
    first = t2i.process([painted(0, prompt="a room")])
    again = t2i_stage().process([painted(0, prompt="a room")])
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]


def test_t2i_batched_calls_match_single_source_calls(t2i):
    """One call per (generator, size) holds the whole batch; each image still matches its single-source run
    to within float rounding (why GPU bits may differ: tests/stages/test_controlnet_stage.py)."""
    inputs = [painted(0, prompt="a room"), painted(1, prompt="a street at night"), painted(2, prompt="a room")]
    batched = t2i.process([replace(s, meta=dict(s.meta)) for s in inputs])
    single = [v for s in inputs for v in t2i.process([s])]
    for a, b in zip(batched, single):
        assert a.meta == b.meta
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2


def test_t2i_records_prompt_truncation(t2i):
    long_prompt = " ".join(["a red chair beside a wooden table"] * 12)  # ~400 characters
    out = t2i.process([painted(0, prompt=long_prompt)])
    sd3, flux = out[0].meta["synthesis"]["text_encoders"], out[2].meta["synthesis"]["text_encoders"]
    assert sd3["tokenizer"]["kind"] == "clip" and sd3["tokenizer"]["limit"] == 77
    assert sd3["tokenizer"]["truncated"] and sd3["tokenizer_2"]["truncated"]
    # The T5 encoder reads 512 tokens: the prompt fits. Flux here reads only 64, and says so.
    assert sd3["tokenizer_3"] == {
        "kind": "long",
        "tokens": sd3["tokenizer_3"]["tokens"],
        "limit": 512,
        "truncated": False,
    }
    assert flux["tokenizer_2"]["limit"] == 64 and flux["tokenizer_2"]["truncated"]
    short = t2i.process([painted(0, prompt="a chair")])[0].meta["synthesis"]["text_encoders"]
    assert not any(enc["truncated"] for enc in short.values())


def test_t2i_prompt_from_classes_or_failure(t2i):
    from_classes = t2i.process([painted(0)])
    assert from_classes[0].meta["prompt"] == "a photo of wall, sky, person"
    no_prompt = Sample(shard=0, index=3, source_id="bare", image=np.zeros((16, 16, 3), np.uint8))
    out = t2i.process([no_prompt])
    assert len(out) == 4 and all(s.error["reason"] == "no_prompt" for s in out)


def test_all_four_families_build_and_load_from_a_directory(model_cache):
    generators = [{"name": f, "family": f, "steps": 2, "resolution": 32} for f in ("sana", "sdxl")]
    out = t2i_stage(generators, n=1).process([painted(0, prompt="a sofa")])
    assert [s.meta["synthesis"]["family"] for s in out] == ["sana", "sdxl"]
    # Sana sizes are multiples of 32, SDXL's of 8: a 24x32 real image gives 32x32 and 24x32.
    assert [s.image.shape for s in out] == [(32, 32, 3), (24, 32, 3)]
    # The pretrained profile with local directories, the loading path real weights take, gives the same.
    local = [{**g, "model": tiny_t2i_dir(g["family"])} for g in generators]
    real = t2i_stage(local, n=1, profile="pretrained")
    assert real.model_ids() == {"sana": tiny_t2i_dir("sana"), "sdxl": tiny_t2i_dir("sdxl")}
    again = real.process([painted(0, prompt="a sofa")])
    assert [s.image.tobytes() for s in again] == [s.image.tobytes() for s in out]


def test_t2i_params_are_checked():
    with pytest.raises(ValidationError, match="unique"):
        TextToImageStage.Params(generators=[{"name": "a", "family": "flux"}, {"name": "a", "family": "sd3"}])
    with pytest.raises(ValidationError):
        TextToImageStage.Params(generators=[{"name": "a", "family": "dalle"}])
    with pytest.raises(ValidationError):
        TextToImageStage.Params(generators=[{"name": "a", "family": "flux", "max_sequence_length": 1024}])
    defaults = TextToImageStage.Params()
    assert [g.family for g in defaults.generators] == ["flux", "sd3"] and defaults.images_per_generator == 1


# ---------------------------------------------------------------- scoring


def score_stage(**params):
    stage = ScoreStage(ScoreStage.Params(**params), ScoreStage.Model(profile="tiny"), context("score"))
    stage.setup()
    return stage


def test_score_with_target_mask_and_auto_label(model_cache):
    stage = score_stage(auto_label=LABELER, boundary_tolerance=1)
    out = stage.process([painted(0, prompt="a wall"), painted(1)])
    first, second = out
    assert first.meta["scores"]["fidelity"]["miou"] == 1.0 and first.meta["scores"]["fidelity"]["boundary_f"] == 1.0
    dens = first.meta["scores"]["density"]
    assert dens["classes"] == 3 and dens["instances"] == 3  # sky band, wall, one person
    assert dens["min_instance_area"] == pytest.approx(48 / 768)
    assert isinstance(first.meta["scores"]["fidelity"]["clip_score"], float)
    assert second.meta["scores"]["fidelity"]["clip_score"] is None  # no prompt: null, not 0
    # "a wall" in the tiny CLIP vocabulary (bytes, no merges): a</w> w a l l</w>, plus start and end.
    assert first.meta["scoring"] == {
        "stage": "score",
        "density_from": "mask",
        "instances_from": "components",
        "boundary_tolerance": 1,
        "auto_label": LABELER["kind"],
        "auto_label_error": None,
        "clip_prompt_tokens": 7,
        "clip_prompt_truncated": False,
    }
    assert first.mask is not None and "pseudo_label" not in first.meta  # the labeler worked on a copy
    assert stage.model_ids() == {"clip": "tiny:score-clip-v1", "auto_label.labeler": "palette"}


def test_score_unlabeled_sample_uses_auto_label_for_density(model_cache):
    stage = score_stage(auto_label=LABELER)
    sample = painted(0, prompt=" ".join(["a very long prompt"] * 40))
    sample.mask = None
    out = stage.process([sample])[0]
    assert out.meta["scoring"]["density_from"] == "auto_label"
    assert out.meta["scores"]["density"]["classes"] == 3
    assert out.meta["scores"]["fidelity"]["miou"] is None and out.meta["scores"]["fidelity"]["boundary_f"] is None
    assert out.meta["scoring"]["clip_prompt_truncated"]


def test_score_without_labeler_or_clip(model_cache):
    stage = score_stage(clip=False)
    sample = painted(0, prompt="x")
    sample.mask = None
    out = stage.process([sample, painted(1)])
    assert all(v is None for v in out[0].meta["scores"]["density"].values())
    assert all(v is None for v in out[0].meta["scores"]["fidelity"].values())
    assert out[0].meta["scoring"]["density_from"] is None
    assert out[1].meta["scores"]["density"]["instances"] == 3 and out[1].meta["scores"]["fidelity"]["miou"] is None
    assert stage.model_ids() == {}


def test_labeler_failure_costs_only_that_samples_fidelity(model_cache):
    stage = score_stage(auto_label={**LABELER, "params": {"fail_ids": ["p-1"]}}, clip=False)
    out = stage.process([painted(0), painted(1), painted(2)])
    assert [s.meta["scores"]["fidelity"]["miou"] for s in out] == [1.0, None, 1.0]
    assert "cannot label p-1" in out[1].meta["scoring"]["auto_label_error"]
    assert all(s.ok for s in out)


def test_a_broken_labeler_fails_the_stage_instead_of_nulling_every_fidelity(model_cache):
    # A CUDA or storage error is the stage's failure (retried, then the shard fails), never a null score.
    stage = score_stage(auto_label={**LABELER, "params": {"broken": True}}, clip=False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        stage.process([painted(0), painted(1)])


def test_score_params_are_checked():
    with pytest.raises(ValidationError, match="unknown stage"):
        ScoreStage.Params(auto_label={"kind": "no-such-labeler"})
    with pytest.raises(ValidationError):
        ScoreStage.Params(auto_label={**LABELER, "params": {"colour": "red"}})
    with pytest.raises(ValidationError):
        ScoreStage.Params(boundary_tolerance=-1)


# ---------------------------------------------------------------- selection


def keep_stage(**params):
    return KeepStage(KeepStage.Params(**params), KeepStage.Model(), context("keep"))


def scored(index, instances, miou):
    s = painted(index)
    s.meta["scores"] = {"density": {"instances": instances}, "fidelity": {"miou": miou}}
    return s


def test_keep_rejects_by_thresholds_with_reasons():
    stage = keep_stage(min={"density.instances": 3, "fidelity.miou": 0.5}, max={"density.instances": 10})
    out = stage.process([scored(0, 5, 0.9), scored(1, 2, 0.9), scored(2, 12, 0.1), scored(3, 4, None)])
    assert [s.ok for s in out] == [True, False, False, True]
    assert out[1].rejected["reason"] == "density.instances_below_min"
    assert out[2].rejected["reason"] == "fidelity.miou_below_min"  # min bounds first; the detail lists both
    assert "density.instances 12 > 10" in out[2].rejected["detail"]
    strict = keep_stage(min={"fidelity.miou": 0.5}, missing="reject").process([scored(4, 4, None)])
    assert strict[0].rejected["reason"] == "fidelity.miou_missing"


def test_keep_params_know_the_score_names():
    with pytest.raises(ValidationError, match="unknown score"):
        KeepStage.Params(min={"density.crowd": 1})
    assert resolve_stage("keep") is KeepStage and not KeepStage.uses_gpu
