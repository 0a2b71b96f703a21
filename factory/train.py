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

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import torch.utils.data
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.palettes import Palette
from factory.random_models import SDXL, random_id
from factory.sdxl import SDXL_BASE, SUBFOLDER, TINY_SDXL, TrainingModels, write_model_info
from factory.spec import SourceSpec, SpecError, format_loc, read_yaml
from factory.train_data import LoaderBatches, PairStream

log = logging.getLogger("factory")

KINDS = ("text2mask", "mask2img")
COMPLETE = "_COMPLETE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainModel(_Strict):
    profile: Literal["pretrained", "tiny", "random"] = Field(
        "pretrained", description="random: the SDXL base architecture with random weights (benchmarks only)")
    base: str = Field(SDXL_BASE, description="SDXL base: hub id, local dir or s3:// URL")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class TrainOutput(_Strict):
    url: str = Field(min_length=1, description="local path or fsspec URL (s3://bucket/prefix)")
    endpoint_url: str | None = Field(None, description="S3 endpoint (SeaweedFS, MinIO, ...)")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    def filesystem(self):
        options = dict(self.storage_options)
        if self.endpoint_url:
            options.setdefault("client_kwargs", {})["endpoint_url"] = self.endpoint_url
        fs, root = fsspec.core.url_to_fs(self.url, **options)
        return fs, root.rstrip("/")


class TrainSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="run name: letters, digits, - and _")
    seed: int = 0
    source: SourceSpec
    model: TrainModel = Field(default_factory=TrainModel)
    palette: Literal["separated", "ade150"] = Field("separated", description="colours for the source's classes")
    palette_seed: int = 0
    outlines: bool = Field(False, description="draw instance outlines in the edge colour (panoptic/instance data)")
    prompt: str = Field("a photo of {classes}", description="prompt for samples without a caption")
    captions: str | None = Field(None, description="JSON lines {\"id\": ..., \"caption\": ...} per source id")
    empty_prompt_prob: float = Field(0.0, ge=0, le=1, description="share of empty prompts (for guidance)")
    steps: int = Field(30000, gt=0, description="optimizer steps; paper: 30K iterations")
    batch_size: int = Field(4, gt=0, description="samples per worker per step")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    resolution: int = Field(768, ge=8, description="square training crop; paper: 768")
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept; older ones are deleted")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = True
    cpus_per_worker: float = Field(1, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="autocast dtype on GPU")
    loader_workers: int = Field(2, ge=0, description="data loading processes per worker")
    output: TrainOutput

    def content_hash(self) -> str:
        """What decides the weights; where they go, how long, and how often they are saved may change."""
        data = self.model_dump(mode="json", exclude={"output", "steps", "checkpoint_every", "keep_checkpoints",
                                                     "use_gpu", "cpus_per_worker", "loader_workers"})
        data["source"].pop("storage_options")
        data["model"].pop("storage_options")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class TrainResumeError(RuntimeError):
    """The output already holds another training run."""


def parse_train_spec(data: Any, origin: str = "spec") -> TrainSpec:
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise SpecError(f"{origin}: {format_loc(err['loc']) or 'spec'}: {err['msg']}") from None


def load_train_spec(path: str | Path) -> TrainSpec:
    return parse_train_spec(read_yaml(path), origin=str(path))


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's noise, latent sample and timesteps on one worker."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---------------------------------------------------------------- checkpoints


class _Store:
    """Checkpoints and the final folder on any fsspec filesystem; `_COMPLETE` marks a folder usable."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def complete(self, *parts: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(*parts, COMPLETE))

    def checkpoint_steps(self) -> dict[int, bool]:
        """step -> whether that checkpoint is complete."""
        self.fs.invalidate_cache()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path("checkpoints"), detail=False)]
        except FileNotFoundError:
            return {}
        steps = [int(n[len("step-"):]) for n in names if n.startswith("step-") and n[len("step-"):].isdigit()]
        return {s: self.complete("checkpoints", _step_dir(s)) for s in steps}

    def latest(self) -> int | None:
        done = [s for s, ok in self.checkpoint_steps().items() if ok]
        return max(done) if done else None

    def publish(self, local: Path, *parts: str) -> None:
        """Upload a folder: stale leftovers first removed, files next, the marker last."""
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            dest = f"{target}/{file.relative_to(local).as_posix()}"
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), dest)
        self.fs.pipe_file(f"{target}/{COMPLETE}", b"ok\n")

    def download(self, local: Path, *parts: str) -> Path:
        source = self.path(*parts)
        for remote in self.fs.find(source):
            rel = remote[len(source):].lstrip("/")
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local / rel))
        return local

    def prune(self, newest: int, keep: int) -> None:
        """Delete all but the `keep` newest complete checkpoints, and any incomplete one before `newest`."""
        steps = self.checkpoint_steps()
        complete = sorted(s for s, ok in steps.items() if ok)
        doomed = complete[:-keep] + [s for s, ok in steps.items() if not ok and s < newest]
        for s in doomed:
            try:
                self.fs.rm(self.path("checkpoints", _step_dir(s)), recursive=True)
            except FileNotFoundError:  # an object store may list a folder whose files are already gone
                pass

    def read_json(self, *parts: str) -> dict | None:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path(*parts)):
            return None
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.load(f)


def _step_dir(step: int) -> str:
    return f"step-{step:06d}"


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
    store = _Store(*spec.output.filesystem())

    with tempfile.TemporaryDirectory() as tmp:
        latest = store.latest()
        resume = store.download(Path(tmp) / "resume", "checkpoints", _step_dir(latest)) if latest is not None else None
        state = json.loads((resume / "state.json").read_text()) if resume else {"step": 0, "starts": []}
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
        log.info("%s worker %d/%d: %s at step %d of %d", kind, rank, world,
                 "resuming" if resume else "starting", start, spec.steps)

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

        loader = torch.utils.data.DataLoader(LoaderBatches(spec, kind, palette, rank, world, start), batch_size=None,
                                             num_workers=spec.loader_workers)
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
                info = {"steps": done, "starts": starts, "probe_loss_start": probe_start,
                        "probe_loss": probe_loss(), "loss": loss.item()}
                if rank == 0:
                    _save_checkpoint(store, Path(tmp) / f"ckpt-{done}", kind, models, optimizer, palette, spec, info)
                if world > 1:
                    torch.distributed.barrier()
                ray.train.report({k: v for k, v in info.items() if k != "starts"})
        del batches, loader

        if rank == 0:
            final = Path(tmp) / "final"
            info = {"steps": max(start, spec.steps), "starts": starts, "probe_loss_start": probe_start,
                    "probe_loss": probe_loss(), "loss": None if loss is None else loss.item()}
            _write_model(final, kind, models.trainable, palette, spec, info)
            store.publish(final, "final")
            log.info("%s: final model at %s", kind, store.path("final"))


def _save_checkpoint(store: _Store, folder: Path, kind: str, models: TrainingModels, optimizer, palette: Palette,
                     spec: TrainSpec, info: dict) -> None:
    step = info["steps"]
    _write_model(folder, kind, models.trainable, palette, spec, info)
    torch.save({"optimizer": optimizer.state_dict(),
                "scaler": models.scaler.state_dict() if models.scaler is not None else None},
               folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, **info}, indent=1))
    store.publish(folder, "checkpoints", _step_dir(step))
    shutil.rmtree(folder)
    store.prune(step, spec.keep_checkpoints)
    log.info("checkpoint %s", store.path("checkpoints", _step_dir(step)))


# ---------------------------------------------------------------- the driver


def train(kind: str, spec: TrainSpec, address: str | None = None) -> dict:
    """Train (or resume, or find finished) a SegGen model; returns the final folder's seggen.json + url."""
    from factory.sources import open_source

    if kind not in KINDS:
        raise ValueError(f"unknown training kind {kind!r}; use {' or '.join(KINDS)}")
    spec = _with_absolute_paths(spec)
    record = {"kind": kind, "name": spec.name, "spec_hash": spec.content_hash(), "spec": spec.model_dump(mode="json")}
    classes = open_source(spec.source).classes
    palette = Palette.for_classes(classes, spec.palette, spec.palette_seed, spec.outlines)
    store = _Store(*spec.output.filesystem())
    previous = store.read_json("train.json")
    if previous is None:
        store.fs.makedirs(store.root, exist_ok=True)
        store.fs.pipe_file(store.path("train.json"), json.dumps(record, indent=1, sort_keys=True).encode())
    elif (previous["kind"], previous["spec_hash"]) != (kind, record["spec_hash"]):
        raise TrainResumeError(
            f"{spec.output.url} already holds a {previous['kind']} run with spec hash {previous['spec_hash']}; "
            f"this {kind} spec hashes to {record['spec_hash']}. Rerun that spec to resume it, or give another "
            "output url (only steps, checkpointing, output and worker resources may change between runs)."
        )
    done = store.read_json("final", "seggen.json") if store.complete("final") else None
    if done is not None and done["steps"] >= spec.steps:
        log.info("%s: %s already holds a model trained %d steps", kind, store.path("final"), done["steps"])
        return {**done, "url": store.path("final")}

    fit_on_ray(_worker_loop, {"spec": spec.model_dump(mode="json"), "kind": kind, "palette": palette.to_json()},
               spec, f"{spec.name}-{kind}", address)
    info = store.read_json("final", "seggen.json")
    return {**info, "url": store.path("final")}


def fit_on_ray(loop, config: dict, spec, name: str, address: str | None) -> None:
    """Run `loop(config)` on a TorchTrainer sized by the spec's num_workers, use_gpu and cpus_per_worker;
    raise the workers' error if one failed."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from factory.engine import _init_ray

    _init_ray(address)
    with tempfile.TemporaryDirectory() as ray_storage:
        # Ray Train keeps only its run bookkeeping here: models and results go to the output, from rank 0.
        result = TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                         resources_per_worker={"CPU": spec.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=ray_storage),
        ).fit()
    if result.error is not None:
        raise result.error


def _with_absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local relative paths made absolute, as the workers may run in another directory; the spec hash
    then names the data by its full path."""
    def absolute(path: str) -> str:
        return path if "://" in path else str(Path(path).expanduser().resolve())

    update = {
        "source": spec.source.model_copy(update={"path": absolute(spec.source.path)}),
        "output": spec.output.model_copy(update={"url": absolute(spec.output.url)}),
    }
    if spec.captions:
        update["captions"] = absolute(spec.captions)
    return spec.model_copy(update=update)


def train_text2mask(spec: TrainSpec, address: str | None = None) -> dict:
    return train("text2mask", spec, address)


def train_mask2img(spec: TrainSpec, address: str | None = None) -> dict:
    return train("mask2img", spec, address)


def main_train(kind: str, spec_path: str) -> int:
    """`factory train KIND SPEC`: 0 once the final model folder is written."""
    info = train(kind, load_train_spec(spec_path))
    print(f"{kind}: {info['steps']} steps, probe loss {info['probe_loss_start']:.4f} -> {info['probe_loss']:.4f}; "
          f"model at {info['url']}")
    return 0
