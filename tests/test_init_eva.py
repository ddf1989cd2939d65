"""EVA from statistics on random data: against an independent fp64 reimplementation of PEFT's rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity_lora.init import GroupSums, alpha_pattern, eva_init, pca, to_eva_state_dict

# three input groups like one transformer block: q/k/v share an input, o alone, gate/up share one
SPEC = [("attn_in", 40, ("b.q", "b.k", "b.v")), ("attn_out", 40, ("b.o",)), ("mlp_in", 40, ("b.gate", "b.up")),
        ("mlp_mid", 64, ("b.down",))]
ORDER = ["b.q", "b.k", "b.v", "b.o", "b.gate", "b.up", "b.down"]


def raw_tokens(seed: int = 0, n: int = 600, decays=(0.4, 0.7, 1.0, 1.3)) -> dict[str, torch.Tensor]:
    """Tokens per group with different, decaying spectra (λ_i ∝ i^-2·decay) and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for index, (name, d, _) in enumerate(SPEC):
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
        scale = torch.arange(1, d + 1, dtype=torch.float64) ** -decays[index]
        out[name] = (torch.randn(n, d, dtype=torch.float64, generator=g) * scale) @ q.T + 3.0
    return out


def group_sums(xs: dict[str, torch.Tensor]) -> dict[str, GroupSums]:
    return {name: GroupSums(xs[name].T @ xs[name], xs[name].sum(0), xs[name].shape[0], members)
            for name, _, members in SPEC}


def reference(xs: dict[str, torch.Tensor], r: int, rho: float, rank_pattern=None):
    """PEFT's rule written out plainly: numpy eigh of np.cov, ratios over the trace, sort, count."""
    rank_pattern = rank_pattern or {}
    base = {m: rank_pattern.get(m, r) for m in ORDER}
    caps = {m: round(base[m] * rho) for m in ORDER}
    fits = {}
    for name, _, members in SPEC:
        top = max(caps[m] for m in members)
        for m in members:
            caps[m] = top
        values, vectors = np.linalg.eigh(np.cov(xs[name].numpy(), rowvar=False))
        values, rows = values[::-1], vectors[:, ::-1].T
        rows = rows * np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])[:, None]
        fits.update({m: (values / values.sum(), rows) for m in members})
    entries = sorted((-fits[m][0][i], ORDER.index(m), i) for m in ORDER for i in range(caps[m]))
    ranks = dict.fromkeys(ORDER, 0)
    for _, index, _ in entries[: sum(base.values())]:
        ranks[ORDER[index]] += 1
    return ranks, {m: fits[m][1][: ranks[m]] for m in ORDER}, fits


@pytest.mark.parametrize("r,rho", [(4, 2.0), (3, 1.5), (5, 1.5), (2, 1.0), (6, 3.0)])
def test_ranks_and_components_match_reference(r, rho):
    xs = raw_tokens(seed=r)
    ranks, rows, fits = reference(xs, r, rho)
    got = eva_init(group_sums(xs), r, rho, order=ORDER)
    assert got.ranks == ranks
    assert sum(got.ranks.values()) == got.budget == r * len(ORDER)
    for m in ORDER:
        assert got.components[m].shape == (ranks[m], 40 if m != "b.down" else 64)
        np.testing.assert_allclose(got.components[m].numpy(), rows[m], atol=1e-9)
        cap = round(r * rho)  # Python's round: 4.5 -> 4, 7.5 -> 8, as in PEFT
        np.testing.assert_allclose(got.scores[m].numpy(), fits[m][0][:cap], rtol=1e-9)


def test_members_share_ranks_spectrum_and_modules_can_get_rank_zero():
    xs = raw_tokens(seed=11, decays=(0.5, 0.0, 0.5, 0.5))  # a flat attention output among decaying inputs
    got = eva_init(group_sums(xs), 2, 4.0, order=ORDER)
    assert torch.equal(got.scores["b.q"], got.scores["b.v"])
    ranks, _, _ = reference(xs, 2, 4.0)
    assert got.ranks == ranks
    # every direction of the flat input explains less than the others' top ones: rank 0
    assert got.ranks["b.o"] == 0 and sum(got.ranks.values()) == 14
    assert got.components["b.o"].shape == (0, 40)


def test_rank_pattern_sets_caps_and_budget_group_takes_largest_cap():
    xs = raw_tokens(seed=2)
    pattern = {"b.k": 6, "b.down": 1}
    ranks, rows, _ = reference(xs, 3, 2.0, pattern)
    got = eva_init(group_sums(xs), 3, 2.0, rank_pattern=pattern, order=ORDER)
    assert got.ranks == ranks
    assert got.budget == 3 * 5 + 6 + 1
    assert len(got.scores["b.q"]) == len(got.scores["b.v"]) == 12  # the group's largest cap, round(6 * 2)
    assert len(got.scores["b.down"]) == 2


def test_ties_within_a_group_go_to_earlier_members():
    xs = raw_tokens(seed=4)
    got = eva_init(group_sums(xs), 4, 2.0, order=ORDER)
    for members in (("b.q", "b.k", "b.v"), ("b.gate", "b.up")):
        ranks = [got.ranks[m] for m in members]
        assert ranks == sorted(ranks, reverse=True) and ranks[0] - ranks[-1] <= 1
    # the reverse order moves the extra rank to the other end of the group
    flipped = eva_init(group_sums(xs), 4, 2.0, order=ORDER[::-1])
    assert sorted(flipped.ranks.values()) == sorted(got.ranks.values())


def test_one_decomposition_per_input_group(monkeypatch):
    calls = []
    real = pca.top_eigenpairs_many

    def counting(matrices, ks, method="auto", **kw):
        calls.extend((m.shape[0], k) for m, k in zip(matrices, ks))
        return real(matrices, ks, method, **kw)

    monkeypatch.setattr(pca, "top_eigenpairs_many", counting)
    got = eva_init(group_sums(raw_tokens()), 4, 2.0, order=ORDER)
    assert len(calls) == got.decompositions == len(SPEC)  # 4 groups for 7 modules
    assert calls == [(40, 8), (40, 8), (40, 8), (64, 8)]


def test_deterministic_bytes_and_token_order_independent():
    xs = raw_tokens(seed=5)
    a, b = eva_init(group_sums(xs), 4, 2.0, order=ORDER), eva_init(group_sums(xs), 4, 2.0, order=ORDER)
    assert a.ranks == b.ranks
    assert all(torch.equal(a.components[m], b.components[m]) for m in ORDER)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(9))
    shuffled = eva_init(group_sums({k: v[perm] for k, v in xs.items()}), 4, 2.0, order=ORDER)
    assert shuffled.ranks == a.ranks
    for m in ORDER:  # the sums differ in the last bits only; the sign convention keeps the rows comparable
        assert torch.allclose(shuffled.components[m], a.components[m], atol=1e-9)


def test_lanczos_and_dense_agree():
    xs = {name: torch.randn(800, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
          * torch.arange(1, 301, dtype=torch.float64) ** -0.7 for i, (name, _, _) in enumerate(SPEC[:1])}
    groups = {"attn_in": GroupSums(xs["attn_in"].T @ xs["attn_in"], xs["attn_in"].sum(0), 800, ("q", "k"))}
    dense, lanczos = eva_init(groups, 8, 2.0, solver="dense"), eva_init(groups, 8, 2.0, solver="lanczos")
    assert lanczos.solvers == {"attn_in": "lanczos"} and dense.solvers == {"attn_in": "dense"}
    assert dense.ranks == lanczos.ranks
    assert all(torch.allclose(dense.components[m], lanczos.components[m], atol=1e-8) for m in ("q", "k"))


def test_whiten_divides_rows_by_fourth_root_of_scatter_eigenvalues():
    xs = raw_tokens(seed=6)
    plain = eva_init(group_sums(xs), 4, 2.0, order=ORDER)
    white = eva_init(group_sums(xs), 4, 2.0, order=ORDER, whiten=True)
    assert white.ranks == plain.ranks
    for m in ORDER:
        k = plain.ranks[m]
        group = next(name for name, _, members in SPEC if m in members)
        eig = np.sort(np.linalg.eigvalsh(np.cov(xs[group].numpy(), rowvar=False)))[::-1][:k]
        expected = plain.components[m].numpy() / ((599 * eig) ** 0.25)[:, None]
        np.testing.assert_allclose(white.components[m].numpy(), expected, rtol=1e-8, atol=1e-12)


def test_rho_above_threshold_is_cut_like_peft():
    xs = raw_tokens(seed=7)
    got = eva_init(group_sums(xs), 2, 5000.0, order=ORDER, max_param_dim=40)
    assert got.settings["rho"] == 20  # min(5000, 40 // 2)
    with pytest.raises(ValueError, match="ask for fewer"):
        eva_init(group_sums(xs), 2, 5000.0, order=ORDER)  # default max_dim 64 -> cap 64 > 40 features


def test_state_dict_and_alpha_pattern():
    xs = raw_tokens(seed=8)
    got = eva_init(group_sums(xs), 2, 4.0, order=ORDER)
    sd = to_eva_state_dict(got)
    assert list(sd) == ["base_model.model." + m for m in ORDER]
    for m in ORDER:
        t = sd["base_model.model." + m]
        assert t.dtype == torch.float64 and t.is_contiguous() and t.shape == got.components[m].shape
        assert t.data_ptr() != got.components[m].data_ptr()
    assert list(to_eva_state_dict(got, prefix=""))[0] == "b.q"
    assert to_eva_state_dict(got, dtype=torch.float32)["base_model.model.b.q"].dtype == torch.float32
    alphas = alpha_pattern(got.ranks, 2, 16.0)
    assert alphas == got.alpha_pattern(2, 16.0)
    assert all(alphas[m] == 16.0 * got.ranks[m] / 2 for m in alphas)
    assert not any(got.ranks[m] in (0, 2) for m in alphas)


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "positive integer"),
    ({"rho": 0.5}, ">= 1.0"),
    ({"rank_pattern": {"nope": 2}}, "not targets"),
    ({"rank_pattern": {"b.q": 0}}, "positive integers"),
    ({"r": 30}, "ask for fewer"),  # cap 60 > 40 features (PEFT fails here too)
    ({"solver": "qr"}, "unknown eigen solver"),
])
def test_bad_settings_are_named(kwargs, match):
    args = {"r": 4, "rho": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        eva_init(group_sums(raw_tokens()), args.pop("r"), args.pop("rho"), order=ORDER, **args)


def test_too_few_tokens_and_missing_sum_are_named():
    xs = raw_tokens(n=6)
    with pytest.raises(ValueError, match="tokens cannot give"):
        eva_init(group_sums(xs), 4, 2.0, order=ORDER)
    groups = {k: v._replace(total=None) for k, v in group_sums(raw_tokens()).items()}
    with pytest.raises(ValueError, match="needs Σx"):
        eva_init(groups, 4, 2.0, order=ORDER)
    with pytest.raises(ValueError, match="two input groups"):
        eva_init({"a": (torch.eye(2), torch.zeros(2), 5, ("m",)), "b": (torch.eye(2), torch.zeros(2), 5, ("m",))}, 1)
