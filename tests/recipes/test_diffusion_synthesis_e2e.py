"""The Diffusion Synthesis recipe end to end through a local Ray, on tiny models: real VOC samples with
their masks, and an images-only folder labelled by the Mask Generator. Shards are read back."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import DATA, REPO, decode_image, decode_mask, load_json, read_tar
from PIL import Image

from factory.engine.driver import run_job
from factory.engine.spec import load_spec, parse_spec
from factory.sources import open_source
from factory.sources.classes import IGNORE, ClassSet, ade150_lookup, class_names_in, class_set

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

VOC = class_set("voc")
VOC_SOURCE = {
    "kind": "folder",
    "path": str(DATA / "voc_samples"),
    "classes": "voc",
    "image_suffix": "_image.png",
    "mask_suffix": "_target.png",
    "mask_format": "palette",
    "palette": "voc",
    "ignore_colors": [[224, 224, 192]],
}
# Five actor stages share the 2 test CPUs with the read and encode tasks: a fifth of a CPU each.
RES = {"num_cpus": 0.2, "batch_size": 4}
TINY = {"profile": "tiny"}
EPS = 0.8


def stage(kind, params=None, **extra):
    return {"kind": kind, "model": TINY, "params": params or {}, "resources": RES, **extra}


def read_all(out: Path, shard: int) -> dict:
    """key -> (files, meta) over the kept and the rejected shard of `shard`."""
    found = {}
    for tar in (out / "shards" / f"shard-{shard:06d}.tar", out / "rejected" / f"shard-{shard:06d}.tar"):
        if tar.exists():
            for key, files in read_tar(tar).items():
                found[key] = (files, json.loads(files["json"]))
    return found


@pytest.fixture(scope="module")
def voc_job(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "out"
    spec = parse_spec(
        {
            "name": "diffusion-e2e",
            "seed": 3,
            "source": VOC_SOURCE,
            "stages": [
                stage("caption", {"max_new_tokens": 8}),
                {"kind": "prompt", "params": {"mode": "caption_classes"}, "resources": RES},
                stage("controlnet", {"variants": 2, "steps": 2, "resolution": 64}, name="synth"),
                stage("select", {"eps": EPS, "miou_threshold": 0.0, "box_threshold": 0.1, "text_threshold": 0.1}),
            ],
            "output": {"url": str(out), "shard_size": 2, "image_format": "png", "keep_rejected": True},
        }
    )
    return run_job(spec), out, open_source(spec.source)


def test_recipe_writes_every_variant_kept_or_rejected(voc_job):
    index, out, _ = voc_job
    assert index["complete"] and index["num_shards"] == 2 and index["failed"] == 0
    assert index["samples"] + index["rejected"] == 3 * 2
    # With these seeds the tiny models give both outcomes, so both shard sets are exercised.
    assert index["samples"] > 0 and index["rejected"] > 0


def test_captions_prompts_and_exact_masks(voc_job):
    _, out, source = voc_job
    seen = 0
    for shard in range(2):
        for files, meta in read_all(out, shard).values():
            seen += 1
            record = source.load(meta["source_id"])
            assert isinstance(meta["caption"], str) and meta["caption"]
            names = [n for n in class_names_in(record.mask, VOC) if n != "background"]
            assert meta["prompt"] == f"{meta['caption']}; {', '.join(names)}"
            assert meta["prompt_mode"] == "caption_classes"
            assert meta["synthesis"]["steps"] == 2 and meta["synthesis"]["size"] == [64, 64]
            np.testing.assert_array_equal(decode_mask(files["seg.png"]), record.mask)
            image = decode_image(files["png"])
            assert image.shape == record.image.shape and not np.array_equal(image, record.image)
    assert seen == 6


def test_captions_export_one_line_per_source(voc_job, tmp_path):
    from factory.cli import main

    _, out, _ = voc_job
    assert main(["captions", str(out), "--out", str(tmp_path / "captions.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ["1", "114", "23"]
    assert all(isinstance(line["caption"], str) and line["caption"] for line in lines)


def test_scores_and_rejections_are_consistent(voc_job):
    _, out, _ = voc_job
    for shard in range(2):
        stats = load_json(out / "stats" / f"shard-{shard:06d}.json")
        kept = read_tar(out / "shards" / f"shard-{shard:06d}.tar")
        reasons = Counter()
        for key, (_, meta) in read_all(out, shard).items():
            scores = meta["scores"]
            assert scores["embedding"] == "clip" and -1 <= scores["cosine"] <= 1 and 0 <= scores["miou"] <= 1
            if scores["cosine"] > EPS:
                assert key in kept and "rejected" not in meta
            else:
                assert key not in kept and meta["rejected"]["reason"] == "low_cosine"
                reasons[f"select:{meta['rejected']['reason']}"] += 1
        assert stats["samples"] == len(kept) and stats["rejected"] == sum(reasons.values())
        assert stats["rejected_by_reason"] == dict(reasons)
        assert stats["models"]["caption"] == {"captioner": "tiny:blip-caption-v1"}
        assert stats["models"]["select"] == {
            "embedding": "tiny:clip-vision-v1",
            "detector": "tiny:grounding-dino-v2",
            "sam": "tiny:sam-v1",
        }


def test_images_only_source_is_labelled_by_the_mask_generator(ray_local, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for path in sorted((DATA / "voc_samples").glob("*_image.png")):
        Image.open(path).convert("RGB").resize((64, 64)).save(src / path.name.replace("_image", ""))
    out = tmp_path / "out"
    spec = parse_spec(
        {
            "name": "pseudo-e2e",
            "source": {
                "kind": "folder",
                "path": str(src),
                "classes": "voc",
                "image_suffix": ".png",
                "mask_suffix": None,
            },
            "stages": [
                stage("caption", {"max_new_tokens": 4}),
                stage("maskgen", {"mode": "fill_missing", "box_threshold": 0.1, "text_threshold": 0.1}),
                {"kind": "prompt", "params": {"mode": "caption_classes"}, "resources": RES},
                stage("controlnet", {"variants": 1, "steps": 2, "resolution": 32}, name="synth"),
                stage(
                    "select",
                    {
                        "embedding": "pixels",
                        "eps": -1.0,
                        "miou_threshold": 0.0,
                        "box_threshold": 0.1,
                        "text_threshold": 0.1,
                    },
                ),
            ],
            "output": {"url": str(out), "shard_size": 4, "image_format": "png"},
        }
    )
    index = run_job(spec)
    assert index["complete"] and index["samples"] == 3 and index["failed"] == 0
    samples = read_tar(out / "shards" / "shard-000000.tar")
    assert len(samples) == 3
    labelled = 0
    for files in samples.values():
        meta = json.loads(files["json"])
        assert meta["pseudo_label"] is True and set(files) == {"png", "seg.png", "inst.png", "json"}
        mask, instances = decode_mask(files["seg.png"]), decode_mask(files["inst.png"])
        assert mask.shape == instances.shape == (64, 64)
        assert set(np.unique(mask).tolist()) <= set(range(1, len(VOC))) | {IGNORE}  # background is never detected
        assert ((mask == IGNORE) == (instances == 0)).all()
        labelled += int((mask != IGNORE).any())
        names = class_names_in(mask, VOC)
        assert meta["prompt"] == (f"{meta['caption']}; {', '.join(names)}" if names else meta["caption"])
        assert meta["scores"]["embedding"] == "pixels" and "miou" in meta["scores"]
    assert labelled > 0


# ------------------------------------------------------------------------------- shipped files


def test_job_specs_validate_and_match():
    jobs = REPO / "jobs"
    real = load_spec(jobs / "diffusion_synthesis.yaml")
    tiny = load_spec(jobs / "diffusion_synthesis_tiny.yaml")
    kinds = ["caption", "prompt", "controlnet", "select"]
    assert [s.kind for s in real.stages] == [s.kind for s in tiny.stages] == kinds
    synth = real.stages[2].params
    assert (synth["variants"], synth["guidance"], synth["steps"]) == (5, 7.5, 50)
    assert real.stages[3].params["eps"] == 0.8 and real.stages[3].params["embedding"] == "clip"
    assert all(s.model.get("profile", "pretrained") == "pretrained" for s in real.stages if s.kind != "prompt")
    assert all(s.model["profile"] == "tiny" for s in tiny.stages if s.kind != "prompt")
    raw = yaml.safe_load((jobs / "diffusion_synthesis_tiny.yaml").read_text())
    assert raw["source"]["path"] == "build/scenes"


def test_coco_panoptic_class_map_covers_the_133_categories():
    path = REPO / "factory" / "data" / "class_maps" / "coco_panoptic_to_ade150.json"
    mapping = json.loads(path.read_text())
    assert len(mapping) == 133
    ade = set(class_set("ade150").names)
    assert all(v is None or v in ade for v in mapping.values())
    assert mapping["couch"] == "sofa" and mapping["wall-brick"] == "wall" and mapping["dog"] == "animal"
    coco = ClassSet("coco_panoptic", tuple(mapping))
    lut = ade150_lookup(coco)
    assert lut[coco.index("couch")] == class_set("ade150").index("sofa")
    assert lut[coco.index("fork")] == IGNORE
