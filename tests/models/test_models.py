"""Model resolution and loading: hub ids, local paths, object-store copies, and the tiny profile."""

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch

from factory.models import loading as models
from factory.models import tiny_diffusion
from factory.models.cache import fill_once, model_cache_dir
from factory.models.controlnet import load_controlnet_pipeline
from factory.models.tiny_diffusion import TINY_CONTROLNET, tiny_controlnet_pipeline_dir

pytestmark = pytest.mark.timeout(300)


def _cfg(**kw):
    return SimpleNamespace(**{"profile": "pretrained", "storage_options": {}, **kw})


def test_tiny_dir_is_built_once_and_reused(model_cache, monkeypatch):
    first = Path(tiny_controlnet_pipeline_dir())
    assert first.parent.parent == model_cache and first.name == TINY_CONTROLNET
    marker = first / ".factory-complete"
    stamp = marker.stat().st_mtime_ns

    def must_not_build(target):
        raise AssertionError("the tiny pipeline was built a second time")

    monkeypatch.setattr(tiny_diffusion, "build_tiny_controlnet", must_not_build)
    assert Path(tiny_controlnet_pipeline_dir()) == first
    assert marker.stat().st_mtime_ns == stamp
    for part in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (first / part).exists()


def test_tiny_pipeline_loads_through_from_pretrained(model_cache):
    pipe = load_controlnet_pipeline(_cfg(profile="tiny"), "cpu", "auto")
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.model_max_length == 77
    assert pipe._progress_bar_config == {"disable": True}
    ids = pipe.tokenizer("A photo of wall, sky & tree #42 ~{}|", truncation=True).input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_pretrained_profile_loads_local_and_object_store_paths(model_cache, memfs):
    tiny = Path(tiny_controlnet_pipeline_dir())
    local = load_controlnet_pipeline(_cfg(base=str(tiny), controlnet=str(tiny / "controlnet")), "cpu", "bf16")
    assert local.unet.dtype == torch.bfloat16 and local.controlnet.dtype == torch.bfloat16

    for f in tiny.rglob("*"):
        if f.is_file() and f.name != ".factory-complete":
            memfs.pipe_file(f"/models/sd/{f.relative_to(tiny)}", f.read_bytes())
    remote = load_controlnet_pipeline(
        _cfg(base="memory://models/sd", controlnet="memory://models/sd/controlnet"), "cpu", "fp32"
    )
    assert remote.unet.config.block_out_channels == local.unet.config.block_out_channels
    assert remote.unet.dtype == torch.float32
    assert torch.equal(remote.unet.conv_in.weight.to(torch.bfloat16), local.unet.conv_in.weight)


def test_object_store_url_is_copied_once_per_content(model_cache, memfs):
    memfs.pipe_file("/models/m1/config.json", b'{"a": 1}')
    memfs.pipe_file("/models/m1/sub/weights.bin", b"\x00\x01")
    path = Path(models.resolve_model_path("memory://models/m1", {}))
    assert path.parent == model_cache
    assert (path / "config.json").read_bytes() == b'{"a": 1}'
    assert (path / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    stamp = (path / ".factory-complete").stat().st_mtime_ns
    assert Path(models.resolve_model_path("memory://models/m1")) == path  # the same content: not copied again
    assert (path / ".factory-complete").stat().st_mtime_ns == stamp

    # Other content under the same URL is another entry: the first stays for the jobs pinned to it.
    memfs.pipe_file("/models/m1/config.json", b'{"a": 2}')
    other = Path(models.resolve_model_path("memory://models/m1"))
    assert other != path and (other / "config.json").read_bytes() == b'{"a": 2}'
    assert (path / "config.json").read_bytes() == b'{"a": 1}'

    # A copy without its completion marker was interrupted: it is redone from scratch.
    (other / ".factory-complete").unlink()
    (other / "stale.tmp").write_bytes(b"partial")
    assert Path(models.resolve_model_path("memory://models/m1")) == other
    assert (other / "config.json").read_bytes() == b'{"a": 2}'
    assert not (other / "stale.tmp").exists()


def test_single_file_url_resolves_to_the_file(model_cache, memfs):
    memfs.pipe_file("/models/sam_vit_b.pth", b"weights")
    path = Path(models.resolve_model_path("memory://models/sam_vit_b.pth"))
    assert path.is_file() and path.name == "sam_vit_b.pth" and path.read_bytes() == b"weights"


def test_concurrent_fills_run_once(tmp_path):
    calls = []

    def slow_fill(target):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        (target / "data").write_text("x")

    threads = [threading.Thread(target=fill_once, args=(tmp_path / "m", slow_fill)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tmp_path / "m" / "data").read_text() == "x"


def test_missing_paths_error_clearly(model_cache, memfs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path("./weights/sd15/unet")
    with pytest.raises(FileNotFoundError, match="memory://models/absent"):
        models.resolve_model_path("memory://models/absent")
    assert models.resolve_model_path(f"file://{tmp_path}") == str(tmp_path)


def test_hub_id_is_returned_unchanged_and_offline_load_says_so(monkeypatch):
    assert models.resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    # huggingface_hub reads HF_HUB_OFFLINE once at import: set the env and the module constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = _cfg(base="runwayml/stable-diffusion-v1-5", controlnet="lllyasviel/sd-controlnet-seg")
    with pytest.raises(OSError, match="hub is unreachable") as err:
        load_controlnet_pipeline(cfg, "cpu", "auto")
    assert "lllyasviel/sd-controlnet-seg" in str(err.value) and "s3://" in str(err.value)


def test_dtype_choice(caplog):
    assert models.torch_dtype("auto", "cuda") == torch.float16
    assert models.torch_dtype("auto", "cpu") == torch.float32
    assert models.torch_dtype("bf16", "cpu") == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="factory.models.loading"):
        assert models.torch_dtype("fp16", "cpu") == torch.float32
    assert "fp32" in caplog.text
    with pytest.raises(ValueError, match="unknown dtype"):
        models.torch_dtype("int8", "cpu")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_MODEL_CACHE", str(tmp_path / "c"))
    assert model_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACTORY_MODEL_CACHE")
    assert model_cache_dir() == Path(os.path.expanduser("~/.cache/factory/models"))
