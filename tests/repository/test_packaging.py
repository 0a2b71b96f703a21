"""The package's requirements, its lock, its one version, and the one line a missing extra gives."""

import tomllib

import pytest
from helpers import REPO, locked
from packaging.requirements import Requirement

import factory
from factory import extras
from factory.cli import main

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    """Every requirement of the core and of every extra, the references to factory's own extras left out."""
    lines = PYPROJECT["dependencies"] + [r for extra in PYPROJECT["optional-dependencies"].values() for r in extra]
    return [req for req in map(Requirement, lines) if req.name != "factory"]


def test_the_package_declares_ranges_and_the_lock_pins_a_version_in_each():
    pins = locked()
    for req in requirements():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a range, not a pin"
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, not {req}"


def test_the_core_leaves_out_the_heavy_packages():
    core = {Requirement(r).name.lower() for r in PYPROJECT["dependencies"]}
    heavy = {"torch", "torchvision", "ray", "diffusers", "transformers", "accelerate", "segment-anything", "scipy"}
    assert not core & (heavy | {"matplotlib", "safetensors", "psutil"})
    assert heavy <= set(extras.distributions("all"))


def test_the_version_is_the_installed_packages(capsys):
    assert factory.__version__ == PYPROJECT["version"]
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"factory {PYPROJECT['version']}\n"
    # The Dockerfile names no version: `make image` tags it with pyproject's.
    assert PYPROJECT["version"] not in (REPO / "Dockerfile").read_text()


def test_extras_read_from_the_metadata_expand_their_references():
    assert extras.distributions("engine") == ["ray", "psutil"]
    train = extras.distributions("train")
    assert {"ray", "psutil", "torch", "diffusers"} <= set(train) and "factory" not in train
    assert extras.extra_for_module("segment_anything.modeling") == "models"
    assert extras.extra_for_module("ray.data") == "engine"
    assert extras.extra_for_module("json") is None


def test_a_command_without_its_extra_fails_with_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(extras, "_installed", lambda dist: dist not in ("ray", "psutil"))
    assert main(["run", str(REPO / "jobs" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "factory: factory run needs the 'engine' extra (ray, psutil not installed): pip install 'factory[engine]'\n"
    )


def test_a_module_missing_anyway_is_traced_to_its_extra(monkeypatch, capsys):
    def preview(args):
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr("factory.cli.cmd_preview", preview)
    assert main(["preview", "out"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "factory: diffusers is not installed; it comes with the 'models' extra: pip install 'factory[models]'\n"
    )


@pytest.mark.parametrize("command", ["run", "stage"])
def test_a_stage_without_its_extra_stops_the_job_before_it_starts(command, monkeypatch, capsys, tmp_path):
    """The quickstart's ControlNet stage needs `models`: one line, before Ray starts or a file is written."""
    monkeypatch.setattr(extras, "_installed", lambda dist: dist not in ("torch", "diffusers"))
    argv = [command, str(REPO / "jobs" / "quickstart.yaml"), "--output", str(tmp_path / "out")]
    assert main(argv + (["synth", "--out", str(tmp_path / "files")] if command == "stage" else [])) == 2
    want = "stages[0] (controlnet) needs the 'models' extra (torch, diffusers not installed): "
    want += "pip install 'factory[models]'"
    assert capsys.readouterr().err == f"factory: {want}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_engine_s_ray_stops_below_the_release_that_removes_what_it_calls():
    """Ray 2.60 deprecates `read_datasource(ray_remote_args=...)` for removal in 2.64; while the engine passes
    it, the engine extra's range must end before that release."""
    (ray,) = [req for req in map(Requirement, PYPROJECT["optional-dependencies"]["engine"]) if req.name == "ray"]
    if "ray_remote_args=" in (REPO / "factory" / "engine" / "executors" / "ray_data.py").read_text():
        assert not ray.specifier.contains("2.64.0") and ray.specifier.contains(locked()["ray"])
