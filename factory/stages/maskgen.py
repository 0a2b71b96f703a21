"""The Mask Generator: pseudo-labels from GroundingDINO boxes turned into masks by SAM.

GroundingDINO (transformers' `GroundingDinoForObjectDetection`) is prompted with the class names
("sofa. chair. potted plant.") and gives boxes; SAM (segment-anything) turns every box of an image into
a mask in one batched decoder call; the masks become one semantic mask where, pixel by pixel, the
highest-scoring mask wins (never the last one written). Pixels no mask covers are ignore (255).

A box is kept when its best token probability exceeds `box_threshold` (GroundingDINO's box score, also
the instance's score); its class is the class whose prompt tokens score highest, if that exceeds
`text_threshold`. Boxes of one class overlapping by more than `nms_threshold` IoU are merged.

`MaskGenerator` is shared: the `maskgen` stage labels images that have no mask (or all of them), and the
`select` stage labels synthetic images to compare with the mask they were generated from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from factory.models.detection import DetectionParams, MaskGenerator, MaskGenModelConfig
from factory.sample import Sample
from factory.stages import Stage, register_stage


class MaskGenParams(DetectionParams):
    mode: Literal["fill_missing", "replace"] = Field(
        "fill_missing", description="fill_missing: label only samples without a mask; replace: label every sample"
    )
    classes: list[str] | None = Field(
        None, description="class names to detect; default every class of the source's class set (less skip_classes)"
    )


@register_stage
class MaskGenStage(Stage[MaskGenParams, MaskGenModelConfig]):
    name = "maskgen"
    uses_gpu = True
    extra = "models"
    Params = MaskGenParams
    Model = MaskGenModelConfig

    def setup(self) -> None:
        classes = self.context.classes
        wanted = self.params.classes if self.params.classes is not None else list(classes.names)
        # Canonical names: a synonym in the spec resolves to the class it names (KeyError if none).
        self.names = [classes.names[classes.index(n)] for n in wanted]
        self.generator = MaskGenerator(self.model, self.params, classes, self.context.device)

    def model_ids(self) -> dict[str, str]:
        return MaskGenerator.model_ids(self.model)

    def process(self, samples: list[Sample]) -> list[Sample]:
        todo = [s for s in samples if s.image is not None and (self.params.mode == "replace" or s.mask is None)]
        for s in samples:
            s.meta["pseudo_label"] = False
        for s, label in zip(todo, self.generator.generate([s.array("image") for s in todo], self.names)):
            s.mask, s.instances = label.mask, label.instances
            s.meta["pseudo_label"] = True
            s.meta["pseudo_instances"] = {
                "classes": [self.context.classes.names[c] for c in label.class_ids],
                "scores": label.scores,
            }
        return samples
