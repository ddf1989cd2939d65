"""The init setting end to end: compute_allocation / sensitivity_peft_model / the CLI with an initialisation
from the statistics, against independent fp64 oracles, PEFT's own loader and the streaming path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_batches, tiny_llama
from sensitivity_lora import AllocationSettings, calibrate, compute_allocation, sensitivity_peft_model
from sensitivity_lora.cli import main
from sensitivity_lora.peft import apply_initial_weights, lora_config, verify_ranks
from sensitivity_lora.scoring.result import Allocation, load_initial_weights


def _oracle_inputs(model, batches) -> dict[str, np.ndarray]:
    """Every target's non-padding inputs (tokens × d_in), from hooks of our own, fp64 numpy."""
    stats = calibrate(model, batches, hessian="diag", progress=False)  # only for the names and the groups
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in stats.dims}
    lookup = dict(model.named_modules())
    handles = []
    for name in stats.dims:
        def hook(module, args, name=name):
            inputs[name].append(args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy())
        handles.append(lookup[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].reshape(-1).bool().numpy() for b in batches]
    return {name: np.concatenate([c[m] for c, m in zip(chunks, masks)]) for name, chunks in inputs.items()}


def _oracle_directions(model, batches, k: int) -> dict[str, np.ndarray]:
    """Top-k eigenvectors (rows) of every target's centred input covariance."""
    out = {}
    for name, x in _oracle_inputs(model, batches).items():
        values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
        out[name] = vectors[:, ::-1][:, :k].T
    return out


def test_covariance_init_keeps_the_ranks_and_takes_the_top_covariance_directions():
    model, batches = tiny_llama(), random_batches(3)
    plain = compute_allocation(model, batches, avg_rank=4, hessian="full", progress=False)
    init = compute_allocation(model, batches, avg_rank=4, init="covariance", progress=False)
    assert init.ranks() == plain.ranks() and init.method == "sra"
    assert [m.theta for m in init.modules.values()] == [m.theta for m in plain.modules.values()]
    oracle = _oracle_directions(model, batches, 16)
    for name, m in init.modules.items():
        a = init.initial_weights[name].double().numpy()
        assert a.shape == (m.rank, m.d_in)
        cos = np.abs(np.sum(a * oracle[name][: m.rank], axis=1))
        assert cos.min() > 1 - 1e-4, (name, cos)
        rows = init.initial_weights[name]
        biggest = rows.abs().argmax(dim=1)
        assert bool((rows.gather(1, biggest[:, None]) > 0).all())  # the sign convention
    # one decomposition per input group, shared by its members
    assert init.settings["decompositions"] == len(calibrate(model, batches, progress=False).groups)


@pytest.mark.parametrize("init", ["covariance", "eva", "output-aware"])
def test_streaming_gives_the_same_initialisation_as_one_pass(init):
    model, batches = tiny_llama(), random_batches(3)
    one = compute_allocation(model, batches, avg_rank=4, init=init, progress=False)
    streamed = compute_allocation(model, batches, avg_rank=4, init=init, streaming=True, progress=False)
    assert one.to_dict() == streamed.to_dict()
    assert all(torch.equal(one.initial_weights[n], streamed.initial_weights[n]) for n in one.modules)
    assert one.total_rank() == 4 * len(one.modules)  # the budget holds for every rank rule


@pytest.mark.parametrize("init", ["covariance", "eva", "output-aware"])
def test_overlapped_fitting_gives_the_same_bytes_with_one_part_in_flight(init, monkeypatch):
    """The worker-thread path (a GPU's default; forced here on the CPU) changes when parts are decomposed,
    not what comes out; it never holds more than one part, and its thread is gone afterwards."""
    import threading

    from sensitivity_lora import initialisation
    from sensitivity_lora.calibration.streaming import iter_block_statistics, released

    model, batches = tiny_llama(), random_batches(3)
    settings = AllocationSettings(init=init)
    in_flight, most = [0], [0]
    real = initialisation.PartwiseInit._fit

    def counting(self, part, groups, weights):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            return real(self, part, groups, weights)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(initialisation.PartwiseInit, "_fit", counting)
    answers = []
    for overlap in (False, True):
        fitter = initialisation.PartwiseInit(model, 4, settings, overlap=overlap)
        allocation = compute_allocation(model, batches, avg_rank=4, settings=settings, streaming=True, progress=False)
        for part in released(iter_block_statistics(model, batches, None, settings.hessian, None, streaming=True)):
            fitter.fit(part)
        answers.append(fitter.finish(allocation))
        assert fitter._worker is None
    assert most[0] == 1
    assert answers[0].ranks() == answers[1].ranks()
    assert all(torch.equal(answers[0].initial_weights[n], answers[1].initial_weights[n]) for n in answers[0].modules)
    assert not [t for t in threading.enumerate() if t.name.startswith("sensitivity-lora-init")]


def test_an_error_in_the_overlapped_fit_surfaces_and_the_worker_stops(monkeypatch):
    import threading

    from sensitivity_lora import initialisation
    from sensitivity_lora.calibration.streaming import iter_block_statistics, released

    def broken(self, part, groups, weights):
        raise ValueError("no variance in this part")

    model, batches = tiny_llama(), random_batches(2)
    monkeypatch.setattr(initialisation.PartwiseInit, "_fit", broken)
    fitter = initialisation.PartwiseInit(model, 4, AllocationSettings(init="covariance"), overlap=True)
    with pytest.raises(ValueError, match="no variance"):
        for part in released(iter_block_statistics(model, batches, None, "full", None, streaming=True)):
            fitter.fit(part)
        fitter.finish(None)
    fitter.close()
    assert fitter._worker is None
    assert not [t for t in threading.enumerate() if t.name.startswith("sensitivity-lora-init")]


def test_partwise_fitting_equals_the_initialisers_on_the_whole_model():
    """Fitting each part up to its cap and choosing the ranks at the end is the initialisers' own answer."""
    from sensitivity_lora.init import eva_init, group_sums_from_statistics, output_aware_init

    model, batches = tiny_llama(), random_batches(3)
    stats = calibrate(model, batches, hessian="full", progress=False)
    groups, order = group_sums_from_statistics(stats), list(stats.dims)
    lookup = dict(model.named_modules())
    weights = {n: lookup[n].weight.detach() for n in order}
    for init, whole in (("eva", eva_init(groups, 4, 2.0, order=order)),
                        ("output-aware", output_aware_init(weights, groups, 4, 2.0, order=order))):
        got = compute_allocation(model, batches, avg_rank=4, init=init, progress=False)
        assert got.ranks() == whole.ranks, init
        for n in order:
            a, b = got.initial_weights[n].double(), whole.components[n]
            assert a.shape == b.shape
            if a.numel():
                assert (a * b).sum(1).min() > 1 - 1e-6, (init, n)  # same unit rows, same signs


def test_eva_and_output_aware_choose_their_own_ranks_on_the_same_budget():
    model, batches = tiny_llama(), random_batches(3)
    for init in ("eva", "output-aware"):
        a = compute_allocation(model, batches, avg_rank=4, init=init, progress=False)
        assert a.method == init and a.budget == 4 * len(a.modules) == a.total_rank()
        assert max(a.ranks().values()) <= round(2.0 * 4)  # init_rho = 2
        assert set(a.initial_weights) == set(a.modules)


@pytest.mark.parametrize("init", ["covariance", "eva"])
def test_sensitivity_peft_model_starts_from_the_initial_weights_and_leaves_outputs_unchanged(init):
    model, batches = tiny_llama(), random_batches(3)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    peft_model, allocation = sensitivity_peft_model(model, batches, avg_rank=4, init=init, progress=False)
    applied = 0
    for path, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            name = path.removeprefix("base_model.model.")
            assert torch.equal(module.lora_A["default"].weight, allocation.initial_weights[name])
            assert not module.lora_B["default"].weight.any()
            applied += 1
    assert applied == sum(r > 0 for r in allocation.ranks().values())
    with torch.no_grad():  # B = 0: the adapted model computes what the base model did
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_eva_state_dict_loads_in_peft_unchanged_and_gives_the_same_adapter():
    from peft import EvaConfig, LoraConfig
    from peft import get_peft_model as peft_get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches = random_batches(3)
    allocation = compute_allocation(tiny_llama(), batches, avg_rank=4, init="eva", progress=False)
    ours = peft_get_peft_model(tiny_llama(), lora_config(allocation, 8.0))
    apply_initial_weights(ours, allocation)
    targets = list(allocation.modules)
    theirs = peft_get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8.0, target_modules=targets,
                                                           init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)))
    initialize_lora_eva_weights(theirs, eva_state_dict=allocation.eva_state_dict())
    verify_ranks(theirs, allocation)  # PEFT's loader set exactly our ranks (and α/r constant)
    mine = {p: m for p, m in ours.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for path, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            torch.testing.assert_close(module.lora_A["default"].weight, mine[path].lora_A["default"].weight)
            assert module.scaling["default"] == pytest.approx(mine[path].scaling["default"])


def test_initial_weights_round_trip_and_refuse_a_foreign_allocation(tmp_path):
    model, batches = tiny_llama(), random_batches(3)
    allocation = compute_allocation(model, batches, avg_rank=4, init="eva", progress=False)
    allocation.save(tmp_path / "allocation.json")
    allocation.save_initial_weights(tmp_path / "w.safetensors")
    loaded = Allocation.load(tmp_path / "allocation.json", initial_weights=tmp_path / "w.safetensors")
    assert loaded == allocation
    assert all(torch.equal(loaded.initial_weights[n], allocation.initial_weights[n]) for n in allocation.modules)
    other = compute_allocation(model, batches, avg_rank=2, init="eva", progress=False)
    with pytest.raises(ValueError, match="was it written for this allocation"):
        load_initial_weights(tmp_path / "w.safetensors", other)
    plain = compute_allocation(model, batches, avg_rank=4, progress=False)
    with pytest.raises(ValueError, match="no initial weights"):
        plain.save_initial_weights(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("init", ["covariance", "eva"])
def test_default_gain_rows_keep_the_directions_at_the_input_gain_of_peft_default_a(init):
    model, batches = tiny_llama(), random_batches(3)
    unit = compute_allocation(model, batches, avg_rank=4, init=init, progress=False)
    gain = compute_allocation(model, batches, avg_rank=4, init=init, init_scale="default-gain", progress=False)
    assert gain.ranks() == unit.ranks() and gain.settings["init_scale"] == "default-gain"
    inputs = _oracle_inputs(model, batches)
    for name, rows in gain.initial_weights.items():
        if not rows.shape[0]:
            continue
        x = inputs[name]
        target = np.mean(x * x) / 3.0  # E[(a·x)²] of a row with entries U(±1/√d): tr(XᵀX/n) / (3d)
        energy = np.mean((x @ rows.double().numpy().T) ** 2, axis=0)
        np.testing.assert_allclose(energy, target, rtol=1e-4)
        u = unit.initial_weights[name].double()
        cos = (rows.double() * u).sum(dim=1) / rows.double().norm(dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos))  # same directions and signs, longer or shorter
    streamed = compute_allocation(model, batches, avg_rank=4, init=init, init_scale="default-gain",
                                  streaming=True, progress=False)
    assert all(torch.equal(gain.initial_weights[n], streamed.initial_weights[n]) for n in gain.modules)


def test_init_settings_are_validated():
    assert AllocationSettings(init="eva").hessian == "full"  # an initialisation reads Σxxᵀ
    with pytest.raises(ValueError, match="init='svd' is unknown"):
        AllocationSettings(init="svd")
    with pytest.raises(ValueError, match="init_rho"):
        AllocationSettings(init="eva", init_rho=0.5)
    with pytest.raises(ValueError, match="init_scale='gain' is unknown"):
        AllocationSettings(init="covariance", init_scale="gain")
    with pytest.raises(ValueError, match="integer avg_rank"):
        compute_allocation(tiny_llama(), random_batches(1), avg_rank=2.5, init="eva", progress=False)


def test_verify_ranks_treats_rank_zero_as_no_adapter():
    model, batches = tiny_llama(), random_batches(3)
    allocation = compute_allocation(model, batches, avg_rank=4, progress=False)
    name = next(iter(allocation.modules))
    import dataclasses

    zeroed = dataclasses.replace(allocation, modules={**allocation.modules,
                                                      name: dataclasses.replace(allocation.modules[name], rank=0)})
    from peft import get_peft_model as peft_get_peft_model

    verify_ranks(peft_get_peft_model(tiny_llama(), lora_config(zeroed)), zeroed)  # no layer where rank is 0
    from sensitivity_lora import RankMismatchError

    with pytest.raises(RankMismatchError, match="allocated rank 0"):
        verify_ranks(peft_get_peft_model(tiny_llama(), lora_config(allocation)), zeroed)


def test_cli_allocate_with_init_writes_weights_that_rebuild_the_adapter(tiny_llama_dir, tmp_path):
    text = tmp_path / "data.txt"
    text.write_text("\n".join(f"calibration line {i} with a few words of text" for i in range(12)))
    out = tmp_path / "out"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--data", str(text), "--out", str(out), "--avg-rank", "4",
                 "--init", "eva", "--init-scale", "default-gain", "--no-plot", "--quiet", "--seq-len", "16"]) == 0
    assert {p.name for p in out.iterdir()} == {"allocation.json", "adapter_config.json", "initial_weights.safetensors"}
    allocation = Allocation.load(out / "allocation.json", initial_weights=out / "initial_weights.safetensors")
    recorded = json.loads((out / "allocation.json").read_text())["settings"]
    assert allocation.method == "eva" and recorded["init"] == "eva" and recorded["init_scale"] == "default-gain"
    assert sum(a.shape[0] for a in allocation.initial_weights.values()) == allocation.total_rank()
