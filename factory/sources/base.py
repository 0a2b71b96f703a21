"""The reader interface every source kind implements, and the base of the readers of files.

A reader lists sample ids as a stream, ascending and unique (so the plan is the same on every run), and
loads one sample by id as an 8-bit RGB image plus a class-id mask in the source's class set (ignore =
`classes.ignore_index`), within the spec's size limits. Files are read through fsspec (local paths,
memory://, s3://...), one sample at a time. Bad data raises `BadSample` with a stable reason word; the
engine counts it and goes on. Listings are streams in bounded memory (see `listing.py`), so nothing
holds all ids; the one exception is COCO panoptic, whose annotation file is one JSON document that
has to be parsed whole anyway.

Readers are pickled to Ray workers, so they hold only the spec, the filesystem object and small tables.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from factory.sample import BadSample
from factory.sources.classes import ClassSet, class_set
from factory.sources.images import decode, fit_size, to_rgb8
from factory.sources.listing import sorted_ids
from factory.sources.spec import SourceSpec
from factory.storage import url_to_fs

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

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        assert spec.path is not None, "a file source has a path (SourceSpec checks it)"
        self.fs, root = url_to_fs(spec.path, spec.storage_options)
        self.root = root.rstrip("/") or root
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"source {spec.kind}: path {spec.path!r} does not exist")

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
