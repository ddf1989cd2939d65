#!/usr/bin/env bash
# llm-compressor 0.14 against the package: its own accumulation and its sequential GPTQ pipeline
# (tests/test_gptq_llmcompressor.py, skipped in the main venv). llm-compressor pins its own transformers,
# so it gets a venv of its own and the package runs from the checkout (PYTHONPATH, the built extension in place).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
start=$(date +%s)
# Outside the clone, so that a second run on the same machine skips the install (minutes: it is most of the
# time of this check); a machine without it installs it here.
venv=${LLMC_VENV:-$HOME/.cache/sensitivity-lora/llmcompressor-venv}
ready() { "$venv/bin/python" -c "import llmcompressor, pytest, sys; sys.exit(not llmcompressor.__version__.startswith('0.14.'))" 2>/dev/null; }
if ! ready; then
    python3 -m venv "$venv"
    # torch first, pinned: the local CPU wheel; an unpinned torch would pull a CUDA build of several GB
    "$venv/bin/pip" install -q torch==2.13.0
    echo "torch==2.13.0" > "$venv/constraints.txt"
    "$venv/bin/pip" install -q -c "$venv/constraints.txt" "llmcompressor==0.14.*" pytest
fi
"$venv/bin/python" -c "import llmcompressor; print('llm-compressor', llmcompressor.__version__)"  # loud if missing
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -o addopts=-ra tests/test_gptq_llmcompressor.py
echo "llm-compressor check finished in $(( $(date +%s) - start )) s"
