"""Layer-wise streaming calibration: one transformer block at a time.

The inputs of every block are captured once per batch with the blocks stubbed
out (each stub records the block's positional and keyword arguments: the
model's internal attention mask, rotary cos/sin, positions, ...; the last stub
stops the forward). Then block i runs over the cached hidden states with the
statistics hooks on its target modules, its outputs replace the cache as block
i+1's inputs, its statistics are handed to the caller and dropped. So at most
one block's Hessians are alive, block weights can live elsewhere and visit the
compute device one at a time, and the activation cache can sit in (pinned) CPU
memory. The numbers equal the one-pass ``one_pass.calibrate`` exactly: each
block computes the same thing on the same inputs, in the same order.

Assumption (true of the Llama, Mistral, Qwen2, GPT-2 and BERT families): block
i+1 reads block i's output unchanged. Models whose blocks cannot be found,
targets outside the blocks, or blocks that return something other than a
tensor or a tuple fall back to the one-pass hooks, with a warning saying why.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import CalibrationError
from ..progress import progress_bar
from ..settings import check_hessian
from .fingerprint import run_fingerprint
from .forward import forward_kwargs, model_device, prepare_batch, preserved_state, run_model
from .hooks import StatisticsHooks
from .offload import StreamingUnsupported, on_device, outside_blocks
from .one_pass import calibrate
from .statistics import CalibrationStatistics
from .targets import block_containers, module_dims, resolve_targets
from .validate import check_backend, check_batches, check_device, check_model, real_rows


class _StopForward(Exception):
    """Raised by the last block's stub: nothing after the blocks is needed."""


@dataclass
class BlockStatistics:
    """One block's finalised statistics; ``index`` is -1 for a one-pass fallback over the whole model."""

    index: int
    stats: CalibrationStatistics
    from_checkpoint: bool = False
    block: nn.Module | None = None  # the block itself (sequential mode: the consumer may change it)


@dataclass
class _CachedBatch:
    """One calibration batch as seen by the blocks."""

    hidden: torch.Tensor  # input of the next block to run (on the cache device)
    mask: torch.Tensor | None  # the batch's own (batch, seq) attention mask, for the statistics
    n_sequences: int
    n_tokens: int
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # per block: (other args, kwargs)
    hidden_as_kwarg: bool = False


@dataclass
class StreamPlan:
    container: str
    blocks: nn.ModuleList
    targets: dict[int, dict[str, nn.Module]]  # block index → its target modules, model order
    dims: dict[str, tuple[int, int]]


def plan_streaming(model: nn.Module, names: Sequence[str]) -> StreamPlan:
    """Which block each target lives in; raises ``StreamingUnsupported`` when streaming cannot work."""
    containers = block_containers(model)
    if len(containers) != 1:
        raise StreamingUnsupported(
            "no list of transformer blocks found" if not containers else
            f"several block lists ({', '.join(containers)}), e.g. an encoder-decoder"
        )
    container = containers[0]
    blocks = model.get_submodule(container)
    lookup = dict(model.named_modules())
    targets: dict[int, dict[str, nn.Module]] = {}
    for name in names:
        head, _, rest = name.partition(container + ".")
        index = rest.split(".", 1)[0]
        if head or not rest or not index.isdigit():
            raise StreamingUnsupported(f"target {name} is outside the blocks of {container}")
        targets.setdefault(int(index), {})[name] = lookup[name]
    return StreamPlan(container, blocks, dict(sorted(targets.items())),
                      {n: module_dims(lookup[n]) for n in names})


def _batch_digest(hasher: "hashlib._Hash", batch: Mapping[str, Any]) -> None:
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            hasher.update(key.encode())
            hasher.update(str((tuple(value.shape), str(value.dtype))).encode())
            hasher.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _strip_cache(value: Any) -> Any:
    """The KV cache must not be carried from the capture pass into the block runs."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


@contextlib.contextmanager
def _stubbed_blocks(blocks: nn.ModuleList, last: int, records: list) -> Iterator[None]:
    """Replace each block's forward by a recorder that passes the hidden state through.

    Block 0 really runs on the first call, to learn what blocks return (a tensor
    or a tuple); the stubs return the same structure so the model's loop goes on.
    """
    shape: dict[str, Any] = {}

    def make(index: int, original: Callable):
        def stub(*args, **kwargs):
            as_kwarg = not args
            if as_kwarg and "hidden_states" not in kwargs:
                raise StreamingUnsupported(f"block {index} was called without a hidden-state argument")
            hidden = kwargs.pop("hidden_states") if as_kwarg else args[0]
            rest = tuple(_strip_cache(a) for a in (args if as_kwarg else args[1:]))
            kwargs = {k: _strip_cache(v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            records.append((index, hidden, rest, kwargs, as_kwarg))
            if index == last:
                raise _StopForward
            if "tuple" not in shape:
                out = original(*args, **{**kwargs, **({"hidden_states": hidden} if as_kwarg else {})})
                if isinstance(out, tuple):
                    shape["tuple"] = tuple(out[1:])
                elif isinstance(out, torch.Tensor):
                    shape["tuple"] = None
                else:
                    raise StreamingUnsupported(f"blocks return {type(out).__name__}, not a tensor or a tuple")
            tail = shape["tuple"]
            return hidden if tail is None else (hidden,) + tail

        return stub

    # an instance-level forward that was there before (accelerate's dispatch hook, a user's wrapper) is put
    # back as it was, not deleted
    before = [(block, block.__dict__.get("forward", _NONE)) for block in blocks]
    try:
        for i, block in enumerate(blocks):
            if i > last:
                break
            block.forward = make(i, block.forward)
        yield
    finally:
        for block, forward in before:
            if forward is _NONE:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = forward


_NONE = object()


def _capture(model: nn.Module, plan: StreamPlan, batches: Iterable, last: int, device: torch.device,
             cache_device: torch.device, progress: bool) -> tuple[list[_CachedBatch], str]:
    """Inputs (and call arguments) of blocks 0..last for every batch; also a digest of the data."""
    extra = forward_kwargs(model)
    hasher = hashlib.sha256()
    cached: list[_CachedBatch] = []
    pin = cache_device.type == "cpu" and device.type == "cuda"
    for index, batch in enumerate(progress_bar(batches, progress, "capturing")):
        _batch_digest(hasher, batch)
        kwargs, mask = prepare_batch(batch, device, index)
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        records: list = []
        with _stubbed_blocks(plan.blocks, last, records):
            try:
                run_model(model, {**kwargs, **extra}, index)
            except _StopForward:
                pass
        if len(records) != last + 1 or [r[0] for r in records] != list(range(last + 1)):
            raise StreamingUnsupported("the model did not call its blocks once each, in order")
        hidden = records[0][1].detach()
        hidden = hidden.to(cache_device).pin_memory() if pin else hidden.to(cache_device, copy=True)
        cached.append(_CachedBatch(hidden, mask, real_rows(mask, int(ids.shape[0])), int(ids.shape[0] * ids.shape[1]),
                                   [(r[2], r[3]) for r in records], records[0][4]))
    if not cached:
        raise CalibrationError("no calibration batches were given; pass at least one batch of text")
    return cached, hasher.hexdigest()


def _run_block(block: nn.Module, index: int, cached: _CachedBatch, device: torch.device,
               cache_device: torch.device, hooks: StatisticsHooks | None, keep: bool = True) -> None:
    """Run ``block`` on one cached batch and (``keep``) store its output as the next block's input."""
    hidden = cached.hidden.to(device, non_blocking=True)
    if hooks is not None:
        hooks.context.set(cached.mask, cached.n_sequences, cached.n_tokens)
    args, kwargs = cached.calls[index]
    out = block(**kwargs, hidden_states=hidden) if cached.hidden_as_kwarg else block(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    if cached.hidden.shape != out.shape:
        raise StreamingUnsupported(f"block {index} changes the hidden-state shape {tuple(hidden.shape)} → {tuple(out.shape)}")
    if not keep:
        return
    if cached.hidden.device == out.device:
        cached.hidden = out
    else:  # reuse the (pinned) cache buffer
        cached.hidden.copy_(out, non_blocking=False)


def iter_block_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: str | Sequence[str] | None = None,
    hessian: str = "diag",
    backend: str | None = None,
    *,
    streaming: bool = True,
    device: torch.device | str | None = None,
    cache_device: torch.device | str | None = None,
    checkpoint=None,
    reduce: Callable[[CalibrationStatistics], None] | None = None,
    progress: bool = True,
    fingerprint_extra: Mapping[str, Any] | None = None,
    sequential: bool = False,
) -> Iterator[BlockStatistics]:
    """Yield the finalised statistics of each block with targets, in order, one block alive at a time.

    device: where blocks run (default: where the model is). When it differs, the
      model's weights stay where they are and each block visits ``device`` in turn.
    cache_device: where the hidden states wait between blocks (default: ``device``;
      "cpu" with a CUDA device uses pinned memory).
    checkpoint: a ``checkpoint.BlockCheckpoint``; finished blocks are recorded after
      the consumer took them, and a resumed run yields them from disk (or skips them
      when the checkpoint does not store statistics) without recomputing them. It is
      resumed only when the run's fingerprint (``fingerprint.run_fingerprint``: model
      weights and config, data, settings, package version; ``fingerprint_extra`` adds
      the caller's settings) equals the one it was written with.
    reduce: applied to each block's fresh statistics before anything else sees them
      (distributed all-reduce).
    streaming=False, or a model that cannot stream: one pass over the whole model,
      yielded as a single ``BlockStatistics`` with index -1 (no checkpoint).
    sequential: each block's statistics are yielded (with ``block``, on ``device``) *before* its
      outputs are computed; the consumer may change the block while it holds it (e.g. quantise its
      weights, GPTQ's sequential mode), and the block's outputs, the next block's inputs, are computed
      from the changed block when the consumer asks for the next one. Changes must be written into the
      block's tensors in place (``param.copy_(new)``): the model's structure and tensor objects are put
      back at the end, so a rebound parameter is refused (CalibrationError). Needs streaming; no
      checkpoint (a resumed run could not redo the consumer's changes). Each block then runs twice.
    """
    check_hessian(hessian)
    device, cache_device = check_device(device), check_device(cache_device, "cache_device")
    check_model(model)
    check_backend(backend, {device or model_device(model)}, hessian)
    names = resolve_targets(model, target_modules)
    batches = check_batches(model, batches)  # every batch checked before any forward pass
    if sequential and (not streaming or checkpoint is not None):
        raise ValueError("sequential mode needs streaming=True and no checkpoint (a resumed run could not redo "
                         "the changes the consumer made to the finished blocks)")
    plan = None
    if streaming:
        try:
            plan = plan_streaming(model, names)
        except StreamingUnsupported as exc:
            if sequential:
                raise CalibrationError(f"sequential mode needs a model that streams block by block ({exc})") from exc
            warnings.warn(f"streaming is not possible for this model ({exc}); calibrating in one pass", stacklevel=2)
    if plan is None:
        yield from _one_pass(model, batches, names, hessian, backend, checkpoint, reduce, progress)
        return
    try:
        yield from _stream(model, batches, plan, names, hessian, backend, device, cache_device, checkpoint,
                           reduce, progress, fingerprint_extra, sequential)
    except StreamingUnsupported as exc:
        raise CalibrationError(f"streaming failed on this model ({exc}); pass streaming=False") from exc


def _one_pass(model, batches, names, hessian, backend, checkpoint, reduce, progress) -> Iterator[BlockStatistics]:
    if checkpoint is not None:
        warnings.warn("checkpoints need streaming; this one-pass run cannot be resumed", stacklevel=3)
    stats = calibrate(model, batches, names, hessian, backend, progress)
    if reduce is not None:
        reduce(stats)
    yield BlockStatistics(-1, stats)


def _stream(model, batches, plan: StreamPlan, names, hessian, backend, device, cache_device, checkpoint,
            reduce, progress, fingerprint_extra=None, sequential=False) -> Iterator[BlockStatistics]:
    home = model_device(model)
    device = torch.device(device) if device is not None else home
    cache_device = torch.device(cache_device) if cache_device is not None else device
    offload = device != home
    last = max(plan.targets)  # blocks after the last one with targets never need to run
    with preserved_state(model):
        movers = outside_blocks(model, plan.container) + [plan.blocks[0]] if offload else []
        with on_device(movers, device if offload else None):
            cached, digest = _capture(model, plan, batches, last, device, cache_device, progress)
        done: list[int] = []
        if checkpoint is not None:
            fingerprint = run_fingerprint(model, names, plan.dims, hessian, backend, device, digest, len(cached),
                                          plan.container, fingerprint_extra)
            done = checkpoint.open(fingerprint)  # refuses a folder written with anything else
        try:
            yield from _stream_blocks(plan, cached, done, hessian, backend, device, cache_device, offload,
                                      checkpoint, reduce, progress, sequential)
        finally:
            if checkpoint is not None:
                checkpoint.close()


def _stream_blocks(plan: StreamPlan, cached, done, hessian, backend, device, cache_device, offload, checkpoint,
                   reduce, progress, sequential=False) -> Iterator[BlockStatistics]:
    todo = [i for i in plan.targets if i not in done]
    for index in plan.targets:  # finished blocks first (always a prefix: blocks finish in order)
        if index in done:
            stats = (checkpoint.load(index, backend=backend) if checkpoint.store
                     else CalibrationStatistics({}, {}, {}, hessian))
            yield BlockStatistics(index, stats, from_checkpoint=True)
    # the rest in order; finished blocks before them only run forward, to make the next inputs
    steps = range(0, max(todo) + 1 if todo else 0)
    for index in progress_bar(steps, progress and len(steps) > 1, "blocks", "block"):
        block = plan.blocks[index]
        with on_device([block], device if offload else None, write_back=sequential):
            if index not in todo:
                for c in cached:
                    _run_block(block, index, c, device, cache_device, None)
                continue
            targets = plan.targets[index]
            with StatisticsHooks(targets, hessian, backend, device) as hooks:
                for c in cached:
                    _run_block(block, index, c, device, cache_device, hooks, not sequential)
                hooks.context.seen.clear()
            if sequential:
                yield from _sequential_turn(block, index, hooks.result({n: plan.dims[n] for n in targets}), reduce)
                del hooks
                for c in cached if index < steps[-1] else ():  # the next block's inputs, from the changed block
                    _run_block(block, index, c, device, cache_device, None)
                continue
        stats = hooks.result({n: plan.dims[n] for n in targets})
        del hooks
        if reduce is not None:
            reduce(stats)
        yield BlockStatistics(index, stats)
        if checkpoint is not None:
            checkpoint.save(index, stats)
        del stats


def _sequential_turn(block: nn.Module, index: int, stats: CalibrationStatistics,
                     reduce: Callable[[CalibrationStatistics], None] | None) -> Iterator[BlockStatistics]:
    """Hand the block and its statistics to the consumer; after its turn, check it wrote in place."""
    if reduce is not None:
        reduce(stats)
    storage = {name: t.data_ptr() for name, t in block.named_parameters()}
    yield BlockStatistics(index, stats, block=block)
    changed = [name for name, t in block.named_parameters() if storage.get(name) != t.data_ptr()]
    if changed or len(storage) != len(dict(block.named_parameters())):
        raise CalibrationError(
            f"block {index}: the consumer replaced parameters ({', '.join(changed) or 'added or removed some'}) "
            "instead of writing into them; the model's tensors are put back after the run, so write in place "
            "(with torch.no_grad(): param.copy_(new))")


def _take(block: BlockStatistics) -> CalibrationStatistics:
    stats, block.stats = block.stats, None
    return stats


def released(blocks: Iterable[BlockStatistics]) -> Iterator[CalibrationStatistics]:
    """Each block's statistics, detached from the block so that only the consumer holds them."""
    for block in blocks:
        # through a function: a local here would keep this block alive while the next one is computed
        yield _take(block)
