"""The result of an allocation: per-module ranks, θ and metrics, with a plain JSON form,
and Kendall's τ-b between two results."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import FileFormatError, MissingInputError
from ..files import atomic_write_text, json_safe
from ..init.state import PEFT_MODEL_PREFIX
from ..settings import BUDGET_MODES, RANK_RULES
from .metrics import ModuleMetrics

if TYPE_CHECKING:
    import torch

TOP_FRACTION = 0.05
WEIGHTS_FORMAT = "sensitivity-lora-initial-weights"  # concentration: the share of the ranks held by this fraction of the modules


@dataclass(frozen=True)
class ModuleAllocation(ModuleMetrics):
    """One module's metrics, shape and input group, with its θ, rank and the bound it sits at
    ("min", "max" or None)."""

    rank: int
    theta: float
    at_bound: str | None = None


@dataclass
class Allocation:
    """Ranks for every target module (insertion order = model order) and how they were chosen.

    ``budget`` is the target: rank units (round(avg_rank · M)) in rank mode,
    parameters (floor(avg_rank · Σ(d_in + d_out))) in params mode. PRA and
    uniform may land off it; :meth:`total_rank` and :meth:`trainable_params`
    say what was reached.
    """

    method: str
    avg_rank: float
    budget: int
    budget_mode: str
    settings: dict = field(default_factory=dict)
    modules: dict[str, ModuleAllocation] = field(default_factory=dict)
    # A of every module (rank × d_in, fp32; B = 0) when an initialisation was computed; not in the JSON
    initial_weights: dict[str, "torch.Tensor"] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.settings = json_safe(self.settings)

    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules.values())

    def trainable_params(self) -> int:
        """Σ r · (d_in + d_out): the LoRA A and B parameters."""
        return sum(m.rank * (m.d_in + m.d_out) for m in self.modules.values())

    def concentration(self) -> dict[str, Any]:
        """How concentrated the ranks are: the share of Σ rank held by the top 5 % of modules
        (max(1, floor(0.05 · M)) modules, by rank), and how many modules sit at r_min and at r_max."""
        ranks = sorted((m.rank for m in self.modules.values()), reverse=True)
        top = max(1, math.floor(TOP_FRACTION * len(ranks)))
        total = sum(ranks)
        bounds = [m.at_bound for m in self.modules.values()]
        return {"top_fraction": TOP_FRACTION, "top_modules": top,
                "top5_share": (sum(ranks[:top]) / total) if total else 0.0,
                "at_min": bounds.count("min"), "at_max": bounds.count("max")}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``concentration``, ``total_rank`` and ``trainable_params`` are derived."""
        return {"method": self.method, "avg_rank": self.avg_rank, "budget": self.budget,
                "budget_mode": self.budget_mode, "total_rank": self.total_rank(),
                "trainable_params": self.trainable_params(), "settings": json_safe(self.settings),
                "concentration": self.concentration(),
                "modules": {name: asdict(m) for name, m in self.modules.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the allocation") -> "Allocation":
        """The allocation in ``data`` (the JSON form), every field checked: FileFormatError naming
        ``source`` and the module when a rank is not a non-negative integer within the matrix size,
        a metric or θ is not a finite number, a shape is not positive, ..."""
        check_allocation_dict(data, source)
        known = {f.name for f in fields(ModuleAllocation)}
        modules = {name: ModuleAllocation(**{k: v for k, v in m.items() if k in known})
                   for name, m in data["modules"].items()}
        return cls(method=data["method"], avg_rank=float(data["avg_rank"]), budget=data["budget"],
                   budget_mode=data["budget_mode"], settings=dict(data.get("settings", {})), modules=modules)

    def save(self, path: str | Path) -> None:
        """Write the JSON form atomically (a crash leaves the old file or the new one, never half of one)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path, initial_weights: str | Path | None = None) -> "Allocation":
        """Read ``path`` (JSON) and, when given, the initial weights written by :meth:`save_initial_weights`.

        Everything is checked (see :meth:`from_dict`); a missing, unreadable, truncated or invalid file
        raises FileFormatError (MissingInputError when it is not there) naming it."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"no allocation file at {path}" + (" (it is a folder: pass the "
                                    "allocation.json inside it)" if path.is_dir() else ""))
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FileFormatError(f"{path} is not a readable allocation ({exc}); it may be truncated: "
                                  "write it again with Allocation.save or `sensitivity-lora allocate`") from None
        allocation = cls.from_dict(data, str(path))
        if initial_weights is not None:
            allocation.initial_weights = load_initial_weights(initial_weights, allocation)
        return allocation

    def save_initial_weights(self, path: str | Path) -> None:
        """The initial A matrices as safetensors (one tensor per module, rank × d_in), written atomically."""
        if self.initial_weights is None:
            raise ValueError("this allocation has no initial weights (compute it with an init other than 'none')")
        from ..files import atomic_save_safetensors

        tensors = {name: a for name, a in self.initial_weights.items() if a.shape[0] > 0}
        atomic_save_safetensors(path, tensors, {"format": WEIGHTS_FORMAT, "init": str(self.settings.get("init")),
                                                "ranks": json.dumps(self.ranks())})

    def eva_state_dict(self, prefix: str = PEFT_MODEL_PREFIX) -> dict[str, "torch.Tensor"]:
        """The initial weights in PEFT ``get_eva_state_dict``'s format, for
        ``peft.tuners.lora.eva.initialize_lora_eva_weights(peft_model, eva_state_dict=...)``."""
        if self.initial_weights is None:
            raise ValueError("this allocation has no initial weights (compute it with an init other than 'none')")
        return {prefix + name: a.clone() for name, a in self.initial_weights.items()}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_allocation_dict(data: Any, source: str = "the allocation") -> None:
    """Raise FileFormatError naming ``source`` unless ``data`` is a sound allocation (see ``Allocation.from_dict``)."""
    def bad(why: str) -> FileFormatError:
        return FileFormatError(f"{source}: {why}; it is not an allocation as Allocation.save writes it")

    if not isinstance(data, Mapping):
        raise bad(f"the top level is {type(data).__name__}, not a JSON object")
    missing = [k for k in ("method", "avg_rank", "budget", "budget_mode", "modules") if k not in data]
    if missing:
        raise bad(f"it has no {', '.join(missing)}")
    if data["method"] not in RANK_RULES:
        raise bad(f"method={data['method']!r} is not one of {', '.join(RANK_RULES)}")
    if data["budget_mode"] not in BUDGET_MODES:
        raise bad(f"budget_mode={data['budget_mode']!r} is not one of {', '.join(BUDGET_MODES)}")
    if not _is_number(data["avg_rank"]) or data["avg_rank"] <= 0:
        raise bad(f"avg_rank={data['avg_rank']!r} is not a positive finite number")
    if not _is_int(data["budget"]) or data["budget"] < 0:
        raise bad(f"budget={data['budget']!r} is not a non-negative integer")
    if not isinstance(data.get("settings", {}), Mapping):
        raise bad("settings is not a JSON object")
    modules = data["modules"]
    if not isinstance(modules, Mapping) or not modules:
        raise bad("modules is not a non-empty JSON object (module name → its rank and metrics)")
    for name, m in modules.items():
        if not isinstance(m, Mapping):
            raise bad(f"module {name} is {type(m).__name__}, not a JSON object")
        absent = [k for k in ("rank", "theta", "trace", "topk", "eff_rank", "d_in", "d_out", "group") if k not in m]
        if absent:
            raise bad(f"module {name} has no {', '.join(absent)}")
        for key in ("d_in", "d_out"):
            if not _is_int(m[key]) or m[key] < 1:
                raise bad(f"module {name}: {key}={m[key]!r} is not a positive integer")
        rank = m["rank"]
        if not _is_int(rank) or rank < 0:
            raise bad(f"module {name}: rank={rank!r} is not a non-negative integer")
        if rank > max(m["d_in"], m["d_out"]):
            raise bad(f"module {name}: rank {rank} exceeds the size of its {m['d_out']} × {m['d_in']} matrix")
        for key in ("theta", "trace", "topk", "eff_rank"):
            if not _is_number(m[key]):
                raise bad(f"module {name}: {key}={m[key]!r} is not a finite number")
        if not isinstance(m["group"], str):
            raise bad(f"module {name}: group={m['group']!r} is not a module name")
        if m.get("at_bound") not in (None, "min", "max"):
            raise bad(f"module {name}: at_bound={m.get('at_bound')!r} is not null, 'min' or 'max'")


def load_initial_weights(path: str | Path, allocation: Allocation) -> dict[str, "torch.Tensor"]:
    """The A matrices of ``path``, checked against ``allocation``'s ranks and shapes."""
    import torch

    from ..calibration.serialize import read_safetensors

    meta, tensors = read_safetensors(path, "initial-weights file")
    if meta.get("format") != WEIGHTS_FORMAT:
        raise FileFormatError(f"{path} is not a sensitivity-lora initial-weights file (format={meta.get('format')!r})")
    weights = {}
    for name, m in allocation.modules.items():
        a = tensors.pop(name, None)
        if a is None:
            a = torch.zeros(0, m.d_in)
        if tuple(a.shape) != (m.rank, m.d_in) or not a.is_floating_point() or not bool(torch.isfinite(a).all()):
            raise FileFormatError(f"{path}: the weight of {name} has shape {tuple(a.shape)}, expected "
                                  f"({m.rank}, {m.d_in}) finite floats; was it written for this allocation?")
        weights[name] = a
    if tensors:
        raise FileFormatError(f"{path} holds weights of modules the allocation does not have "
                              f"(e.g. {next(iter(tensors))})")
    return weights


def kendall_tau(a: Allocation, b: Allocation) -> float:
    """Kendall's τ-b between the θ orderings of two allocations over their common modules.

    NaN when θ is constant in either (the ordering is undefined).
    """
    from scipy.stats import kendalltau

    common = [name for name in a.modules if name in b.modules]
    if len(common) < 2:
        raise ValueError(f"the allocations share {len(common)} module(s); Kendall's τ needs at least 2 "
                         "(were they computed for the same model and target_modules?)")
    x = [a.modules[n].theta for n in common]
    y = [b.modules[n].theta for n in common]
    return float(kendalltau(x, y, variant="b").statistic)
