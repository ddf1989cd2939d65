"""Per-input-group accumulators of activation statistics, and their finalisation.

One ``GroupStatistics`` per distinct layer input (an "input group": q/k/v of one
attention block, gate/up of one MLP block, ...). It keeps the raw sums in fp64
and the token count; the normalisation convention (docs/method.md §2) is applied only
when a Hessian is read, so every tool's convention can be served from the same
numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import CalibrationError, NotPositiveDefiniteError
from ..ops.reference import symmetrize_upper
from ..settings import HESSIAN_MODES

# factor(n_tokens, n_sequences) for H = factor · Σ x xᵀ
NORMALISATIONS = {
    "2/tokens": lambda tokens, seqs: 2.0 / tokens,  # this project's default (GPTQ/OBD with per-token mean)
    "2/sequences": lambda tokens, seqs: 2.0 / seqs,  # GPTQ's reference implementation
    "1/tokens": lambda tokens, seqs: 1.0 / tokens,  # AQLM, covariance initialisers
    "sum": lambda tokens, seqs: 1.0,  # the raw sum
}


def normalisation_factor(convention: str, n_tokens: int, n_sequences: int) -> float:
    if convention not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {convention!r}; choose from {', '.join(NORMALISATIONS)}")
    if n_tokens <= 0 or n_sequences <= 0:
        raise CalibrationError("no calibration tokens were seen; check the data and the attention mask")
    return NORMALISATIONS[convention](n_tokens, n_sequences)


@dataclass
class GroupStatistics:
    """Raw sums over the calibration tokens of one layer input."""

    name: str
    members: list[str]
    d_in: int
    mode: str = "diag"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    sumsq: torch.Tensor = field(init=False)  # Σ x² per feature
    sum: torch.Tensor = field(init=False)  # Σ x per feature (centring: covariance initialisers)
    xtx: torch.Tensor | None = field(init=False, default=None)
    n_tokens: int = 0
    n_sequences: int = 0

    def __post_init__(self) -> None:
        if self.mode not in HESSIAN_MODES:
            raise ValueError(f"unknown hessian mode {self.mode!r}; choose from {', '.join(HESSIAN_MODES)}")
        self.sumsq = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        self.sum = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        if self.mode == "full":
            self.xtx = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=self.device)
        self._symmetric = False

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, n_valid: int, n_sequences: int) -> None:
        """Accumulate a (tokens, d_in) activation; ``mask`` selects the tokens that count."""
        if self.xtx is not None:
            ops.get_op("accumulate_xtx", x.device, self.backend)(self.xtx, x, mask, None)
            self._symmetric = False
        # Σx² and Σx in one read of x (the sum-of-squares kernels fuse both)
        ops.get_op("accumulate_sumsq", x.device, self.backend)(self.sumsq, x, mask, self.sum)
        self.n_tokens += n_valid
        self.n_sequences += n_sequences

    def merge_(self, other: "GroupStatistics") -> None:
        """Add another shard's sums (same group, same mode)."""
        if other.d_in != self.d_in or other.mode != self.mode:
            raise ValueError(f"cannot merge statistics of {other.name!r} into {self.name!r}: shapes or modes differ")
        self.sumsq += other.sumsq.to(self.sumsq.device)
        self.sum += other.sum.to(self.sum.device)
        if self.xtx is not None:
            self.xtx = self.raw_xtx() + other.raw_xtx().to(self.sumsq.device)  # stays symmetric
        self.n_tokens += other.n_tokens
        self.n_sequences += other.n_sequences

    def check_finite(self) -> None:
        # Σxxᵀ through its diagonal only: |Σ x_i x_j| ≤ max(Σ x_i², Σ x_j²) (Cauchy–Schwarz), so an Inf
        # off the diagonal means one on it, and a NaN in x_i reaches Σ x_i²; reading all d² costs as much
        # as a batch's products at SmolLM2's widths
        if not torch.isfinite(self.sumsq).all() or not torch.isfinite(self.sum).all() or (
                self.xtx is not None and not torch.isfinite(self.xtx.diagonal()).all()):
            raise CalibrationError(
                f"non-finite activations (NaN/Inf) reached {', '.join(self.members)}; "
                "the model overflows on this data or dtype: try float32/bfloat16 instead of float16, "
                "or check the weights and inputs"
            )

    def raw_xtx(self) -> torch.Tensor:
        """The full symmetric Σ x xᵀ (fp64); mirrors the upper triangle once."""
        if self.xtx is None:
            raise ValueError(f"{self.name}: the full Hessian needs hessian='full' at calibration")
        if not self._symmetric:
            self.xtx = symmetrize_upper(self.xtx)
            self._symmetric = True
        return self.xtx

    def mean(self) -> torch.Tensor:
        """μ = Σx / n (fp64)."""
        if self.n_tokens <= 0:
            raise CalibrationError(f"{self.name}: no calibration tokens were seen")
        return self.sum / self.n_tokens

    def covariance(self) -> torch.Tensor:
        """The centred input covariance C = (Σxxᵀ − n·μμᵀ) / (n − 1) (fp64, symmetric; needs hessian='full')."""
        n = self.n_tokens
        if n < 2:
            raise CalibrationError(f"{self.name}: a covariance needs at least 2 tokens, got {n}")
        mu = self.mean()
        return (self.raw_xtx() - n * torch.outer(mu, mu)) / (n - 1)

    def hessian_diag(self, convention: str = "2/tokens") -> torch.Tensor:
        """diag(H_row) under ``convention`` (fp64)."""
        return self.sumsq * normalisation_factor(convention, self.n_tokens, self.n_sequences)

    def hessian(self, convention: str = "2/tokens") -> torch.Tensor:
        """The full H_row under ``convention`` (fp64, symmetric)."""
        return self.raw_xtx() * normalisation_factor(convention, self.n_tokens, self.n_sequences)

    def eigenvalues(self, convention: str = "2/tokens") -> torch.Tensor:
        """Eigenvalues of H_row, descending, clamped at 0 (rounding can make tiny ones negative)."""
        return torch.linalg.eigvalsh(self.hessian(convention)).flip(0).clamp_min(0.0)

    def cholesky(self, convention: str = "2/tokens", rel_damp: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float, int]:
        """Damped lower Cholesky factor of H_row, the damping used and the tries (GPTQ-style consumers)."""
        H = self.hessian(convention)
        try:
            return ops.get_op("cholesky_damped", H.device, self.backend)(H, rel_damp, max_tries, 10.0)
        except NotPositiveDefiniteError as exc:
            raise NotPositiveDefiniteError(f"Hessian of {', '.join(self.members)}: {exc}") from exc


@dataclass
class CalibrationStatistics:
    """Everything calibration measured: one entry per input group, and the module → group map."""

    groups: dict[str, GroupStatistics]
    module_group: dict[str, str]
    dims: dict[str, tuple[int, int]]  # module → (d_in, d_out)
    mode: str

    @property
    def n_tokens(self) -> int:
        return max((g.n_tokens for g in self.groups.values()), default=0)
