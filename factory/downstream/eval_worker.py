"""One Ray Train worker of `factory eval`: train and score each pending (arm, seed) run in turn, together
with the other workers (data-parallel), or its share of the runs alone (`runs_at_once`).

A run: seed torch, build the segmenter (so every arm of a seed starts from the same weights), train
`steps` batches of the arm's mix (SENSE arms label their synthetic images with the seed's real-only
model, loaded from the output), then score the held-out split: each worker scores its share of the
images, the confusion matrices are summed across workers, and rank 0 writes the run's result.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from factory.downstream.eval_spec import BASELINE, EvalSpec
from factory.downstream.mix import resize_short_side
from factory.downstream.mix_torch import MixDataset, pseudo_label
from factory.downstream.segmenter import Segmenter, build_segmenter
from factory.sample import BadSample
from factory.sources import open_source
from factory.storage import Folder

log = logging.getLogger("factory")


def run_path(arm: str, seed: int) -> tuple[str, str]:
    return "runs", f"{arm}-seed{seed}.json"


def baseline_path(seed: int) -> tuple[str, str]:
    return "models", f"{BASELINE}-seed{seed}.pt"


def eval_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    spec = EvalSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    out = Folder.at(spec.output)
    classes = open_source(spec.real).classes
    pending: list[tuple[str, int]] = config["pending"]
    if spec.runs_at_once == 1:
        for arm, seed in pending:
            miou = one_run(spec, arm, seed, out, classes, device, rank, world)
            if world > 1:
                torch.distributed.barrier()
            ray.train.report({"arm": arm, "seed": seed, "miou": miou})
        return
    for phase in side_by_side(pending):
        for arm, seed in phase[rank::world]:
            one_run(spec, arm, seed, out, classes, device, 0, 1)
        torch.distributed.barrier()  # the baselines are written before any SENSE arm loads one as its teacher


def side_by_side(pending: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """The runs in two phases, the baselines first: within a phase any worker may take any run, and a
    SENSE arm's teacher (its seed's baseline) is done before the arms start."""
    return [[r for r in pending if r[0] == BASELINE], [r for r in pending if r[0] != BASELINE]]


def one_run(spec: EvalSpec, arm: str, seed: int, out: Folder, classes, device, rank: int, world: int) -> float:
    """Train and score one (arm, seed), data-parallel over `world` workers; rank 0 writes its result (and a
    baseline's weights). Returns its mIoU."""
    import ray.train.torch

    started = time.time()
    torch.manual_seed(seed)
    model = build_segmenter(spec.segmenter, len(classes))
    teacher = _teacher(spec, arm, seed, len(classes), out, device)
    trained = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    loss = train_run(spec, arm, seed, trained, teacher, rank, world, device, classes.ignore_index)
    conf = score_heldout(spec, model, rank, world, device, len(classes), classes.ignore_index)
    if world > 1:
        conf = conf.to(device)
        torch.distributed.all_reduce(conf)
    ious = class_iou(conf.cpu())
    miou = float(np.mean(list(ious.values()))) if ious else 0.0
    result = {
        "arm": arm,
        "seed": seed,
        "miou": miou,
        "class_iou": {classes.names[c]: v for c, v in sorted(ious.items())},
        "steps": spec.train.steps,
        "final_loss": loss,
        "seconds": round(time.time() - started, 1),
        "spec_hash": spec.content_hash(),
    }
    if rank == 0:
        if arm == BASELINE:
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            out.write_bytes(buf.getvalue(), *baseline_path(seed))
        out.write_bytes(json.dumps(result, indent=1).encode(), *run_path(arm, seed))
        log.info("eval %s: %s seed %d: mIoU %.4f (%.0f s)", spec.name, arm, seed, result["miou"], result["seconds"])
    return miou


def _teacher(spec: EvalSpec, arm: str, seed: int, num_classes: int, out: Folder, device) -> Segmenter | None:
    """A SENSE arm's teacher: this seed's real-only model, frozen."""
    chosen = next((a for a in spec.arms if a.name == arm), None)
    if chosen is None or chosen.strategy.kind != "sense":
        return None
    teacher = build_segmenter(spec.segmenter.model_copy(update={"backbone_checkpoint": None}), num_classes)
    with out.fs.open(out.path(*baseline_path(seed)), "rb") as f:
        teacher.load_state_dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))
    return teacher.to(device).eval().requires_grad_(False)


def train_run(
    spec: EvalSpec, arm: str, seed: int, model, teacher, rank: int, world: int, device, ignore_index: int
) -> float:
    """`steps` AdamW steps on the arm's mix with a poly learning-rate decay; returns the last loss."""
    t = spec.train
    threshold = next((a.teacher_threshold for a in spec.arms if a.name == arm), None)
    loader = torch.utils.data.DataLoader(
        MixDataset(spec.mix(arm, seed), rank=rank, world=world), batch_size=None, num_workers=t.loader_workers
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    model.train()
    batches = iter(loader)
    loss = torch.zeros(())
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16" and torch.device(device).type == "cuda"
    )
    for step in range(t.steps):
        batch = next(batches)
        if teacher is not None:
            batch = pseudo_label(batch, teacher, threshold, ignore_index)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * (1 - step / t.steps) ** 0.9
        target = batch["mask"].to(device)
        with autocast:
            logits = model(batch["image"].to(device))
        # A sum over the labelled pixels: a batch with none (all ignore) gives 0, not NaN.
        loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        loss = loss / (target != ignore_index).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    del batches, loader
    return loss.item()


@torch.no_grad()
def score_heldout(
    spec: EvalSpec, model: Segmenter, rank: int, world: int, device, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """The confusion matrix of this worker's share of the held-out images (each at its own size, after
    the training resize), in batches of equal-sized images."""
    source = open_source(spec.heldout)
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    pending: list = []

    def flush():
        images = torch.from_numpy(np.stack([im for im, _ in pending])).permute(0, 3, 1, 2).to(device)
        pred = model(images).argmax(1).cpu()
        target = torch.from_numpy(np.stack([m.astype(np.int64) for _, m in pending]))
        conf.add_(confusion(pred, target, num_classes, ignore_index))
        pending.clear()

    for sample_id in list(source.list_ids())[rank::world]:
        try:
            rec = source.load(sample_id)
        except BadSample as e:
            log.warning("eval: skipping held-out sample %s: %s", sample_id, e)
            continue
        if rec.mask is None:
            continue
        image, mask = (
            resize_short_side(rec.image, rec.mask, spec.train.resize) if spec.train.resize else (rec.image, rec.mask)
        )
        if pending and (mask.shape != pending[0][1].shape or len(pending) == spec.eval_batch_size):
            flush()
        pending.append((image, mask))
    if pending:
        flush()
    return conf


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; ignore pixels left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(conf: torch.Tensor) -> dict[int, float]:
    """IoU of each class present in the ground truth (the mmseg convention: a class the held-out split
    lacks is not scored, but predicting it costs the classes whose pixels it took)."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    return {int(c): float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in torch.nonzero(gt > 0).flatten()}
