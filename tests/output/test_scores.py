"""Density and fidelity scores on hand-made masks whose answers are worked out by hand."""

import math

import numpy as np
import pytest

from factory.output.scores import (
    SCORE_NAMES,
    boundary,
    boundary_f,
    density,
    entropy_bits,
    fidelity,
    flatten_scores,
    miou,
)

pytestmark = pytest.mark.timeout(60)

IGNORE = 255


def square(top=8, left=8, size=16, shape=(32, 32), value=1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[top : top + size, left : left + size] = value
    return mask


# ---------------------------------------------------------------- fidelity


def test_two_squares_shifted_by_k_pixels():
    k = 2
    target, label = square(), square(left=8 + k)
    # Square: 16x16 = 256 pixels; overlap 16 x 14 = 224; union 288. Background: 768 each, union 800.
    assert miou(target, label) == pytest.approx((224 / 288 + (1024 - 288) / 800) / 2)
    # At tolerance 0 only coinciding boundary pixels match. Square (inner boundary, 60 pixels each): the
    # top and bottom rows overlap on 14 columns each -> 28 of 60 both ways. Background (the 64 pixels
    # around the square): again the rows above and below overlap on 14 columns -> 28 of 64.
    assert boundary_f(target, label, tolerance=0) == pytest.approx((28 / 60 + 28 / 64) / 2)
    # Every boundary pixel lies within k pixels of the other square's boundary.
    assert boundary_f(target, label, tolerance=k) == pytest.approx(1.0)
    assert boundary_f(target, label, tolerance=k - 1) < boundary_f(target, label, tolerance=k)
    assert fidelity(target, label, tolerance=k) == {"miou": miou(target, label), "boundary_f": 1.0}


def test_identical_disjoint_and_extra_classes():
    mask = square()
    assert miou(mask, mask) == 1.0 and boundary_f(mask, mask, 0) == 1.0
    disjoint = square(top=0, left=0, size=4, value=2)
    disjoint[mask == 1] = 0
    # Classes 0, 1, 2 are in either mask: 1 and 2 have IoU 0; background overlaps on 1024-256-16.
    assert miou(mask, disjoint) == pytest.approx((1024 - 272) / 1024 / 3)
    # A class that fills the image in both masks has no boundary anywhere, and agrees perfectly.
    full = np.full((8, 8), 3, np.uint8)
    assert boundary_f(full, full) == 1.0 and miou(full, full) == 1.0
    # A class with a boundary in one mask only scores 0 for boundary F.
    assert boundary_f(full, square(0, 0, 4, (8, 8), 3)) == pytest.approx(0.0)


def test_ignore_pixels_of_the_target_are_left_out():
    target = square()
    target[:, :4] = IGNORE
    label = square()
    label[:, :4] = 7  # whatever the auto-label says where the target has no label does not count
    assert miou(target, label) == 1.0
    assert boundary_f(target, label, 0) == 1.0
    all_ignore = np.full((8, 8), IGNORE, np.uint8)
    assert miou(all_ignore, np.zeros((8, 8), np.uint8)) is None
    assert boundary_f(all_ignore, np.zeros((8, 8), np.uint8)) is None


def test_missing_inputs_are_null_and_shapes_must_match():
    assert fidelity(None, square()) == {"miou": None, "boundary_f": None}
    assert fidelity(square(), None) == {"miou": None, "boundary_f": None}
    with pytest.raises(ValueError, match="shape"):
        miou(square(), square(shape=(16, 16), size=4))


def test_boundary_is_the_inner_contour_and_not_the_frame():
    assert np.count_nonzero(boundary(square() == 1)) == 60  # 4 * 16 - 4 corners counted once
    assert np.count_nonzero(boundary(square() == 0)) == 64  # the ring around the square, no corners
    assert not boundary(np.ones((8, 8), bool)).any()


# ---------------------------------------------------------------- density


def test_density_from_connected_components():
    mask = np.zeros((32, 32), np.uint8)
    mask[0:8, 0:8] = 1
    mask[8:16, 8:16] = 1  # touches the first only at a corner: 4-connectivity makes it a second instance
    mask[20:28, 20:28] = 2
    d = density(mask)
    # Instances: two squares of class 1, one of class 2, and the background (one connected region).
    assert d["instances"] == 4 and d["classes"] == 3
    assert d["min_instance_area"] == pytest.approx(64 / 1024)
    assert d["mean_instance_area"] == pytest.approx(1024 / 4 / 1024)
    p = np.array([1024 - 192, 128, 64]) / 1024
    assert d["class_entropy"] == pytest.approx(float(-(p * np.log2(p)).sum()))


def test_density_from_instance_ids_and_ignore():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 1
    instances = np.zeros((10, 10), np.int32)
    instances[0:2, 5:7] = 3
    instances[5:10, 5:10] = 9
    d = density(mask, instances)
    assert d == {
        "instances": 2,
        "classes": 2,
        "class_entropy": pytest.approx(1.0),
        "mean_instance_area": pytest.approx((4 + 25) / 2 / 100),
        "min_instance_area": pytest.approx(0.04),
    }
    mask[:5] = IGNORE  # ignore pixels carry no class and no instance
    d = density(mask, instances)
    assert d["instances"] == 1 and d["min_instance_area"] == pytest.approx(0.25)


def test_density_of_four_equal_classes_and_noise():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, 4:], mask[4:, :4], mask[4:, 4:] = 1, 2, 3
    assert density(mask)["class_entropy"] == pytest.approx(2.0)
    mask[0, 0] = 3  # a one-pixel speck
    assert density(mask)["instances"] == 5
    assert density(mask, min_pixels=2)["instances"] == 4


def test_density_nulls():
    assert density(None) == dict.fromkeys(
        ["instances", "classes", "class_entropy", "mean_instance_area", "min_instance_area"]
    )
    empty = density(np.full((4, 4), IGNORE, np.uint8))
    assert empty == {
        "instances": 0,
        "classes": 0,
        "class_entropy": 0.0,
        "mean_instance_area": None,
        "min_instance_area": None,
    }
    assert entropy_bits(np.array([5])) == 0.0 and entropy_bits(np.array([])) == 0.0


def test_flatten_scores_names_every_score():
    flat = flatten_scores(
        {"density": {"instances": 3, "class_entropy": float("nan")}, "fidelity": {"clip_score": 21.5}}
    )
    assert list(flat) == list(SCORE_NAMES)
    assert flat["density.instances"] == 3 and flat["fidelity.clip_score"] == 21.5
    assert flat["density.class_entropy"] is None and flat["fidelity.miou"] is None
    assert all(v is None for v in flatten_scores(None).values())
    assert not any(isinstance(v, float) and math.isnan(v) for v in flat.values())
