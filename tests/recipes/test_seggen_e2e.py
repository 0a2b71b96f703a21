"""MaskSyn and ImgSyn end to end through local Ray into shards, from the shipped tiny recipes.

The recipes start with the caption stage; these tests drop it so they exercise the SegGen stages alone
(Text2Mask and Mask2Img then prompt from the class-name template).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, decode_image, decode_mask, read_tar

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.sources.classes import IGNORE, class_set
from factory.sources.scenes import make_scenes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

JOBS = REPO / "jobs"
SCENES = 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, count=SCENES, size=40)
    return root


def recipe(name: str, scenes: Path, out: Path) -> dict:
    data = yaml.safe_load((JOBS / name).read_text())
    assert data["stages"][0]["kind"] == "caption"
    data["stages"] = data["stages"][1:]
    data["source"]["path"] = str(scenes)
    data["output"]["url"] = str(out)
    return data


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["failed"] == 0
    found = {}
    for shard in index["shards"]:
        found.update(read_tar(shard["url"]))
    return found


def test_imgsyn_keeps_the_human_masks_bit_for_bit(ray_local, scenes, tmp_path):
    spec = parse_spec(recipe("seggen_imgsyn_tiny.yaml", scenes, tmp_path / "imgsyn"))
    images = spec.stages[0].params["images"]
    index = run_job(spec)
    assert index["samples"] == SCENES * images
    found = samples(tmp_path / "imgsyn")
    assert len(found) == SCENES * images
    for _, files in sorted(found.items()):
        meta = json.loads(files["json"])
        human = decode_mask((scenes / f"{meta['source_id']}_mask.png").read_bytes())
        mask = decode_mask(files["seg.png"])
        assert mask.dtype == np.uint8 and np.array_equal(mask, human)
        assert decode_image(files["png"]).shape == (40, 40, 3)
        assert meta["image_kind"] == "synthetic" and meta["mask2img"]["models"]["mask2img"] == "tiny:seggen-mask2img-v1"
    variants = sorted(json.loads(f["json"])["variant"] for f in found.values())
    assert variants == sorted([str(j) for j in range(images)] * SCENES)


def test_masksyn_stores_new_decoded_masks_with_new_images(ray_local, scenes, tmp_path):
    spec = parse_spec(recipe("seggen_masksyn_tiny.yaml", scenes, tmp_path / "masksyn"))
    t2m, m2i = spec.stages
    per_scene = t2m.params["maps"] * m2i.params["images"]
    side = t2m.params["resolution"]
    run_job(spec)
    found = samples(tmp_path / "masksyn")
    assert len(found) == SCENES * per_scene
    names = class_set("ade150").names
    for files in found.values():
        meta = json.loads(files["json"])
        mask = decode_mask(files["seg.png"])
        assert mask.shape == (side, side) and decode_image(files["png"]).shape == (side, side, 3)
        assert set(np.unique(mask)) <= set(range(len(names))) | {IGNORE}
        assert meta["image_kind"] == "synthetic"
        assert meta["text2mask"]["stage"] == "text2mask" and meta["mask2img"]["stage"] == "mask2img"
        assert meta["prompt"].startswith("a photo of ")
    # Each scene gave `maps` different masks (own seeds), each mask one image.
    by_scene = {}
    for files in found.values():
        meta = json.loads(files["json"])
        by_scene.setdefault(meta["source_id"], set()).add(meta["text2mask"]["seed"])
    assert len(by_scene) == SCENES and all(len(seeds) == t2m.params["maps"] for seeds in by_scene.values())
