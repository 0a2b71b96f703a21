"""The procedural scenes: deterministic files that read back as an ADE150 folder source."""

import numpy as np
import pytest
from PIL import Image

from factory.sources import open_source
from factory.sources.classes import ade150_palette, class_set
from factory.sources.scenes import IMAGE_SUFFIX, MASK_SUFFIX, make_scenes, render_scene
from factory.sources.spec import SourceSpec

pytestmark = pytest.mark.timeout(120)


def read_files(root, ids):
    return {i: ((root / f"{i}{IMAGE_SUFFIX}").read_bytes(), (root / f"{i}{MASK_SUFFIX}").read_bytes()) for i in ids}


def test_writes_images_and_masks(tmp_path):
    ids = make_scenes(tmp_path, count=5, size=48, seed=3)
    assert ids == [f"scene-{i:05d}" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{i}{IMAGE_SUFFIX}" for i in ids] + [f"{i}{MASK_SUFFIX}" for i in ids]
    )
    image = Image.open(tmp_path / f"{ids[0]}{IMAGE_SUFFIX}")
    mask = Image.open(tmp_path / f"{ids[0]}{MASK_SUFFIX}")
    assert image.mode == "RGB" and image.size == (48, 48)
    assert mask.mode == "L" and mask.size == (48, 48)


def test_bit_identical_for_a_seed(tmp_path):
    a = read_files(tmp_path / "a", make_scenes(tmp_path / "a", count=4, size=32, seed=1))
    b = read_files(tmp_path / "b", make_scenes(tmp_path / "b", count=4, size=32, seed=1))
    assert a == b
    c = read_files(tmp_path / "c", make_scenes(tmp_path / "c", count=4, size=32, seed=2))
    assert all(a[i][0] != c[i][0] for i in a)
    # Scene i depends only on (seed, i): a longer set starts with the same scenes.
    d = read_files(tmp_path / "d", make_scenes(tmp_path / "d", count=6, size=32, seed=1))
    assert all(d[i] == a[i] for i in a)


def test_idempotent(tmp_path):
    ids = make_scenes(tmp_path, count=3, size=32)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert make_scenes(tmp_path, count=3, size=32) == ids
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    # A missing file is written again, identical to the first time.
    first = (tmp_path / f"{ids[1]}{MASK_SUFFIX}").read_bytes()
    (tmp_path / f"{ids[1]}{MASK_SUFFIX}").unlink()
    make_scenes(tmp_path, count=3, size=32)
    assert (tmp_path / f"{ids[1]}{MASK_SUFFIX}").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_reads_back_as_an_ade150_folder_source(tmp_path):
    ids = make_scenes(tmp_path, count=8, size=64)
    src = open_source(
        SourceSpec(
            kind="folder", path=str(tmp_path), classes="ade150", image_suffix=IMAGE_SUFFIX, mask_suffix=MASK_SUFFIX
        )
    )
    assert list(src.list_ids()) == ids
    seen = set()
    for sample_id in ids:
        rec = src.load(sample_id)
        assert rec.image.shape == (64, 64, 3) and rec.mask.shape == (64, 64)
        present = set(np.unique(rec.mask).tolist())
        assert len(present) >= 2 and max(present) < 150  # a horizon at least; every pixel labelled
        seen |= present
    ade = class_set("ade150")
    assert {ade.index("sky"), ade.index("wall")} & seen
    assert seen <= {
        ade.index(n)
        for n in (
            "wall",
            "building",
            "sky",
            "floor",
            "tree",
            "road",
            "grass",
            "mountain",
            "person",
            "car",
            "table",
            "chair",
            "sofa",
            "painting",
        )
    }


def test_class_ids_are_the_ade150_ones():
    ade = class_set("ade150")
    expected = {
        "wall": 0,
        "building": 1,
        "sky": 2,
        "floor": 3,
        "tree": 4,
        "road": 6,
        "grass": 9,
        "person": 12,
        "mountain": 16,
        "car": 20,
    }
    assert {name: ade.index(name) for name in expected} == expected


def test_image_colours_follow_the_palette():
    image, mask = render_scene(64, seed=0, index=0)
    palette = ade150_palette().astype(float)
    # Each class region's mean colour is nearer its own palette colour than any other class present.
    present = np.unique(mask)
    for c in present:
        region = image[mask == c].astype(float)
        if len(region) < 30:
            continue
        mean = region.mean(axis=0)
        distances = {int(o): np.linalg.norm(mean - palette[o]) for o in present}
        assert min(distances, key=distances.get) == c
    # Light from above: the top rows are brighter than the bottom rows of the same class.
    top_class = mask[0, 0]
    rows = [image[y][mask[y] == top_class].mean() for y in range(64) if (mask[y] == top_class).sum() > 8]
    assert rows[0] > rows[-1]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_scenes(tmp_path, count=1, size=4)
    assert make_scenes(tmp_path / "none", count=0) == []


def colour_lookup_accuracy(style: str) -> tuple[float, float]:
    """Pixel accuracy of the best colour-only classifier fitted on 150 scenes (each quantised colour ->
    its most frequent class), on 100 other scenes; and the accuracy of always answering the most
    frequent class."""

    def pixels(indices):
        scenes = [render_scene(32, 0, i, style) for i in indices]
        colours = np.concatenate([im.reshape(-1, 3) for im, _ in scenes]) // 32
        bins = colours[:, 0] * 64 + colours[:, 1] * 8 + colours[:, 2]
        return bins, np.concatenate([m.ravel() for _, m in scenes]).astype(np.int64)

    bins, labels = pixels(range(150))
    majority = np.bincount(labels).argmax()
    table = np.full(512, majority)
    counts = np.zeros((512, 256), np.int64)
    np.add.at(counts, (bins, labels), 1)
    seen = counts.sum(axis=1) > 0
    table[seen] = counts[seen].argmax(axis=1)
    test_bins, test_labels = pixels(range(1000, 1100))
    return float((table[test_bins] == test_labels).mean()), float((test_labels == majority).mean())


def test_varied_scenes_colour_does_not_give_the_class():
    palette, baseline = colour_lookup_accuracy("palette")
    varied, _ = colour_lookup_accuracy("varied")
    assert palette > 0.8  # the palette look: colour nearly is the label
    assert varied < baseline + 0.05  # the varied look: colour is no better than guessing the commonest class


def test_varied_look_keeps_the_layout_and_is_deterministic():
    for index in range(5):
        image, mask = render_scene(32, 3, index, style="varied")
        palette_image, palette_mask = render_scene(32, 3, index)
        assert np.array_equal(mask, palette_mask) and not np.array_equal(image, palette_image)
        again = render_scene(32, 3, index, style="varied")
        assert np.array_equal(again[0], image)
    with pytest.raises(ValueError, match="unknown scene style"):
        render_scene(32, 0, 0, style="neon")


def test_start_makes_disjoint_splits_of_one_set(tmp_path):
    ids = make_scenes(tmp_path / "b", count=2, size=16, start=5, style="varied")
    assert ids == ["scene-00005", "scene-00006"]
    whole = make_scenes(tmp_path / "a", count=7, size=16, style="varied")
    assert read_files(tmp_path / "b", ids) == read_files(tmp_path / "a", whole[5:])
    with pytest.raises(ValueError, match="style"):
        make_scenes(tmp_path / "c", count=1, style="neon")
