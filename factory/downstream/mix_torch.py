"""The mixing loader for torch: `MixDataset`, an `IterableDataset` over `MixBatches` (use
`DataLoader(..., batch_size=None)`), and SENSE's teacher labels (`pseudo_label`). Needs torch, which the
training environment brings; the laws and the reading are in `factory.downstream.mix`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.utils.data

from factory.downstream.mix import PSEUDO, SYNTHETIC, MixBatches
from factory.downstream.mix_spec import MixSpec


def to_torch(batch: dict) -> dict:
    """A numpy batch of `MixBatches` as tensors (no copy); keys and source ids stay lists of strings."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class MixDataset(torch.utils.data.IterableDataset):
    """Batches of a mix for torch's DataLoader (use `batch_size=None`).

    Rank r of `world` (default: torch.distributed's, if initialised); each DataLoader process reads its
    own share (`MixBatches`), and the DataLoader takes the processes' batches in turn, so batch b always
    comes from the same process.
    """

    def __init__(self, spec: MixSpec, rank: int | None = None, world: int | None = None, start: int = 0):
        super().__init__()
        if rank is None or world is None:
            from webdataset.utils import pytorch_worker_info

            rank, world, _, _ = pytorch_worker_info()
        self.mix = MixBatches(spec, rank, world, start)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return map(to_torch, self.mix.batches(worker, workers))


@torch.no_grad()
def pseudo_label(
    batch: dict, teacher: torch.nn.Module, threshold: float, ignore_index: int = 255, preprocess=None
) -> dict:
    """Label the batch's unlabelled synthetic images with `teacher`: a pixel gets the teacher's class where
    its softmax confidence is >= `threshold`, else `ignore_index`. Those samples become PSEUDO.

    `teacher(images)` returns logits (B, C, H, W) (or torchvision's {"out": ...}); `preprocess` turns the
    uint8 batch into the teacher's input (default: float in [0, 1]).
    """
    todo = (batch["kind"] == SYNTHETIC) & ~batch["labelled"]
    if not todo.any():
        return batch
    device = next(teacher.parameters()).device
    images = batch["image"][todo].to(device)
    x = preprocess(images) if preprocess else images.float() / 255.0
    was_training = teacher.training
    teacher.eval()
    logits = teacher(x)
    teacher.train(was_training)
    logits = logits["out"] if isinstance(logits, dict) else logits
    confidence, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    label[confidence < threshold] = ignore_index
    out = dict(batch)
    out["mask"], out["kind"], out["labelled"] = batch["mask"].clone(), batch["kind"].clone(), batch["labelled"].clone()
    out["mask"][todo] = label.to(out["mask"].device, torch.int64)
    out["kind"][todo] = PSEUDO
    out["labelled"][todo] = True
    return out
