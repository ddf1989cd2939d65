"""Centred covariance and second moment from raw sums, against torch.cov / numpy on the tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity_lora.init import centred_covariance, default_gain_rows, second_moment


def tokens(n: int = 700, d: int = 24, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a large common mean (like massive activations) makes S − nμμᵀ a difference of large numbers
    return (torch.randn(n, d, generator=g) * torch.linspace(2.0, 0.05, d) + 40.0).to(dtype)


def sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x64 = x.double()
    return x64.T @ x64, x64.sum(0), x.shape[0]


def test_centred_covariance_matches_numpy_cov():
    x = tokens()
    cov = centred_covariance(*sums(x))
    assert cov.dtype == torch.float64 and torch.equal(cov, cov.T)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-9)


def test_second_moment_is_sum_over_count():
    x = tokens(dtype=torch.bfloat16)
    s, _, n = sums(x)
    m = second_moment(s, n)
    assert m.dtype == torch.float64
    np.testing.assert_allclose(m.numpy(), (x.double().T @ x.double() / n).numpy(), rtol=1e-12)


def test_accepts_integer_like_counts_and_fp32_sums():
    x = tokens(n=50, d=4)
    s, t, n = sums(x)
    a = centred_covariance(s.float(), t.float(), np.int64(n))
    b = centred_covariance(s, t, n)
    assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("args,match", [
    ((torch.eye(3), None, 10), "needs Σx"),
    ((torch.eye(3), torch.zeros(4), 10), r"\(3,\) tensor"),
    ((torch.eye(3), torch.zeros(3), 1), "at least 2 tokens"),
    ((torch.eye(3), torch.zeros(3), True), "integer"),
    ((None, torch.zeros(3), 10), "hessian='full'"),
    ((torch.zeros(3, 4), torch.zeros(3), 10), "square"),
])
def test_bad_sums_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        centred_covariance(*args)


def test_second_moment_needs_tokens():
    with pytest.raises(ValueError, match="no tokens"):
        second_moment(torch.eye(2), 0)


def test_default_gain_rows_by_hand():
    xtx = torch.diag(torch.tensor([8.0, 2.0]))  # S over n = 2 tokens: M = diag(4, 1), tr(M)/(3d) = 5/6
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    out = default_gain_rows(rows, xtx, 2)
    # row 1: a M aᵀ = 4 → scale √(5/6 / 4); row 2: 4 → the same; the zero row stays zero
    expected = torch.tensor([[(5 / 24) ** 0.5, 0.0], [0.0, 2 * (5 / 24) ** 0.5], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    assert out.dtype == rows.dtype
    with pytest.raises(ValueError, match=r"rows must be \(k, 2\)"):
        default_gain_rows(torch.ones(1, 3), xtx, 2)


@pytest.mark.parametrize("d", [257, 299, 300, 576])
def test_centred_covariance_is_exactly_symmetric_at_any_width(d):
    """Vectorised and scalar tails must round (i, j) and (j, i) alike (a fused multiply-add in one of them
    would not): widths off the SIMD width included."""
    x = torch.randn(400, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d)) + 3.0
    s_mat = x.T @ x
    s_mat = (s_mat + s_mat.T) * 0.5
    cov = centred_covariance(s_mat, x.sum(0), 400)
    assert torch.equal(cov, cov.T)
    assert torch.allclose(cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)), rtol=1e-10, atol=1e-12)
