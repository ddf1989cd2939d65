"""The generator: one small attention network that writes P, Λ and Q for every target module.

A d_out × r matrix is too big to come out of a small network in one piece, so it is
generated in row chunks (the chunked hypernetworks of von Oswald et al., 2020): every
module is a short sequence of tokens, one per ``chunk_size`` rows of P, one per
``chunk_size`` columns of Q and one for Λ. A token's input is the sum of embeddings of
what it is (its module's layer index and type, its role P/Q/Λ, its chunk position), a
small learned code of its own, and (optionally) statistics of the frozen weight rows or
columns it covers. Self-attention runs across the tokens of one module, so the chunks of
P and Q and the singular values are written together; shared linear heads then expand
each token to its ``chunk_size × r`` block of P or Q, or to the r values of Λ.
Every parameter is shared across modules except the codes (``code_size`` numbers per
token, about (d_in + d_out) · code_size / chunk_size per module against LoRA's
(d_in + d_out) · r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import HyperAdaLoraConfig

ROLE_P, ROLE_Q, ROLE_LAMBDA = 0, 1, 2
N_STATS = 3


@dataclass(frozen=True)
class ModuleSpec:
    """One target module as the generator sees it."""

    name: str
    layer: int  # block index; the number of blocks for a module outside them
    kind: int  # index of its type (``self_attn.q_proj`` ...) among the targets' types
    d_in: int
    d_out: int


def weight_statistics(weight: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk features of a (d_out, d_in) weight: for row chunks (P's tokens) and column chunks (Q's).

    Each row holds log(mean norm in the chunk / mean norm of the module), the chunk's norm spread
    relative to that mean, and the module's log RMS: scale-free, so every module's tokens are alike in size.
    """
    w = weight.detach().float()
    rms = w.pow(2).mean().sqrt().clamp_min(1e-12)

    def per_chunk(norms: torch.Tensor) -> torch.Tensor:
        pad = (-norms.numel()) % chunk  # the last chunk may be short: weight its entries by a 0/1 mask
        values = torch.cat([norms, norms.new_zeros(pad)]).view(-1, chunk)
        present = torch.cat([torch.ones_like(norms), norms.new_zeros(pad)]).view(-1, chunk)
        count = present.sum(dim=1)
        chunk_mean = values.sum(dim=1) / count
        spread = (((values - chunk_mean[:, None]) ** 2 * present).sum(dim=1) / count).sqrt()
        mean = norms.mean().clamp_min(1e-12)
        return torch.stack([(chunk_mean.clamp_min(1e-12) / mean).log(), spread / mean,
                            rms.log().expand_as(count)], dim=1)

    return per_chunk(w.norm(dim=1)), per_chunk(w.norm(dim=0))


class HyperNetwork(nn.Module):
    """Generates ``{module: (P, Λ, Q)}`` with P (d_out × r), Λ (r), Q (r × d_in), r = ``config.init_rank``."""

    def __init__(self, specs: list[ModuleSpec], config: HyperAdaLoraConfig,
                 stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()
        if not specs:
            raise ValueError("the hypernetwork needs at least one target module")
        self.specs = list(specs)
        self.rank, self.chunk = int(config.init_rank), int(config.chunk_size)
        h, c, r = config.hidden_size, self.chunk, self.rank
        counts = [(math.ceil(s.d_out / c), math.ceil(s.d_in / c)) for s in specs]
        self.counts = counts
        length = max(p + q + 1 for p, q in counts)
        n_tokens = sum(p + q + 1 for p, q in counts)
        # the token grid: one padded row per module; an index into the codes, a role, a position
        code_index = torch.zeros(len(specs), length, dtype=torch.long)
        role = torch.full((len(specs), length), ROLE_LAMBDA, dtype=torch.long)
        position = torch.zeros(len(specs), length, dtype=torch.long)
        padding = torch.ones(len(specs), length, dtype=torch.bool)
        token_stats = torch.zeros(len(specs), length, N_STATS)
        offset = 0
        for m, (spec, (n_p, n_q)) in enumerate(zip(specs, counts)):
            n = n_p + n_q + 1
            code_index[m, :n] = torch.arange(offset, offset + n)
            role[m, :n_p], role[m, n_p:n_p + n_q] = ROLE_P, ROLE_Q
            position[m, :n_p], position[m, n_p:n_p + n_q] = torch.arange(n_p), torch.arange(n_q)
            padding[m, :n] = False
            if stats is not None:
                rows, cols = stats[spec.name]
                token_stats[m, :n_p], token_stats[m, n_p:n_p + n_q] = rows, cols
                token_stats[m, n_p + n_q, 2] = rows[0, 2]  # Λ's token knows the module's scale
            offset += n
        for name, value in (("code_index", code_index), ("role", role), ("position", position),
                            ("padding", padding), ("token_stats", token_stats),
                            ("layer", torch.tensor([s.layer for s in specs])),
                            ("kind", torch.tensor([s.kind for s in specs]))):
            self.register_buffer(name, value, persistent=False)
        self.use_stats = stats is not None
        self.codes = nn.Parameter(torch.randn(n_tokens, config.code_size))
        self.code_proj = nn.Linear(config.code_size, h)
        self.role_emb = nn.Embedding(3, h)
        self.pos_emb = nn.Embedding(max(max(p, q) for p, q in counts), h)
        self.layer_emb = nn.Embedding(max(s.layer for s in specs) + 1, h)
        self.kind_emb = nn.Embedding(max(s.kind for s in specs) + 1, h)
        self.stat_proj = nn.Linear(N_STATS, h) if self.use_stats else None
        block = nn.TransformerEncoderLayer(h, config.num_heads, dim_feedforward=2 * h, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.p_head, self.q_head, self.lambda_head = nn.Linear(h, c * r), nn.Linear(h, c * r), nn.Linear(h, r)
        with torch.no_grad():  # P, Q start at AdaLoRA's N(0, init_std²) entries; Λ = 0, so ΔW = 0 at the start
            for head in (self.p_head, self.q_head):
                head.weight.normal_(0.0, config.init_std / math.sqrt(h))
                head.bias.zero_()
            self.lambda_head.weight.zero_()
            self.lambda_head.bias.zero_()

    def tokens(self) -> torch.Tensor:
        """The encoded tokens, (modules, length, hidden)."""
        x = (self.code_proj(self.codes[self.code_index]) + self.role_emb(self.role) + self.pos_emb(self.position)
             + (self.layer_emb(self.layer) + self.kind_emb(self.kind))[:, None, :])
        if self.stat_proj is not None:
            x = x + self.stat_proj(self.token_stats)
        return self.norm(self.encoder(x, src_key_padding_mask=self.padding))

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        z = self.tokens()[~self.padding]  # the real tokens, module by module: P chunks, Q chunks, Λ
        # heads on the tokens of their role only, one split per role (a slice per module would make
        # the backward pass write a full-size zero gradient per module)
        n_p, n_q = [p for p, _ in self.counts], [q for _, q in self.counts]
        p_all = self.p_head(z[self.role[~self.padding] == ROLE_P]).reshape(-1, self.rank)
        q_all = self.q_head(z[self.role[~self.padding] == ROLE_Q]).reshape(-1, self.rank)
        lam_all = self.lambda_head(z[self.role[~self.padding] == ROLE_LAMBDA])
        ps = p_all.split([n * self.chunk for n in n_p])
        qs = q_all.split([n * self.chunk for n in n_q])
        return {spec.name: (p[: spec.d_out], lam, q[: spec.d_in].T)
                for spec, p, lam, q in zip(self.specs, ps, lam_all.unbind(0), qs)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_generated(self) -> int:
        """How many numbers it writes: what AdaLoRA would train directly (P, Λ, Q of every module)."""
        return sum(self.rank * (s.d_in + s.d_out + 1) for s in self.specs)
