"""Output-aware initialisation against fp64 oracles: full SVD of W·M, and W·M^{1/2} from an eigendecomposition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity_lora.init import GroupSums, output_aware_init

SPEC = [("attn", 24, {"q": 24, "k": 8, "v": 3}), ("mlp", 40, {"down": 24})]  # group, d_in, {module: d_out}
ORDER = ["q", "k", "v", "down"]


def setup(seed: int = 0, n: int = 500):
    g = torch.Generator().manual_seed(seed)
    sums, raw, weights = {}, {}, {}
    for name, d, outs in SPEC:
        x = torch.randn(n, d, dtype=torch.float64, generator=g) * torch.arange(1, d + 1) ** -0.5 + 0.7
        raw[name] = x
        sums[name] = GroupSums(x.T @ x, x.sum(0), n, tuple(outs))
        for m, d_out in outs.items():
            weights[m] = torch.randn(d_out, d, generator=g)  # fp32, as models store them
    return sums, raw, weights


def sign_fixed(rows: np.ndarray) -> np.ndarray:
    return rows * np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])[:, None]


def oracle(raw, weights, avg_rank: int, rho: float, variant: str, damping: float = 0.01):
    scores, rows = {}, {}
    for name, d, outs in SPEC:
        x = raw[name].numpy()
        m = x.T @ x / len(x)
        if variant == "whitened":
            damped = m + damping * np.trace(m) / d * np.eye(d)
            values, vectors = np.linalg.eigh(damped)
            root, inv_root = (vectors * values ** 0.5) @ vectors.T, (vectors * values ** -0.5) @ vectors.T
        for module in outs:
            w = weights[module].double().numpy()
            prod = w @ (m if variant == "gradient" else root)
            _, sigma, vh = np.linalg.svd(prod)
            k = min(round(rho * avg_rank), *w.shape)
            directions = vh[:k] if variant == "gradient" else (inv_root @ vh[:k].T).T
            directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
            scores[module] = sigma[:k] ** 2 / (sigma ** 2).sum()
            rows[module] = sign_fixed(directions)
    entries = sorted((-scores[mod][i], ORDER.index(mod), i) for mod in ORDER for i in range(len(scores[mod])))
    ranks = dict.fromkeys(ORDER, 0)
    for _, index, _ in entries[: avg_rank * len(ORDER)]:
        ranks[ORDER[index]] += 1
    return ranks, scores, rows


@pytest.mark.parametrize("variant", ["gradient", "whitened"])
@pytest.mark.parametrize("avg_rank,rho", [(4, 2.0), (3, 4.0), (6, 1.0)])
def test_matches_oracle(variant, avg_rank, rho):
    sums, raw, weights = setup(seed=avg_rank)
    ranks, scores, rows = oracle(raw, weights, avg_rank, rho, variant)
    got = output_aware_init(weights, sums, avg_rank, rho, variant=variant)
    assert got.method == f"output-aware-{variant}"
    assert got.ranks == ranks and got.budget == avg_rank * 4
    for m in ORDER:
        np.testing.assert_allclose(got.scores[m].numpy(), scores[m], rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(got.components[m].numpy(), rows[m][: ranks[m]], atol=1e-7)
        assert got.components[m].shape[1] == weights[m].shape[1]


def test_caps_follow_the_matrix_size_and_rows_are_unit_norm():
    sums, _, weights = setup()
    got = output_aware_init(weights, sums, 4, 4.0)
    assert len(got.scores["v"]) == 3 and len(got.scores["k"]) == 8 and len(got.scores["q"]) == 16
    for m in ORDER:
        a = got.components[m]
        assert torch.allclose(a @ a.T, torch.eye(len(a), dtype=torch.float64), atol=1e-10)  # orthonormal rows
    white = output_aware_init(weights, sums, 4, 4.0, variant="whitened")
    for m in ORDER:
        assert torch.allclose(white.components[m].norm(dim=1), torch.ones(white.ranks[m], dtype=torch.float64))


def test_one_decomposition_per_module_deterministic_bytes():
    sums, _, weights = setup(seed=5)
    a = output_aware_init(weights, sums, 4)
    b = output_aware_init(weights, sums, 4)
    assert a.decompositions == 4 and a.ranks == b.ranks
    assert all(torch.equal(a.components[m], b.components[m]) for m in ORDER)


def test_whitened_rows_give_the_best_output_reconstruction():
    """A x with the whitened rows spans the best rank-r approximation of W x in output energy (undamped limit)."""
    sums, raw, weights = setup(seed=6)
    got = output_aware_init(weights, sums, 4, 2.0, variant="whitened", damping=1e-9)
    x, w = raw["attn"], weights["q"].double()
    a = got.components["q"]
    features = x @ a.T  # (n, r)
    coef = torch.linalg.lstsq(features, x @ w.T).solution  # the best B for this A
    err_ours = (x @ w.T - features @ coef).square().sum()
    u, s, vh = torch.linalg.svd(x @ w.T, full_matrices=False)  # truncated SVD of the outputs: the optimum
    err_best = s[len(a):].square().sum()
    assert float(err_ours) == pytest.approx(float(err_best), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "sqrt"}, "unknown output-aware variant"),
    ({"avg_rank": 0}, "positive integer"),
    ({"rho": 0.5}, ">= 1.0"),
    ({"damping": 0.0}, "damping must be positive"),
])
def test_bad_settings_are_named(kwargs, match):
    sums, _, weights = setup()
    args = {"avg_rank": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        output_aware_init(weights, sums, args.pop("avg_rank"), **args)


def test_bad_weights_are_named():
    sums, _, weights = setup()
    with pytest.raises(ValueError, match="no weight for 1 modules"):
        output_aware_init({k: v for k, v in weights.items() if k != "q"}, sums, 4)
    with pytest.raises(ValueError, match="transpose Conv1D"):
        output_aware_init({**weights, "k": weights["k"].T}, sums, 4)
