"""Training on real + synthetic data: the mixing loader, with the three published mixing laws.

A `MixSpec` names the real dataset (any source kind, read by the factory's own readers), the factory
outputs to mix in (any fsspec URL, optionally filtered by score bounds or by a `factory select`
selection), the strategy and the batch size. The loader yields whole batches:

    {"image": uint8 (B, 3, H, W), "mask": int64 (B, H, W) class ids (ignore = the class set's, 255 for
     up to 254 classes), "kind": int64 (B,) REAL / SYNTHETIC / PSEUDO, "labelled": bool (B,),
     "key": [str], "source_id": [str]}

Strategies, each named as in its paper, as laws over the B slots of a batch:
- `seggen` (SegGen): each slot holds a real sample, replaced by a synthetic one with probability p (0.6).
- `seggen_pretrain` (SegGen): the first `pretrain_batches` batches are all synthetic, then all real.
- `diffusion_synthesis` (Diffusion Synthesis): each slot is synthetic with probability alpha (0.5); the
  synthetic one is a uniformly chosen variant of a uniformly drawn source (a real index with variants).
- `sense` (SENSE): B real then B synthetic samples per batch (`batch_size` = 2B, as in the paper);
  synthetic images without a mask are labelled on the fly by a teacher (`pseudo_label`), keeping only
  confident pixels.
- `real`: real samples only (the baseline `factory eval` compares against).

Batch b's slot kinds are drawn from a generator seeded by (seed, rank, b): the law holds exactly for
every batch, whatever the number of loader workers. Why not webdataset's `RandomMix`: it draws from
Python's global, unseeded `random`, so batches would not reproduce and the draw would depend on which
loader process made the batch. Reading uses webdataset's tar expander, key grouping and shuffle stage.

Three loaders over the same law: `MixBatches` here, plain numpy batches with no torch (the core install);
`MixDataset` (`factory.downstream.mix_torch`), a torch `IterableDataset` (shares split across ranks and
DataLoader workers); and `ray_datasets` + `ray_train_batches` for Ray Train (`factory.downstream.mix_ray`:
Ray Data reads each worker's share in tasks, the worker mixes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from factory.downstream.mix_spec import MixSpec, check_inputs, parse_mix_spec
from factory.downstream.mix_streams import (
    KIND_NAMES,
    PSEUDO,
    REAL,
    SYNTHETIC,
    decode,
    forever,
    real_ids,
    real_rows,
    shuffled,
    source_groups,
    synthetic_epoch,
    synthetic_shards,
)

__all__ = ["MixSpec", "MixBatches", "parse_mix_spec", "REAL", "SYNTHETIC", "PSEUDO", "KIND_NAMES"]


# ---------------------------------------------------------------- the laws


def slot_kinds(spec: MixSpec, rank: int, b: int) -> np.ndarray:
    """Which slots of batch `b` on `rank` are synthetic (True), from a generator seeded by (seed, rank, b)."""
    s, n = spec.strategy, spec.batch_size
    rng = np.random.default_rng([spec.seed, rank, b])
    if s.kind == "real":
        return np.zeros(n, dtype=bool)
    if s.kind == "seggen":
        return rng.random(n) < s.p
    if s.kind == "diffusion_synthesis":
        return rng.random(n) < s.alpha
    if s.kind == "seggen_pretrain":
        return np.full(n, b < s.pretrain_batches)
    return np.arange(n) >= n // 2  # sense: B/2 real, then B/2 synthetic


def synthetic_draws(spec: MixSpec, epoch_rows: Callable[[int], Iterable[dict]], seed: list[int]) -> Iterator[dict]:
    """The synthetic stream of a strategy, epoch after epoch: each epoch's samples shuffled, or (Diffusion
    Synthesis) its sources shuffled with one of each source's variants drawn uniformly. The shuffle
    buffer never spans two epochs, so an epoch draws every sample (or source) once."""

    def epoch(e: int) -> Iterator[dict]:
        if spec.strategy.kind != "diffusion_synthesis":
            return shuffled(epoch_rows(e), spec.shuffle_buffer, [*seed, e])
        pick = np.random.default_rng([*seed, e, 1])
        groups = shuffled(source_groups(epoch_rows(e)), spec.shuffle_buffer, [*seed, e])
        return (group[int(pick.integers(len(group)))] for group in groups)

    return forever(epoch, "the synthetic outputs")


def mixed_batches(
    spec: MixSpec,
    rank: int,
    batch_indices: Iterator[int],
    real: Iterator[dict],
    synthetic: Iterator[dict] | None,
    ignore_index: int,
    mask_dtype,
) -> Iterator[dict]:
    """Batches `batch_indices` drawn from the two streams by the strategy's law, transformed and collated."""
    drawn = synthetic if synthetic is not None else _no_synthetic(spec)
    for b in batch_indices:
        rows = [next(drawn) if is_synthetic else next(real) for is_synthetic in slot_kinds(spec, rank, b)]
        rng = np.random.default_rng([spec.seed, rank, b, 1])
        yield collate([transform(spec, decode(r, ignore_index, mask_dtype), rng, ignore_index) for r in rows])


def _no_synthetic(spec: MixSpec) -> Iterator[dict]:
    """The synthetic stream of a mix without synthetic outputs: only the `real` strategy never draws from it."""
    raise ValueError(f"mix: strategy {spec.strategy.kind!r} draws synthetic samples, but `synthetic` lists none")
    yield  # a generator: the error comes at the first draw, not when the batches are set up


def resize_short_side(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, mask nearest (class ids stay ids), short side to `size`."""
    from PIL import Image

    h, w = mask.shape
    scale = size / min(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (
        np.asarray(Image.fromarray(image).resize(shape, Image.Resampling.BILINEAR)),
        np.asarray(Image.fromarray(mask).resize(shape, Image.Resampling.NEAREST)),
    )


def transform(spec: MixSpec, row: dict, rng: np.random.Generator, ignore_index: int) -> dict:
    """Resize (short side), random crop (padded with ignore), flip: the same geometry for image and mask;
    then, with `photometric`, random colours for the image alone."""
    image, mask = row["image"], row["mask"]
    if spec.resize:
        image, mask = resize_short_side(image, mask, spec.resize)
    if spec.crop:
        c = spec.crop
        h, w = mask.shape
        padded_image = np.zeros((max(h, c), max(w, c), 3), np.uint8)
        padded_mask = np.full((max(h, c), max(w, c)), ignore_index, mask.dtype)
        padded_image[:h, :w], padded_mask[:h, :w] = image, mask
        top, left = int(rng.integers(padded_mask.shape[0] - c + 1)), int(rng.integers(padded_mask.shape[1] - c + 1))
        image, mask = padded_image[top : top + c, left : left + c], padded_mask[top : top + c, left : left + c]
    if spec.flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if spec.photometric:  # the image's colours say less: a segmenter has to rely on shape and context
        gain, offset = rng.uniform(0.7, 1.3, 3).astype(np.float32), np.float32(rng.uniform(-32, 32))
        image = np.clip(image[..., rng.permutation(3)] * gain + offset, 0, 255).astype(np.uint8)
    return {**row, "image": image, "mask": mask}


def collate(rows: list[dict]) -> dict:
    """One batch as numpy arrays (channels first, as torch's DataLoader and models take them)."""
    shapes = {r["mask"].shape for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"mix: one batch holds images of sizes {sorted(shapes)}: set `crop` (and `resize`)")
    return {
        "image": np.ascontiguousarray(np.stack([r["image"] for r in rows]).transpose(0, 3, 1, 2)),
        "mask": np.stack([r["mask"].astype(np.int64) for r in rows]),
        "kind": np.array([r["kind"] for r in rows], dtype=np.int64),
        "labelled": np.array([bool(r["labelled"]) for r in rows]),
        "key": [r["key"] for r in rows],
        "source_id": [r["source_id"] for r in rows],
    }


def _class_info(spec: MixSpec) -> tuple[int, np.dtype]:
    from factory.sources import open_source

    classes = open_source(spec.real).classes
    return classes.ignore_index, classes.mask_dtype


# ---------------------------------------------------------------- the loader


class MixBatches:
    """Batches of a mix as numpy arrays, for any training loop (`MixDataset` wraps it for torch).

    Rank r of `world` and loader process w of n read share r * n + w of the real ids and of the synthetic
    shards; process w yields batches start + w, + n, + 2n, ..., so batch b always comes from the same
    process whatever the number of processes.
    """

    def __init__(self, spec: MixSpec, rank: int = 0, world: int = 1, start: int = 0):
        self.spec, self.rank, self.world, self.start = spec, rank, world, start
        check_inputs(spec)
        self.ids = real_ids(spec)
        self.shards = synthetic_shards(spec) if spec.synthetic else []

    def batches(self, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """Loader process `worker` of `workers`: its batches, for ever."""
        slot, slots = self.rank * workers + worker, self.world * workers
        if len(self.ids) < slots:
            raise ValueError(
                f"mix: the real dataset has {len(self.ids)} samples, fewer than the {slots} readers "
                f"({self.world} ranks x {workers} loader workers)"
            )
        spec = self.spec
        real = forever(lambda e: real_rows(spec, self.ids, e, slot, slots), "the real dataset")
        synthetic = None
        if self.shards:
            synthetic = synthetic_draws(
                spec, lambda e: synthetic_epoch(spec, self.shards, e, slot, slots), [spec.seed, slot]
            )
        ignore_index, mask_dtype = _class_info(spec)
        indices = iter(range(self.start + worker, 2**62, workers))
        yield from mixed_batches(spec, self.rank, indices, real, synthetic, ignore_index, mask_dtype)

    def __iter__(self) -> Iterator[dict]:
        return self.batches()
