"""Sources: the reader interface, and the readers of plain folders and of procedural scenes (the
published datasets' readers are in `dataset_readers.py`).

A reader lists sample ids as a stream, ascending and unique (so the plan is the same on every run), and
loads one sample by id as an 8-bit RGB image plus a class-id mask in the source's class set (ignore =
`classes.ignore_index`), within the spec's size limits. Files are read through fsspec (local paths,
memory://, s3://...), one sample at a time. Bad data raises `BadSample` with a stable reason word; the
engine counts it and goes on. Listings are streams in bounded memory (see `listing.py`), so nothing
here holds all ids; the one exception is COCO panoptic, whose annotation file is one JSON document that
has to be parsed whole anyway.

Readers are pickled to Ray workers, so they hold only the spec, the filesystem object and small tables.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
from PIL import Image

from factory.classes import ClassSet, ade150_palette, class_set, decode_palette_mask, voc_palette
from factory.listing import sorted_ids
from factory.sample import BadSample
from factory.scenes import render_scene
from factory.source_images import decode, fit_size, to_rgb8
from factory.spec import SourceSpec

log = logging.getLogger(__name__)


@dataclass
class SourceRecord:
    id: str  # stable, unique id (relative stem path); the plan sorts on it
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) classes.mask_dtype, ids 0..N-1, ignore = classes.ignore_index
    instances: np.ndarray | None = None  # (H, W) uint16 instance ids, 0 = none
    meta: dict = field(default_factory=dict)  # JSON-able extras


def resolve_classes(value: str | list[str]) -> ClassSet:
    """A class set from a spec: a shipped name (ade150, voc, cityscapes) or a list of names."""
    if isinstance(value, str):
        return class_set(value)
    return ClassSet("custom", tuple(value))


def fixed_classes(spec: SourceSpec, default: ClassSet) -> ClassSet:
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


def id_array(im: Image.Image, path: str) -> np.ndarray:
    """The raw values of a single-channel label PNG. P mode gives the palette indices, not colours."""
    if im.mode in ("L", "P") or im.mode.startswith("I"):
        return np.asarray(im).astype(np.int32)
    raise BadSample(
        "corrupt_mask", f"{path}: mode {im.mode} is not a single-channel id mask (colour masks need a palette)"
    )


class Source(ABC):
    """A dataset: sorted ids, and one `SourceRecord` per id."""

    classes: ClassSet

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    def list_ids(self) -> Iterator[str]:
        """The ids, ascending and unique, as a stream; `limit` takes the first N."""
        return itertools.islice(self._ids(), self.spec.limit)

    def load(self, sample_id: str) -> SourceRecord:
        """One sample within the spec's size limits; raises BadSample for data that cannot be used."""
        rec = self._load(sample_id)
        where = rec.meta.get("image_path", sample_id)
        rec.image, rec.mask, rec.instances, resized_from = fit_size(
            rec.image, rec.mask, rec.instances, self.spec.min_side, self.spec.max_side, where
        )
        if resized_from:
            rec.meta["resized_from"] = resized_from
        return rec

    @abstractmethod
    def _ids(self) -> Iterator[str]:
        """All ids of the source, ascending and unique, streamed."""

    @abstractmethod
    def _load(self, sample_id: str) -> SourceRecord:
        """One sample at its stored size."""


class FileSource(Source):
    """A dataset stored as files under `spec.path`, read through fsspec."""

    default_split: str | None = None

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.fs, root = fsspec.core.url_to_fs(spec.path, **spec.storage_options)
        self.root = root.rstrip("/") or root
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"source {spec.kind}: path {spec.path!r} does not exist")
        self.split = spec.split or self.default_split

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _rel(self, path: str) -> str:
        base = self.root.rstrip("/")
        return path[len(base) + 1 :] if path.startswith(base + "/") else path

    def _find(self, base: str, suffix: str, what: str) -> Iterator[str]:
        """Ids (relative path minus `suffix`) of the files under `base` whose name ends with `suffix`,
        ascending; warns if `base` is absent."""
        if not self.fs.isdir(base):
            log.warning("source %s: no %s at %s", self.spec.kind, what, base)
            return iter(())
        return sorted_ids(self.fs, base, lambda name: name[: -len(suffix)] if name.endswith(suffix) else None)

    def _read(self, path: str, missing_reason: str) -> bytes:
        try:
            with self.fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadSample(missing_reason, f"{path}: no such file") from None

    def _image(self, path: str) -> np.ndarray:
        # No EXIF transpose: dataset masks are aligned with the stored pixel grid, not the displayed one.
        return to_rgb8(decode(self._read(path, "missing_image"), path, "corrupt_image"), path)

    def _mask_image(self, path: str) -> Image.Image:
        return decode(self._read(path, "missing_mask"), path, "corrupt_mask")

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


class FolderSource(FileSource):
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

    def _ids(self) -> Iterator[str]:
        image_suffix, mask_suffix = self.spec.image_suffix, self.spec.mask_suffix
        # With ".png" images and "_mask.png" masks every mask also ends with the image suffix: a file
        # that ends with the longer suffix is a mask, never an image.
        masks_look_like_images = (
            mask_suffix is not None and len(mask_suffix) > len(image_suffix) and mask_suffix.endswith(image_suffix)
        )

        def stem(name: str) -> str | None:
            if not name.endswith(image_suffix) or (masks_look_like_images and name.endswith(mask_suffix)):
                return None
            return name[: -len(image_suffix)]

        return sorted_ids(self.fs, self.root, stem)

    def _load(self, sample_id: str) -> SourceRecord:
        image_path = self._path(sample_id + self.spec.image_suffix)
        image = self._image(image_path)
        if self.spec.mask_suffix is None:
            return SourceRecord(sample_id, image, None, None, {"image_path": self._rel(image_path)})
        mask_path = self._path(sample_id + self.spec.mask_suffix)
        mask_im = self._mask_image(mask_path)
        if self._palette is None:
            raw = id_array(mask_im, mask_path)
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


class ScenesSource(Source):
    """`count` procedural ADE150 scenes (`factory.scenes`), rendered on demand from their ids: no files.

    Ids are `scene-` and the zero-padded index, so they sort as the indices do; listing is a generator,
    so ten million ids cost no memory.
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.classes = fixed_classes(spec, class_set("ade150"))
        self._digits = max(7, len(str(spec.count - 1)))
        self._id = re.compile(rf"scene-(\d{{{self._digits}}})")

    def _ids(self) -> Iterator[str]:
        return map(f"scene-{{:0{self._digits}d}}".format, range(self.spec.count))

    def _load(self, sample_id: str) -> SourceRecord:
        match = self._id.fullmatch(sample_id)
        if match is None or int(match[1]) >= self.spec.count:
            raise BadSample("missing_image", f"{sample_id}: not one of the {self.spec.count} scenes of this source")
        index = int(match[1])
        image, mask = render_scene(self.spec.size, self.spec.seed, index)
        meta = {"scene_seed": self.spec.seed, "scene_index": index}
        return SourceRecord(sample_id, image, mask.astype(self.classes.mask_dtype, copy=False), None, meta)


def open_source(spec: SourceSpec) -> Source:
    """The reader for `spec.kind`; raises FileNotFoundError if the dataset root does not exist."""
    from factory.dataset_readers import DATASET_READERS  # they build on the classes of this module

    readers: dict[str, type[Source]] = {"folder": FolderSource, "scenes": ScenesSource, **DATASET_READERS}
    return readers[spec.kind](spec)
