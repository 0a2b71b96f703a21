"""The `scenes` source: procedural scenes rendered from their ids, no files, millions of ids for nothing."""

import itertools
import json
import pickle
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import decode_image, decode_mask, read_tar

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.sample import BadSample
from factory.schema import SpecError
from factory.sources import open_source
from factory.sources.classes import class_set
from factory.sources.scenes import render_scene
from factory.sources.spec import SourceSpec

pytestmark = pytest.mark.timeout(300)


def scenes(**fields):
    return open_source(SourceSpec(kind="scenes", **fields))


def test_ids_are_zero_padded_sorted_and_limited():
    assert list(scenes(count=3).list_ids()) == ["scene-0000000", "scene-0000001", "scene-0000002"]
    assert list(scenes(count=100, limit=2).list_ids()) == ["scene-0000000", "scene-0000001"]
    ids = list(scenes(count=1200).list_ids())
    assert ids == sorted(ids) and len(set(ids)) == 1200
    # Past ten million the ids get wider, all of them, so they still sort as the indices do.
    assert next(iter(scenes(count=10_000_001).list_ids())) == "scene-00000000"


def test_scenes_render_from_their_ids():
    src = scenes(count=5, size=48, seed=3)
    assert src.classes == class_set("ade150")
    rec = src.load("scene-0000004")
    image, mask = render_scene(48, 3, 4)
    np.testing.assert_array_equal(rec.image, image)
    np.testing.assert_array_equal(rec.mask, mask)
    assert rec.mask.dtype == src.classes.mask_dtype and rec.instances is None
    assert rec.meta == {"scene_seed": 3, "scene_index": 4}
    copy = pickle.loads(pickle.dumps(src))  # Ray ships readers to workers
    np.testing.assert_array_equal(copy.load("scene-0000004").mask, mask)


@pytest.mark.parametrize("sample_id", ["scene-0000005", "scene-5", "scene-000000a", "x"])
def test_ids_outside_the_set_are_bad_samples(sample_id):
    with pytest.raises(BadSample) as info:
        scenes(count=5).load(sample_id)
    assert info.value.reason == "missing_image"


def test_millions_of_ids_stream_in_flat_memory():
    """Python memory traced while 2,000,000 ids stream by in chunks of 100,000: one chunk's worth, not
    the listing's (all of them would be ~140 MB). tracemalloc counts this call's allocations only, so
    what else the test process holds does not matter."""
    ids = scenes(count=2_000_000).list_ids()
    assert isinstance(ids, Iterator) and not hasattr(ids, "__len__")
    count, previous = 0, ""
    tracemalloc.start()
    try:
        for chunk in iter(lambda: list(itertools.islice(ids, 100_000)), []):
            assert chunk[0] > previous and chunk == sorted(chunk)
            previous, count = chunk[-1], count + len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 2_000_000 and previous == "scene-1999999"
    assert peak < 25 * 2**20, peak


def spec_with(source: dict) -> dict:
    return {"name": "s", "source": source, "output": {"url": "out"}}


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "scenes"}, "source.count: a scenes source needs `count`"),
        ({"kind": "scenes", "count": 3, "path": "x"}, "source.path: a scenes source has no files"),
        ({"kind": "scenes", "count": 3, "size": 8}, r"source.size: 8 is outside min_side..max_side \(16..2048\)"),
        ({"kind": "folder", "classes": "voc"}, "source.path: a source of kind folder needs `path`"),
        ({"kind": "ade20k"}, "source.path: a source of kind ade20k needs `path`"),
        ({"kind": "folder", "path": "x", "classes": "voc", "min_side": 64, "max_side": 32}, "source.min_side: 64"),
    ],
)
def test_spec_checks_the_fields_of_each_kind(source, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec_with(source))


def test_a_scenes_spec_round_trips_as_the_workers_receive_it():
    spec = parse_spec(spec_with({"kind": "scenes", "count": 10, "size": 32, "seed": 2}))
    again = SourceSpec.model_validate_json(spec.source.model_dump_json())
    assert again == spec.source and list(open_source(again).list_ids())[-1] == "scene-0000009"


@pytest.mark.integration
def test_a_scenes_job_runs_through_the_engine(ray_local, tmp_path):
    spec = parse_spec(
        {
            "name": "scenes",
            "source": {"kind": "scenes", "count": 5, "size": 32, "seed": 4},
            "output": {"url": str(tmp_path / "out"), "shard_size": 2, "image_format": "png"},
        }
    )
    assert run_job(spec)["samples"] == 5
    seen = set()
    for shard in range(3):
        for files in read_tar(tmp_path / "out" / "shards" / f"shard-{shard:06d}.tar").values():
            meta = json.loads(files["json"])
            image, mask = render_scene(32, 4, meta["scene_index"])
            np.testing.assert_array_equal(decode_image(files["png"]), image)
            np.testing.assert_array_equal(decode_mask(files["seg.png"]), mask)
            seen.add(meta["source_id"])
    assert seen == {f"scene-000000{i}" for i in range(5)}
