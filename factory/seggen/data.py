"""Training data for the SegGen models: batches of (prompt, colour map[, image]) read from a source dataset.

Only the source's ids are listed up front; pixels are read batch by batch, in torch loader processes
when `loader_workers` > 0. A batch is a pure function of (seed, worker rank, step), so a resumed run
reads exactly the batches the interrupted one would have read, with no saved data state.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from factory.sample import BadSample
from factory.sources import open_source
from factory.sources.palettes import Palette
from factory.stages.diffusion import prompt_for
from factory.storage import open_url

if TYPE_CHECKING:
    from factory.seggen.spec import TrainSpec


class PairStream:
    """The batches of one training worker.

    Each epoch is a seeded permutation of all ids, dealt round-robin to the workers; a worker's batches
    walk its share cyclically. Masks are painted with the model's palette after a short-side resize and
    a seeded square crop, whose geometry also feeds SDXL's size conditioning.
    """

    def __init__(self, spec: TrainSpec, kind: str, palette: Palette, rank: int, world: int):
        self.spec, self.kind, self.palette = spec, kind, palette
        self.rank, self.world = rank, world
        self.source = open_source(spec.source)
        self.ids = list(self.source.list_ids())
        if len(self.ids) < world:
            raise ValueError(f"source has {len(self.ids)} samples, fewer than the {world} training workers")
        self.lut = palette.lookup_from(self.source.classes)
        self.captions = _read_captions(spec) if spec.captions else {}

    def batch_ids(self, k: int) -> list[str]:
        """The source ids of this worker's batch k."""
        b, share_len = self.spec.batch_size, len(range(self.rank, len(self.ids), self.world))
        epoch, offset = divmod(k, -(-share_len // b))
        order = np.random.default_rng([self.spec.seed, epoch]).permutation(len(self.ids))[self.rank :: self.world]
        return [self.ids[order[(offset * b + i) % share_len]] for i in range(b)]

    def batch(self, k: int) -> dict:
        """{"prompt": [str], "colour": (B, 3, R, R) in [0, 1], "time_ids": (B, 6)[, "image": (B, 3, R, R)]}."""
        examples, bad = [], []
        for i, sample_id in enumerate(self.batch_ids(k)):
            try:
                examples.append(self._example(self.source.load(sample_id), k, i))
            except BadSample as e:
                bad.append(f"{sample_id}: {e}")
        if not examples:
            raise RuntimeError(f"every sample of training batch {k} is unusable: {bad}")
        # An unusable sample's slot repeats a good one, so every step sees a full batch.
        examples = [examples[i % len(examples)] for i in range(self.spec.batch_size)]
        out = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "prompt"}
        out["prompt"] = [e["prompt"] for e in examples]
        return out

    def _example(self, rec, k: int, i: int) -> dict:
        if rec.mask is None:
            raise BadSample("no_mask", "training pairs need a mask")
        r = self.spec.resolution
        rng = np.random.default_rng([self.spec.seed, self.rank, k, i])
        h, w = rec.mask.shape
        scale = r / min(h, w)
        nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
        top, left = int(rng.integers(0, nh - r + 1)), int(rng.integers(0, nw - r + 1))
        box = (left, top, left + r, top + r)

        def nearest(a: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(a.astype(np.int32)).resize((nw, nh), Image.Resampling.NEAREST).crop(box))

        ids = nearest(self.lut[rec.mask.astype(np.int64)])
        instances = nearest(rec.instances) if self.palette.outlines and rec.instances is not None else None
        colours = self.palette.encode(ids, instances)
        meta = dict(rec.meta)
        if rec.id in self.captions:
            meta["caption"] = self.captions[rec.id]
        prompt = prompt_for(meta, rec.mask, self.source.classes, self.spec.prompt)
        if rng.random() < self.spec.empty_prompt_prob:
            prompt = ""
        out = {
            "prompt": prompt,
            "colour": torch.from_numpy(colours).permute(2, 0, 1).float() / 255.0,
            "time_ids": torch.tensor([h, w, top, left, r, r], dtype=torch.float32),
        }
        if self.kind == "mask2img":
            image = Image.fromarray(rec.image).resize((nw, nh), Image.Resampling.BICUBIC).crop(box)
            out["image"] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        return out


def _read_captions(spec: TrainSpec) -> dict[str, str]:
    assert spec.captions is not None, "called only when the spec names captions"
    with open_url(spec.captions, "rt", spec.source.storage_options) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {str(r["id"]): str(r["caption"]) for r in rows}


class LoaderBatches(torch.utils.data.IterableDataset):
    """A worker's batches from `start` on, for torch's DataLoader: loader process w of n yields batches
    start + w, + n, + 2n, ..., and the loader takes one from each process in turn, so they arrive in order."""

    def __init__(self, spec: TrainSpec, kind: str, palette: Palette, rank: int, world: int, start: int):
        super().__init__()
        self.args, self.start = (spec, kind, palette, rank, world), start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        stream = PairStream(*self.args)
        k = self.start + w
        while True:
            yield stream.batch(k)
            k += n
