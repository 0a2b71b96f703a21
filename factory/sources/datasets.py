"""Readers of the published segmentation datasets whose label ids are fixed: ADE20K, COCO panoptic,
PASCAL VOC and Cityscapes, in their distributed layouts (see the README's Sources table)."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from factory.sample import BadSample
from factory.sources.base import FileSource, SourceRecord, fixed_classes, id_array
from factory.sources.classes import ClassSet, class_set
from factory.sources.images import decode, uint16_instances
from factory.sources.listing import sorted_unique
from factory.sources.spec import SourceSpec

log = logging.getLogger(__name__)


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


def _image_and_mapped_mask(
    source: FileSource, lut: np.ndarray, image_path: str, mask_path: str
) -> tuple[np.ndarray, np.ndarray]:
    """The image, and its label map read as raw ids, size-checked and mapped through `lut`."""
    image = source._image(image_path)
    raw = id_array(source._mask_image(mask_path), mask_path)
    source._check_size(image, raw, mask_path)
    return image, _apply_lut(raw, lut, mask_path).astype(source.classes.mask_dtype)


class DatasetSource(FileSource):
    """A published dataset, its files laid out by split: `spec.split`, else the dataset's usual one."""

    default_split: ClassVar[str]

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.split = spec.split or self.default_split


class ADE20KSource(DatasetSource):
    """ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png with 0 = unlabeled, 1..150."""

    default_split = "training"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        # Accept the directory that holds ADEChallengeData2016 as well as the dataset directory itself.
        if not self.fs.isdir(self._path("images")) and self.fs.isdir(self._path("ADEChallengeData2016")):
            self.root = self._path("ADEChallengeData2016")
        self.classes = fixed_classes(spec, class_set("ade150"))
        # Annotation value v is class v-1; 0 is unlabeled.
        self._lut = np.array([self.classes.ignore_index, *range(len(self.classes))], dtype=np.int32)

    def _ids(self) -> Iterator[str]:
        return self._find(self._path("images", self.split), ".jpg", "images")

    def _load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("images", self.split, sample_id + ".jpg")
        mask_path = self._path("annotations", self.split, sample_id + ".png")
        image, mask = _image_and_mapped_mask(self, self._lut, image_path, mask_path)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(mask_path)}
        return SourceRecord(sample_id, image, mask, None, meta)


class CocoPanopticSource(DatasetSource):
    """COCO panoptic: annotations/panoptic_<split>.json, RGB-encoded segment PNGs, images in <split>/.

    The annotation file is one JSON document that must be parsed whole, so its index (a small tuple per
    image) is held in memory: its size is the annotation file's, per process, and a dataset of millions
    of images comes as many annotation files (one source each), not one.
    """

    default_split = "val2017"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._json_path = self._path("annotations", f"panoptic_{self.split}.json")
        self._png_dir = self._path("annotations", f"panoptic_{self.split}")
        if not self.fs.isdir(self._png_dir) and self.fs.isdir(self._path(f"panoptic_{self.split}")):
            self._png_dir = self._path(f"panoptic_{self.split}")
        self._index: dict | None = None
        names = self._load_index()
        self.classes = fixed_classes(spec, ClassSet("coco_panoptic", names))

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
                segments = tuple((s["id"], s["category_id"], bool(s.get("iscrowd", 0))) for s in ann["segments_info"])
                index[stem] = (ann["file_name"], image_file, segments)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self._json_path}: not a COCO panoptic annotation file ({e!r})") from None
        self._index = index
        return tuple(c["name"] for c in cats)

    def _table(self) -> dict:
        """The index, parsed again by a copy that was unpickled without it (`__getstate__`)."""
        if self._index is None:
            self._load_index()
        assert self._index is not None  # _load_index always sets it
        return self._index

    def _ids(self) -> Iterator[str]:
        return iter(sorted(self._table()))

    def _load(self, sample_id: str) -> SourceRecord:
        png_file, image_file, segments = self._table()[sample_id]
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
        instance = np.zeros(len(present), dtype=np.int64)
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
        instances = uint16_instances(instance, len(numbers), png_path)[inverse]
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(png_path)}
        return SourceRecord(sample_id, image, mask, instances, meta)


class VOCSource(DatasetSource):
    """PASCAL VOC 2012 segmentation: split lists, JPEGImages, P-mode SegmentationClass (255 = boundary)."""

    default_split = "train"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        # The root may be VOC2012 itself, or a directory holding VOC2012 or VOCdevkit/VOC2012.
        for candidate in (self.root, self._path("VOC2012"), self._path("VOCdevkit", "VOC2012")):
            if self.fs.isdir(posixpath.join(candidate, "ImageSets", "Segmentation")):
                self.root = candidate
                break
        self.classes = fixed_classes(spec, class_set("voc"))

    def _ids(self) -> Iterator[str]:
        list_path = self._path("ImageSets", "Segmentation", f"{self.split}.txt")
        if not self.fs.isfile(list_path):
            log.warning("source voc: no split list at %s", list_path)
            return
        with self.fs.open(list_path, "r") as f:
            yield from sorted_unique(line.split()[0] for line in f if line.strip())

    def _load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("JPEGImages", sample_id + ".jpg")
        mask_path = self._path("SegmentationClass", sample_id + ".png")
        image = self._image(image_path)
        raw = id_array(self._mask_image(mask_path), mask_path)
        self._check_size(image, raw, mask_path)
        mask = self._check_ids(raw, mask_path)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(mask_path)}
        return SourceRecord(sample_id, image, mask, None, meta)


# The official Cityscapes labelId -> trainId table (labels.py); other labelIds are unlabeled.
CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


class CityscapesSource(DatasetSource):
    """Cityscapes fine annotations: leftImg8bit/<split>/<city>/<x>_leftImg8bit.png + gtFine labelIds."""

    default_split = "train"
    image_suffix = "_leftImg8bit.png"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.classes = fixed_classes(spec, class_set("cityscapes"))
        # labelIds 0..33 are defined, and license plate (-1) is stored as 255; any other value is invalid.
        lut = np.full(256, -1, dtype=np.int32)
        lut[:34] = self.classes.ignore_index
        lut[255] = self.classes.ignore_index
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        self._lut = lut

    def _ids(self) -> Iterator[str]:
        return self._find(self._path("leftImg8bit", self.split), self.image_suffix, "leftImg8bit images")

    def _load(self, sample_id: str) -> SourceRecord:
        image_path = self._path("leftImg8bit", self.split, sample_id + self.image_suffix)
        label_path = self._path("gtFine", self.split, sample_id + "_gtFine_labelIds.png")
        instance_path = self._path("gtFine", self.split, sample_id + "_gtFine_instanceIds.png")
        image, mask = _image_and_mapped_mask(self, self._lut, image_path, label_path)
        meta = {"image_path": self._rel(image_path), "mask_path": self._rel(label_path)}

        instances = None
        try:
            with self.fs.open(instance_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None  # instanceIds are optional
        if data is not None:
            ids = id_array(decode(data, instance_path, "corrupt_mask"), instance_path)
            self._check_size(image, ids, instance_path)
            # Values >= 1000 are class*1000 + k; renumber them 1..n in ascending order, the rest is 0.
            is_instance = ids >= 1000
            numbers = np.zeros(ids.shape, dtype=np.int64)
            distinct = np.unique(ids[is_instance])
            numbers[is_instance] = np.searchsorted(distinct, ids[is_instance]) + 1
            instances = uint16_instances(numbers, len(distinct), instance_path)
            meta["instances_path"] = self._rel(instance_path)
        return SourceRecord(sample_id, image, mask, instances, meta)


DATASET_READERS: dict[str, type[DatasetSource]] = {
    "ade20k": ADE20KSource,
    "coco_panoptic": CocoPanopticSource,
    "voc": VOCSource,
    "cityscapes": CityscapesSource,
}
