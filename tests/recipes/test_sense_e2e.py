"""jobs/sense_tiny.yaml end to end through a local Ray: dense captions, two generators, scores, selection.

The spec runs twice. As shipped (the unlabeled kind), with the CLIP-score bound raised so the filter
rejects some samples; and as its pseudo-labeled variant: the Mask Generator stage added after `t2i`
with the score stage's auto-label settings.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, decode_image, decode_mask, load_json, read_tar

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore, open_output
from factory.output.selections import selected_keys
from factory.sources.scenes import make_scenes
from factory.tools.report import write_report
from factory.tools.top_fraction import main_select, select_top

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

JOB = REPO / "jobs" / "sense_tiny.yaml"
SOURCES = 5
CLIP_MIN = 10.0  # the tiny run's CLIP scores lie 5-16, none within 0.7 of this


def stage(data: dict, kind: str) -> dict:
    return next(st for st in data["stages"] if st["kind"] == kind)


def run(tmp: Path, name: str, edit) -> tuple[Path, dict]:
    data = yaml.safe_load(JOB.read_text())
    data["source"]["path"] = str(tmp / "scenes")
    data["output"]["url"] = str(tmp / name)
    edit(data)
    return tmp / name, run_job(parse_spec(data, origin=str(JOB)))


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        found.update(read_tar(tar))
    return found


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sense")
    make_scenes(tmp / "scenes", count=SOURCES, size=32)
    return tmp


@pytest.fixture(scope="module")
def sense_run(ray_local, scenes):
    def raise_bound(data):
        stage(data, "keep")["params"]["min"] = {"fidelity.clip_score": CLIP_MIN}

    return run(scenes, "unlabeled", raise_bound)


@pytest.fixture(scope="module")
def labeled_run(scenes):
    """In this process: the variant is about what the stages write, and the bytes are the same under every
    executor (tests/engine/test_executors.py); the unlabeled run takes these stages through Ray actors, and
    the Mask Generator stage runs in one in test_diffusion_synthesis_e2e.py."""

    def add_maskgen(data):
        score = stage(data, "score")
        auto = score["params"].pop("auto_label")
        maskgen = {"kind": "maskgen", "model": auto["model"], "params": auto["params"], "resources": score["resources"]}
        data["stages"].insert(data["stages"].index(stage(data, "t2i")) + 1, maskgen)
        data["engine"] = {**data.get("engine", {}), "executor": "in_process"}

    return run(scenes, "labeled", add_maskgen)


def test_every_real_image_gives_one_image_per_generator(sense_run):
    out, index = sense_run
    assert index["complete"] and index["num_shards"] == 2
    assert index["failed"] == 0 and index["samples"] + index["rejected"] == 2 * SOURCES
    assert index["samples"] > 0 and index["rejected"] > 0
    seen = {}
    for key, files in samples(out).items():
        # The unlabeled kind: image and json, no seg.png, no pseudo-label flag.
        assert set(files) == {"png", "json"}
        meta = json.loads(files["json"])
        assert not meta.get("pseudo_label")
        assert meta["dense_caption"] and meta["prompt"] == meta["dense_caption"]
        synthesis = meta["synthesis"]
        assert synthesis["conditioning"] == "text"
        assert synthesis["generator"] == ("sd35", "flux")[int(meta["variant"])]
        assert synthesis["text_encoders"]["tokenizer"]["limit"] == 77
        seen[key] = meta
    assert {m["synthesis"]["generator"] for m in seen.values()} == {"sd35", "flux"}
    models = load_json(out / "stats" / "shard-000000.json")["models"]
    assert models["t2i"] == {"sd35": "tiny:t2i-sd3-v1", "flux": "tiny:t2i-flux-v1"}
    assert models["caption"] == {"vlm": "tiny:dense-caption-llava-v1"}
    assert models["score"] == {
        "clip": "tiny:score-clip-v1",
        "auto_label.detector": "tiny:grounding-dino-v2",
        "auto_label.sam": "tiny:sam-v1",
    }


def test_scores_are_present_and_null_where_inputs_are_missing(sense_run):
    out, _ = sense_run
    instances = []
    for files in samples(out).values():
        meta = json.loads(files["json"])
        density, fidelity = meta["scores"]["density"], meta["scores"]["fidelity"]
        # No mask of its own: density comes from the Mask Generator's auto-label and its instance ids;
        # no target mask: no mIoU or boundary F.
        assert meta["scoring"]["density_from"] == "auto_label"
        assert meta["scoring"]["instances_from"] == "instance_ids" and meta["scoring"]["auto_label"] == "maskgen"
        assert density["classes"] >= 0 and density["class_entropy"] >= 0
        if density["instances"]:
            assert 0 < density["min_instance_area"] <= density["mean_instance_area"] <= 1
        else:  # the random detector found nothing here: no instance, so no instance area
            assert density["mean_instance_area"] is None and density["min_instance_area"] is None
        instances.append(density["instances"])
        assert fidelity["miou"] is None and fidelity["boundary_f"] is None
        assert fidelity["clip_score"] >= CLIP_MIN
    assert max(instances) >= 1


def test_threshold_rejections_are_counted_by_reason(sense_run):
    out, index = sense_run
    rejected = {}
    for shard in range(2):
        stats = load_json(out / "stats" / f"shard-{shard:06d}.json")
        for reason, n in stats["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + n
        # A shard without failures or rejections has no failures file.
        path = out / "failures" / f"shard-{shard:06d}.jsonl"
        failures = path.read_text().splitlines() if stats["failures_url"] else []
        assert all(json.loads(r)["stage"] == "keep" for r in failures)
    assert rejected == {"keep:fidelity.clip_score_below_min": index["rejected"]}


def test_top_fraction_selection_over_the_output(sense_run, capsys):
    out, index = sense_run
    selection = select_top(OutputStore(str(out)), "density.instances", 0.5)
    assert selection["kept"] == math.ceil(index["samples"] / 2)
    assert selection["dropped_by_reason"] == {
        "outside_fraction": index["samples"] - selection["kept"],
        "missing_score": 0,
    }
    on_disk = load_json(out / "selections" / "top-density.instances-0.5.json")
    assert on_disk == selection
    kept = {k for shard in range(2) for k in selected_keys(OutputStore(str(out)), selection["name"], shard)}
    assert len(kept) == selection["kept"]
    values = {key: json.loads(files["json"])["scores"]["density"]["instances"] for key, files in samples(out).items()}
    assert (
        min(values[k] for k in kept)
        == selection["threshold"]
        >= max((v for k, v in values.items() if k not in kept), default=0)
    )
    assert main_select(open_output(str(out)), "fidelity.clip_score", 0.25, lowest=True) == 0
    assert "bottom-fidelity.clip_score-0.25.json: kept" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown score"):
        select_top(OutputStore(str(out)), "density.crowd", 0.5)


def test_pseudo_labeled_variant_carries_seg_png_and_the_flag(labeled_run):
    out, index = labeled_run
    assert index["complete"] and index["failed"] == 0 and index["samples"] == 2 * SOURCES
    for files in samples(out).values():
        assert set(files) == {"png", "seg.png", "inst.png", "json"}
        meta = json.loads(files["json"])
        assert meta["pseudo_label"] is True and meta["synthesis"]["conditioning"] == "text"
        image, mask = decode_image(files["png"]), decode_mask(files["seg.png"])
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        # Density is measured on the pseudo-label itself; there is no second label to compare it with.
        assert meta["scoring"]["density_from"] == "mask" and meta["scoring"]["auto_label"] is None
        assert meta["scores"]["density"]["classes"] == len(set(np.unique(mask).tolist()) - {255})
        assert meta["scores"]["fidelity"]["miou"] is None
    models = load_json(out / "stats" / "shard-000000.json")["models"]
    assert models["maskgen"] == {"detector": "tiny:grounding-dino-v2", "sam": "tiny:sam-v1"}


def test_report_tells_the_kinds_apart(sense_run, labeled_run, tmp_path):
    for (out, index), kind in ((sense_run, "unlabelled"), (labeled_run, "pseudo-labelled")):
        html = write_report(OutputStore(str(out)), tmp_path / out.name).read_text()
        header = html.index("<th>unlabelled</th>")
        counts = [int(c) for c in re.findall(r"<td>(\d+)</td>", html[header : html.index("</table>", header)])]
        written, synthetic, labelled, pseudo, unlabelled = counts[0], counts[3], counts[4], counts[5], counts[6]
        assert written == synthetic == index["samples"]
        if kind == "unlabelled":
            assert (labelled, pseudo, unlabelled) == (0, 0, written)
        else:
            assert (labelled, pseudo, unlabelled) == (written, written, 0)
