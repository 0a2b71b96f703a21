"""Small datasets in the real on-disk formats, for the reader, engine and bad-input tests.

Every builder writes under `root` and returns the sorted sample ids the reader should list. Images are
not square (SIZE = 24 x 32) so a transposed array cannot pass. The label layouts are fixed so tests can
check exact pixels; they are described next to each builder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from factory.sources.classes import voc_palette

SIZE = (24, 32)  # (H, W)
VOC_BOUNDARY_COLOUR = (224, 224, 192)


# -- writing files ---------------------------------------------------------------------------------


def image_array(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close), different per seed."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, 3)
    img = np.stack([base[0] + 2 * yy, base[1] + 2 * xx, base[2] + yy + xx], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """RGB image; JPEG or PNG by the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def write_mask(path: str | Path, array: np.ndarray) -> Path:
    """Single-channel label PNG: L for uint8, 16-bit for uint16 (Cityscapes instanceIds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def write_voc_mask(path: str | Path, array: np.ndarray) -> Path:
    """P-mode PNG with the VOC colour map, as VOC's SegmentationClass files are stored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array.astype(np.uint8), mode="P")
    im.putpalette(voc_palette(256).flatten().tolist())
    im.save(path, format="PNG")
    return path


def corrupt_jpeg(path: str | Path) -> Path:
    """Keep the JPEG start marker and header bytes, overwrite the rest with zeros (a damaged file)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:20] + bytes(len(data) - 20))
    return path


def truncate_png(path: str | Path) -> Path:
    """Cut a PNG in the middle of its first IDAT chunk: the header reads, the pixels do not."""
    path = Path(path)
    data = path.read_bytes()
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    path.write_bytes(data[: at + 4 + max(1, length // 2)])
    return path


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Keep the first `keep` fraction of a file (an interrupted copy)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# -- folder ----------------------------------------------------------------------------------------


def folder_mask(i: int, num_classes: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Columns: class 0 | class 1 + i % (num_classes - 1) | ignore 255 (last 4 columns)."""
    h, w = size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, w // 2 :] = 1 + i % (num_classes - 1)
    mask[:, w - 4 :] = 255
    return mask


def make_folder(
    root: str | Path,
    n: int = 3,
    *,
    image_suffix: str = "_image.png",
    mask_suffix: str = "_target.png",
    mask_format: str = "ids",
    num_classes: int = 5,
    size: tuple[int, int] = SIZE,
    subdir: str = "",
) -> list[str]:
    """`sample-NNN<image_suffix>` + `sample-NNN<mask_suffix>` under root/subdir.

    mask_format "ids": L PNG of class ids (`folder_mask`); "palette": RGB PNG in the VOC colours of
    `num_classes` classes, ignore drawn in the VOC boundary colour (224, 224, 192).
    """
    base = Path(root) / subdir
    palette = voc_palette(num_classes)
    ids = []
    for i in range(n):
        stem = f"sample-{i:03d}"
        write_image(base / f"{stem}{image_suffix}", image_array(i, size))
        mask = folder_mask(i, num_classes, size)
        if mask_format == "ids":
            write_mask(base / f"{stem}{mask_suffix}", mask)
        else:
            table = np.zeros((256, 3), dtype=np.uint8)
            table[:num_classes] = palette
            table[255] = VOC_BOUNDARY_COLOUR
            write_image(base / f"{stem}{mask_suffix}", table[mask])
        ids.append(f"{subdir}/{stem}" if subdir else stem)
    return sorted(ids)


# -- ADE20K ----------------------------------------------------------------------------------------


def ade_annotation(i: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Raw ADE values in column bands: 0 (unlabeled) | 5 | 150 | 1 + i % 150."""
    h, w = size
    raw = np.zeros((h, w), dtype=np.uint8)
    raw[:, w // 4 : w // 2] = 5
    raw[:, w // 2 : 3 * w // 4] = 150
    raw[:, 3 * w // 4 :] = 1 + i % 150
    return raw


def make_ade20k(root: str | Path, n: int = 3, split: str = "training", size: tuple[int, int] = SIZE) -> list[str]:
    """ADEChallengeData2016 layout at root: images/<split>/ADE_*.jpg, annotations/<split>/ADE_*.png."""
    root = Path(root)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    ids = []
    for i in range(n):
        stem = f"{prefix}_{i + 1:08d}"
        write_image(root / "images" / split / f"{stem}.jpg", image_array(i, size))
        write_mask(root / "annotations" / split / f"{stem}.png", ade_annotation(i, size))
        ids.append(stem)
    return sorted(ids)


# -- COCO panoptic ---------------------------------------------------------------------------------

# Written to the JSON out of id order; the reader sorts by id: person 0, car 1, sky 2, grass 3.
COCO_CATEGORIES = [
    {"id": 187, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky"},
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
    {"id": 193, "name": "grass-merged", "isthing": 0, "supercategory": "plant"},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "vehicle"},
]
COCO_CLASS_NAMES = ("person", "car", "sky-other-merged", "grass-merged")

# Segment ids use all three bytes of the RGB encoding (id = R + 256 G + 256^2 B).
COCO_SEGMENTS = {
    "sky": 3 + 256 * 2 + 65536 * 1,
    "grass": 5 + 256 * 7,
    "person_a": 40,
    "person_b": 41 + 256,
    "car": 70000,
    "crowd": 90,
}


def coco_segment_map(size: tuple[int, int] = SIZE) -> np.ndarray:
    """Segment ids: sky rows [0, h/2), grass below; person_a cols 2:8 and person_b cols 10:16 on rows
    4:20; car rows 14:22 cols 18:28; a crowd of people rows 0:4 cols 28:; the last row is void (0)."""
    h, w = size
    s = COCO_SEGMENTS
    seg = np.full((h, w), s["grass"], dtype=np.int64)
    seg[: h // 2] = s["sky"]
    seg[4:20, 2:8] = s["person_a"]
    seg[4:20, 10:16] = s["person_b"]
    seg[14:22, 18:28] = s["car"]
    seg[0:4, 28:] = s["crowd"]
    seg[h - 1] = 0
    return seg


def make_coco_panoptic(
    root: str | Path, n: int = 3, split: str = "val2017", size: tuple[int, int] = SIZE, png_dir_at_root: bool = False
) -> list[str]:
    """annotations/panoptic_<split>.json, RGB-encoded PNGs in annotations/panoptic_<split>/ (or
    panoptic_<split>/ at root), images in <split>/. segments_info lists the car first, so instance
    numbers follow that order: car 1, person_a 2, person_b 3; the crowd segment is no instance."""
    root = Path(root)
    png_dir = root / f"panoptic_{split}" if png_dir_at_root else root / "annotations" / f"panoptic_{split}"
    seg = coco_segment_map(size)
    rgb = np.stack([seg % 256, (seg // 256) % 256, seg // 65536], axis=-1).astype(np.uint8)
    s = COCO_SEGMENTS
    segments_info = [
        {"id": s["car"], "category_id": 3, "iscrowd": 0},
        {"id": s["person_a"], "category_id": 1, "iscrowd": 0},
        {"id": s["person_b"], "category_id": 1, "iscrowd": 0},
        {"id": s["sky"], "category_id": 187, "iscrowd": 0},
        {"id": s["grass"], "category_id": 193, "iscrowd": 0},
        {"id": s["crowd"], "category_id": 1, "iscrowd": 1},
    ]
    images, annotations, ids = [], [], []
    for i in range(n):
        stem = f"{i + 1:012d}"
        write_image(root / split / f"{stem}.jpg", image_array(i, size))
        write_image(png_dir / f"{stem}.png", rgb)
        images.append({"id": i + 1, "file_name": f"{stem}.jpg", "height": size[0], "width": size[1]})
        annotations.append({"image_id": i + 1, "file_name": f"{stem}.png", "segments_info": segments_info})
        ids.append(stem)
    doc = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(doc))
    return sorted(ids)


# -- PASCAL VOC ------------------------------------------------------------------------------------


def voc_mask(i: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Background 0, an object of class 1 + i % 20 in rows 6:18 cols 8:24, a 255 boundary around it."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[5:19, 7:25] = 255
    mask[6:18, 8:24] = 1 + i % 20
    return mask


def make_voc(
    root: str | Path, n: int = 3, split: str = "train", size: tuple[int, int] = SIZE, layout: str = "VOCdevkit"
) -> list[str]:
    """VOC2012 at root/VOCdevkit/VOC2012 (layout "VOCdevkit"), root/VOC2012 ("VOC2012") or root ("flat").
    The split list is written in reverse order; the reader sorts."""
    root = Path(root)
    base = {"VOCdevkit": root / "VOCdevkit" / "VOC2012", "VOC2012": root / "VOC2012", "flat": root}[layout]
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, sample_id in enumerate(ids):
        write_image(base / "JPEGImages" / f"{sample_id}.jpg", image_array(i, size))
        write_voc_mask(base / "SegmentationClass" / f"{sample_id}.png", voc_mask(i, size))
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("".join(f"{x}\n" for x in reversed(ids)))
    return sorted(ids)


# -- Cityscapes ------------------------------------------------------------------------------------


def cityscapes_label_ids(size: tuple[int, int] = SIZE) -> np.ndarray:
    """labelIds in column bands: 7 road | 26 car | 0 unlabeled | 24 person | 255 (license plate, -1)
    | 33 bicycle | 4 static (no trainId)."""
    h, w = size
    raw = np.zeros((h, w), dtype=np.uint8)
    bands = [7, 26, 0, 24, 255, 33, 4]
    edges = np.linspace(0, w, len(bands) + 1).astype(int)
    for value, a, b in zip(bands, edges[:-1], edges[1:]):
        raw[:, a:b] = value
    return raw


def cityscapes_instance_ids(size: tuple[int, int] = SIZE) -> np.ndarray:
    """instanceIds: the labelIds, with the car band split into cars 26001 (top) and 26000 (bottom) and
    the person band person 24000; 16-bit."""
    label = cityscapes_label_ids(size).astype(np.uint16)
    label[label == 255] = 0
    inst = label.copy()
    h = size[0]
    car = label == 26
    inst[car] = 26000
    inst[: h // 2][car[: h // 2]] = 26001
    inst[label == 24] = 24000
    return inst


def make_cityscapes(
    root: str | Path,
    n: int = 3,
    split: str = "train",
    size: tuple[int, int] = SIZE,
    cities: tuple[str, ...] = ("bochum", "aachen"),
    instances: bool = True,
) -> list[str]:
    """leftImg8bit/<split>/<city>/<x>_leftImg8bit.png with gtFine labelIds (and instanceIds)."""
    root = Path(root)
    ids = []
    for i in range(n):
        city = cities[i % len(cities)]
        stem = f"{city}_000000_{i:06d}"
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image_array(i, size))
        gt = root / "gtFine" / split / city
        write_mask(gt / f"{stem}_gtFine_labelIds.png", cityscapes_label_ids(size))
        if instances:
            write_mask(gt / f"{stem}_gtFine_instanceIds.png", cityscapes_instance_ids(size))
        ids.append(f"{city}/{stem}")
    return sorted(ids)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG-encoded bytes of an array (for writing into non-local filesystems)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
