"""A procedural scene generator, so the quickstart and the tests need no downloaded dataset.

Each scene is a crude picture with a ground-truth mask in ADE150 class ids: a horizon (sky over road or
grass outdoors, wall over floor indoors), a backdrop (mountains, buildings, trees, a painting), and a few
objects standing on the ground. Two looks, with the same layout and mask for a given (seed, index):

- `palette` (default): each class in its ADE150 palette colour, with texture noise. Colour alone gives
  the class, which is what a ControlNet conditioned on palette masks expects to see.
- `varied`: each class of a scene gets a random colour, drawn anew for every scene, and its texture
  family (plain, stripes, checks or blotches) with random angle, period, cell size and contrast. Every
  family is shared by three to five classes, so neither colour nor texture gives the class: a
  segmenter must learn shape and context (what stands on the ground, what is above the horizon, indoors
  or out). `factory eval`'s positive control trains on these.

Both add a vertical light gradient. Files are written as a `folder` source:

    kind: folder, classes: ade150, image_suffix: _image.png, mask_suffix: _mask.png

Scene i depends only on (seed, i): the same call writes bit-identical files, and a larger `count`
extends a set without changing the scenes already there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from factory.sample import BadSample
from factory.sources.base import Source, SourceRecord, fixed_classes
from factory.sources.classes import ade150_palette, class_set
from factory.sources.spec import SourceSpec

IMAGE_SUFFIX = "_image.png"
MASK_SUFFIX = "_mask.png"

# Objects that stand on the ground, by setting, with their (height, width) shape relative to their size.
_OUTDOOR_OBJECTS = (("person", 1.0, 0.35), ("car", 0.55, 1.4), ("tree", 1.4, 0.8))
_INDOOR_OBJECTS = (("person", 1.0, 0.35), ("table", 0.45, 1.0), ("chair", 0.6, 0.45), ("sofa", 0.5, 1.3))


def _cid(name: str) -> int:
    return class_set("ade150").index(name)


def _ellipse(mask: np.ndarray, value: int, cy: float, cx: float, ry: float, rx: float) -> None:
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    mask[((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0] = value


def _rect(mask: np.ndarray, value: int, top: float, left: float, bottom: float, right: float) -> None:
    h, w = mask.shape
    t, b = int(np.clip(round(top), 0, h)), int(np.clip(round(bottom), 0, h))
    x0, x1 = int(np.clip(round(left), 0, w)), int(np.clip(round(right), 0, w))
    mask[t:b, x0:x1] = value


STYLES = ("palette", "varied")
# The varied look's texture family of each class: every family is shared by several classes, so neither
# the colour (random per scene) nor the texture alone gives the class.
_TEXTURE_FAMILY = {
    _cid(name): family
    for family, names in (
        ("plain", ("sky", "wall", "person", "car", "sofa")),
        ("stripes", ("road", "painting", "table")),
        ("checks", ("floor", "building", "chair")),
        ("blotches", ("grass", "mountain", "tree")),
    )
    for name in names
}


def render_scene(size: int, seed: int, index: int, style: str = "palette") -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of set `seed`: ((size, size, 3) uint8 RGB image, (size, size) uint8 ADE150 ids)."""
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; use one of {', '.join(STYLES)}")
    rng = np.random.default_rng([seed, index])
    outdoor = rng.random() < 0.6
    horizon = int(size * rng.uniform(0.35, 0.6))
    mask = np.empty((size, size), dtype=np.uint8)
    objects: tuple[tuple[str, float, float], ...]  # the setting's; indoor and outdoor have different counts

    if outdoor:
        mask[:horizon] = _cid("sky")
        mask[horizon:] = _cid(str(rng.choice(["road", "grass"])))
        backdrop = rng.choice(["mountain", "building", "tree"])
        if backdrop == "mountain":
            # A ridge: a smooth random height profile over the horizon.
            x = np.arange(size)
            ridge = horizon - size * (0.08 + 0.12 * (1 + np.sin(x / size * rng.uniform(3, 9) + rng.uniform(0, 6))) / 2)
            yy = np.arange(size)[:, None]
            mask[(yy >= ridge[None, :]) & (yy < horizon)] = _cid("mountain")
        else:
            for _ in range(int(rng.integers(1, 4))):
                width, height = size * rng.uniform(0.15, 0.35), size * rng.uniform(0.15, 0.35)
                left = rng.uniform(-0.1, 0.9) * size
                if backdrop == "building":
                    _rect(mask, _cid("building"), horizon - height, left, horizon, left + width)
                else:
                    _ellipse(mask, _cid("tree"), horizon - height / 2, left + width / 2, height / 2, width / 2)
        objects = _OUTDOOR_OBJECTS
    else:
        mask[:horizon] = _cid("wall")
        mask[horizon:] = _cid("floor")
        if rng.random() < 0.7:
            height, width = size * rng.uniform(0.1, 0.2), size * rng.uniform(0.15, 0.3)
            top, left = rng.uniform(0.05, 0.2) * size, rng.uniform(0.05, 0.7) * size
            _rect(mask, _cid("painting"), top, left, top + height, left + width)
        objects = _INDOOR_OBJECTS

    # Objects stand on the ground; nearer ones (lower in the frame) are drawn bigger and later.
    placements = []
    for _ in range(int(rng.integers(1, 5))):
        name, rel_h, rel_w = objects[int(rng.integers(len(objects)))]
        bottom = rng.uniform(horizon + 1, size + size * 0.1)
        scale = (bottom - horizon + size * 0.15) * rng.uniform(0.6, 1.1)
        placements.append((bottom, name, rel_h * scale, rel_w * scale, rng.uniform(0, 1) * size, rng.random()))
    for bottom, name, height, width, cx, round_shape in sorted(placements, key=lambda p: p[0]):
        if round_shape < 0.5 or name == "tree":
            _ellipse(mask, _cid(name), bottom - height / 2, cx, height / 2, width / 2)
        else:
            _rect(mask, _cid(name), bottom - height, cx - width / 2, bottom, cx + width / 2)

    if style == "varied":
        # Its own random stream, so the layout above is the same in both looks.
        return _varied_look(mask, np.random.default_rng([seed, index, 1])), mask
    # Colour: palette colour per class, a coarse blotchy texture, fine grain, light from above.
    colour = ade150_palette()[mask].astype(np.float32)
    cell = 8
    coarse = rng.normal(0.0, 10.0, (size // cell + 1, size // cell + 1, 1)).astype(np.float32)
    coarse = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:size, :size]
    fine = rng.normal(0.0, 5.0, (size, size, 3)).astype(np.float32)
    light = np.linspace(1.1, 0.8, size, dtype=np.float32)[:, None, None]
    image = np.clip(colour * light + coarse + fine, 0, 255).round().astype(np.uint8)
    return image, mask


def _varied_look(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each class present: a random colour and its texture family with random parameters; grain, light."""
    size = mask.shape[0]
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = np.empty((size, size, 3), dtype=np.float32)
    for c in np.unique(mask):
        colour = rng.uniform(20, 235, 3).astype(np.float32)
        family, amplitude = _TEXTURE_FAMILY[int(c)], rng.uniform(15, 45)
        if family == "stripes":  # at a random angle and period
            angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
            pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        elif family == "checks":
            cell = int(rng.integers(2, 7))
            pattern = ((yy // cell + xx // cell) % 2) * 2 - 1
        elif family == "blotches":  # coarse noise, blown up
            cell = int(rng.integers(3, 9))
            coarse = rng.normal(0, 1, (size // cell + 1, size // cell + 1)).astype(np.float32)
            pattern = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:size, :size]
        else:
            pattern = np.zeros((size, size), dtype=np.float32)
        region = mask == c
        image[region] = colour + amplitude * pattern[region][:, None]
    image += rng.normal(0.0, 5.0, image.shape).astype(np.float32)
    image *= np.linspace(1.1, 0.8, size, dtype=np.float32)[:, None, None]
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _write_png(array: np.ndarray, path: Path) -> None:
    """Write through a temporary name, so an interrupted run never leaves a half file that looks done."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def make_scenes(
    out_dir: str | Path, count: int = 16, size: int = 64, seed: int = 0, style: str = "palette", start: int = 0
) -> list[str]:
    """Write scenes `start` .. `start + count - 1` to `out_dir` (skipping those already there); returns
    their ids, sorted. Sets made with other `start`s hold other scenes of the same seed: disjoint splits."""
    if count < 0 or size < 8 or start < 0:
        raise ValueError(
            f"make_scenes: need count >= 0, size >= 8 and start >= 0, got count={count}, size={size}, start={start}"
        )
    if style not in STYLES:
        raise ValueError(f"make_scenes: unknown style {style!r}; use one of {', '.join(STYLES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(start, start + count):
        sample_id = f"scene-{i:05d}"
        ids.append(sample_id)
        image_path, mask_path = out / f"{sample_id}{IMAGE_SUFFIX}", out / f"{sample_id}{MASK_SUFFIX}"
        if image_path.exists() and mask_path.exists():
            continue
        image, mask = render_scene(size, seed, i, style)
        _write_png(mask, mask_path)
        _write_png(image, image_path)
    return ids


# ---------------------------------------------------------------- the `scenes` source kind


class ScenesSource(Source):
    """`count` procedural ADE150 scenes (`factory.sources.scenes`), rendered on demand from their ids: no files.

    Ids are `scene-` and the zero-padded index, so they sort as the indices do; listing is a generator,
    so ten million ids cost no memory.
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.classes = fixed_classes(spec, class_set("ade150"))
        assert spec.count is not None  # the spec's validator requires it of a scenes source
        self.count = spec.count
        self._digits = max(7, len(str(self.count - 1)))
        self._id = re.compile(rf"scene-(\d{{{self._digits}}})")

    def _ids(self) -> Iterator[str]:
        return map(f"scene-{{:0{self._digits}d}}".format, range(self.count))

    def _load(self, sample_id: str) -> SourceRecord:
        match = self._id.fullmatch(sample_id)
        if match is None or int(match[1]) >= self.count:
            raise BadSample("missing_image", f"{sample_id}: not one of the {self.count} scenes of this source")
        index = int(match[1])
        image, mask = render_scene(self.spec.size, self.spec.seed, index)
        meta = {"scene_seed": self.spec.seed, "scene_index": index}
        return SourceRecord(sample_id, image, mask.astype(self.classes.mask_dtype, copy=False), None, meta)
