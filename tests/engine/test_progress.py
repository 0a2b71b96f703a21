"""Live progress (factory/engine/progress.py): shown on a timer from the rows stages report per batch, so it
moves while no shard commits; an ETA from the sources the first stage has taken in."""

import io
import logging
import re
import time

import pytest
from helpers import folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.progress import Progress, StageRows
from factory.engine.spec import parse_spec


@pytest.mark.unit
def test_the_timer_shows_stage_rows_while_no_shard_has_committed(caplog):
    rows = StageRows()
    progress = Progress(3, 0, ["invert"], sources_to_do=12, snapshot=rows.snapshot, every=0.05, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="factory"):
        progress.start()
        rows.stage_rows("invert", 2, 4)
        time.sleep(0.3)
        rows.stage_rows("invert", 2, 3)  # one of the two new rows rejected or failed: 3 kept
        time.sleep(0.3)
        progress.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4, lines
    assert any("shards 0/3" in line and "invert 2 in / 4 out" in line for line in lines), lines
    assert "invert 4 in / 7 out" in lines[-1] and "shards 0/3" in lines[-1]
    # 4 of 12 sources taken in after ~0.6 s: about twice that again to go, not "?" for lack of a commit.
    eta = re.search(r"ETA (\d+)s", lines[-1])
    assert eta and int(eta.group(1)) <= 3, lines[-1]


@pytest.mark.unit
def test_without_a_stage_the_eta_comes_from_the_shards():
    progress = Progress(4, 1, [], sources_to_do=0, stream=io.StringIO())
    assert progress.line().endswith("ETA ?")


@pytest.mark.integration
def test_a_job_s_progress_moves_before_its_first_shard_commits(source_for_progress, tmp_path, caplog, ray_local):
    stage = {
        "kind": "stages_for_tests:InvertStage",
        "name": "invert",
        "params": {"sleep": 0.2},
        "resources": {"batch_size": 1},
    }
    data = folder_spec(source_for_progress, tmp_path / "out", [stage], shard_size=4)
    data["engine"] = {"progress_s": 0.1}
    with caplog.at_level(logging.INFO, logger="factory"):
        assert run_job(parse_spec(data))["complete"]
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    moving = [line for line in lines if "shards 0/2" in line and not re.search(r"invert 0 in", line)]
    assert moving, lines  # rows counted per batch, while no shard had committed yet
    assert "invert 8 in / 8 out" in lines[-1] and "shards 2/2" in lines[-1] and "samples 8" in lines[-1]


@pytest.fixture
def source_for_progress(tmp_path):
    src = tmp_path / "src"
    write_folder_source(src, 8, size=16)
    return src
