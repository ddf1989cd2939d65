"""Statistics: diag vs full, normalisation conventions, merging, damped Cholesky of a group."""
from __future__ import annotations

import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora.calibration.one_pass import calibrate
from sensitivity_lora.errors import NotPositiveDefiniteError, CalibrationError
from sensitivity_lora.calibration.statistics import GroupStatistics, normalisation_factor


def test_full_and_diag_agree_on_the_diagonal():
    model = tiny_llama()
    diag = calibrate(model, random_batches(2), hessian="diag", progress=False)
    full = calibrate(model, random_batches(2), hessian="full", progress=False)
    for g in diag.groups:
        torch.testing.assert_close(full.groups[g].raw_xtx().diagonal(), diag.groups[g].sumsq, rtol=1e-6, atol=1e-9)
        H = full.groups[g].hessian()
        torch.testing.assert_close(H, H.T, rtol=0, atol=0)


def _group(x: torch.Tensor, mode: str, mask=None) -> GroupStatistics:
    g = GroupStatistics("g", ["m"], x.shape[1], mode)
    n = int(mask.sum()) if mask is not None else x.shape[0]
    g.add(x, mask, n, 2)
    return g


def test_full_hessian_matches_fp64_oracle_and_conventions():
    x = torch.randn(50, 7)
    mask = torch.rand(50) > 0.3
    g = _group(x, "full", mask)
    xs = x[mask].double()
    n, raw = xs.shape[0], xs.T @ xs
    tol = 1e-6 * float(raw.abs().max())  # fp32 accumulation: error relative to the matrix scale
    torch.testing.assert_close(g.hessian("2/tokens"), 2.0 / n * raw, rtol=1e-6, atol=tol)
    torch.testing.assert_close(g.hessian("2/sequences"), 2.0 / 2 * raw, rtol=1e-6, atol=tol)
    torch.testing.assert_close(g.hessian("1/tokens"), raw / n, rtol=1e-6, atol=tol)
    torch.testing.assert_close(g.hessian_diag("sum"), (xs**2).sum(0), rtol=1e-6, atol=1e-9)
    ev = g.eigenvalues()
    assert torch.all(ev[:-1] >= ev[1:]) and torch.all(ev >= 0)
    torch.testing.assert_close(ev.sum(), g.hessian().trace(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="unknown normalisation"):
        g.hessian("2/batches")


@pytest.mark.parametrize("mode", ["diag", "full"])
def test_sum_mean_and_covariance_match_fp64_oracle(mode):
    x = torch.randn(60, 6) * 3 + torch.arange(6.0)  # a non-zero mean, so centring matters
    mask = torch.rand(60) > 0.25
    g = _group(x, mode, mask)
    xs = x[mask].double()
    n = xs.shape[0]
    torch.testing.assert_close(g.sum, xs.sum(0), rtol=1e-6, atol=1e-6 * float(xs.abs().sum(0).max()))
    torch.testing.assert_close(g.mean(), xs.mean(0), rtol=1e-6, atol=1e-6)
    if mode == "diag":
        with pytest.raises(ValueError, match="hessian='full'"):
            g.covariance()
        return
    centred = xs - xs.mean(0)
    expected = centred.T @ centred / (n - 1)
    torch.testing.assert_close(g.covariance(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    one = GroupStatistics("g", ["m"], 6, "full")
    one.add(x[:1], None, 1, 1)
    with pytest.raises(CalibrationError, match="at least 2 tokens"):
        one.covariance()


def test_merge_equals_one_pass():
    x = torch.randn(40, 5)
    whole = _group(x, "full")
    a, b = _group(x[:15], "full"), _group(x[15:], "full")
    a.merge_(b)
    torch.testing.assert_close(a.raw_xtx(), whole.raw_xtx(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.sum, whole.sum, rtol=1e-6, atol=1e-5)
    assert a.n_tokens == 40 and a.n_sequences == 4
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge_(_group(torch.randn(3, 4), "full"))


def test_cholesky_of_rank_deficient_group_is_damped_and_named():
    x = torch.randn(3, 6)  # 3 tokens, 6 features: rank ≤ 3
    g = _group(x, "full")
    L, damp, tries = g.cholesky()
    assert damp > 0 and tries >= 1
    H = g.hessian()
    torch.testing.assert_close(L @ L.T, H + damp * torch.eye(6, dtype=H.dtype), rtol=1e-8, atol=1e-8)
    g.xtx.fill_(float("nan"))
    with pytest.raises(NotPositiveDefiniteError, match="Hessian of m"):
        g.cholesky()


def test_no_tokens_and_diag_only_errors():
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        normalisation_factor("2/tokens", 0, 0)
    g = _group(torch.randn(4, 3), "diag")
    with pytest.raises(ValueError, match="hessian='full'"):
        g.hessian()
    with pytest.raises(ValueError, match="unknown hessian mode"):
        GroupStatistics("g", ["m"], 3, "block")
