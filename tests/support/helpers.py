"""Small helpers shared by the end-to-end tests: write a folder source, read shards back."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
DATA = SUPPORT.parent / "data"  # real sample data the tests read; data/README.md names each origin


def write_folder_source(root: Path, n: int, size: int = 32, seed: int = 0) -> dict[str, tuple]:
    """n samples `s-XXX_image.png` + `s-XXX_mask.png` (ADE150 ids); returns id -> (image, mask)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 2, 3, 12, 255], dtype=np.uint8), size=(size, size))
        Image.fromarray(image).save(root / f"s-{i:03d}_image.png")
        Image.fromarray(mask, mode="L").save(root / f"s-{i:03d}_mask.png")
        out[f"s-{i:03d}"] = (image, mask)
    return out


def folder_spec(src: Path, out, stages: list, shard_size: int = 4, image_format: str = "png", **extra) -> dict:
    return {
        "name": "e2e",
        "seed": 7,
        "source": {
            "kind": "folder",
            "path": str(src),
            "classes": "ade150",
            "image_suffix": "_image.png",
            "mask_suffix": "_mask.png",
        },
        "stages": stages,
        "output": {"url": str(out), "shard_size": shard_size, "image_format": image_format, **extra},
    }


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with the standard library only."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def decode_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def locked() -> dict[str, str]:
    """requirements.lock as {normalized name: exact version}: what the project's own builds install."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        requirement = line.split(";")[0].strip()
        if requirement and not requirement.startswith("#"):
            name, _, version = requirement.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins
