"""Newton initialisation (init/newton.py, calibration/gradients.py, api.newton_peft_model).

The maths against a dense fp64 oracle (eigh of the damped H, full SVD of G H^{-1/2}); the identity
Δ* = −G Aᵀ A and the optimality of Δ* for the quadratic model against other rank-r starts; the
global greedy on a case computed by hand; one factorisation per input group; the one-pass gradient
collection against autograd and against the package's own calibration; the model left as it was;
the PEFT model: identical output at step 0, ranks, α/r, a training step, and its first gradient
step on B along the oracle's Newton direction.
"""
from __future__ import annotations

import math

import copy

import pytest
import torch

pytest.importorskip("peft")

import sensitivity_lora  # noqa: E402
from conftest import random_batches, tiny_llama  # noqa: E402
from model_snapshot import assert_unchanged, snapshot  # noqa: E402
from test_calibration_gradients import direct_gradients  # noqa: E402
from sensitivity_lora.api import newton_peft_model  # noqa: E402
from sensitivity_lora.calibration.gradients import causal_lm_labels  # noqa: E402
from sensitivity_lora.init import GroupSums, group_sums_from_statistics, newton  # noqa: E402
from sensitivity_lora.init.newton import newton_init, predicted_decrease  # noqa: E402

DAMPING = 0.01


# ---------------------------------------------------------------- oracle and helpers

def random_problem(d_in: int, d_outs: tuple[int, ...], n: int = 500, seed: int = 0):
    """One input group: SPD S = n·H with a decaying spectrum, and a random G per member (fp32)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    spectrum = 10.0 * torch.arange(1, d_in + 1, dtype=torch.float64) ** -1.5 + 1e-3
    h = (q * spectrum) @ q.T
    members = tuple(f"m{i}" for i in range(len(d_outs)))
    grads = {}
    for name, d_out in zip(members, d_outs):
        u, _ = torch.linalg.qr(torch.randn(d_out, min(d_out, d_in), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d_in, min(d_out, d_in), generator=g, dtype=torch.float64))
        s = 2.0 ** -torch.arange(min(d_out, d_in), dtype=torch.float64) * (1 + torch.rand(1, generator=g).item())
        grads[name] = ((u * s) @ v.T).float()
    sums = GroupSums((h * n).float(), None, n, members)
    return grads, {"g": sums}


def oracle(grad: torch.Tensor, sums: GroupSums, damping: float = DAMPING):
    """Dense fp64: (σ², V rows, H^{-1/2}, U, damped H) of K = G (H + λI)^{-1/2}."""
    h = sums.xtx.double() / sums.n_tokens
    h = (h + h.T) / 2
    hd = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    e, q = torch.linalg.eigh(hd)
    inv_sqrt = (q * e.rsqrt()) @ q.T
    u, s, vh = torch.linalg.svd(grad.double() @ inv_sqrt, full_matrices=False)
    return s.square(), vh, inv_sqrt, u, hd


def oracle_minimiser(grad, sums, r):
    s2, vh, inv_sqrt, u, _ = oracle(grad, sums)
    return -(u[:, :r] * s2[:r].sqrt()) @ vh[:r] @ inv_sqrt


def quadratic(grad: torch.Tensor, hd: torch.Tensor, delta: torch.Tensor) -> float:
    """q(Δ) = ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ)."""
    return float((grad.double() * delta).sum() + 0.5 * ((delta @ hd) * delta).sum())


def best_in_row_space(grad: torch.Tensor, hd: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """argmin over B of q(B A): B = −G Aᵀ (A H Aᵀ)⁻¹."""
    a = a.double()
    b = -torch.linalg.solve(a @ hd @ a.T, (grad.double() @ a.T).T).T
    return b @ a


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    return torch.linalg.svdvals(qa.T @ qb)


# ---------------------------------------------------------------- the maths

@pytest.mark.parametrize("d_in", [30, 300])  # dense eigen solver / ARPACK's Lanczos on the Gram
@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
def test_rows_and_spectra_match_the_dense_oracle(d_in, whitening):
    grads, groups = random_problem(d_in, (40, 20, 12), seed=d_in)
    result = newton_init(grads, groups, avg_rank=4, rho=2.0, whitening=whitening)
    assert result.decompositions == 1
    for m, grad in grads.items():
        s2, vh, inv_sqrt, _, _ = oracle(grad, groups["g"])
        k = result.scores[m].numel()
        assert k == min(8, *grad.shape)
        torch.testing.assert_close(result.scores[m], s2[:k], rtol=1e-6, atol=0)
        r = result.ranks[m]
        rows = result.components[m]
        assert rows.shape == (r, d_in)
        if r:
            assert float(principal_cosines(rows, vh[:r] @ inv_sqrt).min()) >= 0.999
            torch.testing.assert_close(rows.norm(dim=1), torch.ones(r, dtype=torch.float64))
            pivots = rows.abs().argmax(dim=1)
            assert bool((rows.gather(1, pivots[:, None]) > 0).all())  # the sign convention
    assert sum(result.ranks.values()) == 4 * 3


def test_the_two_whitenings_give_the_same_rows():
    grads, groups = random_problem(50, (30, 60), seed=3)
    chol = newton_init(grads, groups, 3, whitening="cholesky", normalise="none")
    eigh = newton_init(grads, groups, 3, whitening="eigh", normalise="none")
    assert chol.ranks == eigh.ranks
    for m in grads:
        torch.testing.assert_close(chol.components[m], eigh.components[m], rtol=1e-7, atol=1e-9)


def test_newton_step_is_minus_g_at_a_and_beats_other_rank_r_starts():
    grads, groups = random_problem(24, (32,), seed=7)
    grad, sums = grads["m0"], groups["g"]
    r = 3
    result = newton_init(grads, groups, avg_rank=r, rho=1.0, normalise="none")
    assert result.ranks["m0"] == r
    a = result.components["m0"]
    delta = -grad.double() @ a.T @ a  # the first SGD step on B (B = 0), up to the step size
    target = oracle_minimiser(grad, sums, r)
    torch.testing.assert_close(delta, target, rtol=1e-7, atol=1e-9)
    s2, vh, inv_sqrt, u, hd = oracle(grad, sums)
    best = quadratic(grad, hd, delta)
    assert best == pytest.approx(-0.5 * float(s2[:r].sum()), rel=1e-7)
    assert predicted_decrease(result)["m0"] == pytest.approx(0.5 * float(s2[:r].sum()), rel=1e-7)
    # unit-norm rows keep the subspace: the best B on them reaches the same Δ*
    unit = newton_init(grads, groups, avg_rank=r, rho=1.0).components["m0"]
    torch.testing.assert_close(best_in_row_space(grad, hd, unit), target, rtol=1e-6, atol=1e-8)

    ug, sg, vgh = torch.linalg.svd(grad.double(), full_matrices=False)
    g = torch.Generator().manual_seed(0)
    others = {
        "gradient SVD rows (truncation of G)": vgh[:r],
        "LoRA-GA's A (right singular vectors r..2r of G)": vgh[r:2 * r],
        "EVA-like (top eigenvectors of H)": torch.linalg.eigh(hd)[1][:, -r:].T,
        "random rows": torch.randn(r, 24, generator=g, dtype=torch.float64),
        "Newton rows, perturbed": a + 1e-2 * a.norm() * torch.randn(r, 24, generator=g, dtype=torch.float64),
    }
    for what, rows in others.items():
        value = quadratic(grad, hd, best_in_row_space(grad, hd, rows))
        assert value > best + 1e-9 * abs(best), what
    # the plain truncation G_r with the best scalar step
    g_r = (ug[:, :r] * sg[:r]) @ vgh[:r]
    step = -float((grad.double() * g_r).sum()) / float(((g_r @ hd) * g_r).sum())
    assert quadratic(grad, hd, step * g_r) > best + 1e-9 * abs(best)


def diagonal_problem(singular: dict[str, list[float]], n: int = 10):
    """Modules with S = n·I (4 features) and G = diag(s): σ_i² = s_i² / (1 + damping)."""
    grads = {m: torch.diag(torch.tensor(s)) for m, s in singular.items()}
    groups = {m: GroupSums(torch.eye(len(s)) * n, None, n, (m,)) for m, s in singular.items()}
    return grads, groups


@pytest.mark.parametrize("rho, expected", [(1.5, {"a": 3, "b": 2, "c": 1}),  # cap 3 stops a's 49 before b's 36
                                           (2.0, {"a": 4, "b": 1, "c": 1})])
def test_greedy_by_hand(rho, expected):
    grads, groups = diagonal_problem({"a": [10, 9, 8, 7], "b": [6, 1, 0.5, 0.1], "c": [5, 0.2, 0.1, 0.01]})
    result = newton_init(grads, groups, avg_rank=2, rho=rho)
    assert result.ranks == expected
    assert sum(result.ranks.values()) == 6
    cap = round(rho * 2)
    torch.testing.assert_close(result.scores["a"], torch.tensor([100.0, 81, 64, 49], dtype=torch.float64)[:cap] / 1.01)
    # H = 1.01·I: the Newton rows are the gradient's right singular vectors, the unit vectors e_1, e_2, ...
    torch.testing.assert_close(result.components["a"], torch.eye(4, dtype=torch.float64)[: expected["a"]])


def test_budget_is_exact_under_caps_and_infeasible_budgets_are_refused():
    grads, groups = {}, {}
    for i, (d_in, d_out) in enumerate([(16, 16), (16, 4), (8, 24), (24, 8), (12, 12)]):
        more, sums = random_problem(d_in, (d_out,), seed=i)
        grads[f"x{i}"] = more["m0"]
        groups[f"g{i}"] = sums["g"]._replace(members=(f"x{i}",))
    for avg_rank, rho in [(1, 1.0), (2, 2.0), (3, 1.5), (4, 3.0)]:
        result = newton_init(grads, groups, avg_rank=avg_rank, rho=rho)
        assert sum(result.ranks.values()) == avg_rank * 5
        for m, r in result.ranks.items():
            assert 0 <= r <= min(round(rho * avg_rank), *grads[m].shape)
    with pytest.raises(ValueError, match="budget"):
        newton_init(grads, groups, avg_rank=8, rho=1.0)  # caps 8, 4, 8, 8, 8: 36 < 40


def test_members_of_an_input_group_share_one_factorisation(monkeypatch):
    grads, groups = random_problem(20, (20, 10, 10), seed=2)
    single, other = random_problem(12, (16,), seed=5)
    grads["solo"] = single["m0"]
    groups["h"] = other["g"]._replace(members=("solo",))
    calls = []
    made = []
    original = newton._whitener

    def counting(name, sums, damping, whitening):
        calls.append(name)
        made.append(original(name, sums, damping, whitening))
        return made[-1]

    monkeypatch.setattr(newton, "_whitener", counting)
    result = newton_init(grads, groups, avg_rank=2)
    assert sorted(calls) == ["g", "h"]
    assert result.decompositions == 2


# ---------------------------------------------------------------- the PEFT model

def lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_peft_model_starts_as_the_base_model_with_the_chosen_ranks_and_trains():
    model = tiny_llama()
    base = copy.deepcopy(model)
    batches = random_batches(n_batches=3, seq=12)
    peft_model, info = newton_peft_model(model, batches, 2, lora_alpha=8.0)
    ranks = info["ranks"]
    assert sum(ranks.values()) == 2 * 14
    assert 0 in ranks.values()  # the greedy leaves some modules out on this model
    assert set(info["seconds"]) == {"gradient_pass", "decomposition", "peft", "total"}
    layers = lora_modules(peft_model)
    assert set(layers) == {m for m, r in ranks.items() if r > 0}  # rank 0: no adapter
    for name, layer in layers.items():
        assert layer.r["default"] == ranks[name]
        assert layer.scaling["default"] == pytest.approx(8.0 / 2)  # α/r = lora_alpha / r̄ everywhere
        torch.testing.assert_close(layer.lora_A["default"].weight, info["init"].components[name].float())
        assert float(layer.lora_B["default"].weight.detach().abs().max()) == 0.0
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(peft_model(**batch).logits, base(**batch).logits)

    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = peft_model(**batches[0], labels=causal_lm_labels(batches[0])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(float(layer.lora_B["default"].weight.detach().abs().max()) > 0 for layer in layers.values())


def test_first_gradient_step_on_b_is_the_newton_step():
    """With A = V_rᵀ H^{-1/2} (normalise='none'), s·∂L/∂B·A = s²·G Aᵀ A = −s²·Δ* for every adapted module."""
    model = tiny_llama()
    batches = random_batches(n_batches=2, seq=12)
    stats = sensitivity_lora.calibrate(model, batches, hessian="full", progress=False)
    sums = group_sums_from_statistics(stats)
    owner = {m: g for g, s in sums.items() for m in s.members}
    gradients = direct_gradients(model, batches, [causal_lm_labels(b) for b in batches])
    peft_model, info = newton_peft_model(model, batches, 2, normalise="none")
    peft_model.eval()
    loss = sum(peft_model(**b, labels=causal_lm_labels(b)).loss for b in batches) / len(batches)
    loss.backward()
    checked = 0
    for name, layer in lora_modules(peft_model).items():
        s = layer.scaling["default"]
        step = s * layer.lora_B["default"].weight.grad.double() @ layer.lora_A["default"].weight.double()
        target = -s * s * oracle_minimiser(gradients[name], sums[owner[name]], info["ranks"][name])
        torch.testing.assert_close(step, target, rtol=1e-4, atol=1e-4 * float(target.abs().max()))
        checked += 1
    assert checked == sum(r > 0 for r in info["ranks"].values())


def test_bad_settings_are_refused_before_the_pass():
    model = tiny_llama()
    before = snapshot(model)
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    for kwargs, match in (({"avg_rank": 0}, "avg_rank"), ({"avg_rank": 2.5}, "avg_rank"),
                          ({"avg_rank": 2, "rho": 0.5}, "rho"), ({"avg_rank": 2, "normalise": "columns"}, "normalise"),
                          ({"avg_rank": 2, "lora_alpha": -1.0}, "lora_alpha"),
                          ({"avg_rank": 2, "damping": math.inf}, "damping"),
                          ({"avg_rank": 200, "rho": 1.0}, "avg_rank=200 asks for")):  # caps: at most 64 a module
        with pytest.raises(ValueError, match=match):
            newton_peft_model(model, random_batches(1), **kwargs)
    handle.remove()
    assert not passes  # every refusal came before the gradient pass
    assert_unchanged(before, model)


def test_gain_rows_carry_a_default_rows_output_energy_and_the_same_directions():
    grads, groups = random_problem(40, (24, 48), seed=11)
    unit = newton_init(grads, groups, 3, normalise="rows")
    gain = newton_init(grads, groups, 3, normalise="gain")
    assert unit.ranks == gain.ranks
    for name, sums in groups.items():
        moment = sums.xtx.double() / sums.n_tokens
        target = float(torch.trace(moment)) / (3 * moment.shape[0])  # a Kaiming-uniform row: U(±1/√d)
        for m in sums.members:
            rows = gain.components[m]
            if not rows.shape[0]:
                continue
            torch.testing.assert_close(((rows @ moment) * rows).sum(dim=1),
                                       torch.full((rows.shape[0],), target, dtype=torch.float64))
            cos = (rows * unit.components[m]).sum(dim=1) / rows.norm(dim=1)
            torch.testing.assert_close(cos, torch.ones_like(cos))  # same directions, same signs
    # and the target is what PEFT's default A really gives, on average over draws
    sums = next(iter(groups.values()))
    moment = sums.xtx.double() / sums.n_tokens
    d = moment.shape[0]
    a = torch.empty(20000, d, dtype=torch.float64)  # 20000 draws of a row; fan_in = d, bound 1/√d
    torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=torch.Generator().manual_seed(0))
    measured = float(((a @ moment) * a).sum(dim=1).mean())
    assert abs(measured / (float(torch.trace(moment)) / (3 * d)) - 1) < 0.05
