"""The two sample streams the mixing loader draws from: the real dataset and the factory outputs.

A reader is one share of the data: share `slot` of `slots` (one per rank and DataLoader worker, or one
per Ray Train worker). The real share is every `slots`-th id of a seeded per-epoch permutation of the
source's listing, read through the source's own reader. The synthetic share is every `slots`-th shard of
the outputs' committed shards; with fewer shards than readers, every reader reads every shard and keeps
the source groups (a source's consecutive variants) whose number, plus the shard's, falls in its slot.
Either way the shares are disjoint and cover everything, and a source's variants stay together.

Rows are plain dicts. Synthetic rows keep their encoded bytes until a slot actually takes them (so a
shuffle buffer holds JPEG bytes, not pixels); `decode` turns any row into arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import count

import numpy as np
from webdataset.filters import shuffle

from factory.downstream.mix_spec import MixSpec
from factory.output.samples import decode_image_bytes, decode_mask_bytes, image_bytes, iter_shard_samples, sample_meta
from factory.output.scores import flatten_scores
from factory.output.selections import selected_keys
from factory.sample import BadSample
from factory.sources import open_source

log = logging.getLogger("factory")

REAL, SYNTHETIC, PSEUDO = 0, 1, 2  # what a sample is: the `kind` of every row and batch
KIND_NAMES = ("real", "synthetic", "pseudo")


# ---------------------------------------------------------------- real


def real_ids(spec: MixSpec) -> list[str]:
    return list(open_source(spec.real).list_ids())


def real_rows(spec: MixSpec, ids: list[str], epoch: int, slot: int, slots: int) -> Iterator[dict]:
    """One epoch of a real share: its ids in a seeded order, loaded one at a time; bad samples skipped."""
    source = open_source(spec.real)
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(ids))[slot::slots]
    for i in order:
        yield from load_real(source, ids[i])


def load_real(source, sample_id: str) -> list[dict]:
    """The real row of `sample_id`, or nothing if the sample is unusable (logged)."""
    try:
        rec = source.load(sample_id)
    except BadSample as e:
        log.warning("mix: skipping real sample %s: %s", sample_id, e)
        return []
    mask = (
        rec.mask
        if rec.mask is not None
        else np.full(rec.image.shape[:2], source.classes.ignore_index, source.classes.mask_dtype)
    )
    return [
        {
            "image": rec.image,
            "mask": mask,
            "labelled": rec.mask is not None,
            "kind": REAL,
            "key": sample_id,
            "source_id": sample_id,
        }
    ]


# ---------------------------------------------------------------- synthetic


def synthetic_shards(spec: MixSpec) -> list[tuple[int, int]]:
    """(input index, shard id) of every committed shard of every synthetic input, in order."""
    return [(i, shard) for i, inp in enumerate(spec.synthetic) for shard in inp.store().committed_shards()]


def shard_share(shards: list, slot: int, slots: int) -> tuple[list, bool]:
    """(the shards this reader reads, whether it keeps only its source groups of each)."""
    if len(shards) >= slots:
        return shards[slot::slots], False
    return shards, True


def shard_rows(spec: MixSpec, item: tuple[int, int], slot: int, slots: int, by_group: bool) -> Iterator[dict]:
    """The rows of one shard that pass the input's filters, as bytes; with `by_group`, only the source
    groups of this reader's slot (numbered from the shard id, so every reader agrees)."""
    index, shard = item
    inp = spec.synthetic[index]
    store = inp.store()
    selected = selected_keys(store, inp.selection, shard) if inp.selection else None
    group, last_source = shard - 1, None
    for key, files in iter_shard_samples(store, shard):
        meta = sample_meta(files)
        if meta["source_id"] != last_source:
            group, last_source = group + 1, meta["source_id"]
        if by_group and group % slots != slot:
            continue
        if (selected is not None and key not in selected) or not inp.passes(flatten_scores(meta.get("scores"))):
            continue
        yield {
            "image_bytes": image_bytes(files),
            "mask_bytes": files.get("seg.png", b""),
            "kind": PSEUDO if meta.get("pseudo_label") else SYNTHETIC,
            "labelled": "seg.png" in files,
            "key": key,
            "source_id": f"{index}:{meta['source_id']}",
        }


def synthetic_epoch(spec: MixSpec, shards: list, epoch: int, slot: int, slots: int) -> Iterator[dict]:
    """One epoch of a synthetic share: its shards in a seeded order."""
    mine, by_group = shard_share(shards, slot, slots)
    order = np.random.default_rng([spec.seed, epoch, slot]).permutation(len(mine))
    for i in order:
        yield from shard_rows(spec, mine[i], slot, slots, by_group)


# ---------------------------------------------------------------- shared by both loaders


def forever(epoch_rows, what: str) -> Iterator[dict]:
    """Epoch after epoch of `epoch_rows(epoch)`; an epoch with no row at all is an error, not a hang."""
    for epoch in count():
        empty = True
        for row in epoch_rows(epoch):
            empty = False
            yield row
        if empty:
            raise RuntimeError(
                f"mix: {what} has no usable sample in this reader's share (check filters, "
                "selection, and that there are at least as many samples as readers)"
            )


def shuffled(rows: Iterable, buffer: int, seed: list[int]) -> Iterator:
    """webdataset's shuffle stage (a buffer of `buffer` rows) with its own seeded generator."""
    return shuffle(buffer, buffer, seed=repr(seed))(iter(rows))


def source_groups(rows: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive rows of one source (its variants), as lists."""
    group: list[dict] = []
    for row in rows:
        if group and row["source_id"] != group[0]["source_id"]:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def decode(row: dict, ignore_index: int, mask_dtype) -> dict:
    """A row with arrays: synthetic rows are decoded here, real ones already are."""
    if "image" in row:
        return row
    image = decode_image_bytes(row["image_bytes"])
    mask = (
        decode_mask_bytes(row["mask_bytes"]) if row["labelled"] else np.full(image.shape[:2], ignore_index, mask_dtype)
    )
    return {"image": image, "mask": mask, **{k: row[k] for k in ("labelled", "kind", "key", "source_id")}}
