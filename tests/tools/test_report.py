"""`factory report`: generated from a tiny run, checked for its contents, and rendered by a headless browser.

The run: procedural scenes (one of them corrupt) -> tiny ControlNet, 2 images each -> score with the test
palette labeler as auto-labeler -> keep scenes with at least 5 instances -> a top-half selection.
The browser check needs Chromium at /usr/bin/chromium (Debian package `chromium`).
"""

import base64
import re
import subprocess

import numpy as np
import pytest
from helpers import folder_spec
from PIL import Image

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore
from factory.output.scores import SCORE_NAMES, density
from factory.sources.scenes import make_scenes
from factory.tools.report import main_report, publish_report, stage_table, summarize_stats, write_report
from factory.tools.top_fraction import select_top

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
MIN_INSTANCES = 5


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    ids = make_scenes(tmp / "scenes", count=5, size=32)
    (tmp / "scenes" / f"{ids[-1]}_image.png").write_bytes(b"not a png")
    stages = [
        {
            "kind": "controlnet",
            "name": "synth",
            "model": {"profile": "tiny"},
            "params": {"variants": 2, "steps": 2, "resolution": 32},
            "resources": {"num_cpus": 0.25},
        },
        {
            "kind": "score",
            "model": {"profile": "tiny"},
            "params": {"auto_label": {"kind": "stages_for_tests:PaletteLabeler"}},
            "resources": {"num_cpus": 0.25},
        },
        {"kind": "keep", "params": {"min": {"density.instances": MIN_INSTANCES}}, "resources": {"num_cpus": 0.25}},
    ]
    spec = folder_spec(tmp / "scenes", tmp / "out", stages, max_failure_fraction=1.0)  # a shard of one corrupt scene
    spec["name"] = "report_test"
    # In this process: a report reads stats, which every executor writes alike (test_executors.py).
    spec["engine"] = {"executor": "in_process"}
    index = run_job(parse_spec(spec))
    store = OutputStore(str(tmp / "out"))
    select_top(store, "fidelity.miou", 0.5)
    masks = [np.asarray(Image.open(tmp / "scenes" / f"{i}_mask.png")) for i in ids[:-1]]
    sparse = sum(density(m)["instances"] < MIN_INSTANCES for m in masks)
    return store, index, tmp, sparse


@pytest.fixture(scope="module")
def report(job):
    store, _, tmp, _ = job
    path = write_report(store, tmp / "report")
    return path, path.read_text()


@pytest.mark.integration
def test_stage_table_counts_rows_through_the_pipeline(job):
    store, index, _, sparse = job
    assert index["failed"] == 1 and index["rejected"] == 2 * sparse > 0
    stats = summarize_stats(s for _, s in store.iter_stats())
    table = {r["stage"]: r for r in stage_table(store.read_manifest(), stats)}
    assert list(table) == ["read", "synth", "score", "keep"]
    assert table["read"]["failed_by_reason"] == {"corrupt_image": 1}
    assert table["read"]["in"] == index["samples"] + index["rejected"] + 1
    assert table["keep"] == {
        "stage": "keep",
        "kind": "keep",
        "in": 8,
        "passed": 8 - 2 * sparse,
        "failed": 0,
        "rejected": 2 * sparse,
        "pass_rate": (8 - 2 * sparse) / 8,
        "failed_by_reason": {},
        "rejected_by_reason": {"density.instances_below_min": 2 * sparse},
    }


@pytest.mark.integration
def test_report_sections_and_numbers(report, job):
    path, html = report
    _, index, tmp, sparse = job
    assert path == tmp / "report" / "report.html"
    for heading in (
        "Samples and failures per stage",
        "Filter pass rates",
        "Scores",
        "Class frequency: synthetic vs source",
        "Best and worst samples by score",
    ):
        assert f"<h2>{heading}</h2>" in html
    assert "Factory report: report_test" in html
    for text in (
        "synth",
        "controlnet",
        "corrupt_image: 1",
        f"density.instances_below_min: {2 * sparse}",
        "selection top-fidelity.miou-0.5",
        "outside_fraction",
        *SCORE_NAMES,
    ):
        assert text in html
    # Source side of the class comparison: the scenes behind the written samples.
    assert f"Source: {4 - sparse} source images" in html


@pytest.mark.integration
def test_report_is_self_contained(report):
    path, html = report
    pngs = sorted(path.parent.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"stages.png", "scores.png", "classes.png"} <= names
    # Every score has values in this run (a target mask, an auto-label and a prompt), so each gets a grid.
    assert {f"grid-{name}.png" for name in SCORE_NAMES} <= names
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from anywhere


@pytest.mark.integration
def test_main_report_cli_entry(job, capsys, tmp_path, monkeypatch):
    store, _, tmp, _ = job
    assert main_report(store.url, str(tmp / "cli-report")) == 0
    assert (tmp / "cli-report" / "report.html").is_file()
    assert "cli-report/report.html" in capsys.readouterr().out
    # By default the report goes beside the output, not into the current directory.
    monkeypatch.chdir(tmp_path)
    assert main_report(store.url) == 0
    assert (tmp / "out" / "report" / "report.html").is_file() and not (tmp_path / "report").exists()
    assert f"{tmp / 'out' / 'report' / 'report.html'}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no manifest"):
        main_report(str(tmp / "nowhere"), str(tmp / "nope"))


@pytest.mark.integration
def test_report_of_an_s3_output_is_uploaded_beside_it(job, s3_server):
    import s3fs

    store, _, tmp, _ = job
    _, options = s3_server
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp / "out" / "manifest.json"), "test/report-job/manifest.json")
    for folder in ("shards", "stats", "selections"):
        fs.put(str(tmp / "out" / folder), f"test/report-job/{folder}", recursive=True)
    where = publish_report(OutputStore("s3://test/report-job", options))
    assert where == "s3://test/report-job/report/report.html"
    uploaded = {p.rsplit("/", 1)[-1] for p in fs.ls("test/report-job/report")}
    assert {"report.html", "stages.png", "scores.png", "classes.png"} <= uploaded
    assert b"Factory report: report_test" in fs.cat("test/report-job/report/report.html")


@pytest.mark.e2e
def test_report_renders_in_a_headless_browser(report, tmp_path):
    path, _ = report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    # The plots were decoded and drawn: strongly coloured pixels (bars, histograms) cover a real area.
    coloured = (pixels.max(-1) - pixels.min(-1)) > 80
    assert coloured.sum() > 5000
