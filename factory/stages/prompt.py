"""The Multi-way Prompt Generator: the text prompt each real image is re-synthesised from.

Three modes, chosen in the spec:
- `caption`: the caption an earlier stage wrote (`meta["caption"]`, BLIP).
- `caption_classes`: the caption with the image's class names appended, most pixels first
  ("a living room with a couch; sofa, chair, pottedplant").
- `dataset`: a caption the dataset ships (a COCO captions file, or JSONL / CSV id -> caption).

The prompt goes into `meta["prompt"]`, which the ControlNet stage uses as is. Class names are the
source's own: names from elsewhere (`meta["class_names"]` on samples without a mask) are mapped to them
through the `synonyms` table and the class set's own synonyms.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import random
from typing import Literal

from pydantic import Field, model_validator

from factory.sample import Sample
from factory.schema import StrictModel
from factory.sources.classes import class_names_in
from factory.stages import NoParams, Stage, register_stage
from factory.storage import open_url


class PromptParams(StrictModel):
    mode: Literal["caption", "caption_classes", "dataset"] = "caption_classes"
    template: str = Field(
        "{caption}; {classes}",
        description="caption_classes: how caption and class names combine; an image with no named class "
        "gets the caption alone",
    )
    synonyms: dict[str, str] = Field(
        default_factory=dict, description="other name -> the dataset's own class name (e.g. couch: sofa)"
    )
    exclude_classes: list[str] = Field(
        default_factory=lambda: ["background"], description="class names never appended to a prompt"
    )
    captions: str | None = Field(
        None,
        description="dataset: captions file (local path or fsspec URL): COCO captions .json, .jsonl "
        "with {id, caption} rows, or .csv with id,caption columns",
    )
    pick: Literal["first", "seeded"] = Field(
        "first",
        description="dataset: which caption when an image has several (COCO has five); 'seeded' "
        "draws one from the job seed and sample id",
    )
    storage_options: dict = Field(default_factory=dict, description="fsspec options for the captions file")

    @model_validator(mode="after")
    def _dataset_needs_captions(self):
        if self.mode == "dataset" and not self.captions:
            raise ValueError("mode dataset needs `captions` (a COCO captions json, .jsonl or .csv file)")
        return self


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def read_captions(url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """id -> captions, from a COCO captions json (keyed by file-name stem and by image id), JSONL or CSV."""
    with open_url(url, "rb", storage_options) as f:
        data = f.read().decode("utf-8")
    out: dict[str, list[str]] = {}
    if url.endswith(".jsonl"):
        rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    elif url.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data)))
    elif url.endswith(".json"):
        coco = json.loads(data)
        try:
            names = {im["id"]: im["file_name"] for im in coco.get("images", [])}
            rows = []
            for ann in coco["annotations"]:
                rows.append({"id": ann["image_id"], "caption": ann["caption"]})
                if ann["image_id"] in names:
                    rows.append({"id": _stem(names[ann["image_id"]]), "caption": ann["caption"]})
        except (KeyError, TypeError) as e:
            raise ValueError(f"{url}: not a COCO captions file ({e!r})") from None
    else:
        raise ValueError(f"{url}: captions must be a COCO .json, a .jsonl or a .csv file")
    for row in rows:
        try:
            key, text = str(row["id"]), str(row["caption"]).strip()
        except KeyError as e:
            raise ValueError(f"{url}: every row needs `id` and `caption` ({e!r} missing)") from None
        out.setdefault(key, []).append(text)
    return out


@register_stage
class PromptStage(Stage[PromptParams, NoParams]):
    name = "prompt"
    Params = PromptParams

    def setup(self) -> None:
        self.captions: dict[str, list[str]] = {}
        if self.params.mode == "dataset":
            self.captions = read_captions(self.captions_file, self.params.storage_options)

    @property
    def captions_file(self) -> str:
        """The captions file of dataset mode, which the params' validator makes sure is given."""
        assert self.params.captions is not None
        return self.params.captions

    def model_ids(self) -> dict[str, str]:
        return {"captions": self.captions_file} if self.params.mode == "dataset" else {}

    def class_names(self, sample: Sample) -> list[str]:
        """The sample's class names in the dataset's own words, most pixels first, without duplicates."""
        classes = self.context.classes
        raw = class_names_in(sample.mask, classes) if sample.mask is not None else sample.meta.get("class_names", [])
        names: list[str] = []
        for name in raw:
            name = self.params.synonyms.get(name, name)
            # A class or synonym of this set becomes the set's own name; anything else is kept as written.
            if name in classes.names or any(name in words for words in classes.synonyms):
                name = classes.names[classes.index(name)]
            if name not in names and name not in self.params.exclude_classes:
                names.append(name)
        return names

    def dataset_caption(self, sample: Sample) -> str | None:
        keys = [sample.source_id, _stem(sample.source_id)]
        if "image_path" in sample.meta:
            keys.append(_stem(sample.meta["image_path"]))
        for key in keys:
            found = self.captions.get(key)
            if found:
                if self.params.pick == "first":
                    return found[0]
                return random.Random(sample.seed(self.context.job_seed, "prompt")).choice(found)
        return None

    def process(self, samples: list[Sample]) -> list[Sample]:
        mode = self.params.mode
        for s in samples:
            if mode == "dataset":
                caption = self.dataset_caption(s)
                if caption is not None:
                    s.meta["dataset_caption"] = caption
            else:
                caption = s.meta.get("caption")
            if not caption:
                where = (
                    "in the captions file" if mode == "dataset" else "in meta['caption'] (run a caption stage first)"
                )
                s.fail(self.context.label, "no_caption", f"{s.source_id}: no caption {where}")
                continue
            prompt = caption
            if mode == "caption_classes":
                names = self.class_names(s)
                if names:
                    prompt = self.params.template.replace("{caption}", caption).replace("{classes}", ", ".join(names))
            s.meta["prompt"] = prompt
            s.meta["prompt_mode"] = mode
        return samples
