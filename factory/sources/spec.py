"""The `source` section of a job spec: which dataset, where, with which classes, and the size rule.

Shared by every spec that reads a dataset (jobs, the mixing loader, `factory eval`, `factory train`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from factory.schema import StrictModel


class SourceSpec(StrictModel):
    kind: Literal["folder", "ade20k", "coco_panoptic", "voc", "cityscapes", "scenes"]
    path: str | None = Field(
        None, min_length=1, description="dataset root: a local path or an fsspec URL (s3://...); not for scenes"
    )
    classes: str | list[str] | None = Field(
        None, description="class set name (ade150, voc, cityscapes) or a list of names; default per kind"
    )
    split: str | None = Field(None, description="dataset split (ade20k: training; voc: train; ...)")
    image_suffix: str = Field(".jpg", description="folder: image file name ending, e.g. _image.png")
    mask_suffix: str | None = Field(
        ".png", description="folder: mask file name ending, e.g. _target.png; null: images only (no masks)"
    )
    mask_format: Literal["ids", "palette"] = Field("ids", description="folder: id PNGs or colour PNGs")
    palette: str | list[list[int]] | None = Field(None, description="colour masks: voc, ade150 or RGB rows")
    ignore_colors: list[list[int]] = Field(default_factory=list, description="colours meaning ignore")
    limit: int | None = Field(None, gt=0, description="use only the first N samples of the listing")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    min_side: int = Field(16, gt=0, description="an image whose short side is smaller is bad (too_small)")
    max_side: int = Field(2048, gt=0, description="an image whose long side is larger is scaled down to it")
    count: int | None = Field(None, gt=0, description="scenes: how many procedural scenes")
    size: int = Field(64, ge=8, description="scenes: side of each square scene, in pixels")
    seed: int = Field(0, description="scenes: which set of scenes (scene i depends on seed and i only)")

    @model_validator(mode="after")
    def _fields_of_the_kind(self):
        if self.min_side > self.max_side:
            raise ValueError(f"source.min_side: {self.min_side} is larger than source.max_side {self.max_side}")
        if self.kind == "scenes":
            if self.path is not None:
                raise ValueError("source.path: a scenes source has no files (it renders scenes from their ids)")
            if self.count is None:
                raise ValueError("source.count: a scenes source needs `count` (how many scenes)")
            if not self.min_side <= self.size <= self.max_side:
                raise ValueError(
                    f"source.size: {self.size} is outside min_side..max_side ({self.min_side}..{self.max_side})"
                )
        elif self.path is None:
            raise ValueError(f"source.path: a source of kind {self.kind} needs `path` (its dataset root)")
        if self.kind == "folder" and self.classes is None:
            raise ValueError("a folder source needs `classes` (a class set name or a list of names)")
        if self.mask_format == "palette" and self.palette is None:
            raise ValueError("mask_format: palette needs `palette` (voc, ade150 or a list of RGB rows)")
        return self
