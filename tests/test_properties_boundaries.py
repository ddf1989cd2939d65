"""Property-based tests (Hypothesis) of every public boundary: for any bad numeric or type argument,
the error is a ValueError/TypeError that names the argument, no forward pass ran, the model is
unchanged and no output folder was created or changed. Good values pass the same checks.

A forward pass is counted by a global module forward pre-hook (any module of any model, so a copy
made on the way counts too). Examples are derandomised (the same every run) and few enough that the
file runs in well under a minute; ``--hypothesis-show-statistics`` prints the counts and times.
docs/validation.md lists where each boundary's checks live.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
from pathlib import Path
from unittest import mock

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (the [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import random_batches, save_tiny_llama, tiny_llama  # noqa: E402
from model_snapshot import assert_unchanged, folder_bytes, snapshot  # noqa: E402

# the same examples every run (CI), no example database written into the checkout
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FAST, max_examples=8)

# tiny_llama: hidden 32, intermediate 48, 2 kv heads of 8, 2 layers: 14 linear modules whose
# min(d_in, d_out) sum to 384, so an average rank of 28 (28 · 14 = 392) fits no rule; k/v are 32 × 16
# (m = 512 diagonal entries), the largest module 32 × 48 (m = 1536)
INFEASIBLE_AVG_RANK = 28
LARGEST_M = 1536

# ---------------------------------------------------------------- strategies of bad values

non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.one_of(st.integers(max_value=-1),
                     st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False))
zero = st.sampled_from([0, 0.0, -0.0])
flags = st.booleans()
not_a_number = st.one_of(flags, st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2),
                         st.builds(object), st.just(b"8"))
fractional = st.floats(min_value=0.01, max_value=1e6, allow_nan=False).filter(lambda x: x != int(x))
integral_float = st.integers(min_value=1, max_value=10**6).map(float)  # 8.0 where an int is needed

bad_positive_number = st.one_of(non_finite, negative, zero, not_a_number)
bad_positive_int = st.one_of(non_finite, negative, zero, not_a_number, fractional, integral_float)
bad_positive_int_or_none = bad_positive_int.filter(lambda v: v is not None)
bad_flag = st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=4), st.none(),
                     st.lists(st.booleans(), max_size=1))
bad_path = st.one_of(st.integers(), st.floats(allow_nan=True), flags, st.none(), st.just(""),
                     st.lists(st.text(max_size=2), max_size=1))
bad_targets = st.one_of(st.integers(), st.floats(allow_nan=True), flags, st.builds(object), st.just(b"q_proj"),
                        st.lists(st.integers(), min_size=1, max_size=2))
infeasible_avg_rank = st.one_of(st.integers(min_value=INFEASIBLE_AVG_RANK, max_value=10**12),
                                st.floats(min_value=INFEASIBLE_AVG_RANK, max_value=1e12))


def bad_choice(*valid: str):
    """Anything but one of ``valid``."""
    return st.one_of(st.text(max_size=6).filter(lambda t: t not in valid), st.integers(), st.none(), flags)


# the allocation settings: each field with its bad values (shape-dependent ones included: they too are
# refused before the pass, from the module shapes)
BAD_SETTINGS = {
    "rho": st.one_of(st.sampled_from([math.nan, -math.inf]), negative, zero, not_a_number),
    "r_min": st.one_of(bad_positive_int, st.integers(min_value=17, max_value=10**9)),  # 17 > k_proj's 16
    "r_max": bad_positive_int_or_none,
    "topk": st.one_of(non_finite, negative, zero, not_a_number,
                      st.floats(min_value=1.0, max_value=1e9, exclude_min=True),
                      st.integers(min_value=LARGEST_M + 1, max_value=10**12)),
    "energy": st.one_of(non_finite, negative, zero, not_a_number,
                        st.floats(min_value=1.0, max_value=1e9, exclude_min=True)),
    "tiers": bad_positive_int,
    "init_rho": st.one_of(non_finite, negative, zero, not_a_number,
                          st.floats(min_value=0.0, max_value=1.0, exclude_max=True)),
    "method": bad_choice("sra", "pra", "uniform"),
    "hessian": bad_choice("diag", "full"),
    "scope": bad_choice("matrix", "row", "eigen"),
    "fusion": bad_choice("sigma_mu2", "global", "local", "equal"),
    "budget_mode": bad_choice("rank", "params"),
    "init": bad_choice("none", "covariance", "eva", "output-aware"),
    "init_scale": bad_choice("unit", "default-gain"),
}
one_bad_setting = st.sampled_from(sorted(BAD_SETTINGS)).flatmap(
    lambda name: st.tuples(st.just(name), BAD_SETTINGS[name]))

# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def counted_forwards():
    """Every module forward in the process while inside (a list of module class names)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__))
    try:
        yield calls
    finally:
        handle.remove()


def refused(call, *names: str, kinds=(ValueError, TypeError)) -> str:
    """Run ``call``; it must raise one of ``kinds`` naming one of ``names`` before any forward pass."""
    with counted_forwards() as forwards:
        with pytest.raises(kinds) as info:
            call()
    message = str(info.value)
    assert any(n in message for n in names), f"{type(info.value).__name__}: {message!r} does not name {names}"
    assert forwards == [], f"{len(forwards)} forward call(s) ({forwards[:3]}) before the refusal: {message}"
    return message


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    return random_batches(1, batch=2, seq=6)


@pytest.fixture(scope="module")
def labelled(batches):
    return [{**b, "labels": b["input_ids"].clone()} for b in batches]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


_serial = itertools.count()


def fresh(workspace: Path) -> Path:
    """A path in ``workspace`` that no example has used (it does not exist)."""
    return workspace / f"out{next(_serial)}"


def old_set(workspace: Path) -> Path:
    """A folder holding the files of an earlier run."""
    folder = fresh(workspace)
    folder.mkdir()
    (folder / "allocation.json").write_text('{"earlier": true}\n')
    (folder / "adapter_config.json").write_text('{"earlier": true}\n')
    return folder


# ---------------------------------------------------------------- compute_allocation, sensitivity_peft_model


@FAST
@given(avg_rank=st.one_of(bad_positive_number, infeasible_avg_rank))
def test_compute_allocation_refuses_bad_avg_rank_before_the_pass(model, batches, avg_rank):
    from sensitivity_lora import compute_allocation

    before = snapshot(model)
    refused(lambda: compute_allocation(model, batches, avg_rank, progress=False), "avg_rank")
    assert_unchanged(before, model)


@FAST
@given(bad=one_bad_setting)
def test_compute_allocation_refuses_each_bad_setting_before_the_pass(model, batches, bad):
    from sensitivity_lora import compute_allocation

    name, value = bad
    before = snapshot(model)
    refused(lambda: compute_allocation(model, batches, 4, progress=False, **{name: value}), name)
    assert_unchanged(before, model)


@FAST
@given(name=st.sampled_from(["progress", "streaming", "distributed"]), value=bad_flag)
def test_compute_allocation_refuses_switches_that_are_not_bools(model, batches, name, value):
    from sensitivity_lora import compute_allocation

    before = snapshot(model)
    refused(lambda: compute_allocation(model, batches, 4, **{"progress": False, name: value}), name)
    assert_unchanged(before, model)


@FAST
@given(kind=st.sampled_from(["target_modules", "checkpoint_dir", "device", "backend"]), data=st.data())
def test_compute_allocation_refuses_bad_types_of_its_other_arguments(model, batches, workspace, kind, data):
    from sensitivity_lora import compute_allocation

    value = data.draw({"target_modules": bad_targets, "checkpoint_dir": bad_path.filter(lambda v: v is not None),
                       "device": st.one_of(st.floats(allow_nan=True), flags, st.builds(object)),
                       "backend": st.one_of(st.integers(), flags, st.text(max_size=4).filter(
                           lambda t: t not in ("", "auto", "reference", "cpu", "cuda", "triton")))}[kind])
    before, files = snapshot(model), sorted(workspace.iterdir())
    refused(lambda: compute_allocation(model, batches, 4, progress=False, **{kind: value}), kind)
    assert_unchanged(before, model)
    assert sorted(workspace.iterdir()) == files


@st.composite
def bad_batches(draw):
    """Calibration batches tiny_llama cannot take: ids outside its vocabulary of 128, floats, wrong shapes,
    masks that do not fit, all padding, or no batches at all."""
    rows, seq = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    ids = torch.randint(0, 128, (rows, seq))
    kind = draw(st.sampled_from(["vocab", "negative", "float", "1-d", "mask-shape", "mask-values", "all-padding",
                                 "no-ids", "empty", "one-mapping"]))
    if kind == "vocab":
        return [{"input_ids": ids + draw(st.integers(128, 10**6))}]
    if kind == "negative":
        return [{"input_ids": ids - draw(st.integers(129, 10**6))}]
    if kind == "float":
        return [{"input_ids": ids.float()}]
    if kind == "1-d":
        return [{"input_ids": ids.flatten()}]
    if kind == "mask-shape":
        return [{"input_ids": ids, "attention_mask": torch.ones(rows, seq + 1, dtype=torch.long)}]
    if kind == "mask-values":
        return [{"input_ids": ids, "attention_mask": torch.full((rows, seq), draw(st.integers(2, 9)))}]
    if kind == "all-padding":
        return [{"input_ids": ids, "attention_mask": torch.zeros(rows, seq, dtype=torch.long)}]
    if kind == "no-ids":
        return [{"attention_mask": torch.ones(rows, seq, dtype=torch.long)}]
    if kind == "empty":
        return []
    return {"input_ids": ids}


@FAST
@given(batches_=bad_batches(), streaming=st.booleans())
def test_compute_allocation_refuses_bad_batches_before_the_pass_and_makes_no_checkpoint_folder(
        model, workspace, batches_, streaming):
    from sensitivity_lora import compute_allocation

    checkpoint = fresh(workspace)
    before = snapshot(model)
    refused(lambda: compute_allocation(model, batches_, 4, progress=False, streaming=streaming,
                                       checkpoint_dir=checkpoint if streaming else None), "batch")
    assert_unchanged(before, model)
    assert not checkpoint.exists()


@FAST
@given(kind=st.sampled_from(["avg_rank", "lora_alpha", "adapter_name", "lora_kwargs"]), data=st.data())
def test_sensitivity_peft_model_refuses_bad_arguments_before_the_pass(model, batches, kind, data):
    from sensitivity_lora import sensitivity_peft_model

    value = data.draw({"avg_rank": st.one_of(bad_positive_number, infeasible_avg_rank),
                       "lora_alpha": bad_positive_number.filter(lambda v: v is not None),
                       "adapter_name": st.one_of(st.integers(), st.none(), st.just(""), flags),
                       "lora_kwargs": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=1),
                                                st.fixed_dictionaries({"lora_dropout": st.one_of(
                                                    non_finite, negative, st.floats(min_value=1.0, max_value=10.0),
                                                    st.text(max_size=3))}))}[kind])
    kwargs = {"avg_rank": 4, kind: value} if kind != "avg_rank" else {"avg_rank": value}
    names = ("lora_kwargs", "lora_dropout") if kind == "lora_kwargs" else (kind,)
    before = snapshot(model)
    refused(lambda: sensitivity_peft_model(model, batches, progress=False, **kwargs), *names)
    assert_unchanged(before, model)


# ---------------------------------------------------------------- the PEFT-native entry


@FAST
@given(field=st.sampled_from(["r", "lora_alpha"]), data=st.data())
def test_initialize_lora_sensitivity_refuses_a_bad_lora_config_before_the_pass(model, batches, field, data):
    from peft import LoraConfig

    from sensitivity_lora import SensitivityConfig, initialize_lora_sensitivity

    value = data.draw(st.one_of(bad_positive_int, infeasible_avg_rank.map(int)) if field == "r"
                      else bad_positive_number.filter(lambda v: v is not None))
    lora = LoraConfig(r=4, lora_alpha=8)
    setattr(lora, field, value)  # past PEFT's own constructor: what a config edited after creation holds
    before = snapshot(model)
    refused(lambda: initialize_lora_sensitivity(model, batches, lora, SensitivityConfig(progress=False)),
            f"LoraConfig.{field}" if field == "r" else field)
    assert_unchanged(before, model)


@FAST
@given(data=st.data())
def test_sensitivity_config_refuses_each_bad_field(data):
    from sensitivity_lora import SensitivityConfig

    extra = {"seq_len": bad_positive_int, "batch_size": bad_positive_int, "max_samples": bad_positive_int_or_none,
             "text_field": st.one_of(st.integers(), st.none(), st.just(""), flags),
             "backend": st.one_of(st.integers(), flags, st.text(max_size=4).filter(
                 lambda t: t not in ("auto", "reference", "cpu", "cuda", "triton"))),
             "streaming": bad_flag, "progress": bad_flag}
    shapes_unknown = {"r_min": bad_positive_int,  # no model yet: only what the values alone refuse
                      "topk": st.one_of(non_finite, negative, zero, not_a_number,
                                        st.floats(min_value=1.0, max_value=1e9, exclude_min=True)),
                      "init": bad_choice("none", "covariance", "eva", "output-aware", "auto")}
    fields = {**BAD_SETTINGS, **shapes_unknown, **extra}
    name = data.draw(st.sampled_from(sorted(fields)))
    value = data.draw(fields[name])
    with pytest.raises((ValueError, TypeError), match=name):
        SensitivityConfig(**{name: value})


# ---------------------------------------------------------------- calibrate, export_hessians


@FAST
@given(kind=st.sampled_from(["hessian", "backend", "progress", "target_modules"]), data=st.data())
def test_calibrate_refuses_bad_arguments_before_the_pass(model, batches, kind, data):
    from sensitivity_lora import calibrate

    value = data.draw({"hessian": bad_choice("diag", "full"),
                       "backend": st.one_of(st.integers(), flags, st.text(max_size=4).filter(
                           lambda t: t not in ("", "auto", "reference", "cpu", "cuda", "triton"))),
                       "progress": bad_flag, "target_modules": bad_targets}[kind])
    before = snapshot(model)
    refused(lambda: calibrate(model, batches, **{"progress": False, kind: value}), kind)
    assert_unchanged(before, model)


EXPORT_BAD = {
    "hessian": bad_choice("diag", "full"),
    "storage_dtype": bad_choice("float64", "float32"),
    "layout": bad_choice("full", "upper"),
    "streaming": bad_flag, "distributed": bad_flag, "resume": bad_flag, "overwrite": bad_flag, "progress": bad_flag,
    "target_modules": bad_targets,
}


@FAST
@given(kind=st.sampled_from(sorted(EXPORT_BAD) + ["out_dir"]), existing=st.booleans(), data=st.data())
def test_export_hessians_refuses_bad_arguments_and_leaves_the_folder_as_it_was(model, batches, workspace, kind,
                                                                                existing, data):
    from sensitivity_lora import export_hessians

    out = old_set(workspace) if existing else fresh(workspace)
    files = folder_bytes(out)
    if kind == "out_dir":
        args = {"out_dir": data.draw(bad_path)}
    else:
        args = {"out_dir": out, kind: data.draw(EXPORT_BAD[kind])}
    before = snapshot(model)
    refused(lambda: export_hessians(model, batches, **{"progress": False, **args}), kind)
    assert_unchanged(before, model)
    assert out.exists() == existing and folder_bytes(out) == files


# ---------------------------------------------------------------- lora_config, calibration_batches


@pytest.fixture(scope="module")
def allocation():
    from sensitivity_lora.scoring import ModuleMetrics, allocate

    return allocate({f"layers.{i}.proj": ModuleMetrics(1.0 + i, 1.0, 1.0, 32, 32, f"g{i}") for i in range(3)}, 4)


@FAST
@given(kind=st.sampled_from(["allocation", "lora_alpha", "avg_rank", "ranks"]), data=st.data())
def test_lora_config_refuses_bad_arguments(allocation, kind, data):
    from sensitivity_lora import lora_config, lora_config_from_ranks

    if kind == "allocation":
        value = data.draw(st.one_of(st.integers(), st.none(), st.text(max_size=3), st.dictionaries(st.text(), st.integers())))
        call = lambda: lora_config(value)  # noqa: E731
    elif kind == "lora_alpha":
        value = data.draw(bad_positive_number.filter(lambda v: v is not None))
        call = lambda: lora_config(allocation, value)  # noqa: E731
    elif kind == "avg_rank":
        value = data.draw(bad_positive_number)
        call = lambda: lora_config_from_ranks({"layers.0.proj": 4}, value)  # noqa: E731
    else:
        value = data.draw(st.one_of(st.integers(), st.none(), st.dictionaries(
            st.just("layers.0.proj"), st.one_of(negative, fractional, non_finite, flags, st.text(max_size=2)),
            min_size=1)))
        call = lambda: lora_config_from_ranks(value, 4)  # noqa: E731
    refused(call, kind)


class CountingTokenizer:
    pad_token_id = 0

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts, truncation=True, max_length=None):
        self.calls += 1
        return {"input_ids": [[1, 2, 3] for _ in texts]}


@FAST
@given(kind=st.sampled_from(["seq_len", "batch_size", "max_samples", "texts"]), data=st.data())
def test_calibration_batches_refuses_bad_arguments_before_tokenising(kind, data):
    from sensitivity_lora import calibration_batches

    value = data.draw({"seq_len": bad_positive_int, "batch_size": bad_positive_int,
                       "max_samples": bad_positive_int_or_none,
                       "texts": st.one_of(st.integers(), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                                          st.lists(st.integers(), min_size=1, max_size=2))}[kind])
    tokenizer = CountingTokenizer()
    args = {"texts": ["some text", "more text"], **{kind: value}}
    refused(lambda: calibration_batches(tokenizer=tokenizer, **args), kind)
    assert tokenizer.calls == 0


# ---------------------------------------------------------------- TsqLoRA


@FAST
@given(kind=st.sampled_from(["avg_rank", "rho", "scores", "target_modules"]), scores=st.sampled_from(
    ["first-order", "hessian"]), data=st.data())
def test_tsqlora_initial_ranks_refuse_bad_arguments_before_any_pass(model, labelled, kind, scores, data):
    from sensitivity_lora.training import initial_ranks

    value = data.draw({"avg_rank": st.one_of(bad_positive_number, infeasible_avg_rank),
                       "rho": st.one_of(st.sampled_from([math.nan, -math.inf]), negative, zero, not_a_number),
                       "scores": bad_choice("first-order", "hessian"), "target_modules": bad_targets}[kind])
    args = {"avg_rank": 4, "scores": scores, kind: value}
    before = snapshot(model)
    refused(lambda: initial_ranks(model, labelled, **args), kind)
    assert_unchanged(before, model)


TSQLORA_BAD = {
    "RankSchedule": {"every": bad_positive_int, "start": bad_positive_int_or_none, "window": bad_positive_int,
                     "max_moves": bad_positive_int_or_none, "r_min": bad_positive_int,
                     "stop": st.one_of(non_finite, negative, zero, not_a_number,
                                       st.floats(min_value=1.0, max_value=1e6, exclude_min=True).filter(
                                           lambda x: x != int(x))),
                     "rho": st.one_of(st.just(math.nan), negative, zero, not_a_number,
                                      st.floats(min_value=0.0, max_value=1.0, exclude_max=True)),
                     "seed": st.one_of(non_finite, fractional, not_a_number)},
    "QualityConfig": {"alphas": st.one_of(st.floats(allow_nan=True), st.integers(), st.none(), flags,
                                          st.lists(st.floats(allow_nan=True), max_size=5).filter(
                                              lambda a: len(a) != 3 or not all(math.isfinite(x) and x >= 0
                                                                               for x in a))),
                      "temperature": st.one_of(st.sampled_from([math.nan, -math.inf]), negative, zero,
                                               not_a_number.filter(lambda v: v != "auto")),
                      "ess_fraction": st.one_of(non_finite, negative, zero, not_a_number,
                                                st.floats(min_value=1.0, max_value=1e6, exclude_min=True)),
                      "refresh_every": bad_positive_int, "pool_size": bad_positive_int_or_none,
                      "chunk_size": bad_positive_int,
                      "step_size": st.one_of(non_finite, negative, zero, not_a_number.filter(lambda v: v != "auto")),
                      "delta_loss": bad_choice("exact", "first-order"),
                      "seed": st.one_of(non_finite, fractional, not_a_number)},
    "QualitySampler": {"n_examples": bad_positive_int, "pool_size": bad_positive_int_or_none,
                       "num_samples": bad_positive_int_or_none, "seed": st.one_of(non_finite, fractional, not_a_number),
                       "ess_fraction": st.one_of(non_finite, negative, zero, not_a_number,
                                                 st.floats(min_value=1.0, max_value=1e6, exclude_min=True))},
    "TsqLoRAConfig": {"adapter_name": st.one_of(st.integers(), st.none(), st.just(""), flags),
                      "quality": st.one_of(st.integers(), st.text(max_size=3), flags),
                      "ranks": st.one_of(st.integers(), st.text(max_size=3), flags),
                      "loss_fn": st.one_of(st.integers(), st.text(max_size=3), flags)},
}
one_bad_tsqlora_field = st.sampled_from(sorted((c, f) for c, fields in TSQLORA_BAD.items() for f in fields)).flatmap(
    lambda cf: st.tuples(st.just(cf), TSQLORA_BAD[cf[0]][cf[1]]))


@FAST
@given(bad=one_bad_tsqlora_field)
def test_tsqlora_settings_refuse_each_bad_field(bad):
    from sensitivity_lora import training

    (cls, name), value = bad
    args = {"n_examples": 10} if cls == "QualitySampler" else {}
    with pytest.raises((ValueError, TypeError)) as info:
        getattr(training, cls)(**{**args, name: value})
    assert name in str(info.value), str(info.value)


@FAST
@given(kind=st.sampled_from(["total_steps", "seed", "make_batch", "sampler", "config"]), data=st.data())
def test_tsqlora_run_and_trainer_entry_points_refuse_bad_arguments(model, kind, data):
    from sensitivity_lora.training import TsqLoRACallback, TsqLoRAConfig, TsqLoRARun, tsqlora_trainer

    plain = TsqLoRAConfig(quality=None, ranks=None)  # touches no model: only the arguments are at stake
    value = data.draw({"total_steps": bad_positive_int, "seed": st.one_of(non_finite, fractional, not_a_number),
                       "make_batch": st.one_of(st.integers(), st.text(max_size=3)),
                       "sampler": st.one_of(st.integers(), st.text(max_size=3), flags),
                       "config": st.one_of(st.integers(), st.text(max_size=3), flags)}[kind])
    before = snapshot(model)
    if kind == "config":
        refused(lambda: TsqLoRACallback(value), "config")
        refused(lambda: TsqLoRARun(model, value, 10), "config")
        refused(lambda: tsqlora_trainer(value), "trainer_class")
    else:
        args = {"total_steps": 10, kind: value}
        refused(lambda: TsqLoRARun(model, plain, **args), kind)
    assert_unchanged(before, model)


# ---------------------------------------------------------------- HyperAdaLoRA

HYPER_BAD = {
    "avg_rank": st.one_of(bad_positive_int, st.integers(min_value=11, max_value=10**6)),  # ⌈1.5·11⌉ = 17 > 16
    "total_steps": st.one_of(bad_positive_int, st.sampled_from([1, 2])),  # no steps left to prune in
    "init_rank": st.one_of(bad_positive_int_or_none, st.integers(min_value=-5, max_value=3)),  # below avg_rank 4
    "lora_alpha": bad_positive_number.filter(lambda v: v is not None),
    "lora_dropout": st.one_of(non_finite, negative, not_a_number, st.floats(min_value=1.0, max_value=10.0)),
    "beta1": st.one_of(non_finite, negative, zero, not_a_number, st.floats(min_value=1.0, max_value=10.0)),
    "orth_reg_weight": st.one_of(non_finite, negative, not_a_number),
    "init_std": st.one_of(non_finite, negative, zero, not_a_number),
    "weight_stats": bad_flag,
    "hidden_size": bad_positive_int, "num_heads": bad_positive_int, "chunk_size": bad_positive_int,
    "tinit": st.one_of(negative, fractional, non_finite, flags, st.text(max_size=3)),
    "delta_t": bad_positive_int_or_none,
    "target_modules": bad_targets,
}


@FAST
@given(name=st.sampled_from(sorted(HYPER_BAD)), data=st.data())
def test_hyperadalora_refuses_each_bad_argument_and_leaves_the_model_alone(model, name, data):
    from sensitivity_lora.hyperadalora import get_hyperadalora_model

    value = data.draw(HYPER_BAD[name])
    args = {"avg_rank": 4, "total_steps": 100, name: value}
    before = snapshot(model)
    refused(lambda: get_hyperadalora_model(model, **args), name)
    assert_unchanged(before, model)
    assert not any("Hyper" in type(m).__name__ for m in model.modules())


def test_hyperadalora_callback_names_its_argument():
    from sensitivity_lora.hyperadalora import HyperAdaLoraCallback

    refused(lambda: HyperAdaLoraCallback(tiny_llama()), "model")


# ---------------------------------------------------------------- the command: allocate --out

NUMBER_OPTIONS = {  # option: bad values as typed on a command line
    "--avg-rank": ["nan", "inf", "-inf", "0", "-1", "-0.5", "abc", "", "1e999"],
    "--lora-alpha": ["nan", "inf", "0", "-2", "x"],
    "--rho": ["nan", "0", "-1", "-inf", "x"],
    "--r-min": ["0", "-1", "1.5", "x", "nan"],
    "--r-max": ["0", "-2", "2.5", "x"],
    "--tiers": ["0", "-1", "1.5", "x"],
    "--energy": ["0", "-0.1", "1.5", "nan", "inf", "x"],
    "--topk": ["0", "-1", "1.5", "nan", "inf", "x"],
    "--init-rho": ["0.5", "0", "-1", "nan", "inf", "x"],
    "--max-samples": ["0", "-1", "1.5", "x"],
    "--seq-len": ["0", "-4", "x"],
    "--batch-size": ["0", "-3", "x"],
}
SIGNED = st.one_of(st.integers(max_value=0).map(str), st.floats(max_value=0.0).map(repr))
one_bad_option = st.sampled_from(sorted(NUMBER_OPTIONS)).flatmap(
    lambda option: st.tuples(st.just(option), st.one_of(st.sampled_from(NUMBER_OPTIONS[option]), SIGNED)))


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny Llama with a real tokenizer, and a small text file."""
    base = tmp_path_factory.mktemp("cli")
    save_tiny_llama(base / "model")
    (base / "texts.txt").write_text("\n".join(f"sample {i}: a few words of text to calibrate on" for i in range(8)))
    return base / "model", base / "texts.txt"


def _allocate(model_dir: Path, data: Path, out: Path, *options: str) -> list[str]:
    return ["-q", "allocate", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-plot",
            "--seq-len", "16", *options]


def _names_option(line: str, option: str) -> bool:
    return option in line or option[2:].replace("-", "_") in line


@FAST
@given(bad=one_bad_option, existing=st.booleans())
def test_allocate_command_refuses_bad_numbers_before_loading_the_model(cli_model, workspace, bad, existing):
    from sensitivity_lora.cli import EXIT_INPUT, main

    option, value = bad
    out = old_set(workspace) if existing else fresh(workspace)
    files = folder_bytes(out)
    loads = []
    with mock.patch("sensitivity_lora.models.load_model_and_tokenizer",
                    side_effect=lambda *a, **k: loads.append(a) or pytest.fail("the model was loaded")), \
            contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(_allocate(*cli_model, out, f"{option}={value}"))
    err = stderr.getvalue()
    assert code == EXIT_INPUT and _names_option(err, option), (code, err)
    assert loads == []
    assert out.exists() == existing and folder_bytes(out) == files


SHAPE_OPTIONS = {  # refused from the module shapes once the model is loaded: still before any pass
    "--avg-rank": st.integers(min_value=INFEASIBLE_AVG_RANK, max_value=10**9),
    "--topk": st.integers(min_value=LARGEST_M + 1, max_value=10**12),
    "--r-min": st.integers(min_value=17, max_value=10**6),
}


@FEW
@given(option=st.sampled_from(sorted(SHAPE_OPTIONS)), existing=st.booleans(), data=st.data())
def test_allocate_command_refuses_an_infeasible_budget_before_the_pass_and_leaves_out_alone(
        cli_model, workspace, option, existing, data):
    from sensitivity_lora.cli import EXIT_INPUT, main

    value = data.draw(SHAPE_OPTIONS[option])
    out = old_set(workspace) if existing else fresh(workspace)
    checkpoint = fresh(workspace)
    files = folder_bytes(out)
    with counted_forwards() as forwards, contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(_allocate(*cli_model, out, f"{option}={value}", "--checkpoint-dir", str(checkpoint)))
    err = stderr.getvalue()
    assert code == EXIT_INPUT and _names_option(err, option), (code, err)
    assert forwards == []
    assert out.exists() == existing and folder_bytes(out) == files
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "allocation.json"]  # no lock or staging
    assert not checkpoint.exists()


# ---------------------------------------------------------------- the evaluation harness

CATEGORY = st.text(max_size=8).filter(lambda t: t not in ("business", "entertainment", "politics", "sports", "tech",
                                                         "python-docs"))
below = lambda low: st.integers(min_value=-10**6, max_value=low - 1).map(str)  # noqa: E731
COMMON_EVALUATE = {"--steps": below(1), "--batch-size": below(1), "--eval-every": below(0), "--avg-ranks": below(1),
                   "--seeds": below(0), "--threads": below(1),
                   "--lr": st.one_of(st.sampled_from(["nan", "inf", "-inf"]), st.floats(max_value=0.0).map(repr))}
EVALUATE_BAD = {
    "lm": {**COMMON_EVALUATE, "--n-train": below(1), "--n-eval": below(1), "--n-val": below(0), "--seq-len": below(2),
           "--category": CATEGORY},
    "classify": {**COMMON_EVALUATE, "--train-per-class": below(1), "--test-per-class": below(1),
                 "--max-len": below(2), "--n-calibration": below(1), "--val-per-class": below(0)},
    "stability": {"--n-texts": below(1), "--size-set": below(1), "--seq-len": below(2), "--avg-rank": below(1),
                  "--epochs": below(1), "--steps-per-epoch": below(1), "--threads": below(1),
                  "--category": CATEGORY.filter(lambda t: t != "python-docs")},
}
one_bad_evaluate_option = st.sampled_from(sorted((c, o) for c, options in EVALUATE_BAD.items() for o in options)
                                          ).flatmap(lambda co: st.tuples(st.just(co), EVALUATE_BAD[co[0]][co[1]]))


@FAST
@given(bad=one_bad_evaluate_option)
def test_evaluate_commands_refuse_bad_options_before_loading_a_model_or_writing(workspace, bad):
    from sensitivity_lora.cli import EXIT_INPUT, main

    (command, option), value = bad
    out = fresh(workspace) / "results.json"
    loads = []
    with mock.patch("sensitivity_lora.models.load_model_and_tokenizer",
                    side_effect=lambda *a, **k: loads.append(a) or pytest.fail("the model was loaded")), \
            contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(["-q", "evaluate", command, "--out", str(out), f"{option}={value}"])
    err = stderr.getvalue()
    assert code == EXIT_INPUT and option in err, (code, err)
    assert loads == [] and not out.parent.exists()


# ---------------------------------------------------------------- good values pass the same checks

LLAMA_DIMS = {f"model.layers.{i}.{name}": dims for i in range(2) for name, dims in (
    ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (32, 16)), ("self_attn.v_proj", (32, 16)),
    ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (32, 48)), ("mlp.up_proj", (32, 48)),
    ("mlp.down_proj", (48, 32)))}


@st.composite
def good_allocation_arguments(draw):
    """r̄ in [1, 8] (an integer for the uniform rule) with ρ ≥ 2 (every cap min(16, ⌊ρ·r̄⌋) ≥ r̄ here),
    r_min ≤ r̄, r_max ≥ r̄: feasible on tiny_llama whatever the rule."""
    method = draw(st.sampled_from(["sra", "pra", "uniform"]))
    avg_rank = draw(st.integers(1, 8) if method == "uniform" else st.one_of(st.integers(1, 8), st.floats(1.0, 8.0)))
    scope = draw(st.sampled_from(["matrix", "row", "eigen"]))
    init = draw(st.sampled_from(["none", "covariance", "eva", "output-aware"]))
    kwargs = dict(
        method=method, scope=scope, init=init,
        hessian="full" if scope == "eigen" else draw(st.sampled_from(["diag", "full"])),
        topk=draw(st.one_of(st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
                            st.integers(1, 32 if scope == "row" else 512))),  # m = d_in (row) or d_in·d_out
        energy=draw(st.floats(min_value=0.0, max_value=1.0, exclude_min=True)),
        fusion=draw(st.sampled_from(["sigma_mu2", "global", "local", "equal"])),
        r_min=draw(st.integers(1, math.floor(avg_rank))),
        rho=draw(st.one_of(st.floats(2.0, 1e6), st.just(math.inf))),
        r_max=draw(st.one_of(st.none(), st.integers(math.ceil(avg_rank), 1000))),
        budget_mode=draw(st.sampled_from(["rank", "params"])) if method == "sra" else "rank",
        tiers=draw(st.integers(1, 20)),
        init_rho=draw(st.floats(1.0, 100.0)),
        init_scale=draw(st.sampled_from(["unit", "default-gain"])),
    )
    return avg_rank, kwargs


@FAST
@given(good=good_allocation_arguments())
def test_good_allocation_arguments_pass_validation(good):
    from sensitivity_lora import AllocationSettings
    from sensitivity_lora.scoring.allocate import check_budget_fits
    from sensitivity_lora.settings import check_avg_rank

    avg_rank, kwargs = good
    settings = AllocationSettings(**kwargs)
    check_avg_rank(avg_rank)
    check_budget_fits(LLAMA_DIMS, avg_rank, settings)  # the same check compute_allocation makes first


@FAST
@given(good=good_allocation_arguments(), seq_len=st.integers(1, 10**6), batch_size=st.integers(1, 10**6),
       max_samples=st.one_of(st.none(), st.integers(1, 10**9)), flags=st.tuples(st.booleans(), st.booleans()),
       backend=st.sampled_from([None, "auto", "reference", "cpu", "cuda", "triton"]))
def test_good_sensitivity_config_values_pass(good, seq_len, batch_size, max_samples, flags, backend):
    from sensitivity_lora import SensitivityConfig

    SensitivityConfig(**good[1], seq_len=seq_len, batch_size=batch_size, max_samples=max_samples,
                      streaming=flags[0], progress=flags[1], backend=backend)


@FAST
@given(every=st.integers(1, 10**6), stop=st.one_of(st.integers(1, 10**6), st.floats(0.0, 1.0, exclude_min=True)),
       rho=st.one_of(st.floats(1.0, 1e6), st.just(math.inf)), seed=st.integers(-2**31, 2**31),
       alphas=st.tuples(*[st.floats(0.0, 1e6)] * 3),
       temperature=st.one_of(st.just("auto"), st.floats(min_value=1e-6, max_value=1e6), st.just(math.inf)),
       ess=st.floats(0.0, 1.0, exclude_min=True), pool=st.one_of(st.none(), st.integers(1, 10**6)))
def test_good_tsqlora_values_pass(every, stop, rho, seed, alphas, temperature, ess, pool):
    from sensitivity_lora.training import QualityConfig, QualitySampler, RankSchedule, TsqLoRAConfig

    TsqLoRAConfig(QualityConfig(alphas=alphas, temperature=temperature, ess_fraction=ess, pool_size=pool, seed=seed),
                  RankSchedule(every=every, stop=stop, rho=rho, seed=seed))
    QualitySampler(16, temperature, pool, seed, ess_fraction=ess)


@FAST
@given(avg_rank=st.integers(1, 10**4), total_steps=st.integers(3, 10**7), beta=st.floats(0.0, 1.0, exclude_min=True,
       exclude_max=True), weight=st.floats(0.0, 1e6), std=st.floats(1e-9, 1e3), stats=st.booleans())
def test_good_hyperadalora_values_pass(avg_rank, total_steps, beta, weight, std, stats):
    from sensitivity_lora.hyperadalora import HyperAdaLoraConfig

    HyperAdaLoraConfig(avg_rank=avg_rank, total_steps=total_steps, beta1=beta, beta2=beta, orth_reg_weight=weight,
                       init_std=std, weight_stats=stats)
