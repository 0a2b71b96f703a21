#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels that bench/bench_gpu.py's non-Ray sections (stages,
# training, fast_paths) need and a lent GPU machine lacks, into .whl/ at the repository root (ignored by git).
# A device call carries them (carry [".whl"]) and bench/device/run.sh installs them there; docs/gpu.md,
# "Running it on a lent GPU machine".
#
#   bash bench/device/fetch_wheels.sh
#
# The machine (the device tool's KINDS.md) is CPython 3.12 on x86-64 with torch 2.11, transformers 5.17,
# huggingface_hub 1.33, safetensors 0.8.0, accelerate, numpy, pillow, pyarrow, fsspec, pyyaml, scipy,
# torchvision, tokenizers, packaging, requests, regex, filelock and nvidia-ml-py, but no pydantic, diffusers
# or segment-anything. The versions are requirements.lock's (read below). What each needs (Requires-Dist) and the machine
# has not is here too; the rest it has:
#   pydantic 2.14.4        annotated-types, pydantic-core ==2.50.5, typing-extensions >=4.16.0,
#                          typing-inspection >=0.4.4
#   pydantic-core 2.50.5   typing-extensions >=4.16.0 (the one compiled wheel: cp312, manylinux x86_64)
#   typing-inspection      typing-extensions >=4.15.0
#   typing-extensions      the machine has it, at a version not recorded: carried for pydantic's >=4.16.0;
#                          run.sh installs it only where the machine's is older
#   diffusers 0.42.1       huggingface-hub >=1.32.0,<3.0 (machine: 1.33.0), safetensors >=0.8.0 (0.8.0),
#                          filelock, numpy, regex, requests, Pillow (there), importlib_metadata: not
#                          carried, diffusers imports it only on Python < 3.8 (importlib.metadata otherwise)
#   segment-anything 1.0   nothing (it uses torch and torchvision, which are there)
# Not carried: ray and webdataset (only the recipes section needs Ray; bench_gpu.py skips it without Ray and
# imports neither), s3fs and matplotlib (not imported by the benchmark).
set -euo pipefail

SCRIPT=$(realpath "${BASH_SOURCE[0]}")
REPO=${SCRIPT%/bench/device/*}
cd "$REPO"
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60  # the device call's limit is 64 MiB for the working tree and the carried paths together

NAMES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions diffusers segment-anything)
# Each at the version requirements.lock pins: the one place the project's versions are written.
WHEELS=()
for name in "${NAMES[@]}"; do
  pin=$(grep -E "^${name}==" requirements.lock | head -n 1 | cut -d ' ' -f 1)
  if [[ -z $pin ]]; then
    echo "error: requirements.lock pins no version of $name" >&2
    exit 1
  fi
  WHEELS+=("$pin")
done

mkdir -p .whl
# One version of each: two versions of one package in .whl stop the whole install on the machine.
rm -f .whl/*.whl
echo "Downloading ${#WHEELS[@]} wheels for CPython 3.12, manylinux x86_64, into $REPO/.whl"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

shopt -s nullglob
got=(.whl/*.whl)
if ((${#got[@]} != ${#WHEELS[@]})); then
  echo "error: expected ${#WHEELS[@]} wheels in .whl, found ${#got[@]}: ${got[*]}" >&2
  exit 1
fi
for w in "${got[@]}"; do
  # A wheel's name ends -{python tag}-{abi tag}-{platform tag}.whl: pure Python, or CPython 3.12 on x86-64.
  case "$(basename "$w")" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-cp312-*x86_64*.whl) ;;
    *) echo "error: $w is neither pure Python nor a CPython 3.12 x86-64 wheel" >&2; exit 1 ;;
  esac
  if ! "$PYTHON" -m zipfile -l "$w" >/dev/null; then
    echo "error: $w is not a readable zip file" >&2
    exit 1
  fi
done

# What a device call sends: tracked files and untracked files git does not ignore, plus the carried .whl.
sizes=$(git ls-files -z --cached --others --exclude-standard | "$PYTHON" -c '
import os, sys
paths = [p for p in sys.stdin.buffer.read().decode().split("\0") if p]
tree = sum(os.lstat(p).st_size for p in paths if os.path.lexists(p))
wheels = sum(os.path.getsize(os.path.join(".whl", f)) for f in os.listdir(".whl") if f.endswith(".whl"))
print(tree, wheels)
')
read -r tree_bytes wheel_bytes <<<"$sizes"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
for w in "${got[@]}"; do
  printf '  %-80s %8s KiB\n' "$(basename "$w")" "$(( $(stat -c %s "$w") / 1024 ))"
done
total=$((tree_bytes + wheel_bytes))
echo "wheels $(mib "$wheel_bytes") MiB + working tree $(mib "$tree_bytes") MiB = $(mib "$total") MiB" \
  "(limit here ${LIMIT_MIB} MiB; the call's is 64 MiB)"
if ((total > LIMIT_MIB * 1048576)); then
  echo "error: the wheels and the working tree come to more than ${LIMIT_MIB} MiB: the device call would be refused" >&2
  exit 1
fi
echo "Done. Device call: command 'bash bench/device/run.sh', carry [\".whl\"] (docs/gpu.md)."
