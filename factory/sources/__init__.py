"""Sources: the datasets a job reads, as sorted streams of ids and one sample per id.

spec.py       the `source` section of a spec
base.py       the reader interface (`Source`), the base of file readers, class-set resolution
folder.py     `folder`: image/mask pairs by file-name suffix, id or colour masks
datasets.py   ADE20K, COCO panoptic, PASCAL VOC, Cityscapes in their published layouts
scenes.py     procedural scenes (files for the quickstart and tests, and the `scenes` kind)
listing.py    sorted listings as streams in bounded memory
images.py     decoding, bit depths, the size rule
classes.py    class sets, the ADE150 palette, colour maps for conditioning
palettes.py   SegGen's palettes: masks <-> colour maps
"""

from __future__ import annotations

from factory.sources.base import Source, SourceRecord
from factory.sources.spec import SourceSpec

__all__ = ["Source", "SourceRecord", "SourceSpec", "open_source"]


def open_source(spec: SourceSpec) -> Source:
    """The reader for `spec.kind`; raises FileNotFoundError if the dataset root does not exist."""
    from factory.sources.datasets import DATASET_READERS
    from factory.sources.folder import FolderSource
    from factory.sources.scenes import ScenesSource

    readers: dict[str, type[Source]] = {"folder": FolderSource, "scenes": ScenesSource, **DATASET_READERS}
    return readers[spec.kind](spec)
