#!/usr/bin/env bash
# CI step: the sdist builds the extension in a fresh venv with torch pinned, and the installed
# package (not the checkout) imports, has _C and passes an op test against the fp64 oracles.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sl-sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}  # the tested version, from local disk (the extras say >=3.8)
PY=.venv/bin/python
"$PY" -m pip install -q build
SENSITIVITY_LORA_SKIP_EXT=1 "$PY" -m build --sdist --no-isolation -o "$WORK/dist" >"$WORK/sdist.log" 2>&1 ||
  { tail -30 "$WORK/sdist.log"; echo "sdist_check: FAILED: the sdist did not build" >&2; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q --upgrade pip setuptools wheel ninja
"$V" -m pip install -q "$TORCH_SPEC"
"$V" -m pip install -q "$TRITON_SPEC"
"$V" -m pip install -q --no-build-isolation "$SDIST[test]" >"$WORK/install.log" 2>&1 ||
  { tail -30 "$WORK/install.log"; echo "sdist_check: FAILED: installing the sdist failed" >&2; exit 1; }
mkdir "$WORK/run" && tar xzf "$SDIST" -C "$WORK/run" --strip-components=1 --wildcards '*/tests/*'
cd "$WORK/run"  # away from the checkout: the installed package is what gets imported
"$V" - <<'PYEOF'
import sensitivity_lora, sensitivity_lora.ops as ops
assert "site-packages" in sensitivity_lora.__file__, sensitivity_lora.__file__
assert ops.available("accumulate_xtx", "cpu"), ops.unavailable_reason("accumulate_xtx", "cpu")
print("sdist_check: installed at", sensitivity_lora.__file__, "with the compiled cpu kernels")
PYEOF
HF_HUB_OFFLINE=1 "$V" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "sumsq and cpu" >"$WORK/test.log" 2>&1 ||
  { tail -30 "$WORK/test.log"; echo "sdist_check: FAILED: op tests against the installed sdist" >&2; exit 1; }
tail -1 "$WORK/test.log"
echo "sdist_check: OK in $(( $(date +%s) - start )) s"
