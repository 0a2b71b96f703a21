"""Sorted listings as streams: the exact global order on adversarial names, external sorting of huge
directories, and memory that stays at one run however many files there are."""

import os
import tracemalloc
import uuid

import fsspec
import pytest
from fixtures_data import make_ade20k, make_cityscapes, make_voc

import factory.sources.listing
from factory.sources import open_source
from factory.sources.listing import sorted_ids, sorted_unique
from factory.sources.spec import SourceSpec

pytestmark = pytest.mark.timeout(300)

# Names chosen around "/" (0x2f): "-" and "." sort before it, "0", "_" and letters after it, so a walk
# that ordered a directory by its bare name ("a" before "a-b") would misplace everything under it.
# Directories named like images, a file beside a directory of the same stem, names with spaces,
# newlines and non-ASCII, and a file named only by the suffix (no stem: not a sample).
ADVERSARIAL = [
    "a",
    "a-b",
    "a.b",
    "a0",
    "a_b",
    "a b",
    "A",
    "Z",
    "é",
    "日本",
    "z\nnewline",
    "~",
    "a/x",
    "a/a",
    "a/a/x",
    "a-/x",
    "a./x",
    "a_/x",
    "ab/x",
    "a/b/c/d",
    "a/b/c-",
    "a/b/c0",
    "dir.png/y",
    "x",
    "x-",
    "0/1",
    "00",
    "0",
    ".hidden",
]


def touch_all(root, rel_ids, suffix=".png"):
    for rel in rel_ids:
        path = os.path.join(root, rel + suffix)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


@pytest.fixture
def run_size(monkeypatch):
    def set_size(n):
        monkeypatch.setattr(factory.sources.listing, "RUN_SIZE", n)

    return set_size


def image_folder(path, **fields):
    return open_source(
        SourceSpec(kind="folder", path=str(path), classes="voc", image_suffix=".png", mask_suffix=None, **fields)
    )


@pytest.mark.parametrize("run", [100_000, 2])
def test_local_walk_is_globally_sorted_on_adversarial_names(tmp_path, run_size, run):
    run_size(run)  # 2: every directory is sorted externally, through spilled runs
    touch_all(tmp_path, ADVERSARIAL)
    (tmp_path / ".png").touch()  # only the suffix: no stem, not listed
    (tmp_path / "notes.txt").touch()
    (tmp_path / "emptydir").mkdir()
    listed = list(image_folder(tmp_path).list_ids())
    assert listed == sorted(ADVERSARIAL)
    assert listed.index("a") < listed.index("a-b") < listed.index("a/a") < listed.index("a/x") < listed.index("a0")


def test_fsspec_walk_is_globally_sorted_on_adversarial_names(run_size):
    run_size(3)
    fs = fsspec.filesystem("memory")
    root = f"/listing-test-{uuid.uuid4().hex}"
    names = [n for n in ADVERSARIAL if "\n" not in n]
    try:
        for rel in names:
            fs.pipe(f"{root}/{rel}.png", b"")
        assert list(image_folder(f"memory://{root}").list_ids()) == sorted(names)
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.integration
def test_s3_walk_is_sorted_and_keeps_no_listings(s3_server, run_size):
    run_size(3)
    _, options = s3_server
    root = f"test/listing-{uuid.uuid4().hex}"
    names = [n for n in ADVERSARIAL if "\n" not in n]
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{root}/{rel}.png": b"" for rel in names})
    source = image_folder(f"s3://{root}", storage_options=options)
    assert list(source.list_ids()) == sorted(names)
    # Each directory's listing is dropped from s3fs's cache once sorted: a walk accumulates none.
    assert [path for path in source.fs.dircache if path.startswith(root)] == []


def test_limit_takes_the_first_of_the_sorted_stream(tmp_path):
    touch_all(tmp_path, ADVERSARIAL)
    assert list(image_folder(tmp_path, limit=5).list_ids()) == sorted(ADVERSARIAL)[:5]


def test_symlink_loops_are_not_followed(tmp_path):
    touch_all(tmp_path, ["d/a", "e"])
    os.symlink(tmp_path / "d", tmp_path / "d" / "again")
    os.symlink(tmp_path / "d", tmp_path / "link")  # a linked directory elsewhere is followed once
    assert list(image_folder(tmp_path).list_ids()) == ["d/a", "e", "link/a"]


def test_sorted_unique_merges_spilled_runs(run_size):
    run_size(7)
    keys = [f"k{(i * 7919) % 1000:04d}" for i in range(3000)]  # each key three times, scrambled
    assert list(sorted_unique(keys)) == sorted(set(keys))
    assert list(sorted_unique([])) == []


def test_dataset_readers_stream_their_listings(tmp_path, run_size):
    run_size(2)
    ade = make_ade20k(tmp_path / "ade", 5)
    assert list(open_source(SourceSpec(kind="ade20k", path=str(tmp_path / "ade"))).list_ids()) == ade
    city = make_cityscapes(tmp_path / "city", 5)
    assert list(open_source(SourceSpec(kind="cityscapes", path=str(tmp_path / "city"))).list_ids()) == city
    voc = make_voc(tmp_path / "voc", 5)
    with open(tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write(f"{voc[0]}\n\n")  # a repeated line and a blank one
    assert list(open_source(SourceSpec(kind="voc", path=str(tmp_path / "voc"))).list_ids()) == voc


def peak_bytes(iterate) -> int:
    tracemalloc.start()
    try:
        iterate()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_many_files_stream_in_bounded_memory(tmp_path, run_size):
    # 40k empty images: 36k in one flat directory (sorted externally, in runs of 4k) and 4k over 40
    # subdirectories, written in an order unlike the sorted one. What proves the bound is the ratio of
    # the listing to a run (9 runs in the flat directory), not the count itself.
    expected_count = 40_000
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(36_000):
        open(flat / f"img-{(i * 7919) % 36_000:06d}.png", "wb").close()
    for d in range(40):
        sub = tmp_path / f"sub-{d:03d}"
        sub.mkdir()
        for i in range(100):
            open(sub / f"{i}.png", "wb").close()
    run_size(4_000)
    source = image_folder(tmp_path)

    seen = {"count": 0, "previous": ""}

    def stream():
        for sample_id in source.list_ids():
            assert sample_id > seen["previous"]  # ascending and unique
            seen["previous"] = sample_id
            seen["count"] += 1

    streamed = peak_bytes(stream)
    assert seen["count"] == expected_count and seen["previous"] == "sub-039/99"
    held = peak_bytes(
        lambda: sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    )
    # Holding every id costs ~4 MB here; the stream holds one run of 4k names (and its sorted copy).
    assert streamed < held / 3, (streamed, held)
    assert streamed < 2 * 2**20, streamed


def test_sorted_ids_accepts_stems_only(tmp_path):
    touch_all(tmp_path, ["a_image", "a_mask", "b_image"], suffix=".png")
    fs = fsspec.filesystem("file")
    stem = lambda name: name[: -len("_image.png")] if name.endswith("_image.png") else None  # noqa: E731
    assert list(sorted_ids(fs, str(tmp_path), stem)) == ["a", "b"]
