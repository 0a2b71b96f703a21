"""Model folders and Hugging Face cache snapshots for the pinning tests (no hub here: the cache is laid out
as huggingface_hub lays it out, and read offline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants

from factory.models.weights import WEIGHT_SUFFIXES


def model_folder(root: Path, weights_bytes: bytes = b"\x01\x02", offset: int = 3) -> Path:
    """A model folder: a config.json with an `offset` (what the test-brighten stage reads) and a weights file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"offset": offset}))
    (root / "model.safetensors").write_bytes(weights_bytes)
    return root


def hub_snapshot(cache: Path, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
    """A snapshot in a Hugging Face cache laid out as huggingface_hub writes it: blobs named by sha256 (LFS
    files: the weights) or by git sha1 (the rest), a snapshot folder of links, the branch's ref; the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode()).hexdigest()
    for name, data in files.items():
        lfs = name.endswith(WEIGHT_SUFFIXES)
        digest = hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)
        blob = folder / "blobs" / digest.hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / branch).write_text(commit)
    return commit


def go_offline(cache: Path, monkeypatch) -> Path:
    """This process is offline and its Hugging Face cache is `cache` (huggingface_hub and transformers read
    both at call time)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache
