"""The PEFT-native entry, held like PEFT's EVA: a config object and one call on a PEFT model.

    from peft import LoraConfig, get_peft_model
    from sensitivity_lora import SensitivityConfig, initialize_lora_sensitivity

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_model = initialize_lora_sensitivity(peft_model, texts, tokenizer=tokenizer)

The LoraConfig says what to adapt, the average rank r̄ (``r``), ``lora_alpha`` (the alpha of
uniform LoRA at rank r̄) and everything else (dropout, bias, rsLoRA, DoRA, ...);
:class:`SensitivityConfig` says how the ranks and the initial weights are chosen and how the
calibration data is read. The returned model is a new ``PeftModel`` over the same base model: use
it, not the one passed in (whose adapters were taken out). Its ``save_pretrained`` folder carries
the ranks in ``adapter_config.json`` and is verified on its own by ``verify_ranks(model, folder)``.
"""
from __future__ import annotations

import copy
import dataclasses
from numbers import Integral
from typing import Any, Sequence

from torch import nn

from .api import compute_allocation
from .batches import as_batches
from .calibration.model_state import ModelState
from .calibration.targets import module_dims, resolve_targets
from .calibration.validate import check_backend_name
from .data import check_positive
from .peft import adapter_layers, base_key, build_peft_model, check_lora_alpha, lora_config_from_ranks
from .models import is_causal_lm
from .scoring.allocate import check_budget_fits
from .settings import AUTO_INIT, AllocationSettings, auto_init, auto_init_scale, check_adapter_name, check_flag

_OWN_INITS = ("eva", "corda")  # PEFT initialisations that need their own data pass: they would override ours


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(AllocationSettings):
    """The allocation settings (every field of :class:`AllocationSettings`; here ``init`` defaults to
    ``"auto"``: ``covariance`` with ``init_scale="default-gain"`` for a causal LM, ``none`` otherwise, as
    docs/results.md found; "auto" sets both, choose an init to choose its scale) and how calibration reads
    the data.

    seq_len, batch_size, max_samples: how text and tokenised rows are cut and batched (batches
      already made are used as they are); text_field: the text column of a ``datasets.Dataset``.
    streaming: run the model one block at a time (same result, one block's statistics in memory).
    backend: the statistics kernels (None: the best available).
    progress: a progress bar over the calibration batches.
    """

    init: str = AUTO_INIT
    seq_len: int = 256
    batch_size: int = 8
    max_samples: int | None = None
    text_field: str = "text"
    streaming: bool = False
    backend: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        auto = self.init == AUTO_INIT
        if auto:  # validated as "none"; resolved per model by allocation_settings
            object.__setattr__(self, "init", "none")
        super().__post_init__()
        if auto:
            object.__setattr__(self, "init", AUTO_INIT)
        check_positive("seq_len", self.seq_len)
        check_positive("batch_size", self.batch_size)
        if self.max_samples is not None:
            check_positive("max_samples", self.max_samples)
        for name in ("streaming", "progress"):
            check_flag(name, getattr(self, name))
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string (a column name), got {self.text_field!r}")
        if self.backend is not None:
            check_backend_name(self.backend)

    def allocation_settings(self, causal_lm: bool = True) -> AllocationSettings:
        """The allocation part alone (what ``allocation.json`` records), ``init="auto"`` resolved for a model
        that is (or is not) a causal LM."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(AllocationSettings)}
        if fields["init"] == AUTO_INIT:  # "auto" chooses the init and its row length together
            fields["init"] = auto_init(causal_lm)
            fields["init_scale"] = auto_init_scale(fields["init"])
        return AllocationSettings(**fields)


def _check_lora_config(lora_config: Any, config: SensitivityConfig) -> None:
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"expected a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.rank_pattern or lora_config.alpha_pattern:
        raise ValueError("the LoraConfig already has a rank_pattern/alpha_pattern: the ranks are what this call "
                         "chooses; remove them")
    weights = lora_config.init_lora_weights
    if isinstance(weights, str) and weights.lower() in _OWN_INITS:
        raise ValueError(f"init_lora_weights={weights!r} needs PEFT's own initialisation pass; use "
                         f"SensitivityConfig(init=...) here instead ('eva' is this package's exact EVA)")
    if config.init not in ("none", AUTO_INIT) and not isinstance(weights, bool):
        raise ValueError(f"init_lora_weights={weights!r} conflicts with SensitivityConfig(init={config.init!r}), "
                         "which sets A from the statistics and B = 0; pass init='none' to keep PEFT's initialisation")
    r = lora_config.r
    if isinstance(r, bool) or not isinstance(r, Integral) or r < 1:
        raise ValueError(f"LoraConfig.r must be a positive integer (the average rank), got {r!r}")
    check_lora_alpha(lora_config.lora_alpha)  # used only after the calibration pass: checked before it


def _adapted_names(peft_model: nn.Module, adapter_name: str) -> list[str]:
    """The module names (relative to the base model) that hold a LoRA layer of ``adapter_name``."""
    return [base_key(path) for path, _ in adapter_layers(peft_model, adapter_name)]


def _targets_of(model: nn.Module, lora_config: Any, adapter_name: str) -> list[str]:
    """The modules PEFT would adapt under ``lora_config`` (found by PEFT itself, with empty LoRA
    weights on the meta device, and taken out again)."""
    from peft import get_peft_model

    state = ModelState.capture(model)
    try:
        probe = get_peft_model(model, copy.deepcopy(lora_config), adapter_name=adapter_name, low_cpu_mem_usage=True)
        return _adapted_names(probe, adapter_name)
    finally:
        state.restore()


def initialize_lora_sensitivity(model: nn.Module, data: Any, lora_config: Any = None,
                                config: SensitivityConfig | None = None, *, tokenizer: Any = None,
                                target_modules: str | Sequence[str] | None = None,
                                adapter_name: str = "default"):
    """A PEFT model whose ranks and initial adapters come from one calibration pass over ``data``.

    model: a ``PeftModel`` with one LoRA adapter (its LoraConfig and its adapted modules are used;
      its adapters are taken out, as ``unload()`` does, and new ones built), or a base model with
      ``lora_config`` (default: r = 8, lora_alpha = 16, every linear layer of the transformer blocks,
      or ``target_modules``).
    data: a DataLoader or list of batches, a ``datasets.Dataset`` (tokenised, or text with
      ``tokenizer``), tokenised rows, or a list of texts with ``tokenizer`` (see
      :mod:`sensitivity_lora.batches`).

    Bad input is refused before any work; on any error the model is left as it was.
    """
    from peft import LoraConfig, PeftModel

    config = SensitivityConfig() if config is None else config
    if not isinstance(config, SensitivityConfig):
        raise ValueError(f"config must be a SensitivityConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    is_peft = isinstance(model, PeftModel)
    if is_peft:
        if lora_config is not None or target_modules is not None:
            raise ValueError("pass a PeftModel, or a base model with lora_config/target_modules, not both: a "
                             "PeftModel's own LoraConfig and adapted modules are used")
        if set(model.peft_config) != {adapter_name}:
            raise ValueError(f"the PeftModel holds adapters {sorted(model.peft_config)}; this call builds exactly "
                             f"one, {adapter_name!r}")
        lora_config = model.peft_config[adapter_name]
    elif lora_config is None:
        lora_config = LoraConfig(r=8, lora_alpha=16)
    _check_lora_config(lora_config, config)
    batches = as_batches(data, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
                         max_samples=config.max_samples, text_field=config.text_field)
    if is_peft:
        targets = _adapted_names(model, adapter_name)
        base = model.get_base_model()
    elif lora_config.target_modules is not None and target_modules is None:
        targets, base = _targets_of(model, lora_config, adapter_name), model
    else:
        targets, base = target_modules, model  # None: every linear layer of the blocks
    # the budget against the shapes, before anything changes, in the terms of this call's argument (LoraConfig.r)
    names = targets if is_peft else resolve_targets(base, targets)
    layers = {n: base.get_submodule(n) for n in names}
    shapes = {n: module_dims(getattr(m, "base_layer", m)) for n, m in layers.items()}  # a PEFT layer wraps its linear
    try:
        check_budget_fits(shapes, int(lora_config.r), config.allocation_settings())
    except ValueError as exc:
        raise ValueError(f"LoraConfig.r={lora_config.r} (the average rank r̄) does not fit the adapted modules: "
                         f"{exc}") from None
    state = ModelState.capture(base)
    try:
        if is_peft:
            model.unload()  # the base model back, without the adapters (not merged)
        # auto: the statistics' init for a causal LM, unless the LoraConfig asks for one of PEFT's own (e.g. PiSSA)
        explicit = not isinstance(lora_config.init_lora_weights, bool)
        settings = config.allocation_settings(is_causal_lm(base) and not explicit)
        allocation = compute_allocation(base, batches, int(lora_config.r), settings,
                                        target_modules=targets, backend=config.backend, progress=config.progress,
                                        streaming=config.streaming)
        ranked = lora_config_from_ranks(allocation.ranks(), lora_config.r, lora_config.lora_alpha,
                                        use_rslora=lora_config.use_rslora)
        new_config = dataclasses.replace(copy.deepcopy(lora_config), r=ranked.r, lora_alpha=ranked.lora_alpha,
                                         target_modules=ranked.target_modules, rank_pattern=ranked.rank_pattern,
                                         alpha_pattern=ranked.alpha_pattern)
        return build_peft_model(base, allocation, new_config, adapter_name)
    except BaseException:
        state.restore()  # the adapters (and every flag PEFT set) as they were
        raise
