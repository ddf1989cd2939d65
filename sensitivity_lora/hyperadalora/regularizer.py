"""AdaLoRA's orthogonality regulariser, on the generated P and Q."""
from __future__ import annotations

from typing import Iterable

import torch


def orthogonality_penalty(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over every P and every Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (PEFT AdaLoRA's form: the norm,
    not its square).

    Computed on all r generated columns / rows, pruned or not, as AdaLoRA does: a pruned triplet
    that comes back while the budget still moves comes back orthogonal to the others.
    """
    total, count = None, 0
    for p, q in pairs:
        for gram in (p.T @ p, q @ q.T):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            term = torch.linalg.matrix_norm(gram - eye)
            total = term if total is None else total + term
            count += 1
    if total is None:
        raise ValueError("no generated P and Q to regularise")
    return total / count
