"""Source pixels: high-bit-depth images become correct 8-bit RGB (or are refused), the size limits
(min_side, max_side) on real files, and uint16 instance maps."""

import json
import struct
import zlib

import numpy as np
import pytest
from fixtures_data import COCO_CATEGORIES, image_array, make_cityscapes, make_coco_panoptic, write_image, write_mask
from PIL import Image

from factory.sample import BadSample
from factory.sources import open_source
from factory.sources.spec import SourceSpec

pytestmark = pytest.mark.timeout(300)

H, W = 24, 32


def folder(path, **fields):
    fields.setdefault("classes", ["c0", "c1", "c2", "c3", "c4"])
    fields.setdefault("image_suffix", "_image.png")
    fields.setdefault("mask_suffix", "_target.png")
    return open_source(SourceSpec(kind="folder", path=str(path), **fields))


def bad(src, sample_id) -> BadSample:
    with pytest.raises(BadSample) as info:
        src.load(sample_id)
    return info.value


def grey16() -> np.ndarray:
    """A 16-bit ramp over the whole range, so the high byte and the low byte differ everywhere."""
    return (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 65535 // (H * W - 1)).astype(np.uint16)


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def png_rgb16(rgb: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2, big-endian samples."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# -- high bit depth --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, suffix):
    Image.fromarray(grey16()).save(tmp_path / f"a_image{suffix}")  # PIL mode I;16
    write_mask(tmp_path / "a_target.png", np.zeros((H, W), np.uint8))
    rec = folder(tmp_path, image_suffix=f"_image{suffix}").load("a")
    assert rec.image.dtype == np.uint8 and rec.image.max() == 255 and rec.image.min() == 0
    np.testing.assert_array_equal(rec.image, as_rgb((grey16() >> 8).astype(np.uint8)))


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    (tmp_path / "a_image.png").write_bytes(png_rgb16(rgb))
    write_mask(tmp_path / "a_target.png", np.zeros((H, W), np.uint8))
    np.testing.assert_array_equal(folder(tmp_path).load("a").image, (rgb >> 8).astype(np.uint8))


def test_32_bit_integer_images_are_16_bit_values_or_refused(tmp_path):
    write_mask(tmp_path / "a_target.png", np.zeros((H, W), np.uint8))
    write_mask(tmp_path / "b_target.png", np.zeros((H, W), np.uint8))
    Image.fromarray(grey16().astype(np.int32)).save(tmp_path / "a_image.tif")  # mode I, values 0..65535
    wide = grey16().astype(np.int32) * 4  # past 16 bits: no defined 8-bit scale
    Image.fromarray(wide).save(tmp_path / "b_image.tif")
    src = folder(tmp_path, image_suffix="_image.tif")
    assert Image.open(tmp_path / "a_image.tif").mode == "I"
    np.testing.assert_array_equal(src.load("a").image, as_rgb((grey16() >> 8).astype(np.uint8)))
    err = bad(src, "b")
    assert err.reason == "unsupported_image" and "beyond 16 bits" in err.detail


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)).save(tmp_path / "a_image.tif")
    write_mask(tmp_path / "a_target.png", np.zeros((H, W), np.uint8))
    err = bad(folder(tmp_path, image_suffix="_image.tif"), "a")
    assert err.reason == "unsupported_image" and "mode F" in err.detail


# -- size limits -----------------------------------------------------------------------------------


def test_a_1x1_source_is_too_small(tmp_path):
    write_image(tmp_path / "a_image.png", np.zeros((1, 1, 3), np.uint8))
    write_mask(tmp_path / "a_target.png", np.zeros((1, 1), np.uint8))
    err = bad(folder(tmp_path), "a")
    assert err.reason == "too_small" and "1x1" in err.detail
    assert folder(tmp_path, min_side=1).load("a").image.shape == (1, 1, 3)


def test_a_6000x6000_source_is_read_at_2048_with_its_mask(tmp_path):
    n = 6000
    ramp = (np.arange(n) * 255 // n).astype(np.uint8)
    image = np.empty((n, n, 3), np.uint8)  # filled in place: a stacked int64 array would be 864 MB
    image[..., 0], image[..., 1], image[..., 2] = ramp[:, None], ramp[None, :], 128
    write_image(tmp_path / "big_image.jpg", image)
    del image
    grid = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5  # 8x8 blocks of 750 px, classes 0..4
    write_mask(tmp_path / "big_target.png", np.repeat(np.repeat(grid, 750, 0), 750, 1))
    rec = folder(tmp_path, image_suffix="_image.jpg").load("big")
    assert rec.image.shape == (2048, 2048, 3) and rec.mask.shape == (2048, 2048)
    assert rec.meta["resized_from"] == [n, n]
    # Nearest neighbour at pixel centres: every label is one of the source's, exactly where it was.
    centres = ((np.arange(2048) + 0.5) * n / 2048).astype(int) // 750
    np.testing.assert_array_equal(rec.mask, grid[centres[:, None], centres[None, :]])
    # The image is scaled, not cropped: its gradient spans the same range.
    assert abs(int(rec.image[-1, 0, 0]) - 254) <= 3 and abs(int(rec.image[0, -1, 1]) - 254) <= 3


def test_downscaling_uses_lanczos_and_keeps_the_aspect(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    write_image(tmp_path / "a_image.png", image)
    write_mask(tmp_path / "a_target.png", np.zeros((200, 300), np.uint8))
    rec = folder(tmp_path, max_side=100).load("a")
    expected = np.asarray(Image.fromarray(image).resize((100, 67), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(rec.image, expected)
    assert rec.mask.shape == (67, 100) and rec.meta["resized_from"] == [200, 300]
    assert "resized_from" not in folder(tmp_path, max_side=300).load("a").meta


def test_a_thin_image_is_too_small_once_scaled(tmp_path):
    write_image(tmp_path / "a_image.png", np.zeros((20, 500, 3), np.uint8))
    write_mask(tmp_path / "a_target.png", np.zeros((20, 500), np.uint8))
    err = bad(folder(tmp_path, max_side=100), "a")
    assert err.reason == "too_small" and "100x4 after scaling 500x20" in err.detail


@pytest.mark.parametrize("kind", ["cityscapes", "coco_panoptic"])
def test_instances_are_scaled_with_nearest_and_stay_uint16(tmp_path, kind):
    make = make_cityscapes if kind == "cityscapes" else make_coco_panoptic
    sample_id = make(tmp_path, 1, size=(40, 64))[0]
    full = open_source(SourceSpec(kind=kind, path=str(tmp_path))).load(sample_id)
    small = open_source(SourceSpec(kind=kind, path=str(tmp_path), max_side=32)).load(sample_id)
    rows, cols = ((np.arange(20) + 0.5) * 2).astype(int), ((np.arange(32) + 0.5) * 2).astype(int)
    assert small.instances.dtype == np.uint16 and small.meta["resized_from"] == [40, 64]
    np.testing.assert_array_equal(small.instances, full.instances[rows[:, None], cols])
    np.testing.assert_array_equal(small.mask, full.mask[rows[:, None], cols])


# -- uint16 instances ------------------------------------------------------------------------------


def coco_one_segment_per_pixel(root, h: int, w: int) -> str:
    """A COCO panoptic image whose every pixel is its own person instance: h * w instances."""
    ids = np.arange(1, h * w + 1).reshape(h, w)
    write_image(root / "val2017" / "x.jpg", image_array(0, (h, w)))
    write_image(
        root / "annotations" / "panoptic_val2017" / "x.png",
        np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8),
    )
    segments = [{"id": int(i), "category_id": 1, "iscrowd": 0} for i in range(1, h * w + 1)]
    doc = {
        "images": [{"id": 1, "file_name": "x.jpg"}],
        "categories": COCO_CATEGORIES,
        "annotations": [{"image_id": 1, "file_name": "x.png", "segments_info": segments}],
    }
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    return "x"


def test_coco_panoptic_with_65535_instances_fits_uint16(tmp_path):
    sample_id = coco_one_segment_per_pixel(tmp_path, 255, 257)  # 65535 pixels
    rec = open_source(SourceSpec(kind="coco_panoptic", path=str(tmp_path))).load(sample_id)
    assert rec.instances.dtype == np.uint16 and rec.instances.max() == 65535
    assert len(np.unique(rec.instances)) == 65535


def test_more_than_65535_instances_is_a_bad_sample(tmp_path):
    sample_id = coco_one_segment_per_pixel(tmp_path, 256, 257)  # 65792 pixels
    err = bad(open_source(SourceSpec(kind="coco_panoptic", path=str(tmp_path))), sample_id)
    assert err.reason == "too_many_instances" and "65792 instances" in err.detail


def test_a_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    write_image(tmp_path / "a_image.png", image_array(0))
    write_mask(tmp_path / "a_target.png", np.zeros((H, W), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 3)  # PIL refuses past twice the limit
    assert bad(folder(tmp_path), "a").reason == "too_large"
