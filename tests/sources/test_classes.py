import json
from importlib import resources

import numpy as np
import pytest
from helpers import DATA

from factory.sources.classes import (
    IGNORE,
    ade150_lookup,
    ade150_palette,
    class_names_in,
    class_set,
    colorize,
    decode_palette_mask,
    voc_palette,
)

pytestmark = pytest.mark.timeout(60)


def test_shipped_palette_is_the_ade20k_color150_mat():
    import scipy.io

    mat = scipy.io.loadmat(DATA / "ade20k" / "color150.mat")["colors"]
    np.testing.assert_array_equal(ade150_palette(), mat)
    pal = ade150_palette()
    assert tuple(pal[0]) == (120, 120, 120) and tuple(pal[1]) == (180, 120, 120) and tuple(pal[2]) == (6, 230, 230)


def test_ade150_names_and_synonyms():
    ade = class_set("ade150")
    assert len(ade) == 150 and ade.names[12] == "person" and ade.names[136] == "traffic light"
    assert ade.index("couch") == ade.index("sofa") and ade.index("aeroplane") == ade.index("airplane")


def test_voc_palette_matches_the_standard_colours():
    pal = voc_palette()
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[3]) == (128, 128, 0) and tuple(pal[255]) == (224, 224, 192)


def test_colorize_maps_through_ade150_and_leaves_unlabeled_black():
    voc = class_set("voc")
    lut = ade150_lookup(voc)
    mask = np.array([[0, 1], [3, IGNORE]], dtype=np.uint8)  # background, aeroplane, bird, ignore
    rgb = colorize(mask, ade150_palette(), lut)
    ade = class_set("ade150")
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[1, 1]) == (0, 0, 0)
    assert tuple(rgb[0, 1]) == tuple(ade150_palette()[ade.index("airplane")])
    assert tuple(rgb[1, 0]) == tuple(ade150_palette()[ade.index("animal")])


@pytest.mark.parametrize("name", ["voc", "cityscapes"])
def test_every_shipped_class_map_covers_its_class_set_with_real_ade_names(name):
    table = json.loads(resources.files("factory.data").joinpath(f"class_maps/{name}_to_ade150.json").read_text())
    assert set(table) == set(class_set(name).names)
    ade = class_set("ade150")
    assert all(v is None or v in ade.names for v in table.values())


def test_decode_palette_mask_counts_unknown_colours():
    pal = voc_palette(21)
    rgb = np.array([[[128, 0, 0], [224, 224, 192]], [[1, 2, 3], [0, 0, 0]]], dtype=np.uint8)
    ids, unknown = decode_palette_mask(rgb, pal, ignore_colors=((224, 224, 192),))
    assert ids.tolist() == [[1, IGNORE], [IGNORE, 0]] and unknown == 1


def test_class_names_in_orders_by_area():
    mask = np.array([[2, 2, 2, 0], [12, IGNORE, 2, 0]], dtype=np.uint8)
    assert class_names_in(mask, class_set("ade150")) == ["sky", "wall", "person"]
