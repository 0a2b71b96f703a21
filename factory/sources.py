"""Dataset readers: one sample at a time, streamed through fsspec (local paths, memory://, s3://...).

A reader lists sample ids (sorted, so the plan is the same on every run) and loads one sample by id as
an RGB image plus a class-id mask in the source's class set (ignore = `classes.ignore_index`). Bad data
raises `BadSample` with a stable reason word; the engine counts it and goes on. Only listings are held
in memory, never the images.

Readers are pickled to Ray workers, so they hold only the spec, the filesystem object and small tables.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
from PIL import Image

from factory.classes import ClassSet, ade150_palette, class_set, decode_palette_mask, voc_palette
from factory.sample import BadSample
from factory.spec import SourceSpec

log = logging.getLogger(__name__)


@dataclass
class SourceRecord:
    id: str  # stable, unique id (relative stem path); the plan sorts on it
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) classes.mask_dtype, ids 0..N-1, ignore = classes.ignore_index
    instances: np.ndarray | None = None  # (H, W) int32 instance ids, 0 = none
    meta: dict = field(default_factory=dict)  # JSON-able extras


def resolve_classes(value: str | list[str]) -> ClassSet:
    """A class set from a spec: a shipped name (ade150, voc, cityscapes) or a list of names."""
    if isinstance(value, str):
        return class_set(value)
    return ClassSet("custom", tuple(value))


def _fixed_classes(spec: SourceSpec, default: ClassSet) -> ClassSet:
    """The class set of a dataset whose label ids are fixed: `spec.classes` may only rename the classes."""
    if spec.classes is None:
        return default
    classes = resolve_classes(spec.classes)
    if len(classes) != len(default):
        raise ValueError(
            f"source {spec.kind}: classes has {len(classes)} names but the dataset's labels define "
            f"{len(default)} ({default.name}); a class set here can only rename them"
        )
    return classes


def _decode(data: bytes, path: str, reason: str) -> Image.Image:
    """Decode fully: PIL is lazy, and a truncated file only fails when the pixels are read."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise BadSample(reason, f"{path}: {e}") from None
    return im


def _id_array(im: Image.Image, path: str) -> np.ndarray:
    """The raw values of a single-channel label PNG. P mode gives the palette indices, not colours."""
    if im.mode in ("L", "P") or im.mode.startswith("I"):
        return np.asarray(im).astype(np.int32)
    raise BadSample(
        "corrupt_mask", f"{path}: mode {im.mode} is not a single-channel id mask (colour masks need a palette)"
    )


def _apply_lut(raw: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
    """Map raw label values through `lut`; -1 entries and values past its end are not valid labels."""
    bad = (raw < 0) | (raw >= len(lut))
    if not bad.any():
        mapped = lut[raw]
        bad = mapped < 0
    if bad.any():
        values = np.unique(raw[bad])[:8].tolist()
        raise BadSample("unknown_class_id", f"{path}: label values {values} have no class")
    return mapped


class Source(ABC):
    """A dataset: sorted ids, and one `SourceRecord` per id."""

    classes: ClassSet
    default_split: str | None = None

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.fs, root = fsspec.core.url_to_fs(spec.path, **spec.storage_options)
        self.root = root.rstrip("/") or root
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"source {spec.kind}: path {spec.path!r} does not exist")
        self.split = spec.split or self.default_split

    # -- listing -------------------------------------------------------------------------------------

    def list_ids(self) -> Iterator[str]:
        ids = self._ids()
        if self.spec.limit is not None:
            ids = ids[: self.spec.limit]
        yield from ids

    @abstractmethod
    def _ids(self) -> list[str]:
        """All ids of the source, sorted ascending and unique."""

    @abstractmethod
    def load(self, sample_id: str) -> SourceRecord:
        """One sample; raises BadSample for data that cannot be used."""

    # -- helpers shared by the readers ---------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _rel(self, path: str, base: str | None = None) -> str:
        base = (base or self.root).rstrip("/")
        return path[len(base) + 1 :] if path.startswith(base + "/") else path

    def _find(self, base: str, suffix: str, what: str) -> list[str]:
        """Files under `base` whose name ends with `suffix`; warns if `base` is absent."""
        if not self.fs.isdir(base):
            log.warning("source %s: no %s at %s", self.spec.kind, what, base)
            return []
        return [p for p in self.fs.find(base) if p.endswith(suffix)]

    def _read(self, path: str, missing_reason: str) -> bytes:
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadSample(missing_reason, f"{path}: no such file") from None

    def _image(self, path: str) -> np.ndarray:
        # No EXIF transpose: dataset masks are aligned with the stored pixel grid, not the displayed one.
        im = _decode(self._read(path, "missing_image"), path, "corrupt_image")
        return np.array(im if im.mode == "RGB" else im.convert("RGB"))

    def _mask_image(self, path: str) -> Image.Image:
        return _decode(self._read(path, "missing_mask"), path, "corrupt_mask")

    def _check_ids(self, ids: np.ndarray, path: str) -> np.ndarray:
        """Class ids as `classes.mask_dtype`; anything neither a class nor ignore is rejected."""
        n, ignore = len(self.classes), self.classes.ignore_index
        bad = ((ids < 0) | (ids >= n)) & (ids != ignore)
        if bad.any():
            values = np.unique(ids[bad])[:8].tolist()
            raise BadSample(
                "unknown_class_id", f"{path}: values {values} are not among the {n} classes of {self.classes.name!r}"
            )
        return ids.astype(self.classes.mask_dtype)

    @staticmethod
    def _check_size(image: np.ndarray, label: np.ndarray, path: str) -> None:
        if label.shape[:2] != image.shape[:2]:
            raise BadSample(
                "size_mismatch", f"{path}: {label.shape[1]}x{label.shape[0]} vs image {image.shape[1]}x{image.shape[0]}"
            )


class FolderSource(Source):
    """`<stem><image_suffix>` images with `<stem><mask_suffix>` masks beside them, in any subfolder.

    With `mask_suffix` null the folder holds images only: samples carry no mask (a mask generator
    stage can label them).
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.classes = resolve_classes(spec.classes)
        if spec.image_suffix == spec.mask_suffix:
            raise ValueError(f"source folder: image_suffix and mask_suffix are both {spec.image_suffix!r}")
        self._palette = None
        if spec.mask_format == "palette":
            if self.classes.mask_dtype != np.uint8:
                raise ValueError("source folder: colour masks support at most 254 classes")
            self._palette = self._resolve_palette(spec.palette)
            self._ignore_colors = tuple(tuple(int(v) for v in c) for c in spec.ignore_colors)

    def _resolve_palette(self, palette: str | list[list[int]]) -> np.ndarray:
        if palette == "voc":
            return voc_palette(len(self.classes))
        if palette == "ade150":
            return ade150_palette()
        if isinstance(palette, str):
            raise ValueError(f"source folder: unknown palette {palette!r}; use voc, ade150 or RGB rows")
        rows = np.asarray(palette)
        if rows.ndim != 2 or rows.shape[1] != 3 or rows.min(initial=0) < 0 or rows.max(initial=0) > 255:
            raise ValueError("source folder: palette rows must be [r, g, b] with values 0..255")
        return rows.astype(np.uint8)

    def _ids(self) -> list[str]:
        image_suffix, mask_suffix = self.spec.image_suffix, self.spec.mask_suffix
        # With ".png" images and "_mask.png" masks every mask also ends with the image suffix: a file
        # that ends with the longer suffix is a mask, never an image.
        masks_look_like_images = (
            mask_suffix is not None and len(mask_suffix) > len(image_suffix) and mask_suffix.endswith(image_suffix)
        )
        ids = {
            self._rel(p)[: -len(image_suffix)]
            for p in self.fs.find(self.root)
            if p.endswith(image_suffix) and not (masks_look_like_images and p.endswith(mask_suffix))
        }
        return sorted(ids)

    def load(self, sample_id: str) -> SourceRecord:
        image_path = self._path(sample_id + self.spec.image_suffix)
        image = self._image(image_path)
        if self.spec.mask_suffix is None:
            return SourceRecord(sample_id, image, None, None, {"image_path": self._rel(image_path)})
        mask_path = self._path(sample_id + self.spec.mask_suffix)
        mask_im = self._mask_image(mask_path)
        if self._palette is None:
            raw = _id_array(mask_im, mask_path)
            self._check_size(image, raw, mask_path)
            mask = self._check_ids(raw, mask_path)
        else:
            rgb = np.asarray(mask_im.convert("RGB"))
            self._check_size(image, rgb, mask_path)
            ids, unknown = decode_palette_mask(rgb, self._palette, self._ignore_colors)
            if unknown:
                raise BadSample("unknown_class_id", f"{mask_path}: {unknown} pixels have colours not in the palette")
            mask = self._check_ids(ids.astype(np.int32), mask_path)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(mask_path)}
        return SourceRecord(sample_id, image, mask, None, meta)


class ADE20KSource(Source):
    """ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png with 0 = unlabeled, 1..150."""

    default_split = "training"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        # Accept the directory that holds ADEChallengeData2016 as well as the dataset directory itself.
        if not self.fs.isdir(self._path("images")) and self.fs.isdir(self._path("ADEChallengeData2016")):
            self.root = self._path("ADEChallengeData2016")
        self.classes = _fixed_classes(spec, class_set("ade150"))
        # Annotation value v is class v-1; 0 is unlabeled.
        self._lut = np.array([self.classes.ignore_index, *range(len(self.classes))], dtype=np.int32)

    def _ids(self) -> list[str]:
        base = self._path("images", self.split)
        return sorted({self._rel(p, base)[: -len(".jpg")] for p in self._find(base, ".jpg", "images")})

    def load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("images", self.split, sample_id + ".jpg")
        mask_path = self._path("annotations", self.split, sample_id + ".png")
        image = self._image(image_path)
        raw = _id_array(self._mask_image(mask_path), mask_path)
        self._check_size(image, raw, mask_path)
        mask = _apply_lut(raw, self._lut, mask_path).astype(self.classes.mask_dtype)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(mask_path)}
        return SourceRecord(sample_id, image, mask, None, meta)


class CocoPanopticSource(Source):
    """COCO panoptic: annotations/panoptic_<split>.json, RGB-encoded segment PNGs, images in <split>/."""

    default_split = "val2017"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._json_path = self._path("annotations", f"panoptic_{self.split}.json")
        self._png_dir = self._path("annotations", f"panoptic_{self.split}")
        if not self.fs.isdir(self._png_dir) and self.fs.isdir(self._path(f"panoptic_{self.split}")):
            self._png_dir = self._path(f"panoptic_{self.split}")
        self._index: dict | None = None
        names = self._load_index()
        self.classes = _fixed_classes(spec, ClassSet("coco_panoptic", names))

    def __getstate__(self):
        # The annotation index can be tens of MB: each unpickled copy (a Ray worker) parses the JSON
        # once itself instead of receiving it with every task.
        state = dict(self.__dict__)
        state["_index"] = None
        return state

    def _load_index(self) -> tuple[str, ...]:
        """Parse the JSON once; keep a compact id -> (png, image, segments) table. Returns class names."""
        if not self.fs.isfile(self._json_path):
            log.warning("source coco_panoptic: no annotation file at %s", self._json_path)
            self._index, self._categories = {}, {}
            return ()
        with self.fs.open(self._json_path, "rb") as f:
            data = json.load(f)
        try:
            # Categories sorted by COCO id become the contiguous class ids 0..K-1.
            cats = sorted(data["categories"], key=lambda c: c["id"])
            self._categories = {c["id"]: (i, bool(c.get("isthing", 0))) for i, c in enumerate(cats)}
            image_files = {im["id"]: im["file_name"] for im in data.get("images", [])}
            index = {}
            for ann in data["annotations"]:
                stem = posixpath.splitext(ann["file_name"])[0]
                image_file = image_files.get(ann["image_id"], stem + ".jpg")
                segments = tuple(
                    (s["id"], s["category_id"], bool(s.get("iscrowd", 0))) for s in ann["segments_info"]
                )
                index[stem] = (ann["file_name"], image_file, segments)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self._json_path}: not a COCO panoptic annotation file ({e!r})") from None
        self._index = index
        return tuple(c["name"] for c in cats)

    def _ids(self) -> list[str]:
        if self._index is None:
            self._load_index()
        return sorted(self._index)

    def load(self, sample_id: str) -> SourceRecord:
        if self._index is None:
            self._load_index()
        png_file, image_file, segments = self._index[sample_id]
        image_path = self._path(self.split, image_file)
        png_path = posixpath.join(self._png_dir, png_file)
        image = self._image(image_path)
        png = self._mask_image(png_path)
        if png.mode not in ("RGB", "RGBA"):
            raise BadSample("corrupt_mask", f"{png_path}: mode {png.mode}, expected an RGB panoptic PNG")
        rgb = np.asarray(png.convert("RGB")).astype(np.int32)
        self._check_size(image, rgb, png_path)
        seg = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]

        # Map each distinct segment id once, then index: a few dozen segments, not a pass per segment.
        present, inverse = np.unique(seg, return_inverse=True)
        info = {sid: (cat, crowd) for sid, cat, crowd in segments}
        semantic = np.full(len(present), self.classes.ignore_index, dtype=np.int32)
        instance = np.zeros(len(present), dtype=np.int32)
        present_set = {int(s) for s in present}
        # Instances are numbered 1..n in segments_info order over the thing segments in the PNG. Crowd
        # regions keep their class but are no single instance (0), as in COCO's own evaluation.
        numbers: dict[int, int] = {}
        for sid, cat, crowd in segments:
            if sid in present_set and not crowd and self._categories.get(cat, (0, False))[1]:
                numbers[sid] = len(numbers) + 1
        for j, sid in enumerate(present.tolist()):
            if sid == 0:
                continue  # void
            if sid not in info:
                raise BadSample("unknown_class_id", f"{png_path}: segment {sid} has no segments_info entry")
            cat = info[sid][0]
            if cat not in self._categories:
                raise BadSample("unknown_class_id", f"{png_path}: segment {sid} has unknown category {cat}")
            semantic[j] = self._categories[cat][0]
            instance[j] = numbers.get(sid, 0)
        inverse = inverse.reshape(seg.shape)
        mask = semantic[inverse].astype(self.classes.mask_dtype)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(png_path)}
        return SourceRecord(sample_id, image, mask, instance[inverse], meta)


class VOCSource(Source):
    """PASCAL VOC 2012 segmentation: split lists, JPEGImages, P-mode SegmentationClass (255 = boundary)."""

    default_split = "train"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        # The root may be VOC2012 itself, or a directory holding VOC2012 or VOCdevkit/VOC2012.
        for candidate in (self.root, self._path("VOC2012"), self._path("VOCdevkit", "VOC2012")):
            if self.fs.isdir(posixpath.join(candidate, "ImageSets", "Segmentation")):
                self.root = candidate
                break
        self.classes = _fixed_classes(spec, class_set("voc"))

    def _ids(self) -> list[str]:
        list_path = self._path("ImageSets", "Segmentation", f"{self.split}.txt")
        if not self.fs.isfile(list_path):
            log.warning("source voc: no split list at %s", list_path)
            return []
        with self.fs.open(list_path, "r") as f:
            return sorted({line.split()[0] for line in f if line.strip()})

    def load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("JPEGImages", sample_id + ".jpg")
        mask_path = self._path("SegmentationClass", sample_id + ".png")
        image = self._image(image_path)
        raw = _id_array(self._mask_image(mask_path), mask_path)
        self._check_size(image, raw, mask_path)
        mask = self._check_ids(raw, mask_path)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(mask_path)}
        return SourceRecord(sample_id, image, mask, None, meta)


# The official Cityscapes labelId -> trainId table (labels.py); other labelIds are unlabeled.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


class CityscapesSource(Source):
    """Cityscapes fine annotations: leftImg8bit/<split>/<city>/<x>_leftImg8bit.png + gtFine labelIds."""

    default_split = "train"
    image_suffix = "_leftImg8bit.png"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.classes = _fixed_classes(spec, class_set("cityscapes"))
        # labelIds 0..33 are defined, and license plate (-1) is stored as 255; any other value is invalid.
        lut = np.full(256, -1, dtype=np.int32)
        lut[:34] = self.classes.ignore_index
        lut[255] = self.classes.ignore_index
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        self._lut = lut

    def _ids(self) -> list[str]:
        base = self._path("leftImg8bit", self.split)
        paths = self._find(base, self.image_suffix, "leftImg8bit images")
        return sorted({self._rel(p, base)[: -len(self.image_suffix)] for p in paths})

    def load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("leftImg8bit", self.split, sample_id + self.image_suffix)
        label_path = self._path("gtFine", self.split, sample_id + "_gtFine_labelIds.png")
        instance_path = self._path("gtFine", self.split, sample_id + "_gtFine_instanceIds.png")
        image = self._image(image_path)
        raw = _id_array(self._mask_image(label_path), label_path)
        self._check_size(image, raw, label_path)
        mask = _apply_lut(raw, self._lut, label_path).astype(self.classes.mask_dtype)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(label_path)}

        instances = None
        try:
            with self.fs.open(instance_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None  # instanceIds are optional
        if data is not None:
            ids = _id_array(_decode(data, instance_path, "corrupt_mask"), instance_path)
            self._check_size(image, ids, instance_path)
            # Values >= 1000 are class*1000 + k; renumber them 1..n in ascending order, the rest is 0.
            is_instance = ids >= 1000
            instances = np.zeros(ids.shape, dtype=np.int32)
            values = ids[is_instance]
            instances[is_instance] = np.searchsorted(np.unique(values), values) + 1
            meta["instances_path"] = self._rel(instance_path)
        return SourceRecord(sample_id, image, mask, instances, meta)


READERS: dict[str, type[Source]] = {
    "folder": FolderSource,
    "ade20k": ADE20KSource,
    "coco_panoptic": CocoPanopticSource,
    "voc": VOCSource,
    "cityscapes": CityscapesSource,
}


def open_source(spec: SourceSpec) -> Source:
    """The reader for `spec.kind`; raises FileNotFoundError if the dataset root does not exist."""
    return READERS[spec.kind](spec)
