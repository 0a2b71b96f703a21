"""The README's main job, through the real command line: scenes -> tiny ControlNet -> shards -> status, preview.

`factory run` runs as a subprocess, as `make run` does (it starts and stops its own local Ray); the commands
that start no Ray run through the same entry point (`factory.cli.main`) in this process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from helpers import REPO, decode_image, decode_mask
from PIL import Image

from factory.cli import main

FACTORY = [sys.executable, "-m", "factory.cli"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def factory(*args):
    result = subprocess.run([*FACTORY, *args], capture_output=True, text=True, timeout=500, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, model_cache):
    tmp = tmp_path_factory.mktemp("quickstart")
    assert main(["make-scenes", str(tmp / "scenes"), "--count", "6", "--size", "48"]) == 0
    run = factory("run", "jobs/quickstart.yaml", "--set", f"source.path={tmp / 'scenes'}", "--output", str(tmp / "out"))
    return tmp, run


def test_quickstart_writes_imgsyn_samples_with_the_source_masks(quickstart):
    tmp, run = quickstart
    assert "shards 2/2" in run.stderr and "samples 12" in run.stderr  # the progress line
    shards = sorted(str(p) for p in (tmp / "out" / "shards").glob("*.tar"))
    assert len(shards) == 2
    seen = 0
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        source_mask = np.asarray(Image.open(tmp / "scenes" / f"{meta['source_id']}_mask.png"))
        np.testing.assert_array_equal(decode_mask(sample["seg.png"]), source_mask)
        image = decode_image(sample["jpg"])
        assert image.shape == (*source_mask.shape, 3)
        assert meta["prompt"].startswith("a photo of ") and meta["synthesis"]["steps"] == 2
        assert meta["models"]["synth"]["controlnet"].startswith("tiny:")
        seen += 1
    index = json.loads((tmp / "out" / "index.json").read_text())
    assert seen == index["samples"] == 6 * 2 - index["failed"] * 1


@pytest.fixture
def cli(capsys, monkeypatch):
    """`factory ARGS` through `factory.cli.main` in this process, from the repository: (exit code, stdout, stderr)."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_status_and_preview(quickstart, cli):
    tmp, _ = quickstart
    code, out, _ = cli("status", str(tmp / "out"), "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["shards_done"], data["shards_total"], data["samples"], data["failed"]) == (2, 2, 12, 0)
    assert data["samples_per_second"] > 0
    assert cli("preview", str(tmp / "out"), "--out", str(tmp / "preview.png"), "--count", "3")[0] == 0
    sheet = Image.open(tmp / "preview.png")
    assert sheet.size == (3 * 192, 3 * (192 + 14))


def test_a_stage_runs_alone(quickstart, cli):
    tmp, _ = quickstart
    code, out, _ = cli(
        "stage",
        "jobs/quickstart.yaml",
        "synth",
        "--input",
        str(tmp / "scenes"),
        "--out",
        str(tmp / "loose"),
        "--limit",
        "2",
    )
    assert code == 0 and "4 written" in out
    assert len(list((tmp / "loose").glob("*.seg.png"))) == 4


def test_validate_names_the_bad_field(tmp_path, cli):
    spec = (REPO / "jobs" / "quickstart.yaml").read_text().replace("steps: 2", "steps: -2")
    (tmp_path / "bad.yaml").write_text(spec)
    code, _, err = cli("validate", str(tmp_path / "bad.yaml"))
    assert code == 2
    assert "stages[0].params.steps" in err
    code, out, _ = cli("validate", "jobs/quickstart.yaml")
    assert code == 0 and "ok" in out
