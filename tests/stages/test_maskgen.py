"""The Mask Generator on tiny GroundingDINO + SAM: the merge rule, batching, thresholds, the stage's modes,
real-profile loading, and folder sources without masks."""

import shutil

import fsspec
import huggingface_hub.constants
import numpy as np
import pytest
import segment_anything
import torch
from PIL import Image
from pydantic import ValidationError

from factory.models.cache import model_cache_dir
from factory.models.detection import DetectionParams, MaskGenerator, MaskGenModelConfig, build_sam, merge_masks
from factory.models.tiny_vision import TINY_DETECTOR, TINY_SAM
from factory.sample import Sample
from factory.sources import open_source
from factory.sources.classes import IGNORE, ClassSet, class_set
from factory.sources.spec import SourceSpec
from factory.stages import StageContext, resolve_stage
from factory.stages.maskgen import MaskGenStage

pytestmark = pytest.mark.timeout(300)

VOC = class_set("voc")
ADE = class_set("ade150")
LOOSE = {"box_threshold": 0.0, "text_threshold": 0.0}  # random weights: keep every box


def images(n, shape=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def generator(model_cache):
    return MaskGenerator(MaskGenModelConfig(profile="tiny"), DetectionParams(**LOOSE), VOC, "cpu")


def box(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------- merge rule


def test_overlapping_masks_highest_score_wins_in_any_order():
    a, b, c = box(10, 10, 0, 0, 6, 6), box(10, 10, 3, 3, 9, 9), box(10, 10, 4, 4, 5, 5)
    expected = None
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        masks = np.stack([(a, b, c)[i] for i in order])
        scores = [(0.4, 0.9, 0.2)[i] for i in order]
        classes = [(3, 7, 9)[i] for i in order]
        label = merge_masks(masks, scores, classes, IGNORE, np.uint8)
        if expected is None:
            expected = label
        assert np.array_equal(label.mask, expected.mask) and np.array_equal(label.instances, expected.instances)
    mask, inst = expected.mask, expected.instances
    assert mask.dtype == np.uint8 and inst.dtype == np.int32
    assert (mask[3:9, 3:9] == 7).all() and (inst[3:9, 3:9] == 1).all()  # b (0.9) wins its whole box
    assert mask[0, 0] == 3 and inst[0, 0] == 2 and mask[2, 5] == 3  # a keeps what b does not cover
    assert (mask[9, :] == IGNORE).all() and (inst[9, :] == 0).all()  # nothing there: ignore
    assert not (mask == 9).any()  # c (0.2) lies inside b: it wins no pixel and is dropped
    assert expected.scores == [0.9, 0.4] and expected.class_ids == [7, 3]


def test_merge_ties_empty_and_torch_inputs():
    a, b = box(6, 6, 0, 0, 4, 4), box(6, 6, 2, 2, 6, 6)
    tie = merge_masks(torch.from_numpy(np.stack([a, b])), torch.tensor([0.5, 0.5]), torch.tensor([1, 2]), 255, np.uint8)
    assert tie.mask[3, 3] == 1 and tie.mask[5, 5] == 2  # a tie goes to the mask listed first
    empty = merge_masks(np.zeros((0, 5, 7), bool), [], [], 65535, np.uint16)
    assert empty.mask.shape == (5, 7) and empty.mask.dtype == np.uint16 and (empty.mask == 65535).all()
    assert (empty.instances == 0).all() and empty.scores == [] and empty.class_ids == []


# ------------------------------------------------------------------------------- generator


def test_pseudo_labels_shapes_dtypes_and_determinism(generator):
    ims = images(2, shape=(48, 64)) + images(1, shape=(30, 20), seed=1)
    names = ["sofa", "chair", "pottedplant", "background"]
    labels = generator.generate(ims, names)
    prompted = {VOC.index(n) for n in names[:3]}
    for im, label in zip(ims, labels):
        assert label.mask.shape == label.instances.shape == im.shape[:2]
        assert label.mask.dtype == np.uint8 and label.instances.dtype == np.int32
        assert set(np.unique(label.mask).tolist()) <= prompted | {IGNORE}
        n = len(label.scores)
        assert n == len(label.class_ids) and set(np.unique(label.instances).tolist()) <= set(range(n + 1))
        assert sorted(label.scores, reverse=True) == label.scores
        for k, c in enumerate(label.class_ids, start=1):  # every instance carries its class
            assert (label.mask[label.instances == k] == c).all() and (label.instances == k).any()
        assert ((label.instances == 0) == (label.mask == IGNORE)).all()
    assert any(len(label.scores) for label in labels)
    again = MaskGenerator(MaskGenModelConfig(profile="tiny"), DetectionParams(**LOOSE), VOC, "cpu").generate(ims, names)
    for a, b in zip(labels, again):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.instances, b.instances) and a.scores == b.scores


def test_batches_models_per_call_and_matches_one_by_one(generator):
    ims = images(3)
    names = [["sofa", "chair"], ["bird"], ["sheep", "cow"]]
    calls = {"detector": [], "encoder": [], "boxes": []}
    hooks = [
        generator.detector.register_forward_hook(
            lambda m, a, kw, out: calls["detector"].append(len(out.logits)), with_kwargs=True
        ),
        generator.predictor.model.image_encoder.register_forward_hook(
            lambda m, a, out: calls["encoder"].append(len(a[0]))
        ),
    ]
    predict = generator.predictor.predict_torch

    def recording_predict(**kw):
        calls["boxes"].append(len(kw["boxes"]))
        return predict(**kw)

    generator.predictor.predict_torch = recording_predict
    try:
        labels = generator.generate(ims, names)
    finally:
        del generator.predictor.predict_torch
        for h in hooks:
            h.remove()
    assert calls["detector"] == [3] and calls["encoder"] == [3]  # one call each for the whole batch
    # SAM decodes all boxes of an image in one call.
    detected = [len(scores) for _, scores, _ in generator.detect(ims, names)]
    assert calls["boxes"] == [n for n in detected if n] and len(calls["boxes"]) == 3
    alone = [generator.generate([im], n)[0] for im, n in zip(ims, names)]
    for a, b in zip(labels, alone):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.instances, b.instances)


def test_thresholds_and_empty_prompts(model_cache, generator):
    strict = MaskGenerator(MaskGenModelConfig(profile="tiny"), DetectionParams(box_threshold=1.0), VOC, "cpu")
    for label in strict.generate(images(2), ["sofa"]) + generator.generate(images(1), ["background"]):
        assert (label.mask == IGNORE).all() and (label.instances == 0).all() and label.scores == []
    capped = MaskGenerator(MaskGenModelConfig(profile="tiny"), DetectionParams(**LOOSE, max_boxes=1), VOC, "cpu")
    assert [len(label.scores) for label in capped.generate(images(2), ["sofa", "chair"])] == [1, 1]


def test_prompts_spans_and_chunks(generator):
    text, spans = generator._prompt(["sofa", "pottedplant", "tvmonitor"])
    assert text == "sofa. potted plant. tv monitor."
    assert [text[a:e] for a, e in spans] == ["sofa", "potted plant", "tv monitor"]
    ade = MaskGenerator.__new__(MaskGenerator)
    ade.__dict__.update(generator.__dict__, classes=ADE, _token_counts={})
    chunks = ade._chunks(list(ADE.names))
    assert len(chunks) > 1 and [n for c in chunks for n in c] == list(ADE.names)
    tokenizer = generator.processor.tokenizer
    assert all(len(tokenizer(ade._prompt(c)[0]).input_ids) <= generator.detector.config.max_text_len for c in chunks)
    labels = ade.generate(images(1), list(ADE.names[:60]))
    assert set(np.unique(labels[0].mask).tolist()) <= set(range(60)) | {IGNORE}


# ------------------------------------------------------------------------------- the stage


def make_stage(**params):
    stage = MaskGenStage(
        MaskGenStage.Params(**{**LOOSE, **params}),
        MaskGenStage.Model(profile="tiny"),
        StageContext(label="labels", job_seed=0, classes=VOC, device="cpu"),
    )
    stage.setup()
    return stage


def test_stage_registered_and_validated():
    assert resolve_stage("maskgen") is MaskGenStage and MaskGenStage.uses_gpu
    with pytest.raises(ValidationError):
        MaskGenStage.Params(mode="add")
    with pytest.raises(ValidationError):
        MaskGenStage.Params(box_threshold=1.5)
    with pytest.raises(ValidationError):
        MaskGenStage.Model(sam_type="vit_xl")
    with pytest.raises(KeyError, match="not in class set"):
        make_stage(classes=["unicorn"])


def test_fill_missing_and_replace(model_cache):
    ims = images(2)
    dataset_mask = np.full(ims[0].shape[:2], VOC.index("cat"), np.uint8)

    def inputs():
        return [
            Sample(shard=0, index=0, source_id="a", image=ims[0], mask=dataset_mask.copy()),
            Sample(shard=0, index=1, source_id="b", image=ims[1]),
        ]

    stage = make_stage(classes=["sofa", "chair"])
    assert stage.names == ["sofa", "chair"] and stage.model_ids() == {
        "detector": f"tiny:{TINY_DETECTOR}",
        "sam": f"tiny:{TINY_SAM}",
    }
    kept, labelled = stage.process(inputs())
    assert np.array_equal(kept.mask, dataset_mask) and kept.instances is None and kept.meta["pseudo_label"] is False
    assert labelled.meta["pseudo_label"] is True and labelled.mask.dtype == np.uint8
    assert labelled.mask.shape == labelled.instances.shape == ims[1].shape[:2]
    info = labelled.meta["pseudo_instances"]
    assert len(info["classes"]) == len(info["scores"]) == labelled.instances.max()
    assert set(info["classes"]) <= {"sofa", "chair"}

    replaced = make_stage(mode="replace").process(inputs())
    assert all(s.meta["pseudo_label"] for s in replaced)
    assert not np.array_equal(replaced[0].mask, dataset_mask) and replaced[0].instances is not None


def test_default_classes_are_the_class_set_less_skipped(model_cache):
    stage = make_stage()
    assert stage.names == list(VOC.names)
    label = stage.generator.generate(images(1), stage.names)[0]
    assert VOC.index("background") not in set(np.unique(label.mask).tolist())


# ------------------------------------------------------------------------------- real loading


def test_pretrained_profile_loads_saved_models(generator, tmp_path, monkeypatch):
    det_dir = tmp_path / "gdino"
    shutil.copytree(model_cache_dir() / "tiny" / TINY_DETECTOR, det_dir)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/models/sam/sam_tiny.pth", (model_cache_dir() / "tiny" / TINY_SAM / "sam_tiny.pth").read_bytes())
    # The registry's vit_* builders need full-size checkpoints: route vit_b to the tiny architecture and check
    # the checkpoint it receives is the object-store file copied to a local path.
    seen = []

    def tiny_builder(checkpoint):
        seen.append(checkpoint)
        return build_sam("tiny", checkpoint)

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_builder)
    try:
        cfg = MaskGenModelConfig(detector=str(det_dir), sam="memory://models/sam/sam_tiny.pth", sam_type="vit_b")
        real = MaskGenerator(cfg, DetectionParams(**LOOSE), VOC, "cpu")
    finally:
        fs.rm("/models", recursive=True)
    assert len(seen) == 1 and seen[0].endswith("sam_tiny.pth") and not seen[0].startswith("memory")
    assert MaskGenerator.model_ids(cfg) == {"detector": str(det_dir), "sam": "memory://models/sam/sam_tiny.pth"}
    ims = images(2)
    for a, b in zip(real.generate(ims, ["sofa", "bird"]), generator.generate(ims, ["sofa", "bird"])):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.instances, b.instances)


def test_detector_hub_id_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sam = tmp_path / "sam.pth"
    sam.write_bytes(b"")
    with pytest.raises(OSError, match="hub is unreachable") as err:
        MaskGenerator(MaskGenModelConfig(sam=str(sam)), DetectionParams(), VOC, "cpu")
    assert "IDEA-Research/grounding-dino-base" in str(err.value)


# ------------------------------------------------------------------------------- images-only folders


def test_folder_source_without_masks(tmp_path):
    for i, im in enumerate(images(3, shape=(12, 16))):
        Image.fromarray(im).save(tmp_path / f"p{i}.png")
    spec = SourceSpec(
        kind="folder", path=str(tmp_path), classes="voc", image_suffix=".png", mask_suffix=None, min_side=8
    )
    src = open_source(spec)
    assert list(src.list_ids()) == ["p0", "p1", "p2"]
    rec = src.load("p1")
    assert rec.image.shape == (12, 16, 3) and rec.mask is None and rec.instances is None
    assert rec.meta == {"image_path": "p1.png"}
    assert isinstance(src.classes, ClassSet)
