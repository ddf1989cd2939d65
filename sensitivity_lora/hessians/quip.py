"""Hessians in the on-disk layout of QuIP# (Cornell-RelaxML/quip-sharp), and a checked reader for it.

    from sensitivity_lora.hessians.quip import write_quip_hessians, read_quip_hessian
    write_quip_hessians(statistics, "hessians/llama_quip")     # or an export_hessians folder
    H, mu, n = read_quip_hessian("hessians/llama_quip/0_qkv.pt")

Where the layout is defined (quip-sharp at commit 1d8f873e, 2024-10-29; unchanged since its first
release, 4ac04d2, 2023-11-22):

- writer: ``quantize_llama/hessian_offline_llama.py``, ``accumulate()``. Per block ``i`` and input
  ``key`` it saves a dict with ``torch.save`` to ``{save_path}/{i}_{key}.pt``. The accumulation is
  ``lib/utils/data_utils.py``, ``register_H_hook``: a forward pre-hook on ``self_attn.q_proj``
  (key ``qkv``), ``self_attn.o_proj`` (``o``), ``mlp.up_proj`` (``up``), ``mlp.down_proj``
  (``down``) that adds, in fp64, Σx over every token to ``mu``, XᵀX to ``H`` and the token count
  to ``ct``. No attention mask is applied (its calibration sequences are unpadded, fixed-length).
- packing: ``lib/utils/data_utils.py``, ``sym_to_flat`` / ``flat_to_sym``:
  ``torch.tril_indices(N, N)``, the lower triangle row after row ((0,0), (1,0), (1,1), (2,0), ...),
  which is the upper triangle read column after column; unpacking mirrors it.
- reader: ``lib/algo/quip.py``, ``quantize_linear`` (called from ``lib/algo/finetune.py``, which
  opens ``{hessian_path}/{idx}_{name}.pt``, the names listed in
  ``quantize_llama/quantize_finetune_llama.py``: qkv, o, up, down). It unpacks ``flatH`` with
  ``n``, adds ``mu muᵀ`` back, and hands the result to ``regularize_H`` (divides by the mean of
  the diagonal, adds ``sigma_reg`` on it); ``ct`` is not read.

The keys of one file:

| key   | holds                                                                          | type       |
|-------|--------------------------------------------------------------------------------|------------|
| flatH | centred covariance C = Σxxᵀ/ct − μμᵀ, lower triangle in tril order, d(d+1)/2 | fp32 tensor |
| mu    | μ = Σx/ct, length d                                                            | fp32 tensor |
| n     | d, the input width (not a count)                                               | Python int |
| ct    | the number of tokens summed                                                    | Python int |

So the matrix QuIP# works with is C + μμᵀ = Σxxᵀ/ct, the uncentred second moment in the
``1/tokens`` normalisation (its own scale then cancels in ``regularize_H``); it is stored split into
a centred part and the mean, each rounded to fp32 after the arithmetic was done in fp64.

How the package's own files differ (``hessians.format``): they keep the raw fp64 sums Σxxᵀ (full
or upper triangle, rows first), Σx and Σx², the token and sequence counts and the member module
names, uncentred, in safetensors (nothing pickled); the normalisation is chosen on reading. The
package drops padded positions; QuIP#'s hook counts every position it sees, so the two agree for
unpadded calibration data (QuIP#'s own), and otherwise this export holds the statistics without
the padding. Here the files are computed from the package's fp64 sums the way QuIP# computes them
from its own (divide by ct, subtract μμᵀ, in fp64), then rounded to fp32.

File names: one file per block and input; q/k/v read one input (``{i}_qkv.pt``), gate/up another
(``{i}_up.pt``), then ``{i}_o.pt`` and ``{i}_down.pt``; ``i`` is the number after ``layers.`` in the
module names. Only modules named ``…layers.{i}.self_attn.{q,k,v,o}_proj`` and
``…layers.{i}.mlp.{gate,up,down}_proj`` (Llama, Mistral, Qwen2 naming) have a QuIP# name.

The files are ``torch.save`` pickles of a dict of two tensors and two ints, as QuIP# reads them;
:func:`read_quip_hessian` opens them with ``torch.load(weights_only=True)`` only, and checks them.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import torch

from ..errors import FileFormatError, MissingInputError, OutputExistsError, TargetError
from ..files import atomic_write, check_path
from ..folders import FileSet, output_lock

KEYS = ("flatH", "mu", "n", "ct")
KINDS = ("qkv", "o", "up", "down")  # the inputs of one Llama block, in QuIP#'s order
_KIND = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
         "gate_proj": "up", "up_proj": "up", "down_proj": "down"}
_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)$")
FILE_NAME = re.compile(r"(\d+)_(qkv|o|up|down)\.pt")
_FP32_UNIT = 2.0 ** -24  # unit roundoff of the stored fp32 values


# ---------------------------------------------------------------- names

def quip_file_name(module: str) -> str:
    """The QuIP# Hessian file of the input that ``module`` reads (``model.layers.3.mlp.gate_proj`` → ``3_up.pt``);
    TargetError for a module outside QuIP#'s Llama naming."""
    name = module[: -len(".base_layer")] if module.endswith(".base_layer") else module
    match = _MODULE.search(name)
    if match is None:
        raise TargetError(f"module {module} has no QuIP# Hessian name: QuIP# files exist for "
                          "…layers.<i>.self_attn.{q,k,v,o}_proj and …layers.<i>.mlp.{gate,up,down}_proj only")
    return f"{int(match.group(1))}_{_KIND[match.group(2).rsplit('.', 1)[1]]}.pt"


class _Source(NamedTuple):
    file: str
    members: tuple[str, ...]
    load: Any  # () -> (xtx fp64 (d, d), sum fp64 (d,), n_tokens)


def _sums(value: Any, label: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σxxᵀ, Σx, tokens) of a GroupStatistics, a HessianFile or a GroupSums / (xtx, total, n_tokens, members)."""
    if hasattr(value, "raw_xtx") and callable(value.raw_xtx):  # GroupStatistics
        if getattr(value, "xtx", None) is None:
            raise ValueError(f"{label}: no Σxxᵀ (diagonal calibration); calibrate with hessian='full'")
        xtx, total = value.raw_xtx(), value.sum
    elif hasattr(value, "raw_xtx"):  # HessianFile
        if value.raw_xtx is None:
            raise ValueError(f"{label}: the file holds only the diagonal; export with hessian='full'")
        xtx, total = value.raw_xtx, value.raw_sum
    elif isinstance(value, tuple) and len(value) == 4:  # GroupSums
        xtx, total = value[0], value[1]
    else:
        raise TypeError(f"{label}: cannot read sums from a {type(value).__name__}")
    n = value[2] if isinstance(value, tuple) else value.n_tokens
    if total is None:
        raise ValueError(f"{label}: no Σx; QuIP# files need the mean (mu): use statistics that keep Σx")
    if not isinstance(xtx, torch.Tensor) or not isinstance(total, torch.Tensor):
        raise TypeError(f"{label}: Σxxᵀ and Σx must be tensors")
    d = total.numel()
    if xtx.shape != (d, d) or total.shape != (d,):
        raise ValueError(f"{label}: Σxxᵀ has shape {tuple(xtx.shape)} and Σx {tuple(total.shape)}; expected "
                         f"({d}, {d}) and ({d},)")
    n = int(n)
    if n <= 0:
        raise ValueError(f"{label}: no calibration tokens (n_tokens={n})")
    return xtx, total, n


def _members(value: Any) -> tuple[str, ...]:
    members = value[3] if isinstance(value, tuple) else value.members
    return (members,) if isinstance(members, str) else tuple(members)


def _sources(source: Any) -> list[tuple[str, tuple[str, ...], Any]]:
    """(label, members, loader) per distinct input group of ``source``; an export folder is read file by
    file when written (a whole model's fp64 sums need not fit in memory at once)."""
    if isinstance(source, (str, os.PathLike)):
        from .format import INDEX_FILE, _member_name, load_hessian, read_index

        folder = Path(source)
        index = read_index(folder)
        if index.get("complete") is False:
            raise FileFormatError(f"the export in {folder} is incomplete (still running, or interrupted): resume it "
                                  "before converting it")
        out = []
        for group, name in index["groups"].items():
            path = _member_name(folder, name, folder / INDEX_FILE)
            members = tuple(m for m, g in index["modules"].items() if g == group)
            out.append((str(path), members, lambda path=path: load_hessian(path, convention="sum")))
        return out
    groups = getattr(source, "groups", source)  # CalibrationStatistics → its groups
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError("source must be an export folder, CalibrationStatistics, or a non-empty mapping of "
                        f"GroupStatistics / HessianFile / GroupSums, not {type(source).__name__}")
    out, seen = [], set()
    for key, value in groups.items():
        if id(value) in seen:  # load_hessians(by="module") repeats one object per member
            continue
        seen.add(id(value))
        out.append((f"group {key}", _members(value), lambda value=value: value))
    return out


def _plan(source: Any, strict: bool) -> list[_Source]:
    """Every group's QuIP# file, checked before anything is written: members of one group map to one
    file, no two groups to the same file and, with ``strict``, every group maps and every block
    0..L-1 has its four files."""
    planned: dict[str, _Source] = {}
    unnamed = []
    for label, members, load in _sources(source):
        if not members:
            raise ValueError(f"{label} has no member modules")
        names = set()
        for member in members:
            try:
                names.add(quip_file_name(member))
            except TargetError:
                unnamed.append(member)
        if not names:
            continue
        if len(names) > 1:
            raise TargetError(f"{label}: its modules {', '.join(members)} read one input but fall under several "
                              f"QuIP# files ({', '.join(sorted(names))})")
        file = names.pop()
        if file in planned:
            raise TargetError(f"{label} and {planned[file].members[0]}'s group both map to {file}: QuIP# keeps one "
                              "Hessian per block and input")
        planned[file] = _Source(file, members, load)
    if strict and unnamed:
        raise TargetError(f"{len(unnamed)} module(s) have no QuIP# Hessian name ({', '.join(unnamed[:4])}); QuIP# "
                          "reads …layers.<i>.self_attn.{q,k,v,o}_proj and …layers.<i>.mlp.{gate,up,down}_proj. "
                          "Pass strict=False to leave them out")
    if not planned:
        raise TargetError("no module of the source has a QuIP# Hessian name (a Llama-style model's "
                          "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)")
    if strict:
        blocks = {int(FILE_NAME.fullmatch(f).group(1)) for f in planned}
        missing = [f"{i}_{k}.pt" for i in range(max(blocks) + 1) for k in KINDS if f"{i}_{k}.pt" not in planned]
        if missing:
            raise TargetError(f"QuIP# reads four files per block for every block; {len(missing)} would be missing "
                              f"({', '.join(missing[:4])}): calibrate all of q/k/v, o, gate/up, down of every block, "
                              "or pass strict=False for a partial set")
    return sorted(planned.values(), key=lambda s: (int(FILE_NAME.fullmatch(s.file).group(1)),
                                                   KINDS.index(FILE_NAME.fullmatch(s.file).group(2))))


# ---------------------------------------------------------------- writing

def quip_payload(xtx: torch.Tensor, total: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    """One QuIP# file's dict from the raw sums (see the module docstring): centred, per token, fp32."""
    xtx = xtx.detach().to(device="cpu", dtype=torch.float64)
    total = total.detach().to(device="cpu", dtype=torch.float64)
    d = total.numel()
    mu = total / n_tokens
    cov = xtx / n_tokens - torch.outer(mu, mu)
    rows, cols = torch.tril_indices(d, d)
    flat = cov[rows, cols].to(torch.float32).contiguous()  # symmetric: either triangle of Σxxᵀ is the same
    if not torch.isfinite(flat).all() or not torch.isfinite(mu).all():
        raise ValueError("the sums are not finite (or overflow fp32 once divided by the token count)")
    return {"flatH": flat, "mu": mu.to(torch.float32).contiguous(), "n": int(d), "ct": int(n_tokens)}


def write_quip_hessians(source: Any, folder: str | os.PathLike, *, overwrite: bool = False,
                        strict: bool = True) -> dict[str, tuple[str, ...]]:
    """Write ``source``'s Hessians into ``folder`` as QuIP#'s ``{block}_{qkv,o,up,down}.pt`` files.

    ``source``: a ``CalibrationStatistics`` (``calibrate(..., hessian="full")``), a mapping of
    ``GroupStatistics`` (e.g. one block's from ``iter_block_statistics``), ``load_hessians``' dict
    (by module or by group), ``group_sums_from_statistics``' GroupSums, or a folder written by
    ``export_hessians`` (read one file at a time). ``strict`` (default): every group must have a QuIP#
    name and every block 0..L-1 all four files (what QuIP#'s quantiser opens); ``strict=False`` writes
    what maps and leaves the rest out.

    The set is written whole: staged in a hidden folder and moved into place together, under the
    folder's lock, so the folder holds either the complete new set or what it held before (an error
    or a kill half way changes nothing). A folder that already holds QuIP# Hessian files
    (``<i>_<qkv|o|up|down>.pt``) is refused unless ``overwrite``, which replaces all of them (other
    files, e.g. QuIP#'s ``dev_activations.pt``, stay). Returns ``{file name: member modules}``.
    """
    check_path("folder", folder)
    for flag_name, flag in (("overwrite", overwrite), ("strict", strict)):
        if not isinstance(flag, bool):
            raise ValueError(f"{flag_name} must be True or False, got {flag!r}")
    plan = _plan(source, strict)  # names checked before the folder is touched
    folder = Path(folder)
    with output_lock(folder, "QuIP# Hessian folder"):
        old = sorted(p.name for p in folder.iterdir() if FILE_NAME.fullmatch(p.name) and p.is_file())
        if old and not overwrite:
            raise OutputExistsError(
                f"{folder} already holds QuIP# Hessian files ({', '.join(old[:4])}{', ...' if len(old) > 4 else ''}); "
                "a new set would mix with them. Pass overwrite=True to replace them, or choose another folder",
                errno.EEXIST)
        files = FileSet(folder, replaces=old)
        try:
            for item in plan:
                value = item.load()
                try:
                    payload = quip_payload(*_sums(value, item.file))
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"{item.file} (modules {', '.join(item.members)}): {exc}") from None
                atomic_write(files.path(item.file), lambda tmp, payload=payload: torch.save(payload, tmp))
                del payload, value
            files.commit()
        finally:
            files.discard()
    return {item.file: item.members for item in plan}


# ---------------------------------------------------------------- reading

class QuipHessian(NamedTuple):
    """One QuIP# Hessian file, read back and checked (fp64)."""

    H: torch.Tensor  # (d, d): flatH unpacked + μμᵀ = Σxxᵀ/ct, the matrix QuIP#'s quantize_linear uses
    mu: torch.Tensor  # (d,): Σx/ct
    n: int  # ct, the number of tokens (the file's own "n" is d, i.e. H.shape[0])

    @property
    def covariance(self) -> torch.Tensor:
        """The centred covariance the file stores (H − μμᵀ)."""
        return self.H - torch.outer(self.mu, self.mu)


def _count(value: Any, key: str, path: Path) -> int:
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_floating_point \
            and not value.dtype.is_complex and value.dtype != torch.bool:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FileFormatError(f"{path}: {key!r} must be an integer, found {type(value).__name__} {value!r}"[:300])
    if value <= 0:
        raise FileFormatError(f"{path}: {key!r} must be positive, found {value}")
    return value


def _vector(value: Any, key: str, length: int, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise FileFormatError(f"{path}: {key!r} must be a tensor, found {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise FileFormatError(f"{path}: {key!r} must be a floating-point tensor (QuIP# writes float32), found "
                              f"{value.dtype}")
    if value.ndim != 1 or value.numel() != length:
        want = f"d(d+1)/2 = {length}" if key == "flatH" else f"d = {length}"
        raise FileFormatError(f"{path}: {key!r} has shape {tuple(value.shape)}; expected a vector of length {want} "
                              "(d is the file's 'n')")
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise FileFormatError(f"{path}: {key!r} holds {bad} non-finite value(s) (NaN/Inf)")
    return value.to(device="cpu", dtype=torch.float64)


def read_quip_hessian(path: str | os.PathLike) -> QuipHessian:
    """Read and check one QuIP# Hessian file; returns ``(H, mu, n)`` (:class:`QuipHessian`, fp64).

    Opened with ``torch.load(weights_only=True)`` only: a file that needs anything but tensors and
    plain Python values is refused, never executed. Checked: the four keys, ``n`` (= d) and ``ct`` positive
    integers, ``flatH`` of length d(d+1)/2 and ``mu`` of length d as floating tensors, all finite,
    the covariance positive semidefinite within rounding (λ_min(C) ≥ −d·2⁻²⁴·max diag(C + μμᵀ), tested
    by a Cholesky factorisation of C + that margin·I; the triangle makes it symmetric) and H not zero. Every error is
    a FileFormatError (MissingInputError for a missing file) naming the file and what is wrong.
    """
    check_path("path", path)
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no QuIP# Hessian file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path}: refused by torch.load(weights_only=True), it holds more than tensors and "
                              f"plain values ({first[:200]}); not a QuIP# Hessian file, not loaded") from None
    except Exception as exc:  # truncated, not a torch file, ...
        raise FileFormatError(f"{path} is not a readable torch file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} holds a {type(data).__name__}, not the dict of a QuIP# Hessian file "
                              f"(keys {', '.join(KEYS)})")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise FileFormatError(f"{path} lacks the key(s) {', '.join(map(repr, missing))} of a QuIP# Hessian file "
                              f"(it has {', '.join(map(repr, list(data)[:8]))})")
    d = _count(data["n"], "n", path)
    ct = _count(data["ct"], "ct", path)
    flat = _vector(data["flatH"], "flatH", d * (d + 1) // 2, path)
    mu = _vector(data["mu"], "mu", d, path)
    cov = torch.zeros(d, d, dtype=torch.float64)
    rows, cols = torch.tril_indices(d, d)
    cov[rows, cols] = flat
    cov[cols, rows] = flat
    diag = cov.diagonal()
    if (diag < 0).any():
        i = int(torch.argmin(diag))
        raise FileFormatError(f"{path}: the covariance has a negative diagonal entry ({float(diag[i]):.3g} at {i}); "
                              "a covariance is positive semidefinite")
    # entries carry rounding relative to the uncentred second moment (fp32 storage; sums of fp32 products
    # before the centring): ‖error‖₂ ≤ ‖error‖_F ≤ d·u·max diag(C + μμᵀ)
    scale = float((diag + mu * mu).max())
    margin = d * _FP32_UNIT * scale if scale > 0 else 1.0
    diag.add_(margin)  # in place: one d×d copy less (a Llama MLP input is d = 11008)
    factor, info = torch.linalg.cholesky_ex(cov)
    diag.sub_(margin)
    del factor
    if int(info) != 0:
        lowest = float(torch.linalg.eigvalsh(cov)[0])
        raise FileFormatError(f"{path}: the covariance is not positive semidefinite (smallest eigenvalue "
                              f"{lowest:.3g}, beyond the fp32 rounding margin {margin:.3g}); corrupt, or not "
                              "packed in QuIP#'s lower-triangle order")
    H = cov.add_(torch.outer(mu, mu))
    if not float(H.diagonal().sum()) > 0:
        raise FileFormatError(f"{path}: H is zero (no signal); QuIP# divides by the mean of its diagonal")
    return QuipHessian(H, mu, ct)


def iter_quip_files(folder: str | os.PathLike) -> Iterator[Path]:
    """The QuIP# Hessian files of ``folder`` in block order (qkv, o, up, down within a block)."""
    found = [p for p in Path(folder).iterdir() if FILE_NAME.fullmatch(p.name) and p.is_file()]

    def key(p: Path) -> tuple[int, int]:
        match = FILE_NAME.fullmatch(p.name)
        return int(match.group(1)), KINDS.index(match.group(2))

    return iter(sorted(found, key=key))


__all__ = ["QuipHessian", "iter_quip_files", "quip_file_name", "quip_payload", "read_quip_hessian",
           "write_quip_hessians"]
