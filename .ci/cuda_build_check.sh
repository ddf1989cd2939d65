#!/usr/bin/env bash
# Optional-but-run CI step: prove that `pip install` on a CUDA machine compiles and links the
# CUDA extension. No GPU is needed: a CUDA build of torch (2.14.1, CUDA 13.0) is installed into
# its own venv, setup.py builds the CUDAExtension with SENSITIVITY_LORA_FORCE_CUDA=1 for sm_80 and
# sm_90, and the built library is loaded (all symbols resolved) and must register the CUDA
# kernels of accumulate_sumsq, accumulate_xtx and diag_stats with the dispatcher.
#
# Skips (exit 0, with the reason) when nvcc is missing or the torch wheel cannot be installed;
# set SL_CUDA_CHECK_STRICT=1 to make those failures. SL_CUDA_CHECK_SKIP=1 skips the step.
# Cost here: ~1-2 min for the 5.4 GB torch install (from the local wheel store; the venv is kept
# between runs), a few minutes to compile (MAX_JOBS, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SL_CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${SL_CUDA_TORCH:-torch==2.14.1}
STRICT=${SL_CUDA_CHECK_STRICT:-0}
start=$(date +%s)

skip() {
  if [ "$STRICT" = 1 ]; then echo "cuda_build_check: FAILED: $*" >&2; exit 1; fi
  echo "cuda_build_check: SKIPPED: $*"
  exit 0
}

[ "${SL_CUDA_CHECK_SKIP:-0}" = 1 ] && skip "SL_CUDA_CHECK_SKIP=1"
command -v nvcc >/dev/null || skip "nvcc not found on PATH"
# CUDA_HOME must be the toolkit root that holds the real nvcc, not the folder of a wrapper
# script (e.g. /usr/local/bin/nvcc that execs the real one): ask nvcc where it lives.
CUDA_ROOT=$(nvcc -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
[ -n "$CUDA_ROOT" ] && CUDA_ROOT=$(cd "$CUDA_ROOT" && pwd -P)
[ -x "$CUDA_ROOT/bin/nvcc" ] || skip "cannot resolve the CUDA toolkit root from nvcc (got '$CUDA_ROOT')"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" setuptools wheel ninja || skip "could not install $TORCH_SPEC"
fi
PY="$VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The toolkit here has nvcc and the runtime; the library headers torch includes (cuBLAS,
# cuSPARSE, ...) come with the wheel's nvidia packages.
WHEEL_INC="$SITE/nvidia/cu13/include"
echo "cuda_build_check: torch $("$PY" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CUDA_ROOT"

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/sl-cuda-build.XXXXXX")
# setup.py records the torch it builds against in sensitivity_lora/_build_info.py; this build is
# against another torch than the checkout's own extension, so keep and restore the checkout's record.
INFO=sensitivity_lora/_build_info.py
[ -f "$INFO" ] && cp "$INFO" "$BUILD/build_info.keep"
restore() { if [ -f "$BUILD/build_info.keep" ]; then cp "$BUILD/build_info.keep" "$INFO"; else rm -f "$INFO"; fi; rm -rf "$BUILD"; }
trap restore EXIT
SENSITIVITY_LORA_FORCE_CUDA=1 CUDA_HOME="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH" \
  CPATH="$WHEEL_INC${CPATH:+:$CPATH}" TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" >"$BUILD/build.log" 2>&1 ||
  { tail -50 "$BUILD/build.log"; echo "cuda_build_check: FAILED: the CUDA extension did not build" >&2; exit 1; }

SO=$(find "$BUILD/lib" -name '_C*.so' | head -1)
[ -n "$SO" ] || { echo "cuda_build_check: FAILED: no _C*.so was built" >&2; exit 1; }
"$PY" - "$SO" <<'PYEOF'
import sys
import torch

torch.ops.load_library(sys.argv[1])  # dlopen with RTLD_NOW: an unresolved symbol fails here
missing = [op for op in ("accumulate_sumsq", "accumulate_xtx", "diag_stats")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sensitivity_lora::{op}", "CUDA")]
if missing:
    sys.exit(f"cuda_build_check: FAILED: no CUDA kernel registered for {missing}")
print("cuda_build_check: CUDA kernels registered for accumulate_sumsq, accumulate_xtx, diag_stats")
PYEOF
echo "cuda_build_check: OK in $(( $(date +%s) - start )) s"
