"""The `folder` source: `<stem><image_suffix>` images with `<stem><mask_suffix>` masks, in any subfolder."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from factory.sample import BadSample
from factory.sources.base import FileSource, SourceRecord, id_array, resolve_classes
from factory.sources.classes import ade150_palette, decode_palette_mask, voc_palette
from factory.sources.listing import sorted_ids
from factory.sources.spec import SourceSpec


class FolderSource(FileSource):
    """`<stem><image_suffix>` images with `<stem><mask_suffix>` masks beside them, in any subfolder.

    With `mask_suffix` null the folder holds images only: samples carry no mask (a mask generator
    stage can label them).
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        assert spec.classes is not None  # the spec's validator requires classes of a folder source
        self.classes = resolve_classes(spec.classes)
        if spec.image_suffix == spec.mask_suffix:
            raise ValueError(f"source folder: image_suffix and mask_suffix are both {spec.image_suffix!r}")
        self._palette = None
        if spec.mask_format == "palette":
            if self.classes.mask_dtype != np.uint8:
                raise ValueError("source folder: colour masks support at most 254 classes")
            assert spec.palette is not None  # the spec's validator requires it of colour masks
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
        # that ends with the longer suffix is a mask, never an image. Other suffixes: empty, matching nothing.
        mask_endings = (
            (mask_suffix,)
            if mask_suffix is not None and len(mask_suffix) > len(image_suffix) and mask_suffix.endswith(image_suffix)
            else ()
        )

        def stem(name: str) -> str | None:
            if not name.endswith(image_suffix) or name.endswith(mask_endings):
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
