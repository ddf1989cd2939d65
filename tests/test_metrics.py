"""Metrics (docs/method.md §3): closed forms against brute force on the explicitly repeated diagonal,
hand examples for each scope, and the errors for out-of-range settings."""
from __future__ import annotations

import math
import os
import random
from fractions import Fraction

import pytest
import torch

from sensitivity_lora import ops
from sensitivity_lora.settings import SCOPES, AllocationSettings
from sensitivity_lora.scoring.metrics import ModuleMetrics, module_metrics


def _backends() -> list:
    """Every diag_stats backend that can run here; the others are listed as skips with the reason."""
    params = [pytest.param("reference", "cpu", id="reference")]
    reason = ops.unavailable_reason("diag_stats", "cpu")
    params.append(pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(bool(reason), reason=reason or "")))
    cuda = torch.cuda.is_available()
    why = "no CUDA device" if not cuda else ops.unavailable_reason("diag_stats", "cuda")
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(bool(why), reason=why or "")))
    # Triton runs on CUDA tensors, or on CPU tensors under its interpreter (TRITON_INTERPRET=1).
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    why = ("no CUDA device and TRITON_INTERPRET is not 1" if not (cuda or interpret)
           else ops.unavailable_reason("diag_stats", "triton"))
    params.append(pytest.param("triton", "cuda" if cuda else "cpu", id="triton",
                               marks=pytest.mark.skipif(bool(why), reason=why or "")))
    return params


def brute_force(values: list[float], d_out: int, k: int, alpha: float) -> tuple[float, float, int]:
    """Trace, top-k mean and effective rank of ``values`` repeated ``d_out`` times, materialised.

    Sums are exact (fsum; the effective rank in rational arithmetic on the binary values), so the
    oracle itself has no rounding that could move the effective rank by one.
    """
    lam = sorted(values * d_out, reverse=True)
    total = math.fsum(lam)
    topk = math.fsum(lam[:k]) / k
    exact = [Fraction(v) for v in lam]
    target, cum = Fraction(alpha) * sum(exact), Fraction(0)
    for j, v in enumerate(exact, start=1):
        cum += v
        if cum >= target:
            return total, topk, j
    raise AssertionError("unreachable for alpha <= 1")


def exact_eff_rank(values: list[int], d_out: int, alpha: Fraction) -> int:
    """Effective rank in exact rational arithmetic (integers in, no rounding anywhere)."""
    lam = sorted(values * d_out, reverse=True)
    total, cum = sum(lam), 0
    for j, v in enumerate(lam, start=1):
        cum += v
        if cum >= alpha * total:
            return j
    raise AssertionError("unreachable")


@pytest.mark.parametrize("backend, device", _backends())
def test_closed_form_matches_brute_force_on_random_sizes(backend, device):
    rng = random.Random(1234)
    interpreted = backend == "triton" and device == "cpu"  # the Triton interpreter is slow: fewer cases
    for _ in range(40 if interpreted else 200):
        d_in, d_out = rng.randint(1, 40), rng.randint(1, 12)
        m = d_in * d_out
        values = [rng.choice([0.0, rng.random(), rng.random() * 100.0, 1.0]) for _ in range(d_in)]
        if not any(values):
            values[0] = 0.5
        k = rng.randint(1, m)
        alpha = rng.choice([rng.random() * 0.999 + 0.001, 1.0, 0.85])
        got = module_metrics(torch.tensor(values, dtype=torch.float64, device=device), d_out, "g",
                             AllocationSettings(scope="matrix", topk=k, energy=alpha), backend=backend)
        trace, topk, eff = brute_force(values, d_out, k, alpha)
        assert got.trace == pytest.approx(trace, rel=1e-12)
        assert got.topk == pytest.approx(topk, rel=1e-12)
        assert got.eff_rank == eff, (values, d_out, k, alpha)
        assert (got.d_in, got.d_out) == (d_in, d_out)


@pytest.mark.parametrize("backend, device", _backends())
def test_effective_rank_at_exact_fraction_boundaries(backend, device):
    # Integer diagonals whose matrix-level total is a power of two, so every cumulative share C_j / total is
    # exactly representable; α set to each share must give the first j that reaches it, neither j+1 nor j-1.
    rng = random.Random(7)
    for _ in range(10 if backend == "triton" and device == "cpu" else 40):
        d_out = rng.choice([1, 2, 4, 8])
        head = [rng.randint(0, 9) for _ in range(rng.randint(0, 10))]
        power = 1 << max(1, (sum(head) + 1).bit_length())
        values = head + [power - sum(head)]  # row total is a power of two
        rng.shuffle(values)
        lam = sorted(values * d_out, reverse=True)
        total = sum(lam)
        for j in range(1, len(lam) + 1):
            alpha = Fraction(sum(lam[:j]), total)
            if alpha == 0:
                continue
            assert Fraction(float(alpha)) == alpha  # the test's premise: α is exact in binary
            got = module_metrics(torch.tensor(values, dtype=torch.float64, device=device), d_out, "g",
                                 AllocationSettings(scope="matrix", topk=1, energy=float(alpha)), backend=backend)
            assert got.eff_rank == exact_eff_rank(values, d_out, alpha), (values, d_out, j)


def test_matrix_scope_hand_example():
    # diag(H_row) = [1, 3, 2], d_out = 2. Sorted ℓ = [3, 2, 1], C = [3, 5, 6], T = 6, m = 6.
    # S_g = d_out·T = 12.
    # k = floor(6/2) = 3 = q·d_out + s with q = 1, s = 1: S_t = (2·C_1 + 1·ℓ_2)/3 = (6 + 2)/3 = 8/3.
    # α = 0.85: αT = 5.1, i* = 3 (C_2 = 5 < 5.1 ≤ C_3 = 6): S_e = 2·(3−1) + ceil(2·(5.1 − 5)/1) = 4 + 1 = 5.
    # (Materialised: [3,3,2,2,1,1], running sums 3,6,8,10,11,12; 0.85·12 = 10.2 is first reached at j = 5.)
    got = module_metrics(torch.tensor([1.0, 3.0, 2.0]), 2, "blk0.attn_in")
    assert got == ModuleMetrics(trace=12.0, topk=pytest.approx(8 / 3), eff_rank=5.0, d_in=3, d_out=2,
                                group="blk0.attn_in")


def test_matrix_scope_hand_example_with_exact_alpha():
    # ℓ = [4, 2, 1, 1], d_out = 2: materialised [4,4,2,2,1,1,1,1], running sums 4,8,10,12,13,14,15,16.
    # α = 0.625 → target 10, reached exactly at j = 3 (closed form: αT = 5, i* = 2, 2·1 + ceil(2·(5−4)/2) = 3).
    # α = 0.75 → 12 at j = 4; α = 0.8125 → 13 at j = 5; α = 1 → 16 at j = 8.
    diag = torch.tensor([1.0, 4.0, 1.0, 2.0])
    for alpha, expected in [(0.625, 3), (0.75, 4), (0.8125, 5), (1.0, 8), (0.25, 1)]:
        assert module_metrics(diag, 2, "g", AllocationSettings(energy=alpha)).eff_rank == expected


def test_row_scope_ignores_d_out():
    # Row scope on diag [1, 3, 2]: m = 3, k = floor(3/2) = 1 → S_t = 3; S_g = T = 6;
    # αT = 5.1 → running sums 3, 5, 6 → S_e = 3.
    got = module_metrics(torch.tensor([1.0, 3.0, 2.0]), 2, "g", AllocationSettings(scope="row"))
    assert (got.trace, got.topk, got.eff_rank) == (6.0, 3.0, 3.0)
    assert got.d_out == 2  # the module's shape is kept even though the metric ignores it
    wide = module_metrics(torch.tensor([1.0, 3.0, 2.0]), 50, "g", AllocationSettings(scope="row"))
    assert (wide.trace, wide.topk, wide.eff_rank) == (got.trace, got.topk, got.eff_rank)


def test_eigen_scope_hand_example_and_clamping():
    # Eigenvalues [4, 1, 0, −1e−12] clamp to [4, 1, 0, 0]; d_out = 2 → [4,4,1,1,0,0,0,0], m = 8.
    # S_g = 10; k = 4: S_t = (4+4+1+1)/4 = 2.5; α = 0.85: 8.5 first reached at running sum 9, j = 3.
    diag = torch.tensor([2.0, 1.0, 1.0, 1.0])  # only its length matters here
    got = module_metrics(diag, 2, "g", AllocationSettings(hessian="full", scope="eigen"), eigvals=torch.tensor([4.0, 1.0, 0.0, -1e-12]))
    assert (got.trace, got.topk, got.eff_rank) == (10.0, 2.5, 3.0)


def test_eigen_scope_matches_brute_force_on_a_real_hessian():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    H = 2.0 / 64 * x.T @ x
    eig = torch.linalg.eigvalsh(H).flip(0).clamp_min(0.0)
    got = module_metrics(H.diagonal().clone(), 5, "g", AllocationSettings(hessian="full", scope="eigen", topk=0.25, energy=0.9), eigvals=eig)
    k = math.floor(0.25 * 60)
    trace, topk, eff = brute_force(eig.tolist(), 5, k, 0.9)
    assert got.trace == pytest.approx(trace, rel=1e-12)
    assert got.trace == pytest.approx(5 * float(H.trace()), rel=1e-10)  # Σ eigenvalues = trace
    assert got.topk == pytest.approx(topk, rel=1e-12)
    assert got.eff_rank == eff


def test_eigen_scope_without_eigenvalues_is_a_clear_error():
    with pytest.raises(ValueError, match="hessian='full'"):
        module_metrics(torch.ones(4), 2, "g", AllocationSettings(hessian="full", scope="eigen"))
    with pytest.raises(ValueError, match="eigvals has 3 entries"):
        module_metrics(torch.ones(4), 2, "g", AllocationSettings(hessian="full", scope="eigen"), eigvals=torch.ones(3))


def test_topk_fraction_and_absolute():
    diag = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # d_out = 3, m = 15
    # fraction 0.5 → k = floor(7.5) = 7: [5,5,5,4,4,4,3] → 30/7.
    assert module_metrics(diag, 3, "g").topk == pytest.approx(30 / 7)
    # fraction 0.2 → k = 3: [5,5,5] → 5.  fraction 1.0 → k = 15: mean of all = 45/15 = 3.
    assert module_metrics(diag, 3, "g", AllocationSettings(topk=0.2)).topk == 5.0
    assert module_metrics(diag, 3, "g", AllocationSettings(topk=1.0)).topk == 3.0
    # fraction 0.01 → floor(0.15) = 0, raised to k = 1: 5.
    assert module_metrics(diag, 3, "g", AllocationSettings(topk=0.01)).topk == 5.0
    # int 4 → [5,5,5,4] → 19/4; int 15 = m is allowed.
    assert module_metrics(diag, 3, "g", AllocationSettings(topk=4)).topk == 19 / 4
    assert module_metrics(diag, 3, "g", AllocationSettings(topk=15)).topk == 3.0


def test_topk_fraction_uses_the_written_decimal():
    # 0.29 · 100 is 28.999999999999996 in binary floating point; the user meant k = 29.
    assert AllocationSettings(topk=0.29).k_for(100) == 29
    assert AllocationSettings(topk=0.5).k_for(7) == 3


@pytest.mark.parametrize("changes, field", [
    ({"topk": 0}, "topk"),
    ({"topk": -3}, "topk"),
    ({"topk": 0.0}, "topk"),
    ({"topk": 1.5}, "topk"),
    ({"topk": float("nan")}, "topk"),
    ({"topk": True}, "topk"),
    ({"topk": "half"}, "topk"),
    ({"energy": 0.0}, "energy"),
    ({"energy": 1.01}, "energy"),
    ({"energy": -0.5}, "energy"),
    ({"energy": float("nan")}, "energy"),
    ({"scope": "column"}, "scope"),
    ({"scope": "eigen"}, "full Hessian"),
])
def test_out_of_range_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        AllocationSettings(**changes)
    with pytest.raises(ValueError, match=field):
        AllocationSettings().replace(**changes)


def test_absolute_topk_larger_than_m_is_an_error():
    with pytest.raises(ValueError, match="topk=9 exceeds the m=8"):
        module_metrics(torch.ones(4), 2, "g", AllocationSettings(topk=9))
    with pytest.raises(ValueError, match="topk=5 exceeds the m=4"):
        module_metrics(torch.ones(4), 2, "g", AllocationSettings(scope="row", topk=5))


@pytest.mark.parametrize("diag, d_out, message", [
    (torch.ones(2, 2), 2, "1-D"),
    (torch.ones(0), 2, "non-empty"),
    (torch.tensor([1.0, float("inf")]), 2, "non-finite"),
    (torch.tensor([1.0, -1.0]), 2, "negative"),
    (torch.tensor([1, 2]), 2, "floating"),
    (torch.ones(3), 0, "d_out"),
])
def test_bad_inputs_are_clear_errors(diag, d_out, message):
    with pytest.raises(ValueError, match=message):
        module_metrics(diag, d_out, "g")


def test_all_zero_diagonal_has_zero_metrics():
    got = module_metrics(torch.zeros(6), 4, "dead")
    assert (got.trace, got.topk, got.eff_rank) == (0.0, 0.0, 0.0)


def test_scopes_listed():
    assert SCOPES == ("matrix", "row", "eigen")


@pytest.mark.parametrize("backend, device", _backends())
def test_effective_rank_never_exceeds_m_at_alpha_one(backend, device):
    """Regression: at α = 1 rounding in the cumulative sum once pushed the count past d_out·d."""
    fn = ops.get_op("diag_stats", device, backend)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(300):  # about 3% of these overshot before the fix
        d = int(torch.randint(2, 400, (1,), generator=gen))
        d_out = int(torch.randint(1, 5, (1,), generator=gen))
        diag = (torch.rand(d, generator=gen, dtype=torch.float64) ** 8).to(device)  # many tiny entries
        eff = float(fn(diag, d_out, max(1, d_out * d // 2), 1.0)[2])
        assert 1 <= eff <= d_out * d
