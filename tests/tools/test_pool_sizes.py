"""plan-resources: the balancing arithmetic on made-up rates, the CLI on a bench JSON, and a calibration run."""

import json

import pytest

from factory import cli
from factory.sources.scenes import make_scenes
from factory.tools.pool_sizes import plan, rates_from_bench

pytestmark = pytest.mark.timeout(300)

# A Diffusion-Synthesis-like recipe: caption (K=1) -> prompt (CPU) -> controlnet (K=5) -> select (K=1).
SHAPES = [
    ("caption", "caption", 1, True),
    ("prompt", "prompt", 1, False),
    ("synth", "controlnet", 5, True),
    ("select", "select", 1, True),
]
RATES = {"caption": 100.0, "controlnet": 4.0, "select": 20.0}  # output rows/s on one whole GPU


def test_balance_arithmetic_on_made_up_rates():
    p = plan(SHAPES, RATES, gpus=8, sources=36_000)
    caption, prompt, synth, select = p.stages
    # GPU-seconds per source: 1/100, 0, 5/4 (five images per source), 5/20 (five rows per source).
    assert (caption.gpu_seconds, prompt.gpu_seconds, synth.gpu_seconds, select.gpu_seconds) == (0.01, 0, 1.25, 0.25)
    assert (synth.rows_in, select.rows_in) == (1, 5)
    total = 0.01 + 1.25 + 0.25
    assert p.sources_per_second == pytest.approx(8 / total, abs=1e-6)
    assert p.samples_per_second == pytest.approx(5 * 8 / total, abs=1e-5) and p.rows_per_source == 5
    assert p.hours == pytest.approx(36_000 / (8 / total) / 3600, abs=1e-3)
    # Shares: 8 x 0.01/1.51 = 0.05 GPU, 6.62 GPUs, 1.32 GPUs; pools of ceil(share) actors.
    assert (caption.gpus, synth.gpus, select.gpus) == (
        pytest.approx(0.053, abs=1e-3),
        pytest.approx(6.6225, abs=1e-4),
        pytest.approx(1.3245, abs=1e-4),
    )
    assert (caption.actors, caption.gpus_per_actor) == (1, 0.05)
    assert (synth.actors, synth.gpus_per_actor) == (7, 0.94)
    assert (select.actors, select.gpus_per_actor) == (2, 0.66)
    assert (prompt.actors, prompt.gpus_per_actor) == (0, 0)
    used = sum(s.actors * s.gpus_per_actor for s in p.stages)
    assert used <= 8
    # Balanced: every GPU stage then makes the same sources/s.
    for s in (caption, synth, select):
        assert s.gpus * s.rate / (s.rows_in * s.k) == pytest.approx(p.sources_per_second, rel=1e-3)


def test_one_gpu_and_missing_rates():
    p = plan(SHAPES, RATES, gpus=1)
    assert p.hours is None and sum(s.gpus for s in p.stages) == pytest.approx(1)
    assert all(s.actors == 1 for s in p.stages if s.rate is not None)
    with pytest.raises(ValueError, match="no rate for GPU stage 'select'"):
        plan(SHAPES, {"caption": 1.0, "synth": 1.0}, gpus=2)
    with pytest.raises(ValueError, match="at least 1"):
        plan(SHAPES, RATES, gpus=0)


def test_cli_with_a_bench_json(tmp_path, capsys):
    bench = {
        "gpu": {"name": "made-up"},
        "stages": [
            {"name": "caption-blip", "kind": "caption", "images_per_s": 100.0, "peak_memory_gib": 2.0},
            {"name": "controlnet-sd15", "kind": "controlnet", "images_per_s": 4.0, "peak_memory_gib": 9.5},
            {"name": "select-clip", "kind": "select", "images_per_s": 20.0, "peak_memory_gib": 6.0},
        ],
    }
    rates_file = tmp_path / "bench.json"
    rates_file.write_text(json.dumps(bench))
    assert rates_from_bench(rates_file)[0]["controlnet-sd15"] == 4.0
    make_scenes(tmp_path / "scenes", count=3, size=32)
    code = cli.main(
        [
            "plan-resources",
            "jobs/diffusion_synthesis_tiny.yaml",
            "--set",
            f"source.path={tmp_path / 'scenes'}",
            "--gpus",
            "8",
            "--rates",
            str(rates_file),
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sources"] == 3 and out["gpus"] == 8
    synth = next(s for s in out["stages"] if s["kind"] == "controlnet")
    assert synth["rate"] == 4.0 and synth["memory_gib"] == 9.5


def test_calibration_run_of_the_spec_itself(tmp_path, model_cache, capsys):
    make_scenes(tmp_path / "scenes", count=4, size=32)
    code = cli.main(
        [
            "plan-resources",
            "jobs/quickstart.yaml",
            "--set",
            f"source.path={tmp_path / 'scenes'}",
            "--set",
            "stages.0.resources.batch_size=2",
            "--gpus",
            "2",
            "--samples",
            "4",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "synth" in text and "on 2 GPUs" in text and "job: 4 sources" in text
