"""fp64 oracles, input makers, tolerance checks and the backend lookup (op_for) shared by every backend's op tests.

The oracles are written independently of ``reference.py`` (the reference is
one of the things tested against them): plain fp64 products, and for
``diag_stats`` the explicit repeated diagonal instead of the closed form.
GPU tests import these: ``from oracles import ...`` (tests/ is on sys.path
under pytest's default rootdir-relative import mode).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from sensitivity_lora import ops

# fp32 accumulation of inputs that are exact in fp32 (fp32, bf16, fp16): the
# bound of the issue ("fp32 results within 1e-5 relative"). Errors are
# measured against the Cauchy-Schwarz scale of each entry (see below), so the
# bound holds for entries that cancel too.
ACCUMULATION_RTOL = 1e-5
# fp64 results that come from fp64 arithmetic (diag_stats, Cholesky of fp64 H).
FP64_RTOL = 1e-10
FP32_FACTOR_RTOL = 2e-4  # Cholesky of an fp32 H (condition number ~10² in these tests)


def activation(n: int, d: int, dtype: torch.dtype, seed: int, layout: str = "contiguous") -> torch.Tensor:
    """A (n, d) activation with feature scales spread over 3 decades and a few huge features
    ("massive activations"), in one of the layouts the ops must accept:
    ``contiguous``, ``row-strided`` (a column slice of a wider tensor), ``transposed``."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(d, generator=g, dtype=torch.float64) * 1.2)
    if d >= 8:
        scale[torch.randperm(d, generator=g)[:2]] *= 100.0
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.3 * scale
    if layout == "contiguous":
        return x.to(dtype)
    if layout == "row-strided":
        wide = torch.zeros(n, d + 5, dtype=dtype)
        wide[:, 2 : 2 + d] = x.to(dtype)
        return wide[:, 2 : 2 + d]
    if layout == "transposed":
        return x.to(dtype).T.contiguous().T
    raise ValueError(f"unknown layout {layout!r}")


def token_mask(n: int, kind: str, seed: int) -> torch.Tensor | None:
    """``none`` (no mask), ``random`` (about 70 % kept), ``all-masked`` or ``none-masked``."""
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.7
    if kind == "all-masked":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "none-masked":
        return torch.ones(n, dtype=torch.bool)
    raise ValueError(f"unknown mask kind {kind!r}")


def _kept(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x64 = x.double()
    return x64 if mask is None else x64[mask.bool()]


def oracle_sumsq(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ x², Σ x) per feature over the kept tokens, in fp64."""
    k = _kept(x, mask)
    return (k * k).sum(0), k.sum(0)


def oracle_xtx(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ x xᵀ over the kept tokens, in fp64."""
    k = _kept(x, mask)
    return k.T @ k


def oracle_diag_stats(diag: torch.Tensor, d_out: int, k: int, alpha: float) -> tuple[float, float, int]:
    """Trace, top-k mean and effective rank from the explicit repeated diagonal (small sizes only)."""
    lam = torch.sort(diag.double().flatten().repeat(d_out), descending=True).values
    total = float(lam.sum())
    topk = float(lam[:k].sum()) / k
    if total <= 0.0:
        return d_out * float(diag.double().sum()), topk, 0
    cum = torch.cumsum(lam, 0)
    eff = int(torch.nonzero(cum >= alpha * total * (1 - 1e-12))[0]) + 1
    return total, topk, eff


def floored(H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """H (fp64) with dead features' diagonal set to the floor mean(diag⁺) (1 if 0), and that floor."""
    A = H.double().clone()
    diag = A.diagonal()
    mean = float(diag.clamp_min(0).mean()) if A.numel() else 0.0
    floor = mean if mean > 0 else 1.0
    diag[diag <= 0] = floor
    return A, floor


def spd(n: int, seed: int, dtype: torch.dtype = torch.float64, cond: float = 100.0) -> torch.Tensor:
    """A symmetric positive definite matrix with eigenvalues spread over [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return ((q * eig) @ q.T).to(dtype)


def with_eigenvalues(n: int, seed: int, eig: torch.Tensor) -> torch.Tensor:
    """A symmetric fp64 matrix with the given eigenvalues (e.g. some negative: indefinite)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * eig.double()) @ q.T


# --- comparisons -------------------------------------------------------------------------------

def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, rtol: float,
                      what: str) -> None:
    """|actual − expected| ≤ rtol · scale elementwise (scale ≥ 0, e.g. Σx² for sums of squares)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    bound = rtol * scale + 1e-300
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.3g}× the bound rtol={rtol:g}"


def assert_gram_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, upper_only: bool = True) -> None:
    """Entries of a Gram matrix within rtol·sqrt(G_ii G_jj) (Cauchy-Schwarz bound of |G_ij|)."""
    d = expected.shape[0]
    dg = expected.diagonal().clamp_min(0)
    scale = torch.sqrt(dg[:, None] * dg[None, :])
    keep = torch.ones(d, d, dtype=torch.bool).triu() if upper_only else torch.ones(d, d, dtype=torch.bool)
    assert_sums_close(actual.double()[keep], expected[keep], scale[keep], rtol, "XᵀX (upper triangle)")


def assert_factor_close(L: torch.Tensor, A: torch.Tensor, rtol: float) -> None:
    """L is lower triangular and L Lᵀ reproduces A (normwise relative)."""
    L64 = L.double()
    assert torch.equal(L64, torch.tril(L64)), "factor is not lower triangular"
    assert bool((L64.diagonal() > 0).all()), "factor has a non-positive diagonal"
    err = torch.linalg.matrix_norm(L64 @ L64.T - A) / torch.linalg.matrix_norm(A)
    assert float(err) <= rtol, f"‖L Lᵀ − A‖/‖A‖ = {float(err):.3g} > {rtol:g}"


# The activation dtypes every accumulation op takes.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def op_for(name: str, backend: str):
    """The backend's implementation, or a skip naming why it is unavailable (never a substitute)."""
    if not ops.available(name, backend):
        pytest.skip(f"{backend} backend unavailable: {ops.unavailable_reason(name, backend)}")
    return ops.get_op(name, "cpu", backend)


def case_seed(*parts) -> int:
    """A seed per test case: fresh inputs for every case, reproducible across runs."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def captured_inputs(model, batches, names) -> dict[str, torch.Tensor]:
    """Each module's non-padding inputs in fp64, captured plainly by forward pre-hooks (independent of the package)."""
    mods, seen, mask = dict(model.named_modules()), {n: [] for n in names}, {}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].double()[mask["m"]]))
               for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                mask["m"] = b["attention_mask"].bool()
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}
