#!/usr/bin/env bash
# One prepared GPU check: build the extension with CUDA, run the GPU tests, time the GPU paths.
#
#   bash scripts/gpu_check.sh OUTDIR [--dry-run] [more options of scripts/gpu_check.py]
#
# On one NVIDIA GPU (sm_80/sm_90) with its own torch (CUDA), triton, transformers and peft
# installed and no network; --dry-run on a CPU machine runs each stage's CPU-checkable part.
# Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md; exit 0 only when every stage passed.
# The stage plan and its limits: docs/gpu.md ("GPU check: stage plan"). The Python side stops
# starting stages at 450 s; this wrapper kills it at SL_GPU_CHECK_HARD_LIMIT (470 s), and the
# JSON written so far stays (the running stage is marked as cut).
#
# The interpreter: $PYTHON if set, else the first of python3, python, .venv/bin/python whose
# torch sees a GPU (dry run: .venv/bin/python first, then python3, python: any with torch).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR [--dry-run] [gpu_check.py options]" >&2
  exit 2
fi
OUTDIR=$1
shift
DRY=0
for arg in "$@"; do [ "$arg" = --dry-run ] && DRY=1; done

stamp() { echo "[gpu_check.sh $(date +%H:%M:%S)] $*"; }

pick_python() {
  local candidates py
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return 0; fi
  if [ "$DRY" = 1 ]; then
    candidates="$ROOT/.venv/bin/python python3 python"
    for py in $candidates; do
      command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch" >/dev/null 2>&1 && { echo "$py"; return 0; }
    done
  else
    candidates="python3 python $ROOT/.venv/bin/python"
    for py in $candidates; do
      command -v "$py" >/dev/null 2>&1 &&
        "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 &&
        { echo "$py"; return 0; }
    done
    # none sees a GPU: the first with torch, so that the env stage says why
    for py in $candidates; do
      command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch" >/dev/null 2>&1 && { echo "$py"; return 0; }
    done
  fi
  return 1
}

PY=$(pick_python) || {
  mkdir -p "$OUTDIR"
  stamp "FAILED: no python with torch found (set PYTHON=/path/to/python)" | tee "$OUTDIR/gpu_check.error"
  exit 1
}
stamp "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1))"
mkdir -p "$OUTDIR"
LIMIT=${SL_GPU_CHECK_HARD_LIMIT:-470}
if command -v timeout >/dev/null 2>&1; then
  timeout -k 15 "$LIMIT" "$PY" "$ROOT/scripts/gpu_check.py" "$OUTDIR" "$@"
else
  "$PY" "$ROOT/scripts/gpu_check.py" "$OUTDIR" "$@"
fi
rc=$?
[ "$rc" = 124 ] && stamp "the run was stopped at its hard limit of ${LIMIT} s; see $OUTDIR/gpu_check.json"
exit "$rc"
