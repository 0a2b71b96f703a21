"""High-quality Image Selection: mIoU, the threshold logic on hand-made embeddings and masks, the three
embeddings on tiny models, and real-profile loading."""

import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from factory.models.cache import model_cache_dir
from factory.models.detection import PseudoLabel
from factory.models.tiny_vision import TINY_EMBEDDERS
from factory.sample import Sample
from factory.sources.classes import IGNORE, class_set
from factory.stages import StageContext, resolve_stage
from factory.stages.image_selection import Embedder, SelectModelConfig, SelectStage, mean_iou

pytestmark = pytest.mark.timeout(300)

VOC = class_set("voc")


def make_stage(model=None, **params):
    stage = SelectStage(
        SelectStage.Params(**params),
        SelectStage.Model(**(model or {"profile": "tiny"})),
        StageContext(label="select", job_seed=0, classes=VOC, device="cpu"),
    )
    stage.setup()
    return stage


def synthetic(index, variant, seed=0, shape=(24, 32)):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[4:20, 6:26] = VOC.index("sheep")
    return Sample(
        shard=1,
        index=index,
        source_id=f"s{index}",
        variant=str(variant),
        image=rng.integers(0, 256, (*shape, 3), np.uint8),
        source_image=np.random.default_rng(100 + index).integers(0, 256, (*shape, 3), np.uint8),
        mask=mask,
    )


def test_registered_and_validated():
    assert resolve_stage("select") is SelectStage and SelectStage.uses_gpu
    params = SelectStage.Params()
    assert (params.embedding, params.eps, params.check_cosine, params.check_miou) == ("clip", 0.8, True, True)
    for bad in ({"eps": 1.5}, {"embedding": "siglip"}, {"miou_threshold": -0.1}, {"keep": 3}):
        with pytest.raises(ValidationError):
            SelectStage.Params(**bad)
    with pytest.raises(ValidationError):
        SelectStage.Model(clip_model="x")


# ------------------------------------------------------------------------------- mIoU


def test_mean_iou_by_hand():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 255, 255]], np.uint8)
    assert mean_iou(gt, gt, IGNORE) == 1.0
    pred = np.array([[1, 1, 1, 2], [1, 1, 255, 2], [0, 0, 2, 1]], np.uint8)
    # Scored pixels are the 10 gt labels. Class 1: 4 shared / 5 in either; class 2: 2 / 4; class 0: 2 / 2.
    assert mean_iou(pred, gt, IGNORE) == pytest.approx((4 / 5 + 2 / 4 + 1) / 3)
    # Skipping class 0 (background) leaves it out of the mean; pixels predicted as nothing still cost recall.
    assert mean_iou(pred, gt, IGNORE, frozenset({0})) == pytest.approx((4 / 5 + 2 / 4) / 2)
    # A class only the prediction has counts (IoU 0), a class neither has does not.
    fp = gt.copy()
    fp[0, 0] = 3
    assert mean_iou(fp, gt, IGNORE) == pytest.approx((3 / 4 + 1 + 1 + 0) / 4)
    nothing = np.full_like(gt, IGNORE)
    assert mean_iou(nothing, gt, IGNORE, frozenset({0})) == 0.0
    background_only = np.zeros_like(gt)
    assert mean_iou(nothing, background_only, IGNORE, frozenset({0})) == 1.0


# ------------------------------------------------------------------------------- thresholds


class FakeEmbedder:
    """Embeds each image as the unit vector its top-left pixel value picks (exact: no normalising here)."""

    def __init__(self, vectors):
        self.vectors = vectors
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        return torch.tensor([self.vectors[int(im[0, 0, 0])] for im in images], dtype=torch.float32)


class FakeGenerator:
    """Returns hand-made pseudo-labels, one per image, in order."""

    def __init__(self, masks):
        self.masks, self.names = masks, []

    def generate(self, images, class_names):
        self.names.append(class_names)
        return [PseudoLabel(m, np.zeros(m.shape, np.int32), [], []) for m in self.masks[: len(images)]]


def tagged(index, variant, real_tag, synth_tag, mask):
    real = np.full((*mask.shape, 3), real_tag, np.uint8)
    image = np.full((*mask.shape, 3), synth_tag, np.uint8)
    return Sample(
        shard=0, index=index, source_id=f"s{index}", variant=str(variant), image=image, source_image=real, mask=mask
    )


def test_threshold_logic_on_hand_made_embeddings_and_masks(model_cache):
    stage = make_stage(embedding="pixels", eps=0.75, miou_threshold=0.5)
    # Tag 0: the real image. Cosines with it: tag 1 -> 0.9, tag 2 -> exactly eps (0.75).
    stage.embedder = FakeEmbedder({0: [1.0, 0.0], 1: [0.9, np.sqrt(1 - 0.81)], 2: [0.75, np.sqrt(1 - 0.5625)]})
    gt = np.zeros((4, 4), np.uint8)
    gt[:, :2] = VOC.index("sheep")
    good = gt.copy()  # mIoU 1.0
    half = gt.copy()
    half[:, 2] = VOC.index("sheep")  # sheep: 8 / 12 = 0.667 with background skipped
    poor = np.full_like(gt, VOC.index("sheep"))  # 8 / 16 = 0.5: exactly the threshold, kept
    worse = np.full_like(gt, IGNORE)  # nothing found: 0.0
    stage.generator = FakeGenerator([good, half, poor, worse, good])
    samples = [
        tagged(0, 0, 0, 1, gt),
        tagged(0, 1, 0, 1, gt),
        tagged(0, 2, 0, 1, gt),
        tagged(1, 0, 0, 1, gt),
        tagged(1, 1, 0, 2, gt),
    ]
    out = stage.process(samples)
    scores = [s.meta["scores"] for s in out]
    assert [round(s["cosine"], 4) for s in scores] == [0.9, 0.9, 0.9, 0.9, 0.75]
    assert [round(s["miou"], 4) for s in scores] == [1.0, round(8 / 12, 4), 0.5, 0.0, 1.0]
    assert all(s["embedding"] == "pixels" for s in scores)
    assert [s.rejected and s.rejected["reason"] for s in out] == [None, None, None, "low_miou", "low_cosine"]
    assert out[3].rejected["stage"] == "select" and "needs miou >= 0.5" in out[3].rejected["detail"]
    assert "needs cosine > 0.75" in out[4].rejected["detail"]  # cosine must be strictly above eps
    assert all(s.image is not None for s in out)  # rejected samples keep their pixels for the rejected set
    # Each real image is embedded once for all of its variants: 2 reals + 5 synthetics in a single call.
    assert stage.embedder.calls == [7]
    assert stage.generator.names == [[["background", "sheep"]] * 5]


def test_both_checks_failing_reports_cosine_and_keeps_earlier_scores(model_cache):
    stage = make_stage(embedding="pixels")
    stage.embedder = FakeEmbedder({0: [1.0, 0.0], 3: [0.5, np.sqrt(0.75)]})
    gt = np.full((4, 4), VOC.index("cow"), np.uint8)
    stage.generator = FakeGenerator([np.full_like(gt, IGNORE)])
    sample = tagged(0, 0, 0, 3, gt)
    sample.meta["scores"] = {"aesthetic": 5.0}
    out = stage.process([sample])[0]
    assert out.rejected["reason"] == "low_cosine" and "miou 0.0" in out.rejected["detail"]
    assert out.meta["scores"]["aesthetic"] == 5.0 and out.meta["scores"]["miou"] == 0.0


def test_checks_can_be_turned_off(model_cache):
    no_miou = make_stage(embedding="pixels", check_miou=False)
    assert no_miou.generator is None and no_miou.model_ids() == {}
    out = no_miou.process([synthetic(0, 0)])[0]
    assert set(out.meta["scores"]) == {"cosine", "embedding"}
    no_cosine = make_stage(check_cosine=False, miou_threshold=0.0)
    assert no_cosine.embedder is None and set(no_cosine.model_ids()) == {"detector", "sam"}
    sample = synthetic(0, 0)
    sample.source_image = None  # not needed without the cosine check
    out = no_cosine.process([sample])[0]
    assert out.ok and set(out.meta["scores"]) == {"miou"}
    none = make_stage(check_cosine=False, check_miou=False)
    assert none.process([synthetic(0, 0)])[0].meta["scores"] == {}


def test_missing_inputs_fail(model_cache):
    stage = make_stage(embedding="pixels")
    no_source, no_mask, no_image = synthetic(0, 0), synthetic(1, 0), synthetic(2, 0)
    no_source.source_image = None
    no_mask.mask = None
    no_image.image = None
    out = stage.process([no_source, no_mask, no_image, synthetic(3, 0)])
    assert [s.error and s.error["reason"] for s in out] == ["no_source_image", "no_mask", "no_image", None]
    assert "scores" in out[3].meta


# ------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("kind", ["clip", "dinov2", "pixels"])
def test_embeddings_unit_length_batched_and_deterministic(kind, model_cache):
    cfg = SelectModelConfig(profile="tiny")
    embed = Embedder(kind, cfg, "cpu", pixel_size=16)
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (20 + 4 * i, 30, 3), np.uint8) for i in range(3)]
    emb = embed(ims)
    assert emb.dtype == torch.float32 and emb.shape[0] == 3
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embed(ims[1:2])[0], emb[1], atol=1e-5)  # batching does not change an embedding
    assert torch.equal(Embedder(kind, cfg, "cpu", pixel_size=16)(ims), emb)
    if kind == "pixels":
        assert emb.shape[1] == 16 * 16 * 3
        inverted = embed([ims[0], 255 - ims[0]])
        assert float(inverted[0] @ inverted[1]) == pytest.approx(-1.0, abs=1e-3)  # mean-centred


def test_identical_images_are_kept_on_every_embedding(model_cache):
    for kind in ("clip", "dinov2", "pixels"):
        stage = make_stage(embedding=kind, check_miou=False, eps=0.999)
        sample = synthetic(0, 0)
        sample.image = sample.source_image.copy()
        out = stage.process([sample])[0]
        assert out.ok and out.meta["scores"]["cosine"] == pytest.approx(1.0, abs=1e-4)
        assert out.meta["scores"]["embedding"] == kind


def test_full_tiny_stage_scores_and_determinism(model_cache):
    stage = make_stage(box_threshold=0.0, text_threshold=0.0, eps=-1.0, miou_threshold=0.0)
    assert stage.model_ids() == {
        "embedding": f"tiny:{TINY_EMBEDDERS['clip']}",
        "detector": "tiny:grounding-dino-v2",
        "sam": "tiny:sam-v1",
    }
    out = stage.process([synthetic(0, 0), synthetic(0, 1, seed=1), synthetic(1, 0, seed=2)])
    assert all(s.ok for s in out)
    for s in out:
        assert -1.0 <= s.meta["scores"]["cosine"] <= 1.0 and 0.0 <= s.meta["scores"]["miou"] <= 1.0
    again = make_stage(box_threshold=0.0, text_threshold=0.0, eps=-1.0, miou_threshold=0.0).process(
        [synthetic(0, 0), synthetic(0, 1, seed=1), synthetic(1, 0, seed=2)]
    )
    assert [s.meta["scores"] for s in again] == [s.meta["scores"] for s in out]


def test_pretrained_profile_loads_saved_embedders(model_cache, tmp_path):
    ims = [np.random.default_rng(3).integers(0, 256, (24, 24, 3), np.uint8)]
    for kind in ("clip", "dinov2"):
        tiny = Embedder(kind, SelectModelConfig(profile="tiny"), "cpu", 16)
        saved = tmp_path / kind
        shutil.copytree(model_cache_dir() / "tiny" / TINY_EMBEDDERS[kind], saved)
        real = Embedder(kind, SelectModelConfig(**{kind: str(saved)}), "cpu", 16)
        assert torch.allclose(real(ims), tiny(ims), atol=1e-6)
    stage = make_stage({"clip": str(tmp_path / "clip")}, check_miou=False)
    assert stage.model_ids() == {"embedding": str(tmp_path / "clip")}
