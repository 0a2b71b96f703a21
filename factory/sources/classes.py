"""Class sets, palettes and the colour maps that condition segmentation ControlNets.

Masks inside the factory are class-id arrays: 0..N-1 for the N classes of the source's class set and
`IGNORE` (255) for unlabeled pixels. A mask becomes colours only to condition a model; it is never stored
as colours.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

IGNORE = 255
IGNORE_UINT16 = 65535


@dataclass(frozen=True)
class ClassSet:
    """An ordered list of class names; the index of a name is its class id."""

    name: str
    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def mask_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if len(self.names) < IGNORE else np.dtype(np.uint16)

    @property
    def ignore_index(self) -> int:
        return IGNORE if self.mask_dtype == np.uint8 else IGNORE_UINT16

    def index(self, name: str) -> int:
        """Class id of a name, else of the first class listing it as a synonym."""
        if name in self.names:
            return self.names.index(name)
        for i, words in enumerate(self.synonyms):
            if name in words:
                return i
        raise KeyError(f"class {name!r} is not in class set {self.name!r}")


def _data_path(name: str):
    return resources.files("factory.data").joinpath(name)


@cache
def _ade150_rows() -> list[dict]:
    with _data_path("ade150.csv").open() as f:
        return list(csv.DictReader(f))


def ade150_palette() -> np.ndarray:
    """(150, 3) uint8: the ADE20K palette `lllyasviel/sd-controlnet-seg` was trained on, by 0-based id."""
    return np.array([[int(r["r"]), int(r["g"]), int(r["b"])] for r in _ade150_rows()], dtype=np.uint8)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class c gets the bits of c spread over the high bits of R, G, B."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        r = g = b = 0
        cid = c
        for j in range(8):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        palette[c] = (r, g, b)
    return palette


VOC_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

CITYSCAPES_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


@cache
def class_set(name: str) -> ClassSet:
    """A named class set shipped with the factory: ade150, voc, cityscapes."""
    if name == "ade150":
        rows = _ade150_rows()
        return ClassSet(
            "ade150",
            tuple(r["name"] for r in rows),
            # The source CSV lost the spaces of multi-word synonyms; single words still resolve.
            tuple(tuple(w for w in r["words"].split(";") if w and w != r["name"]) for r in rows),
        )
    if name == "voc":
        return ClassSet("voc", VOC_NAMES)
    if name == "cityscapes":
        return ClassSet("cityscapes", CITYSCAPES_NAMES)
    raise KeyError(f"unknown class set {name!r}; known: ade150, voc, cityscapes, or a list of names")


@cache
def ade150_class_map(class_set_name: str) -> dict[str, str | None]:
    """Source class name -> ADE150 class name used to condition an ADE150-trained model (None: unlabeled)."""
    if class_set_name == "ade150":
        return {n: n for n in class_set("ade150").names}
    path = _data_path(f"class_maps/{class_set_name}_to_ade150.json")
    if not path.is_file():
        raise KeyError(f"no class map from {class_set_name!r} to ade150 is shipped; give one in the spec")
    return json.loads(path.read_text())


def ade150_lookup(classes: ClassSet, overrides: dict[str, str | None] | None = None) -> np.ndarray:
    """A lookup table from the source's class ids to ADE150 ids (IGNORE where the class has no match)."""
    try:
        mapping = dict(ade150_class_map(classes.name))
    except KeyError:
        if overrides is None:
            raise
        mapping = {}
    mapping.update(overrides or {})
    ade = class_set("ade150")
    lut = np.full(max(len(classes), classes.ignore_index) + 1, IGNORE, dtype=np.int64)
    for i, name in enumerate(classes.names):
        target = mapping.get(name, name if classes.name == "ade150" else None)
        if target is not None:
            lut[i] = ade.index(target)
    return lut


def colorize(mask: np.ndarray, palette: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """Class-id mask -> (H, W, 3) uint8 colour map; ids without a palette entry become black."""
    ids = mask.astype(np.int64)
    if lut is not None:
        ids = lut[ids]
    table = np.zeros((max(int(ids.max(initial=0)) + 1, len(palette)), 3), dtype=np.uint8)
    table[: len(palette)] = palette
    out = table[ids]
    out[ids >= len(palette)] = 0
    return out


def decode_palette_mask(
    rgb: np.ndarray, palette: np.ndarray, ignore_colors: tuple[tuple[int, ...], ...] = ()
) -> tuple[np.ndarray, int]:
    """(H, W, 3) colours -> (class ids, number of pixels whose colour is in no palette) by exact match.

    For dataset masks stored as colours (VOC style), where every colour is exact. Colours in
    `ignore_colors` (VOC's boundary colour, black for "unlabeled") are ignore by definition; any other
    unknown colour is counted so the reader can reject the mask instead of guessing.
    """

    def pack(c: np.ndarray) -> np.ndarray:
        c = c.astype(np.int64)
        return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]

    key = pack(rgb)
    pal = pack(np.asarray(palette))
    order = np.argsort(pal, kind="stable")
    pos = np.clip(np.searchsorted(pal[order], key), 0, len(pal) - 1)
    hit = pal[order][pos] == key
    small = len(palette) < IGNORE
    out = np.where(hit, order[pos], IGNORE if small else IGNORE_UINT16).astype(np.uint8 if small else np.uint16)
    ignored = np.isin(key, pack(np.asarray(ignore_colors, dtype=np.int64).reshape(-1, 3)))
    return out, int(np.count_nonzero(~hit & ~ignored))


def class_names_in(mask: np.ndarray, classes: ClassSet) -> list[str]:
    """Names of the classes present in a mask, most pixels first."""
    ids, counts = np.unique(mask, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [classes.names[i] for i in ids[order] if i < len(classes)]
