"""The caption stage (tiny BLIP and BLIP-2) and the Multi-way Prompt Generator's three modes."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from pydantic import ValidationError

from factory.models.cache import model_cache_dir
from factory.models.tiny_vision import TINY_BLIP
from factory.sample import Sample
from factory.sources.classes import IGNORE, class_set
from factory.stages import StageContext, resolve_stage
from factory.stages.caption import CaptionStage
from factory.stages.prompt import PromptStage, read_captions

pytestmark = pytest.mark.timeout(300)

VOC = class_set("voc")


def context(classes=VOC, job_seed=0):
    return StageContext(label="cap", job_seed=job_seed, classes=classes, device="cpu")


def make_caption(model=None, **params):
    stage = CaptionStage(
        CaptionStage.Params(**{"max_new_tokens": 8, **params}),
        CaptionStage.Model(**(model or {"profile": "tiny"})),
        context(),
    )
    stage.setup()
    return stage


def image_sample(index, seed=0, shape=(40, 56), meta=None):
    rng = np.random.default_rng(seed)
    return Sample(
        shard=0,
        index=index,
        source_id=f"img-{index}",
        image=rng.integers(0, 256, (*shape, 3), np.uint8),
        meta=dict(meta or {}),
    )


def voc_mask(shape=(30, 30)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[:, :12] = VOC.index("sofa")
    mask[:10, 12:] = VOC.index("chair")
    mask[-3:, -3:] = VOC.index("pottedplant")
    mask[0, 0] = IGNORE
    return mask


@pytest.fixture(scope="module")
def blip(model_cache):
    return make_caption()


# ------------------------------------------------------------------------------- caption


def test_caption_registered_and_validated():
    assert resolve_stage("caption") is CaptionStage and CaptionStage.uses_gpu
    with pytest.raises(ValidationError):
        CaptionStage.Params(max_new_tokens=0)
    with pytest.raises(ValidationError):
        CaptionStage.Params(temperature=0.7)
    with pytest.raises(ValidationError):
        CaptionStage.Model(family="llava")


def test_captions_batched_and_deterministic(blip):
    inputs = [image_sample(0, seed=1), image_sample(1, seed=2, shape=(64, 32)), image_sample(2, seed=3)]
    out = blip.process(inputs)
    assert [s.index for s in out] == [0, 1, 2] and all(s.ok for s in out)
    captions = [s.meta["caption"] for s in out]
    assert all(isinstance(c, str) and c for c in captions)
    # A batch gives each image the caption it gets alone, and a fresh worker gives the same again.
    alone = [blip.process([image_sample(i, seed=i + 1)])[0].meta["caption"] for i in (0, 2)]
    assert alone == [captions[0], captions[2]]
    again = make_caption().process([image_sample(0, seed=1)])
    assert again[0].meta["caption"] == captions[0]
    assert blip.model_ids() == {"captioner": f"tiny:{TINY_BLIP}"}


def test_max_new_tokens_bounds_the_caption(blip):
    short = make_caption(max_new_tokens=2).process([image_sample(0)])[0].meta["caption"]
    # The tiny vocabulary is one character per token: two new tokens decode to at most two characters.
    assert len(short.replace("#", "").replace(" ", "")) <= 2
    assert len(short) <= len(blip.process([image_sample(0)])[0].meta["caption"])


def test_caption_prompt_prefix_and_missing_image(blip):
    stage = make_caption(prompt="a photography of")
    out = stage.process([image_sample(0), Sample(shard=0, index=1, source_id="none")])
    assert out[0].meta["caption"].startswith("a photography of")
    assert out[1].error["reason"] == "no_image" and out[1].error["stage"] == "cap"


def test_blip2_family(model_cache):
    stage = make_caption({"profile": "tiny", "family": "blip2"})
    out = stage.process([image_sample(0, seed=5), image_sample(1, seed=6)])
    captions = [s.meta["caption"] for s in out]
    assert all(isinstance(c, str) and c for c in captions)
    again = make_caption({"profile": "tiny", "family": "blip2"}).process([image_sample(0, seed=5)])
    assert again[0].meta["caption"] == captions[0]
    # BLIP-2 answers a prompt: the prompt itself is not repeated in the caption.
    prompted = make_caption({"profile": "tiny", "family": "blip2"}, prompt="question: what is this? answer:")
    assert not prompted.process([image_sample(0)])[0].meta["caption"].startswith("question")
    assert stage.model_ids() == {"captioner": "tiny:blip2-caption-v1"}


def test_pretrained_profile_loads_a_saved_model(blip, tmp_path):
    saved = tmp_path / "blip"
    shutil.copytree(model_cache_dir() / "tiny" / TINY_BLIP, saved)
    real = make_caption({"profile": "pretrained", "model": str(saved), "dtype": "fp32"})
    assert real.model_ids() == {"captioner": str(saved)}
    assert real.process([image_sample(0)])[0].meta["caption"] == blip.process([image_sample(0)])[0].meta["caption"]


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    stage = CaptionStage(CaptionStage.Params(), CaptionStage.Model(), context())
    with pytest.raises(OSError, match="hub is unreachable") as err:
        stage.setup()
    assert "Salesforce/blip-image-captioning-large" in str(err.value)


# ------------------------------------------------------------------------------- prompt


def make_prompt(classes=VOC, **params):
    stage = PromptStage(PromptStage.Params(**params), PromptStage.Model(), context(classes))
    stage.setup()
    return stage


def test_prompt_registered_cpu_only_and_validated():
    assert resolve_stage("prompt") is PromptStage and not PromptStage.uses_gpu
    with pytest.raises(ValidationError, match="needs `captions`"):
        PromptStage.Params(mode="dataset")
    with pytest.raises(ValidationError):
        PromptStage.Params(mode="tags")


def test_caption_mode_and_missing_caption():
    stage = make_prompt(mode="caption")
    with_caption = Sample(shard=0, index=0, source_id="a", mask=voc_mask(), meta={"caption": "a living room"})
    without = Sample(shard=0, index=1, source_id="b", mask=voc_mask())
    out = stage.process([with_caption, without])
    assert out[0].meta["prompt"] == "a living room" and out[0].meta["prompt_mode"] == "caption"
    assert out[1].error == {
        "stage": "cap",
        "reason": "no_caption",
        "detail": "b: no caption in meta['caption'] (run a caption stage first)",
    }


def test_caption_classes_mode_most_pixels_first():
    stage = make_prompt(mode="caption_classes")
    sample = Sample(shard=0, index=0, source_id="a", mask=voc_mask(), meta={"caption": "a living room with a couch"})
    assert stage.process([sample])[0].meta["prompt"] == "a living room with a couch; sofa, chair, pottedplant"
    # Background is never named; an image with nothing else gets the caption alone.
    empty = Sample(shard=0, index=1, source_id="b", mask=np.zeros((4, 4), np.uint8), meta={"caption": "a wall"})
    assert stage.process([empty])[0].meta["prompt"] == "a wall"
    custom = make_prompt(mode="caption_classes", template="{classes}: {caption}", exclude_classes=["chair"])
    sample.meta.pop("prompt")
    assert custom.process([sample])[0].meta["prompt"] == "sofa, background, pottedplant: a living room with a couch"


def test_synonyms_map_to_the_dataset_names():
    stage = make_prompt(mode="caption_classes", synonyms={"couch": "sofa", "houseplant": "pottedplant"})
    # Names from another vocabulary (a sample with no mask) become the dataset's own, without repeats.
    sample = Sample(
        shard=0,
        index=0,
        source_id="a",
        meta={"caption": "a room", "class_names": ["couch", "sofa", "houseplant", "lamp"]},
    )
    assert stage.process([sample])[0].meta["prompt"] == "a room; sofa, pottedplant, lamp"
    # The class set's own synonyms apply too (ADE150 lists couch under sofa).
    ade = make_prompt(classes=class_set("ade150"), mode="caption_classes")
    sample = Sample(shard=0, index=0, source_id="a", meta={"caption": "a room", "class_names": ["couch", "wall"]})
    assert ade.process([sample])[0].meta["prompt"] == "a room; sofa, wall"


def write_coco_captions(path: Path):
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
                "annotations": [
                    {"image_id": 139, "id": 1, "caption": "A living room with a television."},
                    {"image_id": 139, "id": 2, "caption": " A room with chairs and a TV. "},
                    {"image_id": 285, "id": 3, "caption": "A big brown bear."},
                ],
            }
        )
    )


def test_read_captions_formats(tmp_path):
    write_coco_captions(tmp_path / "captions.json")
    coco = read_captions(str(tmp_path / "captions.json"))
    assert coco["000000000139"] == coco["139"] == ["A living room with a television.", "A room with chairs and a TV."]
    (tmp_path / "c.jsonl").write_text('{"id": "a", "caption": "one"}\n\n{"id": "a", "caption": "two"}\n')
    assert read_captions(str(tmp_path / "c.jsonl")) == {"a": ["one", "two"]}
    (tmp_path / "c.csv").write_text('id,caption\nb,"a cat, sleeping"\n')
    assert read_captions(f"file://{tmp_path / 'c.csv'}") == {"b": ["a cat, sleeping"]}
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="COCO .json"):
        read_captions(str(tmp_path / "c.txt"))
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_captions(str(tmp_path / "bad.json"))


def test_dataset_mode(tmp_path):
    write_coco_captions(tmp_path / "captions.json")
    stage = make_prompt(mode="dataset", captions=str(tmp_path / "captions.json"))
    assert stage.model_ids() == {"captions": str(tmp_path / "captions.json")}
    samples = [
        Sample(shard=0, index=0, source_id="000000000139"),
        Sample(shard=0, index=1, source_id="sub/x", meta={"image_path": "val2017/000000000285.jpg"}),
        Sample(shard=0, index=2, source_id="000000000999"),
    ]
    out = stage.process(samples)
    assert out[0].meta["prompt"] == out[0].meta["dataset_caption"] == "A living room with a television."
    assert out[1].meta["prompt"] == "A big brown bear."
    assert out[2].error["reason"] == "no_caption"

    seeded = [make_prompt(mode="dataset", captions=str(tmp_path / "captions.json"), pick="seeded") for _ in range(2)]
    picks = [s.process([Sample(shard=0, index=0, source_id="000000000139")])[0].meta["prompt"] for s in seeded]
    assert picks[0] == picks[1] and picks[0] in read_captions(str(tmp_path / "captions.json"))["139"]
