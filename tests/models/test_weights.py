"""Pinned and verified weights (factory/models/weights.py): what a pin holds, and loads held to their pins.

Local folders and an in-memory object store here; the real S3 server's ETags in test_model_cache.py; the
hub through a Hugging Face cache laid out as huggingface_hub lays it out, offline (no hub here), and the
hub's answer to `model_info` as huggingface_hub's own dataclasses.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from model_weights import go_offline, hub_snapshot, model_folder

from factory.models.cache import drop_entry, file_sha256
from factory.models.loading import ModelConfig, from_pretrained, resolve_model_path
from factory.models.weights import WeightsChanged, WeightsPin, WeightsSource, loading_pinned, pin


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    return go_offline(tmp_path / "hf-cache", monkeypatch)


def test_a_local_pin_hashes_every_file_and_records_the_weight_files(model_cache, tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.metadata").write_text("hub bookkeeping")
    pinned = pin(WeightsSource(str(folder)))
    assert pinned.files == {
        "config.json": f"sha256:{hashlib.sha256((folder / 'config.json').read_bytes()).hexdigest()}",
        "model.safetensors": "sha256:" + hashlib.sha256(b"\x01\x02").hexdigest(),
    }
    record = pinned.record()
    assert record["files"] == {"model.safetensors": pinned.files["model.safetensors"]} and record["revision"] is None
    assert record["digest"] == pinned.digest

    (folder / ".cache" / "download.metadata").write_text("changed bookkeeping")
    assert pin(WeightsSource(str(folder))).digest == pinned.digest
    (folder / "config.json").write_text(json.dumps({"offset": 4}))
    assert pin(WeightsSource(str(folder))).digest != pinned.digest
    assert pin(WeightsSource(str(folder / "model.safetensors"))).files == {
        "model.safetensors": pinned.files["model.safetensors"]
    }


def test_a_file_is_hashed_once_per_state(model_cache, tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = file_sha256(f)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    assert file_sha256(f) == first and f not in reads  # remembered
    f.write_bytes(b"abd")
    assert file_sha256(f) == hashlib.sha256(b"abd").hexdigest() and f in reads  # a new state is read again


def test_a_pinned_local_model_that_changed_does_not_load(model_cache, tmp_path):
    folder = model_folder(tmp_path / "m")
    pinned = pin(WeightsSource(str(folder)))
    with loading_pinned([pinned]):
        assert resolve_model_path(str(folder)) == str(folder)
        (folder / "model.safetensors").write_bytes(b"\x09\x09")
        with pytest.raises(WeightsChanged, match=r"model.safetensors: pinned sha256:\w+, now sha256:\w+"):
            resolve_model_path(str(folder))
    assert resolve_model_path(str(folder)) == str(folder)  # outside a job nothing is pinned


def test_an_object_store_model_is_cached_by_content_and_copied_from_the_pinned_objects(model_cache, memfs):
    memfs.pipe_file("/models/pinned/m/config.json", b'{"offset": 1}')
    memfs.pipe_file("/models/pinned/m/model.safetensors", b"\x01")
    url = "memory://models/pinned/m"
    pinned = pin(WeightsSource(url))
    with loading_pinned([pinned]):
        entry = Path(resolve_model_path(url))
    assert entry.parent == model_cache and entry.name.startswith(pinned.digest[len("sha256:") :][:16])
    assert (entry / "model.safetensors").read_bytes() == b"\x01"

    # An object added after the job was planned is no part of its model; one that changed stops the load.
    memfs.pipe_file("/models/pinned/m/extra.bin", b"new")
    memfs.pipe_file("/models/pinned/m/model.safetensors", b"\x02")
    with loading_pinned([pinned]):
        assert Path(resolve_model_path(url)) == entry  # the node's copy of the pinned content
        assert not (entry / "extra.bin").exists()
    drop_entry(entry)
    with loading_pinned([pinned]), pytest.raises(WeightsChanged, match="model.safetensors changed since the job"):
        resolve_model_path(url)

    # Unpinned (outside a job), a load takes what the store holds now: another entry, for other content.
    other = Path(resolve_model_path(url))
    assert other != entry and (other / "model.safetensors").read_bytes() == b"\x02"


def test_a_corrupted_cache_entry_is_noticed_on_load_and_fetched_again(model_cache, memfs):
    memfs.pipe_file("/models/pinned/c/model.safetensors", b"\x01\x02\x03")
    entry = Path(resolve_model_path("memory://models/pinned/c"))
    (entry / "model.safetensors").write_bytes(b"\xff\xff\xff")
    assert Path(resolve_model_path("memory://models/pinned/c")) == entry
    assert (entry / "model.safetensors").read_bytes() == b"\x01\x02\x03"
    assert len((entry.parent / f"{entry.name}.log").read_text().splitlines()) == 2


def test_revision_is_checked_against_the_stages_hub_models(tmp_path):
    local = str(model_folder(tmp_path / "m"))
    ids = {"base": "org/base", "controlnet": "org/cn", "vae": local, "tiny": "tiny:x"}
    sources = ModelConfig(revision={"base": "v1"}).weight_sources(ids)
    assert set(sources) == {"base", "controlnet", "vae"}
    assert sources["base"].revision == "v1" and sources["controlnet"].revision is None
    with pytest.raises(ValueError, match=r"^revision: one revision needs exactly one hub model .*\(base, controlnet\)"):
        ModelConfig(revision="v1").weight_sources(ids)
    assert ModelConfig(revision="v1").weight_sources({"clip": "org/clip"})["clip"].revision == "v1"
    with pytest.raises(ValueError, match=r"^revision\.vae: the stage loads no hub model named 'vae'"):
        ModelConfig(revision={"vae": "v1"}).weight_sources(ids)
    assert ModelConfig(profile="tiny").weight_sources({"clip": "tiny:clip"}) == {}


def test_a_hub_branch_is_pinned_to_its_commit_and_the_weight_files_hashes(monkeypatch):
    asked = {}

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        asked.update(repo=repo_id, revision=revision, files_metadata=files_metadata)
        siblings = [
            RepoSibling("config.json", 10, "b" * 40),
            RepoSibling("unet/model.safetensors", 5, "c" * 40, BlobLfsInfo(5, "d" * 64, 134)),
        ]
        return SimpleNamespace(sha="e" * 40, siblings=siblings)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    pinned = pin(WeightsSource("org/model", revision="release"))
    assert asked == {"repo": "org/model", "revision": "release", "files_metadata": True}
    assert pinned.revision == "e" * 40 and pinned.files == {"unet/model.safetensors": f"sha256:{'d' * 64}"}


def test_an_offline_hub_model_is_pinned_from_the_local_cache_and_loaded_at_its_commit(offline_hub):
    from transformers import PretrainedConfig

    old = hub_snapshot(offline_hub, "factory-test/brighten", {"config.json": b'{"offset": 5}', "w.safetensors": b"1"})
    pinned = pin(WeightsSource("factory-test/brighten"))
    assert pinned.revision == old
    assert pinned.files == {"w.safetensors": f"sha256:{hashlib.sha256(b'1').hexdigest()}"}
    # main moves on; a load under the pin still reads the pinned commit, an unpinned one reads main.
    new = hub_snapshot(offline_hub, "factory-test/brighten", {"config.json": b'{"offset": 9}', "w.safetensors": b"2"})
    assert new != old and pin(WeightsSource("factory-test/brighten")).revision == new
    with loading_pinned([pinned]):
        assert from_pretrained(PretrainedConfig, "factory-test/brighten", "factory-test/brighten").offset == 5
    assert from_pretrained(PretrainedConfig, "factory-test/brighten", "factory-test/brighten").offset == 9
    with pytest.raises(OSError, match="the local Hugging Face cache has no snapshot of it"):
        pin(WeightsSource("factory-test/absent"))


def test_pins_round_trip_and_say_how_they_differ():
    a = WeightsPin.of("s3://b/m", {"x.safetensors": "etag:1", "config.json": "etag:2"})
    assert WeightsPin.from_json(json.loads(json.dumps(a.to_json()))) == a
    b = WeightsPin.of("s3://b/m", {"x.safetensors": "etag:3", "config.json": "etag:2"})
    assert a.digest != b.digest and a.difference(b) == "x.safetensors: pinned etag:1, now etag:3"
    assert WeightsPin.of("org/m", {}, "1" * 40).difference(WeightsPin.of("org/m", {}, "2" * 40)).startswith("revision")


def test_a_copy_is_checked_by_md5_where_the_etag_is_one_else_by_the_etag_unchanged(tmp_path):
    from factory.models.weights import _check_copy

    local = tmp_path / "w.bin"
    local.write_bytes(b"weights")
    md5 = hashlib.md5(b"weights").hexdigest()
    store = SimpleNamespace(info=lambda src: {"name": src, "ETag": f'"{md5}"'})
    _check_copy(store, "b/w.bin", local, f"etag:{md5}", "w.bin")  # a single-part upload: its MD5
    # An encrypted (SSE-KMS) or multi-part object's ETag is no MD5 of its bytes: the object must be unchanged.
    opaque = "0" * 32
    store = SimpleNamespace(info=lambda src: {"name": src, "ETag": f'"{opaque}"'})
    _check_copy(store, "b/w.bin", local, f"etag:{opaque}", "w.bin")
    store = SimpleNamespace(info=lambda src: {"name": src, "ETag": '"1234-2"'})
    with pytest.raises(WeightsChanged, match="w.bin changed since the job was planned"):
        _check_copy(store, "b/w.bin", local, f"etag:{opaque}", "w.bin")
