"""plan-resources: the balancing arithmetic on made-up rates, the packing of its actors onto whole GPUs (also
by a local Ray with 8 stand-in GPUs), the CLI on a bench JSON, and a calibration run."""

import json
import subprocess
import sys

import pytest

from factory import cli
from factory.sources.scenes import make_scenes
from factory.tools.pool_sizes import format_plan, pack, plan, rates_from_bench

pytestmark = pytest.mark.timeout(300)

# A Diffusion-Synthesis-like recipe: caption (K=1) -> prompt (CPU) -> controlnet (K=5) -> select (K=1).
SHAPES = [
    ("caption", "caption", 1, True),
    ("prompt", "prompt", 1, False),
    ("synth", "controlnet", 5, True),
    ("select", "select", 1, True),
]
RATES = {"caption": 100.0, "controlnet": 4.0, "select": 20.0}  # output rows/s on one whole GPU


# The pools of the balanced shares on 8 GPUs before they were packed: the fractions sum under 8, but Ray
# placed 9 of these 10 actors (a fractional-GPU actor stays on one GPU).
UNPACKED = [("caption", 0.07)] + [("synth", 0.94)] * 7 + [("select", 0.66)] * 2


def actors_of(p) -> list[tuple[str, float]]:
    return [(s.label, s.gpus_per_actor) for s in p.stages for _ in range(s.actors)]


def test_balance_arithmetic_on_made_up_rates():
    p = plan(SHAPES, RATES, gpus=8, sources=36_000)
    caption, prompt, synth, select = p.stages
    # GPU-seconds per source: 1/100, 0, 5/4 (five images per source), 5/20 (five rows per source).
    assert (caption.gpu_seconds, prompt.gpu_seconds, synth.gpu_seconds, select.gpu_seconds) == (0.01, 0, 1.25, 0.25)
    assert (synth.rows_in, select.rows_in) == (1, 5)
    assert p.rows_per_source == 5
    # Balanced shares: 8 x 0.01/1.51 = 0.05 GPU, 6.62 GPUs, 1.32 GPUs.
    assert (caption.gpus, synth.gpus, select.gpus) == (
        pytest.approx(0.053, abs=1e-3),
        pytest.approx(6.6225, abs=1e-4),
        pytest.approx(1.3245, abs=1e-4),
    )
    # Their pools (1 x 0.06, 7 x 0.95, 2 x 0.67) do not pack onto 8 whole GPUs; at 90% of every share
    # they do: six whole GPUs of synth, and the two select actors with caption on the last two.
    assert p.scale == 0.9
    assert (caption.actors, caption.gpus_per_actor) == (1, 0.05)
    assert (synth.actors, synth.gpus_per_actor) == (6, 1.0)
    assert (select.actors, select.gpus_per_actor) == (2, 0.6)
    assert (prompt.actors, prompt.gpus_per_actor) == (0, 0)
    assert p.packing == [[("synth", 1.0)]] * 6 + [[("select", 0.6), ("caption", 0.05)], [("select", 0.6)]]
    # Every stage got at least 90% of its balanced share, so the job runs at 90% of the balanced rate or
    # better; the slowest stage sets it (synth: 6 GPUs / 1.25 GPU-s per source).
    balanced = 8 / (0.01 + 1.25 + 0.25)
    for s in (caption, synth, select):
        assert s.actors * s.gpus_per_actor >= 0.9 * s.gpus - 1e-9
    assert p.sources_per_second == pytest.approx(6 / 1.25) and p.sources_per_second >= 0.9 * balanced
    assert p.samples_per_second == pytest.approx(5 * 6 / 1.25)
    assert p.hours == pytest.approx(36_000 / (6 / 1.25) / 3600, abs=1e-3)
    text = format_plan(p)
    assert "every pool got 90% of its share" in text and "GPU 6: select 0.60, caption 0.05 (0.65 used)" in text


def test_first_fit_decreasing_places_what_ray_places():
    cards, unplaced = pack(UNPACKED, 8)
    assert unplaced == [("select", 0.66)]  # as Ray: 9 of 10
    assert cards[:7] == [[("synth", 0.94)]] * 7 and cards[7] == [("select", 0.66), ("caption", 0.07)]
    # Largest first: a whole-GPU actor gets a free GPU before the fractions fill the rest (in the order
    # given, the 0.3 would have taken GPU 0 and left the 1.0 nowhere to go).
    assert pack([("a", 0.3), ("b", 1.0), ("c", 0.7)], 2) == ([[("b", 1.0)], [("c", 0.7), ("a", 0.3)]], [])


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 5, 8, 16, 64])
def test_every_plan_packs_every_actor(gpus):
    p = plan(SHAPES, RATES, gpus)
    cards, unplaced = pack(actors_of(p), gpus)
    assert not unplaced and cards == p.packing
    assert all(sum(share for _, share in card) <= 1 + 1e-9 for card in p.packing)
    assert sorted(a for card in p.packing for a in card) == sorted(actors_of(p))


def test_one_gpu_and_missing_rates():
    p = plan(SHAPES, RATES, gpus=1)
    assert p.hours is None and sum(s.gpus for s in p.stages) == pytest.approx(1)
    assert all(s.actors == 1 for s in p.stages if s.rate is not None)
    with pytest.raises(ValueError, match="no rate for GPU stage 'select'"):
        plan(SHAPES, {"caption": 1.0, "synth": 1.0}, gpus=2)
    with pytest.raises(ValueError, match="at least 1"):
        plan(SHAPES, RATES, gpus=0)


# Places every actor of each case on a local Ray with 8 stand-in GPUs (Ray counts GPUs it is told of, CUDA
# or not) and prints how many became ready; each case's actors are gone before the next.
PLACE = """
import json, sys, time
import ray

ray.init(num_cpus=2, num_gpus=8, include_dashboard=False)

@ray.remote(num_cpus=0)
class Actor:
    def ready(self):
        return True

# The slowest start of an actor seen so far (each is a new worker process): a case waits for its next ready
# actor three times that (at least 8 s) before it counts the rest as never placed.
slowest = 1.0
for actors in json.loads(sys.argv[1]):
    handles = [Actor.options(num_gpus=share).remote() for _, share in actors]
    pending = [h.ready.remote() for h in handles]
    ready, last = 0, time.monotonic()
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(8.0, 3 * slowest))
        if not done:
            break
        ready += 1
        slowest, last = max(slowest, time.monotonic() - last), time.monotonic()
    print(ready, flush=True)
    for h in handles:
        ray.kill(h)
    # A killed actor gives its GPU back a moment later: the next case starts on 8 free GPUs.
    while ray.available_resources().get("GPU", 0) < 8:
        time.sleep(0.2)
"""


@pytest.mark.e2e
def test_ray_places_every_actor_of_the_plan():
    planned = actors_of(plan(SHAPES, RATES, gpus=8))
    # Ray Data asks for the pools stage by stage; either order must place them all.
    cases = [planned, planned[::-1], UNPACKED]  # the last waits by the starts the first two measured
    out = subprocess.run(
        [sys.executable, "-c", PLACE, json.dumps(cases)], capture_output=True, text=True, timeout=400, check=True
    )
    placed = [int(line) for line in out.stdout.split()]
    assert placed == [len(planned), len(planned), 9], out.stderr[-2000:]


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
    placed = [actor for card in out["packing"] for actor in card]
    assert len(out["packing"]) == 8 and len(placed) == sum(s["actors"] for s in out["stages"])


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
