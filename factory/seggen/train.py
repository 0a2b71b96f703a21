"""Training the SegGen models on Ray Train: `factory train text2mask|mask2img SPEC`.

- text2mask: fine-tunes the SDXL UNet on (caption, colour map) pairs: the colour map is the image.
- mask2img: trains a ControlNet (initialised from the UNet) on a frozen SDXL with (caption, colour map,
  image) triplets: the colour map conditions, the image is the target.

Both read a source dataset through `open_source` (images are loaded batch by batch as training goes),
paint masks with a palette made for the source's class set, and run on a TorchTrainer: data-parallel
over `num_workers` workers, AdamW, autocast on GPUs.

Output layout (local path or any fsspec URL):
    train.json                           kind, spec and spec hash: a rerun with another spec is refused
    checkpoints/step-000500/             a model folder (unet/ or controlnet/, palette.json, seggen.json)
                                         plus optimizer.pt and state.json; `_COMPLETE` is written last
    final/                               the model folder the generation stages load (`weights:`)

A rerun resumes from the newest complete checkpoint: weights, optimizer, step, and the data order,
which is a pure function of (seed, step), as is every step's noise, so a resumed run continues exactly
where the killed one was.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from factory.models.random_weights import SDXL, random_id
from factory.models.seggen_folder import MODEL_INFO, SUBFOLDER, write_model_info
from factory.models.tiny_diffusion import TINY_SDXL
from factory.ray_train import fit_on_ray
from factory.seggen.checkpoints import CHECKPOINTS, COMPLETE, FINAL, RECORD, TrainingStore, step_dir
from factory.seggen.data import LoaderBatches, PairStream
from factory.seggen.models import TrainingModels
from factory.seggen.spec import KINDS, TrainResumeError, TrainSpec, load_train_spec, with_absolute_paths
from factory.sources.palettes import Palette

log = logging.getLogger("factory")


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's noise, latent sample and timesteps on one worker."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _write_model(folder: Path, kind: str, module, palette: Palette, spec: TrainSpec, info: dict) -> None:
    module.save_pretrained(str(folder / SUBFOLDER[kind]))
    palette.save(folder)
    base = {"pretrained": spec.model.base, "tiny": f"tiny:{TINY_SDXL}", "random": random_id(SDXL)}[spec.model.profile]
    write_model_info(folder, kind, base=base, resolution=spec.resolution, spec_hash=spec.content_hash(), **info)


# ---------------------------------------------------------------- the worker loop


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: resume, train to `steps`, checkpoint on the way, publish the final folder."""
    import ray.train
    import ray.train.torch

    spec, kind = TrainSpec.model_validate(config["spec"]), config["kind"]
    palette = Palette.from_json(config["palette"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    store = TrainingStore.at(spec.output)

    with tempfile.TemporaryDirectory() as tmp:
        latest = store.latest()
        resume = store.download_dir(Path(tmp) / "resume", CHECKPOINTS, step_dir(latest)) if latest is not None else None
        state: dict[str, Any] = json.loads((resume / "state.json").read_text()) if resume else {"step": 0, "starts": []}
        start = state["step"]
        models = TrainingModels(kind, spec.model, spec.mixed_precision, device, resume)
        optimizer = torch.optim.AdamW(models.trainable.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        if resume:
            saved = torch.load(resume / "optimizer.pt", map_location=device)
            optimizer.load_state_dict(saved["optimizer"])
            if models.scaler is not None and saved.get("scaler"):
                models.scaler.load_state_dict(saved["scaler"])
        model = ray.train.torch.prepare_model(models.trainable)
        starts = [*state["starts"], start]
        log.info(
            "%s worker %d/%d: %s at step %d of %d",
            kind,
            rank,
            world,
            "resuming" if resume else "starting",
            start,
            spec.steps,
        )

        # The probe: rank 0's first batch with fixed noise, scored at the start and at every checkpoint.
        probe = PairStream(spec, kind, palette, 0, world).batch(0) if rank == 0 else None

        def probe_loss() -> float | None:
            if probe is None:
                return None
            with torch.no_grad():
                return float(models.loss(models.trainable, probe, torch.Generator().manual_seed(spec.seed)))

        probe_start = state.get("probe_loss_start")
        if probe_start is None:
            probe_start = probe_loss()

        loader = torch.utils.data.DataLoader(
            LoaderBatches(spec, kind, palette, rank, world, start), batch_size=None, num_workers=spec.loader_workers
        )
        batches = iter(loader)
        loss = None
        for step in range(start, spec.steps):
            batch = next(batches)
            generator = torch.Generator().manual_seed(_step_seed(spec.seed, rank, step))
            loss = models.loss(model, batch, generator)
            if models.scaler is not None:
                models.scaler.scale(loss).backward()
                models.scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(models.trainable.parameters(), spec.max_grad_norm)
            if models.scaler is not None:
                models.scaler.step(optimizer)
                models.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % spec.checkpoint_every == 0 or done == spec.steps:
                info = {
                    "steps": done,
                    "starts": starts,
                    "probe_loss_start": probe_start,
                    "probe_loss": probe_loss(),
                    "loss": loss.item(),
                }
                if rank == 0:
                    _save_checkpoint(store, Path(tmp) / f"ckpt-{done}", kind, models, optimizer, palette, spec, info)
                if world > 1:
                    torch.distributed.barrier()
                ray.train.report({k: v for k, v in info.items() if k != "starts"})
        del batches, loader

        if rank == 0:
            final = Path(tmp) / "final"
            info = {
                "steps": max(start, spec.steps),
                "starts": starts,
                "probe_loss_start": probe_start,
                "probe_loss": probe_loss(),
                "loss": None if loss is None else loss.item(),
            }
            _write_model(final, kind, models.trainable, palette, spec, info)
            store.upload_dir(final, FINAL, marker=COMPLETE)
            log.info("%s: final model at %s", kind, store.path(FINAL))


def _save_checkpoint(
    store: TrainingStore,
    folder: Path,
    kind: str,
    models: TrainingModels,
    optimizer,
    palette: Palette,
    spec: TrainSpec,
    info: dict,
) -> None:
    step = info["steps"]
    _write_model(folder, kind, models.trainable, palette, spec, info)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scaler": models.scaler.state_dict() if models.scaler is not None else None,
        },
        folder / "optimizer.pt",
    )
    (folder / "state.json").write_text(json.dumps({"step": step, **info}, indent=1))
    store.upload_dir(folder, CHECKPOINTS, step_dir(step), marker=COMPLETE)
    shutil.rmtree(folder)
    store.prune(step, spec.keep_checkpoints)
    log.info("checkpoint %s", store.path(CHECKPOINTS, step_dir(step)))


# ---------------------------------------------------------------- the driver


def train(kind: str, spec: TrainSpec, address: str | None = None) -> dict:
    """Train (or resume, or find finished) a SegGen model; returns the final folder's seggen.json + url."""
    from factory.sources import open_source

    if kind not in KINDS:
        raise ValueError(f"unknown training kind {kind!r}; use {' or '.join(KINDS)}")
    spec = with_absolute_paths(spec)
    record = {"kind": kind, "name": spec.name, "spec_hash": spec.content_hash(), "spec": spec.model_dump(mode="json")}
    classes = open_source(spec.source).classes
    palette = Palette.for_classes(classes, spec.palette, spec.palette_seed, spec.outlines)
    store = TrainingStore.at(spec.output)
    previous = store.read_json(RECORD)
    if previous is None:
        store.ensure_root()
        store.fs.pipe_file(store.path(RECORD), json.dumps(record, indent=1, sort_keys=True).encode())
    elif (previous["kind"], previous["spec_hash"]) != (kind, record["spec_hash"]):
        raise TrainResumeError(
            f"{spec.output.url} already holds a {previous['kind']} run with spec hash {previous['spec_hash']}; "
            f"this {kind} spec hashes to {record['spec_hash']}. Rerun that spec to resume it, or give another "
            "output url (only steps, checkpointing, output and worker resources may change between runs)."
        )
    done = store.read_json(FINAL, MODEL_INFO) if store.complete(FINAL) else None
    if done is not None and done["steps"] >= spec.steps:
        log.info("%s: %s already holds a model trained %d steps", kind, store.path(FINAL), done["steps"])
        return {**done, "url": store.path(FINAL)}

    fit_on_ray(
        _worker_loop,
        {"spec": spec.model_dump(mode="json"), "kind": kind, "palette": palette.to_json()},
        spec,
        f"{spec.name}-{kind}",
        address,
    )
    info = store.read_json(FINAL, MODEL_INFO)
    if info is None:
        raise RuntimeError(f"{store.path(FINAL)}: training ended without writing its {MODEL_INFO}")
    return {**info, "url": store.path(FINAL)}


def train_text2mask(spec: TrainSpec, address: str | None = None) -> dict:
    return train("text2mask", spec, address)


def train_mask2img(spec: TrainSpec, address: str | None = None) -> dict:
    return train("mask2img", spec, address)


def main_train(kind: str, spec_path: str) -> int:
    """`factory train KIND SPEC`: 0 once the final model folder is written."""
    info = train(kind, load_train_spec(spec_path))
    print(
        f"{kind}: {info['steps']} steps, probe loss {info['probe_loss_start']:.4f} -> {info['probe_loss']:.4f}; "
        f"model at {info['url']}"
    )
    return 0
