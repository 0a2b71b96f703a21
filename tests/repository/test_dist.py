"""The wheel and sdist build, pass `twine check` and carry the data files; the core alone (a fresh virtual
environment, none of the heavy packages) reads and mixes shards a job of the full install wrote."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

HEAVY = (
    "torch",
    "torchvision",
    "ray",
    "diffusers",
    "transformers",
    "accelerate",
    "segment_anything",
    "scipy",
    "matplotlib",
    "safetensors",
)
DATA_FILES = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "factory" / "data").rglob("*") if p.suffix in (".json", ".csv")
)


def run(*cmd, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=clean_env())
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout}\n{done.stderr}"
    return done


def clean_env() -> dict[str, str]:
    """This environment without the tests' PYTHONPATH (the source tree): the core venv sees its wheel alone."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from the unpacked sdist (so the sdist has to hold
    everything a build needs). No isolation: the locked setuptools, no index."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_and_sdist_pass_twine_and_carry_the_model_configs_and_class_lists(dist):
    run(sys.executable, "-m", "twine", "check", "--strict", dist["wheel"], dist["sdist"])
    assert sum("model_configs" in f for f in DATA_FILES) >= 40 and any("class_maps" in f for f in DATA_FILES)
    wheel = set(zipfile.ZipFile(dist["wheel"]).namelist())
    assert [f for f in DATA_FILES if f not in wheel] == []
    with tarfile.open(dist["sdist"]) as tar:
        root = tar.getnames()[0].split("/")[0]
        sdist = {name.removeprefix(root + "/") for name in tar.getnames()}
    assert [f for f in DATA_FILES if f not in sdist] == []
    assert {"pyproject.toml", "README.md"} <= sdist


def test_the_core_alone_reads_and_mixes_shards_of_the_full_install(dist, ray_local, tmp_path):
    # The full install writes a job's output (the engine on Ray, this process's environment).
    write_folder_source(tmp_path / "src", 8, size=16)
    run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out", stages=[], shard_size=4)))

    # A fresh environment with the core alone: the wheel, its dependencies at the locked versions.
    venv = tmp_path / "core"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "-c",
        REPO / "requirements.lock",
        dist["wheel"],
    )

    mix = {
        "real": {
            "kind": "folder",
            "path": str(tmp_path / "src"),
            "classes": "ade150",
            "image_suffix": "_image.png",
            "mask_suffix": "_mask.png",
        },
        "synthetic": [{"url": str(tmp_path / "out")}],
        "strategy": {"kind": "seggen", "p": 0.5},
        "batch_size": 4,
        "seed": 1,
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    program = textwrap.dedent(f"""
        import importlib.util, json, yaml
        import factory
        from factory.downstream.mix import MixBatches, parse_mix_spec
        assert factory.__file__.startswith({str(venv)!r}), factory.__file__  # the wheel, not the source tree
        spec = parse_mix_spec(yaml.safe_load(open({str(tmp_path / "mix.yaml")!r})))
        batches = MixBatches(spec).batches()
        seen = [next(batches) for _ in range(4)]
        from factory.cli import main
        specs = {[str(p) for p in sorted((REPO / "jobs").glob("*.yaml")) if not p.name.startswith("eval_")]!r}
        print(json.dumps({{
            "invalid": [path for path in specs if main(["validate", path]) != 0],
            "shapes": [list(b["image"].shape) + list(b["mask"].shape) for b in seen],
            "kinds": sorted({{int(k) for b in seen for k in b["kind"]}}),
            "heavy": [m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None],
        }}))
    """)
    found = json.loads(run(python, "-c", program, cwd=tmp_path).stdout.splitlines()[-1])  # after validate's lines
    assert found["heavy"] == []
    assert found["invalid"] == []  # every recipe's spec (and training spec) validates with the core alone
    assert found["shapes"] == [[4, 3, 16, 16, 4, 16, 16]] * 4
    assert found["kinds"] == [0, 1]  # real and synthetic samples, from the folder and from the shards

    # The core's CLI reads the output; a command that needs an extra says which, in one line.
    factory = venv / "bin" / "factory"
    assert "8 written from 8 planned sources" in run(factory, "status", tmp_path / "out", cwd=tmp_path).stdout
    refused = subprocess.run(
        [factory, "run", REPO / "jobs" / "quickstart.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "factory: factory run needs the 'engine' extra (ray, psutil not installed): pip install 'factory[engine]'"
    ]
