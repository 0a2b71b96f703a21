"""SegGen palettes: separated colours, exact round trips, the distance cap, storage, and instance outlines."""

import json

import numpy as np
import pytest

from factory.sources import palettes
from factory.sources.classes import IGNORE, IGNORE_UINT16, ClassSet, ade150_palette, class_set
from factory.sources.palettes import EDGE_COLOR, IGNORE_COLOR, Palette, PaletteError, rgb_to_lab, separated_palette

pytestmark = pytest.mark.timeout(120)

ADE = class_set("ade150")


def every_class_mask(n: int, dtype) -> np.ndarray:
    """Each class id once as a 3x3 block, plus an ignore block."""
    ignore = IGNORE if dtype == np.uint8 else IGNORE_UINT16
    ids = np.append(np.arange(n), ignore).astype(dtype)
    side = int(np.ceil(np.sqrt(len(ids))))
    grid = np.full(side * side, ignore, dtype=dtype)
    grid[: len(ids)] = ids
    return np.kron(grid.reshape(side, side), np.ones((3, 3), dtype=dtype))


def test_separated_palette_is_distinct_deterministic_and_spread():
    colours = separated_palette(150, seed=0)
    assert colours.shape == (150, 3) and colours.dtype == np.uint8
    keys = {tuple(c) for c in colours}
    assert len(keys) == 150 and IGNORE_COLOR not in keys and EDGE_COLOR not in keys
    assert np.array_equal(colours, separated_palette(150, seed=0))
    assert not np.array_equal(colours, separated_palette(150, seed=1))

    # Farther apart than the ADE20K colours, whose closest pair is a shared colour.
    def closest(c):
        lab = rgb_to_lab(c)
        d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
        return d[~np.eye(len(c), dtype=bool)].min()

    assert closest(colours) > 15 > closest(ade150_palette()) == 0


def test_ade150_palette_keeps_the_ade_colours_but_splits_the_shared_one():
    palette = Palette.for_classes(ADE, "ade150")
    original = ade150_palette()
    skyscraper, road = ADE.index("skyscraper"), ADE.index("road")
    same = np.ones(150, dtype=bool)
    same[skyscraper] = False
    assert np.array_equal(palette.colors[same], original[same])
    assert tuple(original[skyscraper]) == tuple(original[road])
    assert tuple(palette.colors[skyscraper]) != tuple(palette.colors[road])
    with pytest.raises(PaletteError, match="separated"):
        Palette.for_classes(class_set("voc"), "ade150")


@pytest.mark.parametrize("kind,n", [("separated", 150), ("ade150", 150), ("separated", 300)])
def test_exact_round_trip_for_every_class(kind, n):
    classes = ADE if n == 150 else ClassSet("big", tuple(f"c{i}" for i in range(n)))
    palette = Palette.for_classes(classes, kind)
    mask = every_class_mask(n, classes.mask_dtype)
    decoded, instances = palette.decode(palette.encode(mask))
    assert instances is None
    assert decoded.dtype == classes.mask_dtype and np.array_equal(decoded, mask)
    assert palette.ignore_index == classes.ignore_index


def test_noise_within_the_cap_decodes_to_the_class():
    palette = Palette.for_classes(ADE)
    radii = palette.default_radii
    offsets = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    tested = 0
    for cid, colour in enumerate(palette.colors):
        noisy = np.clip(colour.astype(int) + offsets, 0, 255).astype(np.uint8)
        near = np.linalg.norm(rgb_to_lab(noisy) - rgb_to_lab(colour), axis=-1) <= radii[cid]
        decoded, _ = palette.decode(noisy[near][None])
        assert (decoded == cid).all(), f"class {cid}"
        tested += int(near.sum())
    assert tested > 150 * 50  # most of the +-4 cube lies within the cap


def test_colours_far_from_every_class_are_ignored():
    palette = Palette.for_classes(ADE)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (20000, 3), dtype=np.uint8)
    d = np.linalg.norm(rgb_to_lab(colours)[:, None] - rgb_to_lab(palette._table())[None], axis=-1)
    far = (d > palette.default_radii[None]).all(1)
    assert far.sum() > 1000
    decoded, _ = palette.decode(colours[far][None])
    assert (decoded == IGNORE).all()
    black, _ = palette.decode(np.zeros((2, 2, 3), np.uint8))
    assert (black == IGNORE).all()
    # A wide cap gives each its nearest class (nearest to black or the edge colour stays ignore); a
    # zero cap takes only exact colours.
    nearest = d[far].argmin(1)
    wide, _ = palette.decode(colours[far][None], cap=500)
    assert np.array_equal(wide[0], np.where(nearest < 150, nearest, IGNORE))
    exact, _ = palette.decode(np.clip(palette.colors[None].astype(int) + 1, 0, 255).astype(np.uint8), cap=0)
    assert (exact == IGNORE).all()


def test_decoding_in_chunks_matches_one_pass(monkeypatch):
    palette = Palette.for_classes(ADE)
    image = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    whole, _ = palette.decode(image, cap=30)
    monkeypatch.setattr(palettes, "_DECODE_CHUNK", 997)
    chunked, _ = palette.decode(image, cap=30)
    assert np.array_equal(whole, chunked)


def test_save_load_round_trip_and_duplicates_refused(tmp_path):
    palette = Palette.for_classes(ADE, seed=3, outlines=True)
    palette.save(tmp_path)
    loaded = Palette.load(tmp_path)
    assert loaded.names == palette.names and np.array_equal(loaded.colors, palette.colors)
    assert (loaded.kind, loaded.seed, loaded.outlines) == ("separated", 3, True)

    data = json.loads((tmp_path / "palette.json").read_text())
    data["colors"][48] = data["colors"][6]
    (tmp_path / "palette.json").write_text(json.dumps(data))
    with pytest.raises(PaletteError, match=r"classes 'road' and 'skyscraper' share colour"):
        Palette.load(tmp_path)

    for reserved, what in ((list(IGNORE_COLOR), "<ignore>"), (list(EDGE_COLOR), "<edge>")):
        data["colors"][48] = reserved
        (tmp_path / "palette.json").write_text(json.dumps(data))
        with pytest.raises(PaletteError, match=f"'{what}' and 'skyscraper'"):
            Palette.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="palette"):
        Palette.load(tmp_path / "missing")


def scene_with_instances():
    """Stuff, two touching instances of one class, and a separate instance of another class."""
    mask = np.full((48, 64), ADE.index("wall"), dtype=np.uint8)
    mask[30:, :] = ADE.index("floor")
    mask[40:44, 50:58] = IGNORE
    instances = np.zeros(mask.shape, dtype=np.int32)
    mask[8:20, 4:16] = ADE.index("person")
    instances[8:20, 4:16] = 4
    mask[8:20, 16:30] = ADE.index("person")
    instances[8:20, 16:30] = 7
    mask[24:40, 36:60] = ADE.index("car")  # crosses the wall/floor border and reaches no image edge
    instances[24:40, 36:60] = 2
    mask[0:10, 50:64] = ADE.index("car")  # touches the image border
    instances[0:10, 50:64] = 9
    return mask, instances


def test_edge_colour_round_trip_for_instances():
    palette = Palette.for_classes(ADE, outlines=True)
    mask, instances = scene_with_instances()
    rgb = palette.encode(mask, instances)
    edge = (rgb == EDGE_COLOR).all(-1)
    # Outlines are drawn inside every instance (the image border counts as outside), never on stuff.
    assert edge[8, 4:30].all() and edge[8:20, 15].all() and edge[8:20, 16].all() and edge[0, 50:64].all()
    assert not edge[instances == 0].any()

    decoded, found = palette.decode(rgb)
    assert np.array_equal(decoded, mask)
    assert found.dtype == np.int32 and np.array_equal(found == 0, instances == 0)
    # Same partition, numbered by first pixel in raster order.
    pairs = {(int(a), int(b)) for a, b in zip(instances[instances > 0], found[instances > 0])}
    assert pairs == {(9, 1), (4, 2), (7, 3), (2, 4)}


def test_without_outlines_edge_pixels_are_ignored():
    palette = Palette.for_classes(ADE)
    mask, instances = scene_with_instances()
    decoded, found = palette.decode(palette.encode(mask, instances))
    assert found is None
    edge = (palette.encode(mask, instances) == EDGE_COLOR).all(-1)
    assert (decoded[edge] == IGNORE).all() and np.array_equal(decoded[~edge], mask[~edge])


def test_lookups_map_classes_by_name():
    palette = Palette.for_classes(ADE)
    voc = class_set("voc")
    to_palette = palette.lookup_from(voc, {"cat": "animal", "person": None})
    assert to_palette[voc.index("chair")] == ADE.index("chair")
    assert to_palette[voc.index("cat")] == ADE.index("animal")
    assert to_palette[voc.index("person")] == IGNORE and to_palette[voc.index("bird")] == IGNORE
    assert to_palette[IGNORE] == IGNORE
    to_voc = palette.lookup_to(voc)
    assert to_voc[ADE.index("chair")] == voc.index("chair") and to_voc[ADE.index("wall")] == IGNORE
    assert to_voc[IGNORE] == IGNORE
