"""Helpers of bench/device/run.sh, run with the interpreter that runs the benchmark.

    python3 bench/device/env.py select .whl/*.whl   # prints the wheels this interpreter needs installed
    python3 bench/device/env.py report              # versions, origins, GPU; exit 1 if the benchmark cannot import

`select` keeps a wheel unless this interpreter already has its distribution at that version or newer (the
machine's own copy then stays in use: a carried wheel is for a missing package or an older one). `report`
prints where each module the benchmark imports comes from and its version, torch's view of the GPU, the
carried distributions' requirements that are not met, and imports the stage registry (every stage module),
as bench/bench_gpu.py does; a module it needs that does not import makes it exit with status 1.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata
from pathlib import Path

# What bench/bench_gpu.py's stages, training and fast_paths sections import (the import chain through
# bench/measure.py, factory.stages.* and factory.models.*), by module name; `optional` ones may be missing.
NEEDED = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "diffusers",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "pydantic",
    "pydantic_core",
    "typing_extensions",
    "segment_anything",
    "numpy",
    "scipy",
    "PIL",
    "yaml",
    "fsspec",
    "pyarrow",
)
OPTIONAL = {
    "pynvml": "the recipes' GPU busy fraction is null",
    "ray": "bench_gpu.py skips the recipes section",
}
# Requirements a carried wheel states that the benchmark does not need: diffusers imports importlib_metadata
# only on Python < 3.8 (importlib.metadata otherwise).
NOT_NEEDED = {"importlib-metadata"}


def normalized(name: str) -> str:
    return name.replace("_", "-").replace(".", "-").lower()


def select(wheels: list[str]) -> int:
    try:
        from packaging.version import Version
    except ImportError:  # without packaging every wheel is installed
        Version = None
    for wheel in wheels:
        name, version = Path(wheel).name.split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and Version is not None and Version(have) >= Version(version):
            print(f"  not installing {name} {version}: this Python has {have}", file=sys.stderr)
            continue
        print(f"  installing {name} {version}" + (f" (this Python has {have})" if have else ""), file=sys.stderr)
        print(wheel)
    return 0


def origin(module) -> str:
    path = getattr(module, "__file__", None) or "?"
    return str(Path(path).parent) if path != "?" else path


def version_of(name: str, module) -> str:
    v = getattr(module, "__version__", None)
    if v is None:
        try:
            v = metadata.version(name)
        except metadata.PackageNotFoundError:
            v = "?"
    return str(v)


def unmet_requirements(site: str) -> list[str]:
    """Requirements (extras left out) of the distributions installed in `site` that the path does not meet."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["(packaging is missing: requirements not checked)"]
    unmet = []
    for dist in metadata.distributions(path=[site]):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if normalized(req.name) in NOT_NEEDED:
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} needs {req}: missing")
                continue
            if not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req}: found {have}")
    return unmet


def report(site: str | None) -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    failed = []
    for name in (*NEEDED, *OPTIONAL):
        try:
            module = importlib.import_module(name)
        except Exception as e:
            if name in OPTIONAL:
                print(f"  {name:<18} absent: {OPTIONAL[name]}")
            else:
                print(f"  {name:<18} FAILS TO IMPORT: {type(e).__name__}: {e}")
                failed.append(name)
            continue
        print(f"  {name:<18} {version_of(name, module):<16} {origin(module)}")
    if "torch" not in failed:
        import torch

        print(f"torch: CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(
                f"torch sees {torch.cuda.device_count()} GPU(s): {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                f"compute capability {p.major}.{p.minor}, {p.multi_processor_count} multiprocessors"
            )
        else:
            print("torch sees no CUDA device")
    if site:
        unmet = unmet_requirements(site)
        print(f"requirements of the wheels installed in {site}: " + ("all met" if not unmet else "NOT MET"))
        for line in unmet:
            print(f"  {line}")
    if not failed:
        try:
            from factory.stages import stage_names

            print(f"factory stages: {', '.join(stage_names())}")
        except Exception as e:
            print(f"factory stages FAIL TO IMPORT: {type(e).__name__}: {e}")
            failed.append("factory.stages")
    if failed:
        print(f"missing for the benchmark: {', '.join(failed)}")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["select"]:
        return select(argv[1:])
    if argv[:1] == ["report"]:
        return report(argv[1] if len(argv) > 1 else None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
