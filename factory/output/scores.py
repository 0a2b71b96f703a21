"""Scene density and label fidelity of one sample, as pure functions of its masks.

SENSE finds synthetic images help when scenes are dense and instances are rendered faithfully. These
functions turn both properties into numbers the factory records on every sample it scores:

density (from one class-id mask, plus its instance map when there is one)
    instances            instances in the mask: distinct non-zero ids of the instance map when given,
                         else the connected components (4-connectivity) of every class region
    classes              distinct classes in the mask (ignore excluded)
    class_entropy        Shannon entropy, in bits, of the labelled pixels' class distribution
    mean_instance_area   mean instance area, as a fraction of all the image's pixels
    min_instance_area    the smallest instance's area, as a fraction of all the image's pixels

fidelity (between a target mask and an auto-label of the same image)
    miou                 mean over classes of |T=c and A=c| / |T=c or A=c|, over the classes present in
                         either mask; pixels the target marks ignore are left out of both
    boundary_f           mean over the same classes of the boundary F-score: the harmonic mean of the
                         fractions of each mask's class-c boundary pixels lying within `tolerance`
                         pixels (Euclidean) of the other mask's class-c boundary

A score that cannot be computed (no mask, no instance) is None, never 0: a missing input must not look
like a bad sample.
"""

from __future__ import annotations

import math

import numpy as np

DENSITY_FIELDS = ("instances", "classes", "class_entropy", "mean_instance_area", "min_instance_area")
FIDELITY_FIELDS = ("miou", "boundary_f", "clip_score")
# Every score a sample can carry, by the dotted name selection and the report use.
SCORE_NAMES = tuple(f"density.{f}" for f in DENSITY_FIELDS) + tuple(f"fidelity.{f}" for f in FIDELITY_FIELDS)

# scipy.ndimage's generate_binary_structure(2, 1), written out: the score names above are read by the core
# install (mix filters, selections), which has no scipy; the scores themselves import it when computed.
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def _areas_from_instances(instances: np.ndarray, valid: np.ndarray) -> np.ndarray:
    _, counts = np.unique(instances[valid & (instances != 0)], return_counts=True)
    return counts


def _areas_from_components(mask: np.ndarray, class_ids: np.ndarray, min_pixels: int) -> np.ndarray:
    from scipy import ndimage

    areas = []
    for c in class_ids:
        labels, n = ndimage.label(mask == c, structure=_FOUR_CONNECTED)
        if n:
            areas.extend(np.bincount(labels.ravel())[1:].tolist())
    out = np.asarray(areas, dtype=np.int64)
    return out[out >= min_pixels]


def density(
    mask: np.ndarray | None, instances: np.ndarray | None = None, ignore_index: int = 255, min_pixels: int = 1
) -> dict[str, float | int | None]:
    """The density scores of one mask; `min_pixels` drops connected components smaller than that (noise).

    With an instance map, only its non-zero ids are instances (stuff regions without an id are not),
    which is the dataset's own definition; without one, each connected region of a class is one.
    """
    if mask is None:
        return dict.fromkeys(DENSITY_FIELDS)
    valid = mask != ignore_index
    class_ids, class_pixels = np.unique(mask[valid], return_counts=True)
    if instances is not None:
        areas = _areas_from_instances(instances, valid)
    else:
        areas = _areas_from_components(mask, class_ids, min_pixels)
    total = mask.size
    return {
        "instances": int(len(areas)),
        "classes": int(len(class_ids)),
        "class_entropy": entropy_bits(class_pixels),
        "mean_instance_area": float(areas.mean() / total) if len(areas) else None,
        "min_instance_area": float(areas.min() / total) if len(areas) else None,
    }


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a distribution given by counts (0.0 for one class or none)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def _fidelity_classes(target: np.ndarray, label: np.ndarray, valid: np.ndarray, ignore_index: int) -> np.ndarray:
    ids = np.union1d(np.unique(target[valid]), np.unique(label[valid]))
    return ids[ids != ignore_index]


def miou(target: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> float | None:
    """Mean IoU of `label` against `target` over the classes present in either; None if there are none."""
    _check_shapes(target, label)
    valid = target != ignore_index
    ious = []
    for c in _fidelity_classes(target, label, valid, ignore_index):
        t, a = (target == c) & valid, (label == c) & valid
        ious.append(np.count_nonzero(t & a) / np.count_nonzero(t | a))
    return float(np.mean(ious)) if ious else None


def boundary(region: np.ndarray) -> np.ndarray:
    """Pixels of a boolean region with a 4-neighbour outside it; the image frame is not a boundary."""
    from scipy import ndimage

    # border_value=1: pixels outside the image count as inside the region, so the frame erodes nothing.
    interior = ndimage.binary_erosion(region, structure=_FOUR_CONNECTED, border_value=1)
    return region & ~interior


def _matched_fraction(edges: np.ndarray, other_edges: np.ndarray, tolerance: float) -> float:
    """Fraction of `edges` pixels within `tolerance` pixels of some `other_edges` pixel."""
    if not other_edges.any():
        return 0.0
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~other_edges)
    return float(np.count_nonzero(distance[edges] <= tolerance) / np.count_nonzero(edges))


def boundary_f(target: np.ndarray, label: np.ndarray, tolerance: float = 2, ignore_index: int = 255) -> float | None:
    """Mean over classes of the boundary F-score at `tolerance` pixels; None if there are no classes.

    A class whose regions have no boundary in either mask (it fills the image in both) scores 1; one
    with a boundary in only one of them scores 0.
    """
    _check_shapes(target, label)
    valid = target != ignore_index
    scores = []
    for c in _fidelity_classes(target, label, valid, ignore_index):
        t_edges, a_edges = boundary((target == c) & valid), boundary((label == c) & valid)
        if not t_edges.any() and not a_edges.any():
            scores.append(1.0)
            continue
        if not t_edges.any() or not a_edges.any():
            scores.append(0.0)
            continue
        precision = _matched_fraction(a_edges, t_edges, tolerance)
        recall = _matched_fraction(t_edges, a_edges, tolerance)
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores)) if scores else None


def _check_shapes(target: np.ndarray, label: np.ndarray) -> None:
    if target.shape != label.shape:
        raise ValueError(f"masks differ in shape: target {target.shape}, label {label.shape}")


def fidelity(
    target: np.ndarray | None, label: np.ndarray | None, tolerance: float = 2, ignore_index: int = 255
) -> dict[str, float | None]:
    """mIoU and boundary F between a target mask and an auto-label; both None when either is missing."""
    if target is None or label is None:
        return {"miou": None, "boundary_f": None}
    return {"miou": miou(target, label, ignore_index), "boundary_f": boundary_f(target, label, tolerance, ignore_index)}


def check_score_names(bounds: dict[str, float]) -> dict[str, float]:
    """`bounds` (score name -> value) unchanged, or a ValueError naming the unknown scores."""
    unknown = sorted(set(bounds) - set(SCORE_NAMES))
    if unknown:
        raise ValueError(f"unknown score(s) {', '.join(unknown)}; known: {', '.join(SCORE_NAMES)}")
    return bounds


def flatten_scores(scores: dict | None) -> dict[str, float | None]:
    """A sample's `scores` json -> {"density.instances": 4, "fidelity.miou": None, ...} for every name."""
    scores = scores or {}
    out = {}
    for name in SCORE_NAMES:
        group, field = name.split(".")
        value = (scores.get(group) or {}).get(field)
        out[name] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return out
