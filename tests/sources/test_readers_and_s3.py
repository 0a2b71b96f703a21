"""Shards read back by real readers (webdataset, Ray Data, a torch DataLoader), locally and from S3."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from helpers import decode_mask, folder_spec, write_folder_source
from PIL import Image

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore
from factory.tools.status import job_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INVERT = {"kind": "stages_for_tests:InvertStage", "params": {"variants": 2}}


def decode_sample(sample: dict) -> dict:
    """The reading recipe from the README: masks decoded as raw ids, never through an RGB decoder."""
    return {
        "key": sample["__key__"],
        "image": np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")),
        "mask": np.asarray(Image.open(io.BytesIO(sample["seg.png"]))),
        "meta": json.loads(sample["json"]),
    }


@pytest.fixture(scope="module")
def local_job(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readers")
    src = write_folder_source(tmp / "src", 10)
    out = tmp / "out"
    run_job(parse_spec(folder_spec(tmp / "src", out, [INVERT], image_format="jpg")))
    return src, out


def test_webdataset_reads_every_sample_with_exact_masks(local_job):
    src, out = local_job
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = [decode_sample(s) for s in wds.WebDataset(shards, shardshuffle=False)]
    assert len(samples) == 20
    for s in samples:
        np.testing.assert_array_equal(s["mask"], src[s["meta"]["source_id"]][1])
        assert s["mask"].dtype == np.uint8 and s["image"].shape == (32, 32, 3)


def test_ray_data_read_webdataset(local_job, ray_local):
    src, out = local_job
    ds = ray_local.data.read_webdataset(str(out / "shards"), decoder=None)
    rows = ds.take_all()
    assert len(rows) == 20
    for row in rows:
        meta = json.loads(row["json"])
        np.testing.assert_array_equal(decode_mask(row["seg.png"]), src[meta["source_id"]][1])


def test_torch_dataloader(local_job):
    import torch

    src, out = local_job
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))

    def to_tensors(sample):
        s = decode_sample(sample)
        return torch.from_numpy(s["image"]).permute(2, 0, 1), torch.from_numpy(s["mask"].astype(np.int64))

    dataset = wds.WebDataset(shards, shardshuffle=False).map(to_tensors)
    loader = torch.utils.data.DataLoader(dataset.batched(4), batch_size=None, num_workers=2)
    images = masks = 0
    for image, mask in loader:
        assert image.dtype == torch.uint8 and image.shape[1:] == (3, 32, 32)
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 2, 3, 12, 255}
        images += image.shape[0]
        masks += mask.shape[0]
    assert images == masks == 20


def test_s3_output_on_a_real_server(ray_local, s3_server, tmp_path):
    import pyarrow.fs
    import s3fs

    endpoint, options = s3_server
    src = write_folder_source(tmp_path / "src", 6)
    spec = folder_spec(
        tmp_path / "src",
        "s3://test/job-s3",
        [INVERT],
        image_format="jpg",
        endpoint_url=endpoint,
        storage_options={"key": options["key"], "secret": options["secret"]},
    )
    index = run_job(parse_spec(spec))
    assert index["complete"] and index["samples"] == 12
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    assert [s["url"] for s in json.loads(fs.cat("test/job-s3/index.json"))["shards"]] == [
        "s3://test/job-s3/shards/shard-000000.tar",
        "s3://test/job-s3/shards/shard-000001.tar",
    ]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("test/job-s3/shards")) == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("test/job-s3/stats")) == [
        "shard-000000.json",
        "shard-000001.json",
    ]
    assert not fs.exists("test/job-s3/_tmp") or not fs.ls("test/job-s3/_tmp")
    # Ray Data reads the shards straight from the object store.
    s3 = pyarrow.fs.S3FileSystem(
        access_key=options["key"],
        secret_key=options["secret"],
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
    )
    rows = ray_local.data.read_webdataset("test/job-s3/shards", filesystem=s3, decoder=None).take_all()
    assert len(rows) == 12
    for row in rows:
        meta = json.loads(row["json"])
        np.testing.assert_array_equal(decode_mask(row["seg.png"]), src[meta["source_id"]][1])
    status = job_status(OutputStore("s3://test/job-s3", options))
    assert (status["shards_done"], status["shards_total"], status["samples"]) == (2, 2, 12)
    # A second run finds both shards committed and writes nothing.
    assert run_job(parse_spec(spec))["samples"] == 12
