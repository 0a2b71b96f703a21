"""`factory eval`: the spec, the metrics, the segmenters, and the harness's two controls at toy scale.

The controls run the shipped toy setup (jobs/eval_toy*.yaml) end to end on Ray Train, on CPU: 8 real
training scenes (`--style varied`, so colour does not give the class), 64 held-out scenes, a UNet.
- positive: mixing in 512 more scenes of the true distribution (packed by a factory job with no stage)
  must help: the paired difference's 95% interval lies above zero.
- negative: mixing in the tiny random-weight ControlNet's noise images (made by the engine from the
  real scenes' masks) must not show a gain: its interval does not lie above zero.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO
from output_builder import Item, build_output
from PIL import Image
from scipy import stats

from factory.cli import main
from factory.downstream.eval import BASELINE, load_eval_spec, paired_difference, run_eval
from factory.downstream.eval_spec import SegmenterConfig, parse_eval_spec
from factory.downstream.eval_worker import _teacher, baseline_path, class_iou, confusion, side_by_side, train_run
from factory.downstream.segmenter import build_segmenter
from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore
from factory.schema import SpecError
from factory.sources.scenes import make_scenes
from factory.storage import Folder

pytestmark = pytest.mark.timeout(900)

JOBS = REPO / "jobs"


def folder(path) -> dict:
    return {
        "kind": "folder",
        "path": str(path),
        "classes": "ade150",
        "image_suffix": "_image.png",
        "mask_suffix": "_mask.png",
    }


def toy_spec(root: Path) -> dict:
    """jobs/eval_toy.yaml with its build/eval paths moved under `root`."""
    text = (JOBS / "eval_toy.yaml").read_text().replace("build/eval", str(root))
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def toy(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_scenes(root / "real", count=8, size=32, style="varied")
    make_scenes(root / "heldout", count=64, size=32, style="varied", start=10000)
    make_scenes(root / "extra", count=512, size=32, style="varied", start=1000)
    for job in ("eval_toy_true_scenes", "eval_toy_controlnet_noise"):
        data = yaml.safe_load((JOBS / f"{job}.yaml").read_text().replace("build/eval", str(root)))
        # In this process: the bytes are the same under every executor (tests/engine/test_executors.py),
        # and no worker process has to import torch and diffusers again for 32 tiny images.
        data["engine"] = {**data.get("engine", {}), "executor": "in_process"}
        assert run_job(parse_spec(data))["complete"]
    spec = parse_eval_spec(toy_spec(root))
    return root, spec, run_eval(spec)


def test_spec_errors_name_the_field(tmp_path):
    good = toy_spec(tmp_path)
    assert parse_eval_spec(good).seeds == 3
    for change, field in (
        ({"seeds": 1}, "seeds"),
        ({"arms": []}, "arms"),
        ({"arms": [{**good["arms"][0], "name": BASELINE}]}, "arms"),
        ({"arms": [good["arms"][0], good["arms"][0]]}, "arms"),
        ({"heldout": good["real"]}, "heldout"),
        ({"segmenter": {"kind": "segformer"}}, "segmenter.kind"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"runs_at_once": 2, "num_workers": 2}, "runs_at_once"),
    ):
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            parse_eval_spec({**good, **change})
    arm = {**good["arms"][0], "strategy": {"kind": "seggen", "p": 2}}
    with pytest.raises(SpecError, match=r"arms\[0\]\.strategy\.seggen\.p"):
        parse_eval_spec({**good, "arms": [arm]})
    plan = load_eval_spec(JOBS / "eval_ade20k.yaml")
    assert plan.use_gpu and plan.num_workers == 8 and plan.segmenter.kind == "deeplabv3_resnet50"


def test_an_arm_made_from_the_heldout_split_is_refused(tmp_path):
    make_scenes(tmp_path / "real", count=2, size=16)
    make_scenes(tmp_path / "heldout", count=2, size=16, start=100)
    leak = build_output(
        OutputStore(str(tmp_path / "leak")),
        {0: [Item("000000-000000", "scene-00100")]},
        source=folder(tmp_path / "heldout"),
    )
    data = toy_spec(tmp_path)
    data["arms"] = [{"name": "leaky", "synthetic": [{"url": leak.url}], "strategy": {"kind": "seggen"}}]
    with pytest.raises(SpecError, match=r"arms\[0\]\.synthetic\[0\]\.url: .* made from the held-out split"):
        run_eval(parse_eval_spec(data))


def test_runs_side_by_side_train_every_baseline_before_any_arm(tmp_path):
    spec = parse_eval_spec(toy_spec(tmp_path))
    assert (spec.runs_at_once, spec.workers()) == (2, 2) and spec.model_copy(update={"runs_at_once": 1}).workers() == 1
    baselines, arms = side_by_side(spec.runs())
    assert baselines == [(BASELINE, s) for s in range(3)]
    assert sorted(arms) == sorted((a, s) for a in ("true-scenes", "controlnet-noise") for s in range(3))
    # How the runs are computed is not what they compute: the spec's hash ignores it.
    assert spec.model_copy(update={"runs_at_once": 1}).content_hash() == spec.content_hash()


def test_metrics_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    conf = confusion(pred, target, num_classes=4, ignore_index=255)
    assert conf.sum() == 7 and conf[0, 0] == 1 and conf[1, 1] == 2 and conf[2, 0] == 1
    # Class 0: 1 shared of 3 in either; class 1: 2 of 4; class 2: 1 of 2; class 3 is not in the ground truth.
    assert class_iou(conf) == pytest.approx({0: 1 / 3, 1: 2 / 4, 2: 1 / 2})
    arm, base = [0.50, 0.55, 0.52], [0.40, 0.47, 0.41]
    d = paired_difference(arm, base)
    diffs = np.array(arm) - np.array(base)
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((diffs.mean(), diffs.mean() - half, diffs.mean() + half))


def test_segmenters_build_and_load_a_backbone_checkpoint(tmp_path):
    import torchvision

    torch.manual_seed(0)
    unet = build_segmenter(SegmenterConfig(kind="unet", width=4, depth=3), num_classes=5)
    assert unet(torch.randint(0, 256, (2, 3, 30, 45), dtype=torch.uint8)).shape == (2, 5, 30, 45)
    torch.manual_seed(0)
    assert torch.equal(build_segmenter(SegmenterConfig(kind="unet", width=4), 5).net.head.weight, unet.net.head.weight)
    classifier = torchvision.models.mobilenet_v3_large(weights=None)  # a classification checkpoint's layout
    torch.save(classifier.state_dict(), tmp_path / "mobilenet.pt")
    config = SegmenterConfig(kind="deeplabv3_mobilenet_v3_large", backbone_checkpoint=str(tmp_path / "mobilenet.pt"))
    model = build_segmenter(config, num_classes=7)
    assert torch.equal(model.backbone.state_dict()["0.0.weight"], classifier.features[0][0].weight)
    assert model.eval()(torch.zeros(1, 3, 33, 40, dtype=torch.uint8)).shape == (1, 7, 33, 40)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="backbone weights missing"):
        build_segmenter(config.model_copy(update={"backbone_checkpoint": str(tmp_path / "wrong.pt")}), 7)


def test_sense_arm_trains_on_the_teacher_s_confident_pixels(tmp_path):
    make_scenes(tmp_path / "real", count=4, size=16, style="varied")
    make_scenes(tmp_path / "heldout", count=2, size=16, style="varied", start=100)
    rng = np.random.default_rng(0)
    unlabelled = build_output(
        OutputStore(str(tmp_path / "t2i")),
        {0: [Item(f"000000-00000{i}", f"s{i}", rng.integers(0, 256, (16, 16, 3), np.uint8)) for i in range(4)]},
    )
    data = toy_spec(tmp_path)
    data.update(
        arms=[
            {
                "name": "sense",
                "synthetic": [{"url": unlabelled.url}],
                "strategy": {"kind": "sense"},
                "teacher_threshold": 0.0,
            }
        ],
        train={"steps": 3, "batch_size": 4, "loader_workers": 0},
        segmenter={"kind": "unet", "width": 4},
    )
    spec = parse_eval_spec(data)
    out = Folder.at(spec.output)
    torch.manual_seed(0)
    baseline = build_segmenter(spec.segmenter, 150)
    buf = io.BytesIO()
    torch.save(baseline.state_dict(), buf)
    out.write_bytes(buf.getvalue(), *baseline_path(0))
    teacher = _teacher(spec, "sense", 0, 150, out, "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    model = build_segmenter(spec.segmenter, 150)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_run(spec, "sense", 0, model, teacher, 0, 1, "cpu", 255)
    # Threshold 0: every synthetic pixel gets the teacher's label, so the loss is finite and weights move.
    assert math.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.e2e
def test_the_positive_control_helps_and_the_negative_control_does_not(toy):
    root, spec, summary = toy
    arms = summary["arms"]
    print(json.dumps({name: {k: arm[k] for k in ("miou", "mean", "std")} for name, arm in arms.items()}, indent=1))
    assert list(arms) == [BASELINE, "true-scenes", "controlnet-noise"]
    assert all(len(arm["miou"]) == 3 and 0 < arm["mean"] < 1 for arm in arms.values())
    positive, negative = arms["true-scenes"]["vs_real_only"], arms["controlnet-noise"]["vs_real_only"]
    assert positive["low"] > 0  # more true-distribution data helps, with 95% confidence
    assert not negative["low"] > 0  # noise images show no gain
    assert arms["true-scenes"]["mean"] > arms["controlnet-noise"]["mean"]


@pytest.mark.e2e
def test_results_plot_resume_and_cli(toy, capsys):
    root, spec, summary = toy
    out = root / "results"
    assert json.loads((out / "eval.json").read_text()) == summary
    with Image.open(out / "eval.png") as im:
        assert im.format == "PNG" and im.width > 400
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(
        f"{arm}-seed{s}.json" for arm in (BASELINE, "true-scenes", "controlnet-noise") for s in range(3)
    )
    assert sorted(p.name for p in (out / "models").iterdir()) == [f"{BASELINE}-seed{s}.pt" for s in range(3)]
    run = json.loads((out / "runs" / "true-scenes-seed0.json").read_text())
    assert set(run["class_iou"]) >= {"sky", "wall"} and run["steps"] == 400
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    # A rerun finds every run done: nothing is trained again, the same table is printed.
    spec_file = root / "eval.yaml"
    spec_file.write_text(yaml.safe_dump(toy_spec(root)))
    assert main(["eval", str(spec_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{BASELINE:<20} mIoU {summary['arms'][BASELINE]['mean']:.3f} +- ")
    assert "vs real-only: +" in lines[1] and "95%" in lines[1]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamps
    assert main(["eval", str(spec_file), "--check"]) == 0
    assert "ok (eval toy: 2 arms + real-only, 3 seeds" in capsys.readouterr().out
    other = toy_spec(root)
    other["train"]["steps"] = 7
    spec_file.write_text(yaml.safe_dump(other))
    assert main(["eval", str(spec_file)]) == 2  # another spec's results are there: refused, named
    assert "holds results of another eval spec" in capsys.readouterr().err
