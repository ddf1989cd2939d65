"""The module wrapper: a frozen linear layer plus the generated update P diag(Λ ⊙ mask) Q."""
from __future__ import annotations

import torch
from torch import nn


class HyperLoraLinear(nn.Module):
    """``base_layer(x) + dropout(x) Qᵀ diag(Λ ⊙ mask) Pᵀ · scale``, with P, Λ, Q set from outside.

    The layer owns nothing trainable: :class:`~.model.HyperAdaLoraModel` generates P, Λ, Q
    once per forward pass of the whole model and hands them to :meth:`set_update` (so every
    layer's tensors come from one run of the hypernetwork, and their gradients flow back into
    it). ``mask`` is the triplets the allocator keeps; a buffer, so it is saved with the model.
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("mask", torch.ones(rank))
        self._update: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def set_update(self, *update: torch.Tensor | None) -> None:
        """The generated P (d_out × r), masked Λ (r) and Q (r × d_in) the next forward uses (None: none)."""
        self._update = None if update == (None,) else update

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._update is None:
            raise RuntimeError("this HyperLoraLinear has no generated update: call the model through its "
                               "HyperAdaLoraModel (its forward hook runs the hypernetwork first)")
        p, lam, q = self._update
        if q.device != x.device:  # a model spread over devices: the generator lives on one of them
            p, lam, q = p.to(x.device), lam.to(x.device), q.to(x.device)
        h = self.dropout(x).to(q.dtype) @ q.T
        return result + ((h * (lam * self.scale)) @ p.T).to(result.dtype)

    def rank(self) -> int:
        return int(self.mask.sum().item())

    def extra_repr(self) -> str:
        return f"rank={self.rank()}/{self.mask.numel()}, scale={self.scale:g}"
