#!/usr/bin/env bash
# The command of a device call that runs bench/bench_gpu.py on a lent GPU machine (docs/gpu.md, "Running it
# on a lent GPU machine"). Here, first: bash bench/device/fetch_wheels.sh (the wheels go to .whl/). Then the
# device call: command `bash bench/device/run.sh`, carry [".whl"], timeout_s 560.
#
#   bash bench/device/run.sh [--cpu] [ARGS for bench_gpu.py ...]
#
# 1. Installs the carried wheels (.whl/*.whl) into /tmp/site, each one this Python lacks or has at an older
#    version, and puts /tmp/site and the repository root on PYTHONPATH. They are CPython 3.12 wheels (the
#    machine's Python): with another Python nothing is installed, and its own packages are used.
# 2. Records the machine into $OUT/env.txt: nvidia-smi, what was installed, each module's version and origin,
#    torch's view of the GPU. Stops there if a module the benchmark needs does not import.
# 3. Runs bench/bench_gpu.py --require-gpu --out "$OUT" --minutes 8 [ARGS], its output in $OUT/bench.log;
#    its JSON (<gpu>-<date>.json) lands in $OUT. ARGS go after these, so a --minutes among them wins.
# 4. Lists what $OUT holds: a device call brings back at most 8 plain files, at most 2 folders down.
#
# --cpu: a rehearsal on a machine without a GPU: --tiny --minutes 6 instead of --require-gpu --minutes 8.
# Environment: OUT (default: a new folder under /tmp, printed), PYTHON (default python3), FACTORY_MODEL_CACHE
# (default /tmp/factory-model-cache). HF_HUB_OFFLINE=1: nothing is downloaded (the machine has no network).
set -euo pipefail

SCRIPT=$(realpath "${BASH_SOURCE[0]}")
REPO=${SCRIPT%/bench/device/*}
cd "$REPO"

PYTHON=${PYTHON:-python3}
SITE=/tmp/site
cpu=0
extra=()
for arg in "$@"; do
  if [[ $arg == --cpu ]]; then cpu=1; else extra+=("$arg"); fi
done
if ((cpu)); then
  minutes=6 bench_args=(--tiny)
else
  minutes=8 bench_args=(--require-gpu)
fi
bench_args+=(--minutes "$minutes")
# The wall-clock guard: bench_gpu.py ends by its --minutes deadline (a --minutes in ARGS wins); 30 s after
# it, it is stopped.
for ((i = 0; i < ${#extra[@]}; i++)); do
  case ${extra[i]} in
    --minutes) minutes=${extra[i + 1]:-$minutes} ;;
    --minutes=*) minutes=${extra[i]#--minutes=} ;;
  esac
done
guard_s=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 30 }')

if [[ -z ${OUT:-} ]]; then
  OUT=$(mktemp -d /tmp/device-out.XXXXXX)
  echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT"
if [[ -n $(ls -A "$OUT") ]]; then
  echo "note: $OUT is not empty; files there stay and count towards the 8 a device call brings back"
fi
export OUT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FACTORY_MODEL_CACHE=${FACTORY_MODEL_CACHE:-/tmp/factory-model-cache}
export PYTHONUNBUFFERED=1
mkdir -p "$FACTORY_MODEL_CACHE"
ENV_FILE=$OUT/env.txt

if ! command -v "$PYTHON" >/dev/null; then
  echo "error: no Python at '$PYTHON' (set PYTHON)" >&2
  exit 1
fi

{
  echo "== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $(uname -srm), $(nproc) CPUs, repository $REPO"
  echo "== bench/device/run.sh $*"
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || echo "nvidia-smi failed (status $?)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
} 2>&1 | tee "$ENV_FILE"

say() { echo "$*" | tee -a "$ENV_FILE"; }

py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
shopt -s nullglob
wheels=(.whl/*.whl)
site=""
say "== wheels (.whl, carried)"
if ((${#wheels[@]} == 0)); then
  say "no .whl/*.whl here: was .whl carried (carry [\".whl\"]) and made by bench/device/fetch_wheels.sh?"
elif [[ $py_version != 3.12 ]]; then
  # The carried set holds a CPython 3.12 extension (pydantic-core) that this Python cannot load, and pydantic
  # insists on its exact pydantic-core: installing only the pure-Python wheels could pair the carried
  # pydantic with this Python's own pydantic-core. So none is installed.
  say "Python $py_version ($(command -v "$PYTHON")): the wheels are for CPython 3.12; none installed," \
    "this Python's own packages are used"
else
  list=$(mktemp)
  # stdout (the wheels to install) to $list, the reasons through tee.
  "$PYTHON" bench/device/env.py select "${wheels[@]}" 2>&1 >"$list" | tee -a "$ENV_FILE"
  mapfile -t install <"$list"
  rm -f "$list"
  if ((${#install[@]} == 0)); then
    say "this Python has every carried package at that version or newer: none installed"
  elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${install[@]}" 2>&1 | tee -a "$ENV_FILE"; then
    say "installed ${#install[@]} of ${#wheels[@]} wheels into $SITE"
    site=$SITE
  else
    say "error: pip could not install the wheels into $SITE (above)" >&2
    exit 1
  fi
fi

export PYTHONPATH=${site:+$site:}$REPO${PYTHONPATH:+:$PYTHONPATH}
echo "PYTHONPATH=$PYTHONPATH HF_HUB_OFFLINE=1 FACTORY_MODEL_CACHE=$FACTORY_MODEL_CACHE" | tee -a "$ENV_FILE"

echo "== modules" | tee -a "$ENV_FILE"
set +e
"$PYTHON" bench/device/env.py report ${site:+"$site"} 2>&1 | tee -a "$ENV_FILE"
status=${PIPESTATUS[0]}
set -e
if ((status != 0)); then
  echo "error: a module the benchmark needs does not import (above; $ENV_FILE); benchmark not run." >&2
  echo "Where pydantic, diffusers or segment_anything is missing: run bash bench/device/fetch_wheels.sh" \
    "here and carry [\".whl\"]." >&2
  exit 1
fi

cmd=("$PYTHON" bench/bench_gpu.py "${bench_args[@]}" --out "$OUT" "${extra[@]}")
echo "== ${cmd[*]} (stopped after ${guard_s} s if still running)" | tee -a "$ENV_FILE"
set +e
timeout --kill-after=15 "$guard_s" "${cmd[@]}" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
set -e
case $status in
  0) echo "bench_gpu.py finished" ;;
  124 | 137) echo "bench_gpu.py ran past its deadline and was stopped after ${guard_s} s: the JSON holds" \
    "every workload it finished" ;;
  *) echo "bench_gpu.py failed with status $status (the end of $OUT/bench.log says why)" ;;
esac

# What comes back from a device call: at most 8 plain files, 16 MiB each, no more than 2 folders down, named
# in letters, digits, '.', '_' and '-'.
echo "== $OUT"
find "$OUT" -mindepth 1 ! -type d -printf '%y %s %P\n' | sort -k3 | while read -r kind size path; do
  printf '  %-60s %10s bytes%s\n' "$path" "$size" "$([[ $kind == f ]] || echo " (not a plain file)")"
done
files=$(find "$OUT" -type f | wc -l)
others=$(find "$OUT" -mindepth 1 ! -type f ! -type d | wc -l)
deep=$(find "$OUT" -mindepth 4 -type f | wc -l)
large=$(find "$OUT" -type f -size +16M | wc -l)
odd=$(find "$OUT" -mindepth 1 -name '*[!A-Za-z0-9._-]*' | wc -l)
echo "$files files"
if ((files > 8 || others + deep + large + odd > 0)); then
  echo "warning: a device call brings back at most 8 plain files of at most 16 MiB, at most 2 folders down," \
    "plainly named: here $files files, $others not plain, $deep too deep, $large too large, $odd oddly named" >&2
fi
exit "$status"
