"""Source pixels into the engine's formats: 8-bit RGB images, within the spec's size limits, uint16 instances.

Never silently wrong: a high-bit-depth image is scaled to 8 bits, and one whose pixels have no defined
8-bit scale (floating point, 32-bit values past 16 bits) is a `BadSample`, not a white or black picture.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from factory.sample import BadSample

_UINT16_MAX = int(np.iinfo(np.uint16).max)
MAX_INSTANCES = _UINT16_MAX  # instance maps are uint16, 0 = no instance


def decode(data: bytes, path: str, reason: str) -> Image.Image:
    """Decode fully: PIL is lazy, and a truncated file only fails when the pixels are read."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", f"{path}: {e}") from None
    except MemoryError:  # the worker's memory, not the file: an infrastructure failure, retried
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise BadSample(reason, f"{path}: {e}") from None
    return im


def to_rgb8(im: Image.Image, path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any PIL image mode.

    PIL already reduces 16-bit RGB(A) files to 8 bits by their high byte. Grayscale beyond 8 bits it
    clips instead (I;16 -> RGB is all white), so those are scaled here: 16-bit values by >> 8, and 32-bit
    integer images (mode I, e.g. 16-bit PNGs as older decoders give them, or 32-bit TIFFs) are read as
    16-bit values when they all lie in 0..65535, and refused otherwise. Float images are refused: their
    range is not defined.
    """
    if im.mode == "RGB":
        return np.array(im)
    if im.mode.startswith("I"):
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
            raise BadSample(
                "unsupported_image",
                f"{path}: {im.mode} pixels span {values.min()}..{values.max()}, beyond 16 bits; "
                "no 8-bit scale is defined",
            )
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        raise BadSample("unsupported_image", f"{path}: floating-point pixels (mode F) have no defined 8-bit scale")
    try:
        return np.array(im.convert("RGB"))
    except ValueError as e:  # a mode PIL cannot convert to RGB
        raise BadSample("unsupported_image", f"{path}: mode {im.mode}: {e}") from None


def fit_size(
    image: np.ndarray, mask: np.ndarray | None, instances: np.ndarray | None, min_side: int, max_side: int, where: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[int] | None]:
    """Apply the spec's size rule: an image whose long side passes `max_side` is scaled down to it
    (image with Lanczos, label maps with nearest neighbour so ids stay exact), then one whose short side
    is below `min_side` is refused (`too_small`). Returns the arrays and the original [h, w] if resized."""
    h, w = image.shape[:2]
    resized_from = None
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.LANCZOS))
        rows, cols = _nearest(h, th), _nearest(w, tw)
        mask = None if mask is None else mask[rows[:, None], cols]
        instances = None if instances is None else instances[rows[:, None], cols]
        resized_from = [h, w]
    if min(image.shape[:2]) < min_side:
        scaled = f" after scaling {w}x{h} down to a long side of {max_side}" if resized_from else ""
        raise BadSample(
            "too_small", f"{where}: {image.shape[1]}x{image.shape[0]}{scaled}; source.min_side is {min_side}"
        )
    return image, mask, instances, resized_from


def _nearest(n: int, m: int) -> np.ndarray:
    """Source index of each of `m` output pixels sampling `n` at pixel centres (as PIL's NEAREST does)."""
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.intp), n - 1)


def uint16_instances(numbers: np.ndarray, count: int, path: str) -> np.ndarray:
    """An instance map numbered 0..count as uint16; more instances than uint16 holds is bad data."""
    if count > MAX_INSTANCES:
        raise BadSample("too_many_instances", f"{path}: {count} instances, at most {MAX_INSTANCES} are kept per image")
    return numbers.astype(np.uint16)
