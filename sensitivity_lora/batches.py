"""Calibration data in the forms users hold, turned into the token batches calibration reads.

Accepted (``as_batches``):

- batches already made: a ``DataLoader`` (or any iterable) of dicts with a 2-D ``input_ids``
  tensor, or one such dict (a tokenizer's ``BatchEncoding``); tensors other than labels are kept,
  everything else (text columns a collator passed through) is dropped;
- tokenised rows: a ``datasets.Dataset`` with an ``input_ids`` column, or a list of dicts whose
  ``input_ids`` is a list of ids (``attention_mask``, if present, drops the padded positions);
  they are cut to ``seq_len`` and padded into batches of ``batch_size``;
- text: a list of strings, or a ``datasets.Dataset`` with a text column, with ``tokenizer``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from .data import calibration_batches, check_positive, pad_id, padded_batches
from .errors import DataError

_DROPPED_KEYS = ("labels", "label")  # calibration never reads labels


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "__getitem__") and not isinstance(data, Mapping)


def _row_ids(row: Mapping[str, Any], index: int, seq_len: int) -> list[int]:
    ids = row.get("input_ids")
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise DataError(f"row {index}: input_ids must be one sequence, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(isinstance(t, int) for t in ids):
        raise DataError(f"row {index}: input_ids must be a list of token ids, got {type(ids).__name__}")
    mask = row.get("attention_mask")
    if mask is not None:
        mask = mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)
        if len(mask) != len(ids):
            raise DataError(f"row {index}: attention_mask has {len(mask)} entries for {len(ids)} tokens")
        ids = [t for t, m in zip(ids, mask) if m]
    return list(ids[:seq_len])


def _rows_to_batches(rows: Iterable[Mapping[str, Any]], tokenizer: Any, seq_len: int, batch_size: int,
                     max_samples: int | None) -> list[dict[str, torch.Tensor]]:
    sequences = []
    for index, row in enumerate(rows):
        if max_samples is not None and len(sequences) >= max_samples:
            break
        ids = _row_ids(row, index, seq_len)
        if ids:
            sequences.append(ids)
    if not sequences:
        raise DataError("no calibration tokens: every row is empty")
    return padded_batches(sequences, pad_id(tokenizer) if tokenizer is not None else 0, batch_size)


def _ready_batch(batch: Mapping[str, Any], index: int) -> dict[str, Any]:
    ids = batch["input_ids"]
    if isinstance(ids, list) and ids and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in ids):
        # default_collate over rows of equal-length lists gives one tensor per position: put them back as rows
        batch = {k: torch.stack(v, dim=1) if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                 for k, v in batch.items()}
        ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise DataError(f"batch {index}: input_ids must be a 2-D tensor (batch, tokens), got "
                        f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in _DROPPED_KEYS}


def _texts(texts: Sequence[str], tokenizer: Any, seq_len: int, batch_size: int,
           max_samples: int | None) -> list[dict[str, torch.Tensor]]:
    if tokenizer is None:
        raise DataError("calibration data given as text needs tokenizer= (the model's tokenizer)")
    return calibration_batches(list(texts), tokenizer, seq_len=seq_len, batch_size=batch_size, max_samples=max_samples)


def as_batches(data: Any, tokenizer: Any = None, *, seq_len: int = 256, batch_size: int = 8,
               max_samples: int | None = None, text_field: str = "text") -> list[dict[str, torch.Tensor]]:
    """The calibration batches of ``data`` in any of the forms listed in the module docstring.

    ``seq_len``, ``batch_size`` and ``max_samples`` apply to text and tokenised rows; batches already
    made are used as they are.
    """
    check_positive("seq_len", seq_len)
    check_positive("batch_size", batch_size)
    if max_samples is not None:
        check_positive("max_samples", max_samples)
    if isinstance(data, (str, bytes)):
        raise DataError("calibration data must be a collection (texts, rows or batches), not one string: "
                        "wrap it in a list")
    if _is_dataset(data):
        columns = list(data.column_names)
        if "input_ids" in columns:
            return _rows_to_batches(data, tokenizer, seq_len, batch_size, max_samples)
        if text_field in columns:
            return _texts(data[text_field], tokenizer, seq_len, batch_size, max_samples)
        raise DataError(f"the dataset has columns {columns}: calibration needs 'input_ids' (tokenised rows) or "
                        f"{text_field!r} (text, with tokenizer=; another column name with text_field=)")
    if isinstance(data, Mapping):
        data = [data]  # one batch (e.g. the BatchEncoding of tokenizer(texts, return_tensors="pt", padding=True))
    try:
        items = list(data)
    except TypeError:
        raise DataError(f"calibration data must be texts, rows or batches, got {type(data).__name__}") from None
    if not items:
        raise DataError("the calibration data is empty")
    first = items[0]
    if isinstance(first, str):
        return _texts(items, tokenizer, seq_len, batch_size, max_samples)
    if not all(isinstance(item, Mapping) and "input_ids" in item for item in items):
        bad = next(i for i, item in enumerate(items) if not (isinstance(item, Mapping) and "input_ids" in item))
        raise DataError(f"calibration item {bad} is {type(items[bad]).__name__}: every item must be a text or a "
                        "dict with 'input_ids'")
    ids = first["input_ids"]
    is_row = (isinstance(ids, torch.Tensor) and ids.dim() == 1) or (
        isinstance(ids, Sequence) and not isinstance(ids, str) and all(isinstance(t, int) for t in ids))
    if is_row:
        return _rows_to_batches(items, tokenizer, seq_len, batch_size, max_samples)
    return [_ready_batch(item, index) for index, item in enumerate(items)]
