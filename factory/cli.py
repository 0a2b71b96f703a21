"""The `factory` command: run and resume jobs, submit them to a cluster, inspect their output, train models.

A thin layer: each command parses its arguments and calls the function that does the work, where that
work lives (the engine, the tools, SegGen training, the consumer side). Modules are imported by the
command that needs them, so `factory status` never starts Ray or imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

import yaml

from factory import __version__
from factory.extras import MissingExtra, extra_for_module, install_line, require
from factory.output.layout import open_output
from factory.schema import SpecError, read_yaml

log = logging.getLogger("factory")


def _overrides(args) -> dict:
    out = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set {item!r}: expected FIELD=VALUE")
        out[key] = yaml.safe_load(value)
    if getattr(args, "output", None):
        out["output.url"] = args.output
    if getattr(args, "input", None):
        out["source.path"] = args.input
    return out


def _job_spec(args, absolute: bool = True):
    from factory.engine.spec import load_spec, with_absolute_paths

    spec = load_spec(args.spec, _overrides(args))
    return with_absolute_paths(spec) if absolute else spec


def _output(args):
    return open_output(args.output, endpoint_url=args.endpoint_url)


def cmd_validate(args) -> int:
    data = read_yaml(args.spec)
    if isinstance(data, dict) and "stages" not in data and "steps" in data:  # a training spec
        from factory.seggen.spec import load_train_spec

        train_spec = load_train_spec(args.spec)
        print(f"{args.spec}: ok (training spec {train_spec.name}, {train_spec.steps} steps)")
        return 0
    spec = _job_spec(args)
    print(f"{args.spec}: ok (job {spec.name}, {len(spec.stages)} stages, spec hash {spec.content_hash()})")
    return 0


def cmd_run(args) -> int:
    require("engine", "factory run")
    from factory.engine.driver import run_job

    spec = _job_spec(args)
    index = run_job(spec, address=args.address, overwrite=args.overwrite)
    print(
        f"{spec.output.url}: {index['committed']}/{index['num_shards']} shards, {index['samples']} samples, "
        f"{index['failed']} failed, {index['rejected']} rejected"
    )
    return 0


def cmd_submit(args) -> int:
    require("cluster", "factory submit")
    from factory.engine.submit import submit

    # The job's driver runs in a fresh directory on the head node, so a relative path would point into
    # it; absolute paths must then name storage every node mounts at that same path.
    return submit(_job_spec(args), args.address, again=args.again, wait=args.wait)


def cmd_logs(args) -> int:
    require("cluster", "factory logs")
    from factory.engine.submit import print_logs

    return print_logs(args.job_id, args.address, follow=args.follow)


def cmd_status(args) -> int:
    from factory.tools.status import main_status

    return main_status(_output(args), as_json=args.json)


def cmd_preview(args) -> int:
    from factory.tools.preview import contact_sheet

    print(f"wrote {contact_sheet(_output(args), args.out, count=args.count)}")
    return 0


def cmd_stage(args) -> int:
    """One stage of a spec, alone, in this process, on the spec's source (or --input): for debugging."""
    from factory.engine.executors.in_process import run_stage_alone

    counts = run_stage_alone(_job_spec(args, absolute=False), args.stage, args.out, args.limit, origin=args.spec)
    print(f"{args.out}: {counts['written']} written, {counts['rejected']} rejected, {counts['failed']} failed")
    return 0


def cmd_train(args) -> int:
    require("train", "factory train")
    from factory.seggen.train import main_train

    return main_train(args.model, args.spec)


def cmd_eval(args) -> int:
    if not args.check:  # the check reads the data alone: the core suffices
        require("train", "factory eval")
        require("report", "factory eval")
    from factory.downstream.eval import main_eval

    return main_eval(args.spec, address=args.address, check_only=args.check)


def cmd_report(args) -> int:
    require("report", "factory report")
    from factory.tools.report import main_report

    return main_report(args.output, args.out, endpoint_url=args.endpoint_url)


def cmd_select(args) -> int:
    from factory.tools.top_fraction import main_select

    return main_select(_output(args), args.score, args.top, lowest=args.lowest)


def cmd_captions(args) -> int:
    from factory.tools.captions import export_captions

    print(f"{args.out}: {export_captions(_output(args), args.out)} captions")
    return 0


def cmd_make_scenes(args) -> int:
    from factory.sources.scenes import make_scenes

    ids = make_scenes(args.dir, count=args.count, size=args.size, seed=args.seed, style=args.style, start=args.start)
    print(f"{args.dir}: {len(ids)} scenes")
    return 0


def cmd_plan_resources(args) -> int:
    from factory.tools.pool_sizes import main_plan_resources

    return main_plan_resources(
        _job_spec(args, absolute=False), args.gpus, args.rates, args.sources, args.samples, args.json
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factory", description=__doc__)
    p.add_argument("--version", action="version", version=f"factory {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def spec_args(q):
        q.add_argument("spec", help="job spec YAML")
        q.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a spec field")
        q.add_argument("--output", help="write to this URL instead of the spec's output.url")

    q = sub.add_parser("validate", help="check a job spec and exit")
    spec_args(q)
    q.set_defaults(func=cmd_validate)

    q = sub.add_parser("run", help="run or resume a job (local embedded Ray unless --address)")
    spec_args(q)
    q.add_argument("--address", help="a running Ray cluster (ray://... or auto)")
    q.add_argument("--overwrite", action="store_true", help="delete the output first and start over")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("submit", help="submit a job to a cluster through the Ray Jobs API")
    spec_args(q)
    q.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HEAD:8265")
    q.add_argument("--wait", action="store_true", help="wait until the job ends")
    q.add_argument("--again", action="store_true", help="submit even if the same job already succeeded")
    q.set_defaults(func=cmd_submit)

    q = sub.add_parser("logs", help="print a submitted job's logs")
    q.add_argument("job_id")
    q.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HEAD:8265")
    q.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    q.set_defaults(func=cmd_logs)

    for name, func, text in (
        ("status", cmd_status, "shards done, samples, failures"),
        ("preview", cmd_preview, "a PNG contact sheet: image | mask | overlay"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("output", help="the job's output URL")
        q.add_argument("--endpoint-url", help="S3 endpoint for s3:// outputs")
        q.set_defaults(func=func)
    sub.choices["status"].add_argument("--json", action="store_true")
    sub.choices["preview"].add_argument("--out", default="preview.png")
    sub.choices["preview"].add_argument("--count", type=int, default=8)

    q = sub.add_parser("stage", help="run one stage of a spec alone, without Ray, writing loose files")
    spec_args(q)
    q.add_argument("stage", help="the stage's name (or kind) in the spec")
    q.add_argument("--input", dest="input", help="read this folder instead of the spec's source.path")
    q.add_argument("--out", required=True, help="folder for KEY.png / KEY.seg.png / KEY.json")
    q.add_argument("--limit", type=int, default=8, help="source samples to process")
    q.set_defaults(func=cmd_stage)

    q = sub.add_parser("train", help="train a SegGen model (text2mask or mask2img) on Ray Train")
    q.add_argument("model", choices=["text2mask", "mask2img"])
    q.add_argument("spec", help="training spec YAML (jobs/train_*.yaml)")
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("eval", help="train a segmenter on real data and on mixes with synthetic data; compare mIoU")
    q.add_argument("spec", help="eval spec YAML (jobs/eval_*.yaml)")
    q.add_argument("--address", help="a running Ray cluster (ray://... or auto)")
    q.add_argument("--check", action="store_true", help="check the spec and its inputs, run nothing")
    q.set_defaults(func=cmd_eval)

    q = sub.add_parser("report", help="an HTML report of a job's output: scores, pass rates, best and worst")
    q.add_argument("output", help="the job's output URL")
    q.add_argument("--out", help="folder for report.html and its plots (default: OUT/report, uploaded for s3://)")
    q.add_argument("--endpoint-url", help="S3 endpoint for s3:// outputs")
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("select", help="keep the top fraction of a finished job's samples by one score")
    q.add_argument("output", help="the job's output URL")
    q.add_argument("--score", required=True, help="a score name, e.g. density.instances or fidelity.miou")
    q.add_argument("--top", type=float, required=True, help="fraction of samples to keep, 0 < F <= 1")
    q.add_argument("--lowest", action="store_true", help="keep the lowest scores instead")
    q.add_argument("--endpoint-url", help="S3 endpoint for s3:// outputs")
    q.set_defaults(func=cmd_select)

    q = sub.add_parser("captions", help="export each source sample's caption from a job's shards (JSON lines)")
    q.add_argument("output", help="the job's output URL")
    q.add_argument("--out", default="captions.jsonl")
    q.add_argument("--endpoint-url", help="S3 endpoint for s3:// outputs")
    q.set_defaults(func=cmd_captions)

    q = sub.add_parser("plan-resources", help="GPU pool sizes that balance a spec's stages on N GPUs")
    spec_args(q)
    q.add_argument("--gpus", type=int, required=True, help="GPUs to split between the stages")
    q.add_argument("--rates", help="a bench/bench_gpu.py JSON; default: a short calibration run of the spec")
    q.add_argument("--sources", type=int, help="source samples in the job (default: the source's listing)")
    q.add_argument("--samples", type=int, default=8, help="calibration: source samples to run")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_plan_resources)

    q = sub.add_parser("make-scenes", help="write procedural ADE150 scenes (the quickstart's input)")
    q.add_argument("dir")
    q.add_argument("--count", type=int, default=16)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--start", type=int, default=0, help="first scene index (disjoint splits of one seed)")
    q.add_argument(
        "--style",
        choices=["palette", "varied"],
        default="palette",
        help="palette: each class in its ADE150 colour; varied: random colours and textures per scene",
    )
    q.set_defaults(func=cmd_make_scenes)
    for q in sub.choices.values():
        q.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    return p


def _stop_ray() -> None:
    """Stop this process's Ray before the last line: workers' log lines reach stderr asynchronously, and
    none may come after the line that says what happened and what to do."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # the job has failed already; its message matters more than a clean shutdown
            log.debug("ray.shutdown failed", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    """Run a command; any failure ends in one `factory:` line with what to do (the traceback with --verbose)."""
    from factory.engine.errors import FactoryError, advice, one_line

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="factory: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"factory: bad job spec: {e}", file=sys.stderr)
        return 2
    except MissingExtra as e:
        print(f"factory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stop_ray()
        print("factory: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        _stop_ray()
        missing = e.name if isinstance(e, ModuleNotFoundError) else None
        extra = extra_for_module(missing) if missing else None
        if extra is not None:
            print(
                f"factory: {missing} is not installed; it comes with the '{extra}' extra: {install_line(extra)}",
                file=sys.stderr,
            )
            return 2
        if args.verbose:
            traceback.print_exc()
        if isinstance(e, FactoryError):
            told = str(e)  # most say what to do in their message; the others carry it as their advice
            print(f"factory: {told}" + ("" if e.advice in told else f"; {e.advice}"), file=sys.stderr)
        else:
            hint = "" if args.verbose else " (--verbose shows the traceback)"
            print(f"factory: {one_line(e)}; {advice(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
