"""Dataset readers on small datasets written in the real formats (see fixtures_data.py)."""

import pickle
import uuid

import fsspec
import numpy as np
import pytest
from fixtures_data import (
    COCO_CLASS_NAMES,
    COCO_SEGMENTS,
    SIZE,
    ade_annotation,
    cityscapes_instance_ids,
    coco_segment_map,
    corrupt_jpeg,
    folder_mask,
    image_array,
    make_ade20k,
    make_cityscapes,
    make_coco_panoptic,
    make_folder,
    make_voc,
    png_bytes,
    truncate_png,
    write_image,
    write_mask,
    write_voc_mask,
)
from helpers import DATA
from PIL import Image

from factory.sample import BadSample
from factory.sources import open_source
from factory.sources.base import SourceRecord
from factory.sources.classes import class_set
from factory.sources.spec import SourceSpec

pytestmark = pytest.mark.timeout(120)

H, W = SIZE


def source(kind, path, **fields):
    return open_source(SourceSpec(kind=kind, path=str(path), **fields))


def folder(path, **fields):
    fields.setdefault("classes", ["c0", "c1", "c2", "c3", "c4"])
    fields.setdefault("image_suffix", "_image.png")
    fields.setdefault("mask_suffix", "_target.png")
    return source("folder", path, **fields)


def bad_reason(src, sample_id) -> str:
    with pytest.raises(BadSample) as info:
        src.load(sample_id)
    return info.value.reason


def check_record(rec: SourceRecord, src, sample_id):
    assert rec.id == sample_id
    assert rec.image.shape == (H, W, 3) and rec.image.dtype == np.uint8
    assert rec.mask.shape == (H, W) and rec.mask.dtype == src.classes.mask_dtype


# -- folder ----------------------------------------------------------------------------------------


def test_folder_lists_sorted_and_loads_ids(tmp_path):
    ids = make_folder(tmp_path, 4) + make_folder(tmp_path, 2, subdir="b")
    src = folder(tmp_path)
    listed = list(src.list_ids())
    assert listed == sorted(ids) and len(listed) == 6
    assert listed[:2] == ["b/sample-000", "b/sample-001"]
    rec = src.load("b/sample-001")
    check_record(rec, src, "b/sample-001")
    np.testing.assert_array_equal(rec.mask, folder_mask(1, 5))
    np.testing.assert_array_equal(rec.image, image_array(1))  # PNG: lossless
    assert rec.instances is None
    assert rec.meta == {"image_path": "b/sample-001_image.png", "mask_path": "b/sample-001_target.png"}


def test_folder_suffixes_sharing_an_ending(tmp_path):
    # ".png" images beside "_mask.png" masks: masks must not be listed as images.
    ids = make_folder(tmp_path, 3, image_suffix=".png", mask_suffix="_mask.png")
    assert list(folder(tmp_path, image_suffix=".png", mask_suffix="_mask.png").list_ids()) == ids
    # And the other way round: "_rgb.png" images with ".png" masks.
    other = tmp_path / "other"
    ids = make_folder(other, 2, image_suffix="_rgb.png", mask_suffix=".png")
    src = folder(other, image_suffix="_rgb.png", mask_suffix=".png")
    assert list(src.list_ids()) == ids
    np.testing.assert_array_equal(src.load(ids[1]).mask, folder_mask(1, 5))


def test_folder_same_suffix_is_refused(tmp_path):
    make_folder(tmp_path, 1)
    with pytest.raises(ValueError, match="both"):
        folder(tmp_path, image_suffix=".png", mask_suffix=".png")


def test_folder_jpeg_images(tmp_path):
    ids = make_folder(tmp_path, 2, image_suffix=".jpg", mask_suffix=".png")
    src = folder(tmp_path, image_suffix=".jpg", mask_suffix=".png")
    assert list(src.list_ids()) == ids
    rec = src.load(ids[0])
    check_record(rec, src, ids[0])
    assert np.abs(rec.image.astype(int) - image_array(0)).mean() < 4  # JPEG is close, not exact


def test_folder_p_mode_ids_use_raw_indices(tmp_path):
    write_image(tmp_path / "a_image.png", image_array(0))
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[:, 5:] = 3
    mask[0] = 255
    write_voc_mask(tmp_path / "a_target.png", mask)  # P mode with the VOC palette: indices, not colours
    np.testing.assert_array_equal(folder(tmp_path).load("a").mask, mask)


def test_folder_palette_masks(tmp_path):
    ids = make_folder(tmp_path, 3, mask_format="palette")
    src = folder(tmp_path, mask_format="palette", palette="voc", ignore_colors=[[224, 224, 192]])
    for i, sample_id in enumerate(ids):
        np.testing.assert_array_equal(src.load(sample_id).mask, folder_mask(i, 5))


def test_folder_palette_explicit_rows_and_unknown_colour(tmp_path):
    write_image(tmp_path / "a_image.png", image_array(0))
    colours = np.zeros((H, W, 3), dtype=np.uint8)
    colours[:, 10:] = (10, 20, 30)
    write_image(tmp_path / "a_target.png", colours)
    rows = [[0, 0, 0], [10, 20, 30]]
    src = folder(tmp_path, classes=["bg", "thing"], mask_format="palette", palette=rows)
    expected = np.zeros(SIZE, dtype=np.uint8)
    expected[:, 10:] = 1
    np.testing.assert_array_equal(src.load("a").mask, expected)

    colours[0, 0] = (1, 2, 3)  # a colour in no palette row, not an ignore colour
    write_image(tmp_path / "a_target.png", colours)
    assert bad_reason(src, "a") == "unknown_class_id"


def test_folder_named_class_set_and_limit(tmp_path):
    make_folder(tmp_path, 5)
    src = folder(tmp_path, classes="voc", limit=2)
    assert src.classes == class_set("voc")
    assert list(src.list_ids()) == ["sample-000", "sample-001"]


def test_folder_bad_samples(tmp_path):
    make_folder(tmp_path, 6)
    corrupt_jpeg_dir = tmp_path / "jpeg"
    jpeg_ids = make_folder(corrupt_jpeg_dir, 1, image_suffix=".jpg", mask_suffix=".png")
    corrupt_jpeg(corrupt_jpeg_dir / f"{jpeg_ids[0]}.jpg")
    assert bad_reason(folder(corrupt_jpeg_dir, image_suffix=".jpg", mask_suffix=".png"), jpeg_ids[0]) == "corrupt_image"

    src = folder(tmp_path)
    truncate_png(tmp_path / "sample-000_image.png")
    assert bad_reason(src, "sample-000") == "corrupt_image"
    truncate_png(tmp_path / "sample-001_target.png")
    assert bad_reason(src, "sample-001") == "corrupt_mask"
    write_mask(tmp_path / "sample-002_target.png", np.zeros((H, W + 1), dtype=np.uint8))
    assert bad_reason(src, "sample-002") == "size_mismatch"
    mask = folder_mask(3, 5)
    mask[0, 0] = 5  # 5 classes: ids 0..4; 5 is neither a class nor ignore
    write_mask(tmp_path / "sample-003_target.png", mask)
    assert bad_reason(src, "sample-003") == "unknown_class_id"
    (tmp_path / "sample-004_target.png").unlink()
    assert "sample-004" in list(src.list_ids())  # listed from the images; the mask is missing at load
    assert bad_reason(src, "sample-004") == "missing_mask"
    write_image(tmp_path / "sample-005_target.png", image_array(5))  # RGB where ids were expected
    assert bad_reason(src, "sample-005") == "corrupt_mask"


def test_folder_empty_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list(folder(tmp_path / "empty").list_ids()) == []
    with pytest.raises(FileNotFoundError, match="nope"):
        folder(tmp_path / "nope")


def test_folder_through_fsspec_memory():
    fs = fsspec.filesystem("memory")
    root = f"/sources-test-{uuid.uuid4().hex}"
    try:
        for i in (1, 0):
            fs.pipe(f"{root}/d/s{i}_image.png", png_bytes(image_array(i)))
            fs.pipe(f"{root}/d/s{i}_target.png", png_bytes(folder_mask(i, 5)))
        src = folder(f"memory://{root}")
        assert list(src.list_ids()) == ["d/s0", "d/s1"]
        rec = src.load("d/s1")
        np.testing.assert_array_equal(rec.mask, folder_mask(1, 5))
        np.testing.assert_array_equal(rec.image, image_array(1))
        with pytest.raises(FileNotFoundError):
            folder(f"memory://{root}-missing")
    finally:
        fs.rm(root, recursive=True)


def test_voc_samples_of_the_repository():
    root = DATA / "voc_samples"
    src = source(
        "folder",
        root,
        classes="voc",
        image_suffix="_image.png",
        mask_suffix="_target.png",
        mask_format="palette",
        palette="voc",
        ignore_colors=[[224, 224, 192]],
    )
    assert list(src.list_ids()) == ["1", "114", "23"]
    voc = class_set("voc")
    present = {}
    for sample_id in src.list_ids():
        rec = src.load(sample_id)
        assert rec.image.shape == (513, 513, 3) and rec.mask.shape == (513, 513)
        present[sample_id] = set(np.unique(rec.mask).tolist())
    assert present["1"] == {voc.index("background"), voc.index("aeroplane"), 255}
    assert voc.index("sheep") == 17 and 17 in present["23"]
    assert voc.index("bird") == 3 and 3 in present["114"]
    assert present["23"] - {0, 17, 255} == set() and present["114"] - {0, 3, 255} == set()


# -- ADE20K ----------------------------------------------------------------------------------------


def test_ade20k_listing_and_mapping(tmp_path):
    ids = make_ade20k(tmp_path, 4)
    make_ade20k(tmp_path, 2, split="validation")
    src = source("ade20k", tmp_path)
    assert src.classes == class_set("ade150") and src.split == "training"
    assert list(src.list_ids()) == ids == [f"ADE_train_{i:08d}" for i in range(1, 5)]
    rec = src.load(ids[2])
    check_record(rec, src, ids[2])
    assert rec.mask[0, 0] == 255  # 0 = unlabeled -> ignore
    assert rec.mask[0, W // 4] == 4  # 5 -> 4
    assert rec.mask[0, W // 2] == 149  # 150 -> 149
    raw = ade_annotation(2).astype(int)
    np.testing.assert_array_equal(rec.mask, np.where(raw == 0, 255, raw - 1))
    assert list(source("ade20k", tmp_path, split="validation").list_ids()) == ["ADE_val_00000001", "ADE_val_00000002"]
    assert list(source("ade20k", tmp_path, limit=3).list_ids()) == ids[:3]


def test_ade20k_accepts_parent_of_dataset_dir(tmp_path):
    ids = make_ade20k(tmp_path / "ADEChallengeData2016", 2)
    assert list(source("ade20k", tmp_path).list_ids()) == ids


def test_ade20k_bad_samples(tmp_path):
    ids = make_ade20k(tmp_path, 5)
    src = source("ade20k", tmp_path)
    corrupt_jpeg(tmp_path / "images" / "training" / f"{ids[0]}.jpg")
    assert bad_reason(src, ids[0]) == "corrupt_image"
    truncate_png(tmp_path / "annotations" / "training" / f"{ids[1]}.png")
    assert bad_reason(src, ids[1]) == "corrupt_mask"
    write_mask(tmp_path / "annotations" / "training" / f"{ids[2]}.png", np.zeros((H + 2, W), dtype=np.uint8))
    assert bad_reason(src, ids[2]) == "size_mismatch"
    raw = ade_annotation(3)
    raw[5, 5] = 151
    write_mask(tmp_path / "annotations" / "training" / f"{ids[3]}.png", raw)
    assert bad_reason(src, ids[3]) == "unknown_class_id"
    (tmp_path / "annotations" / "training" / f"{ids[4]}.png").unlink()
    assert bad_reason(src, ids[4]) == "missing_mask"


def test_ade20k_empty_and_missing_root(tmp_path):
    assert list(source("ade20k", tmp_path).list_ids()) == []
    with pytest.raises(FileNotFoundError):
        source("ade20k", tmp_path / "nope")


def test_fixed_label_datasets_refuse_a_class_set_of_another_size(tmp_path):
    make_ade20k(tmp_path, 1)
    with pytest.raises(ValueError, match="rename"):
        source("ade20k", tmp_path, classes="voc")
    renamed = [f"k{i}" for i in range(150)]
    assert source("ade20k", tmp_path, classes=renamed).classes.names == tuple(renamed)


# -- COCO panoptic ---------------------------------------------------------------------------------


def expected_coco(size=SIZE):
    seg = coco_segment_map(size)
    s = COCO_SEGMENTS
    semantic = np.full(size, 255, dtype=np.uint8)
    instances = np.zeros(size, dtype=np.uint16)
    for key, cls, inst in (
        ("sky", 2, 0),
        ("grass", 3, 0),
        ("person_a", 0, 2),
        ("person_b", 0, 3),
        ("car", 1, 1),
        ("crowd", 0, 0),
    ):
        semantic[seg == s[key]] = cls
        instances[seg == s[key]] = inst
    return semantic, instances


@pytest.mark.parametrize("png_dir_at_root", [False, True])
def test_coco_panoptic_listing_and_mapping(tmp_path, png_dir_at_root):
    ids = make_coco_panoptic(tmp_path, 3, png_dir_at_root=png_dir_at_root)
    src = source("coco_panoptic", tmp_path)
    assert src.classes.names == COCO_CLASS_NAMES  # sorted by category id, contiguous 0..3
    assert list(src.list_ids()) == ids == ["000000000001", "000000000002", "000000000003"]
    rec = src.load(ids[1])
    check_record(rec, src, ids[1])
    semantic, instances = expected_coco()
    np.testing.assert_array_equal(rec.mask, semantic)
    assert rec.instances.dtype == np.uint16
    np.testing.assert_array_equal(rec.instances, instances)
    assert rec.mask[H - 1, 0] == 255 and rec.instances[H - 1, 0] == 0  # void
    assert rec.mask[0, W - 1] == 0 and rec.instances[0, W - 1] == 0  # crowd: person, no instance
    assert list(source("coco_panoptic", tmp_path, limit=2).list_ids()) == ids[:2]


def test_coco_panoptic_survives_pickling(tmp_path):
    ids = make_coco_panoptic(tmp_path, 2)
    src = source("coco_panoptic", tmp_path)
    copy = pickle.loads(pickle.dumps(src))
    assert copy._index is None  # the annotation index is not shipped; the copy parses the JSON itself
    np.testing.assert_array_equal(copy.load(ids[0]).mask, expected_coco()[0])


def test_coco_panoptic_bad_samples(tmp_path):
    ids = make_coco_panoptic(tmp_path, 5)
    src = source("coco_panoptic", tmp_path)
    png_dir = tmp_path / "annotations" / "panoptic_val2017"
    corrupt_jpeg(tmp_path / "val2017" / f"{ids[0]}.jpg")
    assert bad_reason(src, ids[0]) == "corrupt_image"
    truncate_png(png_dir / f"{ids[1]}.png")
    assert bad_reason(src, ids[1]) == "corrupt_mask"
    write_image(png_dir / f"{ids[2]}.png", np.zeros((H, W - 3, 3), dtype=np.uint8))
    assert bad_reason(src, ids[2]) == "size_mismatch"
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[3, 3] = (7, 0, 0)  # segment 7 is not in segments_info
    write_image(png_dir / f"{ids[3]}.png", rgb)
    assert bad_reason(src, ids[3]) == "unknown_class_id"
    (png_dir / f"{ids[4]}.png").unlink()
    assert bad_reason(src, ids[4]) == "missing_mask"


def test_coco_panoptic_empty_and_missing_root(tmp_path):
    assert list(source("coco_panoptic", tmp_path).list_ids()) == []
    with pytest.raises(FileNotFoundError):
        source("coco_panoptic", tmp_path / "nope")


# -- VOC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["VOCdevkit", "VOC2012", "flat"])
def test_voc_listing_and_mapping(tmp_path, layout):
    ids = make_voc(tmp_path, 4, layout=layout)
    src = source("voc", tmp_path)
    assert src.classes == class_set("voc")
    assert list(src.list_ids()) == ids  # the split file is written in reverse: the reader sorts
    rec = src.load(ids[2])
    check_record(rec, src, ids[2])
    assert set(np.unique(rec.mask).tolist()) == {0, 3, 255}  # 255 boundary kept as ignore
    assert rec.mask[5, 7] == 255 and rec.mask[10, 10] == 3 and rec.mask[0, 0] == 0
    assert list(source("voc", tmp_path, limit=1).list_ids()) == ids[:1]
    assert list(source("voc", tmp_path, split="val").list_ids()) == []  # no val.txt


def test_voc_bad_samples(tmp_path):
    ids = make_voc(tmp_path, 6, layout="flat")
    src = source("voc", tmp_path)
    corrupt_jpeg(tmp_path / "JPEGImages" / f"{ids[0]}.jpg")
    assert bad_reason(src, ids[0]) == "corrupt_image"
    truncate_png(tmp_path / "SegmentationClass" / f"{ids[1]}.png")
    assert bad_reason(src, ids[1]) == "corrupt_mask"
    write_voc_mask(tmp_path / "SegmentationClass" / f"{ids[2]}.png", np.zeros((W, H), dtype=np.uint8))
    assert bad_reason(src, ids[2]) == "size_mismatch"
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[1, 1] = 21
    write_voc_mask(tmp_path / "SegmentationClass" / f"{ids[3]}.png", mask)
    assert bad_reason(src, ids[3]) == "unknown_class_id"
    (tmp_path / "SegmentationClass" / f"{ids[4]}.png").unlink()
    assert bad_reason(src, ids[4]) == "missing_mask"
    (tmp_path / "JPEGImages" / f"{ids[5]}.jpg").unlink()
    assert bad_reason(src, ids[5]) == "missing_image"


def test_voc_empty_and_missing_root(tmp_path):
    assert list(source("voc", tmp_path).list_ids()) == []
    with pytest.raises(FileNotFoundError):
        source("voc", tmp_path / "nope")


# -- Cityscapes ------------------------------------------------------------------------------------


def test_cityscapes_listing_and_mapping(tmp_path):
    ids = make_cityscapes(tmp_path, 4)
    src = source("cityscapes", tmp_path)
    assert src.classes == class_set("cityscapes")
    assert (
        list(src.list_ids())
        == ids
        == [
            "aachen/aachen_000000_000001",
            "aachen/aachen_000000_000003",
            "bochum/bochum_000000_000000",
            "bochum/bochum_000000_000002",
        ]
    )
    rec = src.load(ids[0])
    check_record(rec, src, ids[0])
    # Bands: 7 road | 26 car | 0 unlabeled | 24 person | 255 (-1) | 33 bicycle | 4 static.
    edges = np.linspace(0, W, 8).astype(int)
    row = [rec.mask[0, (a + b) // 2] for a, b in zip(edges[:-1], edges[1:])]
    assert row == [0, 13, 255, 11, 255, 18, 255]
    names = class_set("cityscapes").names
    assert names[13] == "car" and names[11] == "person" and names[0] == "road" and names[18] == "bicycle"
    # Instances: car 26000 (bottom), 26001 (top), person 24000 -> ascending order 24000, 26000, 26001.
    raw = cityscapes_instance_ids()
    expected = np.zeros(SIZE, dtype=np.uint16)
    expected[raw == 24000], expected[raw == 26000], expected[raw == 26001] = 1, 2, 3
    assert rec.instances.dtype == np.uint16
    np.testing.assert_array_equal(rec.instances, expected)
    assert list(source("cityscapes", tmp_path, limit=2).list_ids()) == ids[:2]


def test_cityscapes_without_instance_files(tmp_path):
    ids = make_cityscapes(tmp_path, 1, split="val", instances=False)
    rec = source("cityscapes", tmp_path, split="val").load(ids[0])
    assert rec.instances is None and rec.mask[0, 0] == 0


def test_cityscapes_bad_samples(tmp_path):
    ids = make_cityscapes(tmp_path, 6, cities=("aachen",))
    src = source("cityscapes", tmp_path)
    gt = tmp_path / "gtFine" / "train"
    img = tmp_path / "leftImg8bit" / "train"
    truncate_png(img / f"{ids[0]}_leftImg8bit.png")
    assert bad_reason(src, ids[0]) == "corrupt_image"
    truncate_png(gt / f"{ids[1]}_gtFine_labelIds.png")
    assert bad_reason(src, ids[1]) == "corrupt_mask"
    write_mask(gt / f"{ids[2]}_gtFine_labelIds.png", np.zeros((H, 5), dtype=np.uint8))
    assert bad_reason(src, ids[2]) == "size_mismatch"
    raw = np.full(SIZE, 7, dtype=np.uint8)
    raw[0, 0] = 200  # not a Cityscapes labelId
    write_mask(gt / f"{ids[3]}_gtFine_labelIds.png", raw)
    assert bad_reason(src, ids[3]) == "unknown_class_id"
    (gt / f"{ids[4]}_gtFine_labelIds.png").unlink()
    assert bad_reason(src, ids[4]) == "missing_mask"
    write_mask(gt / f"{ids[5]}_gtFine_instanceIds.png", np.zeros((H + 1, W), dtype=np.uint16))
    assert bad_reason(src, ids[5]) == "size_mismatch"


def test_cityscapes_garbage_image(tmp_path):
    ids = make_cityscapes(tmp_path, 1)
    path = tmp_path / "leftImg8bit" / "train" / f"{ids[0]}_leftImg8bit.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature and garbage
    assert bad_reason(source("cityscapes", tmp_path), ids[0]) == "corrupt_image"


def test_cityscapes_empty_and_missing_root(tmp_path):
    assert list(source("cityscapes", tmp_path).list_ids()) == []
    with pytest.raises(FileNotFoundError):
        source("cityscapes", tmp_path / "nope")


def test_readers_survive_pickling(tmp_path):
    # Ray ships readers to workers by pickling.
    ids = make_voc(tmp_path / "voc", 1)
    src = pickle.loads(pickle.dumps(source("voc", tmp_path / "voc")))
    assert list(src.list_ids()) == ids and src.load(ids[0]).mask.shape == SIZE


def test_images_in_other_modes_become_rgb(tmp_path):
    make_folder(tmp_path, 1)
    grey = Image.fromarray(image_array(0)).convert("L")
    grey.save(tmp_path / "sample-000_image.png")
    rec = folder(tmp_path).load("sample-000")
    assert rec.image.shape == (H, W, 3)
    np.testing.assert_array_equal(rec.image[..., 0], np.asarray(grey))
