"""Palettes for SegGen: class-id masks <-> the colour maps that Text2Mask draws and Mask2Img is conditioned on.

A `Palette` gives every class of a class set its own colour, plus two reserved colours: black for
unlabeled pixels and an edge colour (white) for instance outlines. It is stored as `palette.json` beside
the model trained with it, so encoding (training, Mask2Img conditioning) and decoding (Text2Mask output)
always use the same colours.

Two kinds:
- `ade150`: the ADE20K colours by 0-based class id (the palette of `lllyasviel/sd-controlnet-seg`), except
  that skyscraper, which shares road's (140, 140, 140) there, gets its own colour: a shared colour cannot
  be decoded.
- `separated`: for any class set, colours picked by farthest-point sampling in CIELAB, so a model's
  slightly-off colours still decode to the intended class. The seed picks the first colour.

Decoding maps each pixel to the nearest palette colour in CIELAB, the space the colours were spread in,
and to ignore when even that is farther than a cap. With outlines, instances are the connected regions
of one class whose whole border is edge colour; the outline pixels then go back to the instance they
enclose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory.sources.classes import IGNORE, IGNORE_UINT16, ClassSet, ade150_palette, class_set

PALETTE_FILE = "palette.json"
IGNORE_COLOR = (0, 0, 0)
EDGE_COLOR = (255, 255, 255)
_FORMAT = "factory-palette/1"
_DECODE_CHUNK = 1 << 16  # distinct colours per distance matrix: 65536 x 152 floats is ~40 MB
_EDGE_FILL_ROUNDS = 8  # an outline pixel further than this from its instance's interior becomes ignore


class PaletteError(ValueError):
    """A palette that cannot be used: the message says which classes or colours are wrong."""


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIELAB (D65) float64 (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    t = (linear @ to_xyz.T) / np.array([0.95047, 1.0, 1.08883])
    delta = 6 / 29
    f = np.where(t > delta**3, np.cbrt(t), t / (3 * delta**2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _farthest_points(n: int, taken: np.ndarray, seed: int | None) -> np.ndarray:
    """n colours from an RGB grid, each the farthest (CIELAB) from all colours taken before it."""
    levels = max(16, int(np.ceil((8 * (n + len(taken))) ** (1 / 3))))
    axis = np.round(np.linspace(0, 255, levels)).astype(np.uint8)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[~(grid[:, None, :] == taken[None, :, :]).all(-1).any(-1)]
    lab = rgb_to_lab(grid)
    nearest = np.full(len(grid), np.inf)
    for colour in rgb_to_lab(taken):
        nearest = np.minimum(nearest, np.linalg.norm(lab - colour, axis=1))
    chosen = []
    for i in range(n):
        pick = (
            int(np.random.default_rng(seed).integers(len(grid)))
            if i == 0 and seed is not None
            else int(np.argmax(nearest))
        )
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
        nearest[pick] = -1.0
    return grid[chosen]


def separated_palette(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 colours, maximally separated in CIELAB, never black (ignore) or white (edges)."""
    if n < 1:
        raise PaletteError("a palette needs at least one class")
    return _farthest_points(n, np.array([IGNORE_COLOR, EDGE_COLOR], dtype=np.uint8), seed)


def ade150_seggen_palette() -> np.ndarray:
    """The ADE150 colours with skyscraper (48) moved off road's colour to the farthest free one."""
    colours = ade150_palette().copy()
    skyscraper = class_set("ade150").index("skyscraper")
    others = np.delete(colours, skyscraper, axis=0)
    taken = np.concatenate([others, np.array([IGNORE_COLOR, EDGE_COLOR], dtype=np.uint8)])
    colours[skyscraper] = _farthest_points(1, taken, seed=None)[0]
    return colours


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """a moved so that out[y, x] = a[y + dy, x + dx]; `fill` where that falls outside the image."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = a[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _components(group: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """4-connected components of equal `group` values among `valid` pixels.

    Each component is labelled by the flat index of its first pixel (raster order); invalid pixels get -1.
    Min-label propagation with pointer jumping: a handful of vectorised passes for ordinary shapes.
    """
    h, w = group.shape
    labels = np.where(valid, np.arange(h * w, dtype=np.int64).reshape(h, w), -1)
    while True:
        new = labels.copy()
        for dy, dx in _NEIGHBOURS:
            other = _shift(labels, dy, dx, -1)
            same = valid & (other >= 0) & (_shift(group, dy, dx, -1) == group)
            np.minimum(new, np.where(same, other, new), out=new)
        flat = new.reshape(-1)
        live = flat >= 0
        for _ in range(4):
            flat[live] = flat[flat[live]]
        if np.array_equal(new, labels):
            return labels
        labels = new


@dataclass(frozen=True)
class Palette:
    """Class colours for one class set, plus the reserved ignore (black) and edge (white) colours."""

    names: tuple[str, ...]
    colors: np.ndarray  # (n, 3) uint8, row i = class i
    kind: str = "separated"
    seed: int | None = 0
    outlines: bool = False  # the model was trained with instance outlines: decode instances from them
    edge_color: tuple[int, int, int] = EDGE_COLOR

    def __post_init__(self) -> None:
        colours = np.asarray(self.colors)
        if colours.shape != (len(self.names), 3):
            raise PaletteError(f"palette: {len(self.names)} names but colours of shape {colours.shape}")
        if colours.min(initial=0) < 0 or colours.max(initial=0) > 255:
            raise PaletteError("palette: colour values must be 0..255")
        object.__setattr__(self, "colors", colours.astype(np.uint8))
        owners: dict[tuple, str] = {IGNORE_COLOR: "<ignore>", tuple(self.edge_color): "<edge>"}
        if IGNORE_COLOR == tuple(self.edge_color):
            raise PaletteError("palette: the edge colour cannot be black, which means unlabeled")
        for name, colour in zip(self.names, self.colors):
            key = tuple(int(v) for v in colour)
            if key in owners:
                raise PaletteError(
                    f"palette: classes {owners[key]!r} and {name!r} share colour {key}; every class needs its "
                    "own colour (black and the edge colour are reserved), or decoding cannot tell them apart"
                )
            owners[key] = name

    # -- construction and storage ----------------------------------------------------------------------

    @classmethod
    def for_classes(cls, classes: ClassSet, kind: str = "separated", seed: int = 0, outlines: bool = False) -> Palette:
        if kind == "separated":
            return cls(classes.names, separated_palette(len(classes), seed), "separated", seed, outlines)
        if kind == "ade150":
            if classes.names != class_set("ade150").names:
                raise PaletteError(
                    f"palette ade150 colours the 150 ADE20K classes; class set {classes.name!r} differs: "
                    "use the separated palette"
                )
            return cls(classes.names, ade150_seggen_palette(), "ade150", None, outlines)
        raise PaletteError(f"unknown palette kind {kind!r}; use separated or ade150")

    def to_json(self) -> dict:
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "seed": self.seed,
            "outlines": self.outlines,
            "names": list(self.names),
            "colors": self.colors.tolist(),
            "ignore_color": list(IGNORE_COLOR),
            "edge_color": list(self.edge_color),
        }

    @classmethod
    def from_json(cls, data: dict, origin: str = "palette") -> Palette:
        if data.get("format") != _FORMAT:
            raise PaletteError(f"{origin}: not a factory palette (format {data.get('format')!r})")
        if tuple(data.get("ignore_color", IGNORE_COLOR)) != IGNORE_COLOR:
            raise PaletteError(f"{origin}: the ignore colour must be black")
        try:
            return cls(
                tuple(data["names"]),
                np.asarray(data["colors"]),
                data["kind"],
                data.get("seed"),
                bool(data.get("outlines", False)),
                tuple(data["edge_color"]),
            )
        except PaletteError as e:
            raise PaletteError(f"{origin}: {e}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PALETTE_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Palette:
        path = Path(directory) / PALETTE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no palette beside the model (it is written by `factory train`)")
        return cls.from_json(json.loads(path.read_text()), origin=str(path))

    # -- using it --------------------------------------------------------------------------------------

    @property
    def ignore_index(self) -> int:
        """The id decoded masks use for unlabeled pixels: 255, or 65535 past 254 classes."""
        return IGNORE if len(self.names) < IGNORE else IGNORE_UINT16

    @property
    def default_radii(self) -> np.ndarray:
        """Per colour (classes, black, edge): half the CIELAB distance to its nearest other colour.

        A pixel within its nearest colour's radius is closer to it than to any other colour, so no pixel
        is ambiguous; and each colour keeps as much tolerance as its neighbours allow. One global cap
        (the closest pair's) would leave almost none to a crowded palette: ADE150 has two colours 0.3
        delta E apart.
        """
        table = rgb_to_lab(self._table())
        d = np.linalg.norm(table[:, None] - table[None], axis=-1)
        d[np.diag_indices(len(table))] = np.inf
        return d.min(axis=1) / 2

    def _table(self) -> np.ndarray:
        """Class colours, then black (ignore), then the edge colour."""
        return np.concatenate([self.colors, np.array([IGNORE_COLOR, self.edge_color], dtype=np.uint8)])

    def lookup_from(self, classes: ClassSet, overrides: dict[str, str | None] | None = None) -> np.ndarray:
        """Source class ids -> palette ids by class name (`ignore_index` where the palette lacks the class)."""
        overrides = overrides or {}
        index = {n: i for i, n in enumerate(self.names)}
        lut = np.full(max(len(classes), classes.ignore_index) + 1, self.ignore_index, dtype=np.int64)
        for i, name in enumerate(classes.names):
            target = overrides.get(name, name)
            if target is not None and target in index:
                lut[i] = index[target]
        return lut

    def lookup_to(self, classes: ClassSet) -> np.ndarray:
        """Palette ids (and `ignore_index`) -> the source's class ids by name, for decoded masks."""
        lut = np.full(max(len(self.names), self.ignore_index) + 1, classes.ignore_index, dtype=np.int64)
        own = {n: i for i, n in enumerate(classes.names)}
        for i, name in enumerate(self.names):
            if name in own:
                lut[i] = own[name]
        return lut

    def encode(self, mask: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
        """Palette-id mask -> (H, W, 3) uint8 colours; ids outside the palette are black.

        With `instances` (0 = none), every instance's outline (its pixels with a 4-neighbour outside it,
        the image border included) is drawn in the edge colour.
        """
        ids = mask.astype(np.int64)
        table = self._table()
        black = len(self.names)
        out = table[np.where((ids >= 0) & (ids < len(self.names)), ids, black)]
        if instances is not None:
            inst = instances.astype(np.int64)
            edge = np.zeros(inst.shape, dtype=bool)
            for dy, dx in _NEIGHBOURS:
                edge |= _shift(inst, dy, dx, -1) != inst
            out[edge & (inst > 0)] = self.edge_color
        return out

    def decode(self, rgb: np.ndarray, cap: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W, 3) colours -> (palette-id mask, instances or None).

        Each pixel takes the nearest class colour in CIELAB; black, and any pixel farther than `cap`
        (CIELAB distance, delta E 76) from that colour, become `ignore_index`. Without `cap`, each colour's
        own radius (`default_radii`) applies.
        Instances (int32, 0 = none) only for a palette with outlines; otherwise edge-coloured pixels are
        ignored too.
        """
        n = len(self.names)
        rgb = np.asarray(rgb, dtype=np.uint8)
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        # Generated maps hold far fewer distinct colours than pixels: measure each colour once.
        colours, inverse = np.unique(packed.reshape(-1), return_inverse=True)
        unique_rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], -1)
        unique_lab = rgb_to_lab(unique_rgb.astype(np.uint8)).astype(np.float32)
        unique_lab = unique_lab.astype(np.float64)  # float32 rounding is the size of ADE150's tightest radii
        table = rgb_to_lab(self._table()).astype(np.float64)
        table_sq = (table**2).sum(1)
        radii_sq = (self.default_radii if cap is None else np.full(len(table), float(cap))) ** 2
        nearest = np.empty(len(colours), dtype=np.int64)
        for start in range(0, len(colours), _DECODE_CHUNK):
            chunk = unique_lab[start : start + _DECODE_CHUNK]
            # |a - b|^2 = |a|^2 - 2 a.b + |b|^2: one matrix product instead of a (chunk, P, 3) difference.
            d2 = (chunk**2).sum(1)[:, None] - 2 * chunk @ table.T + table_sq[None, :]
            best = d2.argmin(axis=1)
            within = d2[np.arange(len(chunk)), best] <= radii_sq[best]
            nearest[start : start + len(chunk)] = np.where(within, best, n)
        hit = nearest[inverse].reshape(packed.shape)  # 0..n-1 class, n ignore, n + 1 edge
        mask = np.where(hit < n, hit, self.ignore_index).astype(np.uint8 if n < IGNORE else np.uint16)
        if not self.outlines:
            return mask, None
        return self._instances(mask, hit == n + 1)

    def _instances(self, mask: np.ndarray, edge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instances = regions of one class bordered only by edge pixels; outlines go to their instance.

        By construction an instance under 3 px thick has no inside and is lost (its outline becomes
        ignore), and a stuff region wholly enclosed by one instance's outline reads as an instance.
        """
        labelled = ~edge & (mask != self.ignore_index)
        comp = _components(mask.astype(np.int64), labelled)
        # A component with any neighbour that is neither itself nor an outline (the border included)
        # is stuff, not an instance.
        open_to = np.zeros(comp.shape, dtype=bool)
        for dy, dx in _NEIGHBOURS:
            other = _shift(comp, dy, dx, -2)
            open_to |= labelled & ~_shift(edge, dy, dx, False) & (other != comp)
        roots = np.unique(comp[labelled])
        closed = np.setdiff1d(roots, np.unique(comp[open_to]))
        instances = np.zeros(mask.shape, dtype=np.int32)
        inside = np.isin(comp, closed)
        instances[inside] = np.searchsorted(closed, comp[inside]) + 1
        # Grow the instances into their outlines: an outline pixel touches its own interior within a
        # step or two; ties (two instances meeting at a corner) go to the higher id.
        todo = edge.copy()
        for _ in range(_EDGE_FILL_ROUNDS):
            grown = np.zeros_like(instances)
            for dy, dx in _NEIGHBOURS:
                np.maximum(grown, _shift(instances, dy, dx, 0), out=grown)
            take = todo & (grown > 0)
            if not take.any():
                break
            instances[take] = grown[take]
            todo &= ~take
        class_of = np.zeros(len(closed) + 1, dtype=np.int64)
        class_of[instances[inside]] = mask[inside]
        filled = edge & (instances > 0)
        mask = mask.copy()
        mask[filled] = class_of[instances[filled]]
        mask[edge & ~filled] = self.ignore_index
        return mask, instances
