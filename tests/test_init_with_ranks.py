"""Covariance initialisation for given ranks (e.g. Sensitivity-LoRA's): against a dense fp64 oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity_lora.init import GroupSums, covariance_init, pca


def groups(seed: int = 0, n: int = 400):
    g = torch.Generator().manual_seed(seed)
    out, raw = {}, {}
    for name, d, members in [("attn", 32, ("q", "k", "v")), ("mlp", 48, ("down",))]:
        x = torch.randn(n, d, dtype=torch.float64, generator=g) * torch.arange(1, d + 1) ** -0.6 - 1.5
        raw[name] = x
        out[name] = GroupSums(x.T @ x, x.sum(0), n, members)
    return out, raw


def oracle_rows(x: torch.Tensor, k: int) -> np.ndarray:
    values, vectors = np.linalg.eigh(np.cov(x.numpy(), rowvar=False))
    rows = vectors[:, ::-1][:, :k].T
    return rows * np.sign(rows[np.arange(k), np.abs(rows).argmax(axis=1)])[:, None]


def test_rows_are_top_centred_covariance_eigenvectors():
    sums, raw = groups()
    ranks = {"q": 3, "k": 0, "v": 7, "down": 5}
    result = covariance_init(sums, ranks)
    assert result.ranks == ranks and result.budget == 15 and result.method == "covariance"
    for m, group in [("q", "attn"), ("v", "attn"), ("down", "mlp")]:
        np.testing.assert_allclose(result.components[m].numpy(), oracle_rows(raw[group], ranks[m]), atol=1e-9)
        assert torch.allclose(result.components[m].norm(dim=1), torch.ones(ranks[m], dtype=torch.float64))
    assert result.components["k"].shape == (0, 32)
    # members share the group's decomposition: q's rows are a prefix of v's
    assert torch.equal(result.components["q"], result.components["v"][:3])


def test_one_decomposition_per_group_for_its_largest_rank(monkeypatch):
    calls = []
    real = pca.top_eigenpairs_many
    monkeypatch.setattr(pca, "top_eigenpairs_many",
                        lambda ms, ks, method="auto", **kw: calls.extend(ks) or real(ms, ks, method))
    sums, _ = groups()
    result = covariance_init(sums, {"q": 2, "k": 6, "v": 1, "down": 0})
    assert calls == [6] and result.decompositions == 1  # the all-zero group needs none


def test_ranks_must_cover_the_members():
    sums, _ = groups()
    with pytest.raises(ValueError, match="missing"):
        covariance_init(sums, {"q": 1})
    with pytest.raises(ValueError, match="non-negative"):
        covariance_init(sums, {"q": -1, "k": 1, "v": 1, "down": 1})
    with pytest.raises(ValueError, match="ask for fewer"):
        covariance_init(sums, {"q": 40, "k": 1, "v": 1, "down": 1})
