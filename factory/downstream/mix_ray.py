"""The mixing loader on Ray: Ray Data reads each Ray Train worker's share of the real and synthetic data in
tasks, and the worker mixes them by the strategy's law (`factory.downstream.mix.mixed_batches`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

from factory.downstream.mix import _class_info, mixed_batches, synthetic_draws
from factory.downstream.mix_spec import MixSpec, check_inputs
from factory.downstream.mix_streams import forever, real_ids, shard_rows, shard_share, shuffled, synthetic_shards
from factory.sources.spec import SourceSpec


def ray_datasets(spec: MixSpec, world: int, num_cpus: float = 0.5) -> dict:
    """Per Ray Train worker r: `real_r` and `synthetic_r` datasets of its share, read in Ray tasks.

    Give them to a TorchTrainer with `dataset_config=ray.train.DataConfig(datasets_to_split=[])`: each
    worker iterates only its own, epoch after epoch at its own pace (no cross-worker epoch barrier,
    which would deadlock DDP when the two streams' epochs end at different steps).
    """
    import ray.data

    check_inputs(spec)
    ids, shards = real_ids(spec), synthetic_shards(spec) if spec.synthetic else []
    if len(ids) < world:
        raise ValueError(f"mix: the real dataset has {len(ids)} samples, fewer than the {world} workers")
    payload = spec.model_dump(mode="json")
    out = {}
    for r in range(world):
        mine = ids[r::world]
        out[f"real_{r}"] = ray.data.from_items([{"id": i} for i in mine]).flat_map(
            _load_real_row, fn_kwargs={"spec": payload}, num_cpus=num_cpus
        )
        if shards:
            share, by_group = shard_share(shards, r, world)
            out[f"synthetic_{r}"] = ray.data.from_items([{"input": i, "shard": s} for i, s in share]).flat_map(
                _read_shard_rows,
                fn_kwargs={"spec": payload, "slot": r, "slots": world, "by_group": by_group},
                num_cpus=num_cpus,
            )
    return out


def _load_real_row(item: dict, spec: dict) -> list[dict]:
    from factory.downstream.mix_streams import load_real

    return load_real(_source(json.dumps(spec["real"], sort_keys=True)), item["id"])


@functools.lru_cache(maxsize=4)
def _source(real: str):
    """One reader per Ray worker process: some build an index when opened (COCO's annotation file)."""
    from factory.sources import open_source

    return open_source(SourceSpec.model_validate_json(real))


def _read_shard_rows(item: dict, spec: dict, slot: int, slots: int, by_group: bool) -> list[dict]:
    return list(shard_rows(MixSpec.model_validate(spec), (item["input"], item["shard"]), slot, slots, by_group))


def ray_train_batches(spec: MixSpec, start: int = 0) -> Iterator[dict]:
    """Inside a Ray Train worker: this worker's batches start, start + 1, ..., from its `ray_datasets`."""
    import ray.train

    from factory.downstream.mix_torch import to_torch

    rank = ray.train.get_context().get_world_rank()
    real_shard = ray.train.get_dataset_shard(f"real_{rank}")
    real = forever(
        lambda e: shuffled(real_shard.iter_rows(), spec.shuffle_buffer, [spec.seed, rank, e]),
        "this worker's real dataset",
    )
    synthetic = None
    if spec.synthetic:
        synthetic_shard = ray.train.get_dataset_shard(f"synthetic_{rank}")
        synthetic = synthetic_draws(spec, lambda _: synthetic_shard.iter_rows(), [spec.seed, rank])
    ignore_index, mask_dtype = _class_info(spec)
    batches = mixed_batches(spec, rank, iter(range(start, 2**62)), real, synthetic, ignore_index, mask_dtype)
    yield from map(to_torch, batches)
