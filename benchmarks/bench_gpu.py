"""GPU benchmarks and the end-to-end backend agreement check (LLaMA-3.1-8B shape, random weights).

    python benchmarks/bench_gpu.py                                # e2e: 8B shape, 128 × 2048 tokens, bf16
    python benchmarks/bench_gpu.py --stage e2e --backends triton --modes full --json out/e2e.json
    python benchmarks/bench_gpu.py --stage e2e --checkpoint PATH  # a local Llama-family checkpoint
    python benchmarks/bench_gpu.py --stage ops                    # XᵀX d = 4096, 14336; Cholesky d = 4096
    python benchmarks/bench_gpu.py --stage agree                  # every GPU backend against the reference
    python benchmarks/bench_gpu.py --stage e2e --device cpu --tiny   # the same code on a tiny CPU model

Stages:

- ``e2e``: scoring = ``sensitivity_lora.compute_allocation(..., streaming=True)`` (streamed
  calibration, one block's statistics alive at a time, the three metrics, the SRA allocation), per
  backend and Hessian mode, after one warm-up batch (JIT, cuBLAS handles). Reported with, from
  the same run: the plain forward over the same tokens (the decoder without the LM head), the
  FLOP floor (forward FLOPs + SYRK FLOPs at the matmul rate *measured* on this GPU in this run —
  bf16 for a bf16 model, fp32 for fp32; the SYRK counts d² FLOPs per token and input group, the
  upper triangle; diag mode: forward only), peak GPU memory, and the ratio to the paper's
  25.78 s (LLaMA-3.1-8B on an A100-class GPU). Target on one H100: ≤ 10 s in full mode.
  ``--time-budget S``: a measurement whose projected time (from a second, compile-free warm-up
  batch) does not fit its share of the budget is timed on fewer batches and scaled linearly to
  all tokens; ``tokens_timed`` and ``scaled`` say so (peak memory is that of the timed tokens).
- ``ops``: ``accumulate_xtx`` per backend against ``H.addmm_(x.T, x)`` (bf16 GEMM into a bf16 H,
  and fp32 GEMM into an fp32 H) on one batch of tokens; ``cholesky_damped`` per backend against
  ``torch.linalg.cholesky`` (fp64, d = 4096). Medians of 5 after 2 warm-ups.
- ``agree``: a two-block model of the 8B widths (``--tiny``: a tiny model) calibrated in full mode
  with ``reference`` and each other backend on the same device: Σx², XᵀX (upper triangle) and
  token counts agree within 2·1e-5 of each entry's scale (each backend is within 1e-5 of the
  exact sums), and the allocation (diag and full mode) is identical. Exit 1 on disagreement.

Every stage writes a JSON (``--json``; schema ``sensitivity_lora.bench_gpu``, version 1), rewritten
after each measurement so a run cut short keeps what it measured. ``scripts/gpu_check.sh`` runs
all three. Under pytest (``pytest benchmarks/bench_gpu.py``) the agreement check runs per GPU
backend; skipped without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SCHEMA = "sensitivity_lora.bench_gpu"
VERSION = 1
PAPER_SECONDS = 25.78
AGREE_RTOL = 2e-5
GIB = 2**30


# --- models and data ----------------------------------------------------------------------------

def llama31_8b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_config(layers: int = 2):
    """The 8B architecture at toy widths (GQA, SwiGLU), for CPU runs of the same code."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None):
    """A model in eval mode on ``device``: a local checkpoint, or random weights of ``config``."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if checkpoint:
        if not Path(checkpoint).exists():
            raise ValueError(f"checkpoint {checkpoint} does not exist; pass a local model folder")
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def token_batches(vocab: int, sequences: int, seq_len: int, batch_size: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, seq_len), generator=g)
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, sequences, batch_size)]


def decoder_of(model):
    """The model without its LM head (what the streamed scoring runs)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None else getattr(model, "model", model)


# --- timing -------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, float | None, object]:
    """(seconds, peak GiB during the call (CUDA only), result)."""
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, peak_gib(device), out


def median_seconds(device: torch.device, fn: Callable[[], object], reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> dict:
    """The measured dense matmul rate (n × n × n), best and median of ``reps``."""
    g = torch.Generator(device=device).manual_seed(3)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "best_tflops": flops / min(times) / 1e12,
            "median_tflops": flops / statistics.median(times) / 1e12}


# --- FLOPs --------------------------------------------------------------------------------------

def forward_flops(model, tokens: int, seq_len: int) -> float:
    """2·(weights of the decoder's linear layers)·tokens + causal attention (2·seq·d per token and layer)."""
    cfg = model.config
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    return 2.0 * linear * tokens + 2.0 * seq_len * cfg.hidden_size * cfg.num_hidden_layers * tokens


def input_groups(model, device: torch.device, seq_len: int = 16) -> list[int]:
    """d_in of every input group the scoring accumulates (from a calibration of one short sequence)."""
    import sensitivity_lora

    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(5))
    stats = sensitivity_lora.calibrate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                                       hessian="diag", progress=False)
    return [int(group.sumsq.numel()) for group in stats.groups.values()]


def syrk_flops(groups: list[int], tokens: int) -> float:
    """The upper triangle of XᵀX per input group: d²/2 multiply-adds = d² FLOPs per token."""
    return float(sum(d * d for d in groups)) * tokens


# --- JSON ---------------------------------------------------------------------------------------

def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    sms=props.multi_processor_count, memory_gib=props.total_memory / GIB,
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        info.update(name="cpu", threads=torch.get_num_threads())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


class Report:
    """The stage's JSON, rewritten after every measurement."""

    def __init__(self, stage: str, path: str | None, device: torch.device, args: argparse.Namespace):
        self.path = Path(path) if path else None
        self.data = {"schema": SCHEMA, "version": VERSION, "stage": stage, "status": "running", "error": None,
                     "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "seconds": None, "machine": device_info(device),
                     "arguments": {k: v for k, v in vars(args).items() if k != "json"}}
        self._start = time.perf_counter()
        self.write()

    def write(self) -> None:
        self.data["seconds"] = time.perf_counter() - self._start
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            tmp.replace(self.path)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"], self.data["error"] = status, error
        self.write()


def log(message: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def available_backends(backends: list[str], device: torch.device, ops_needed: tuple[str, ...]) -> tuple[list, dict]:
    """(backends that implement every op in ``ops_needed`` here, {backend: why not} for the others)."""
    from sensitivity_lora import ops

    usable, missing = [], {}
    for b in backends:
        if b not in ops.BACKENDS:
            missing[b] = f"unknown backend (known: {', '.join(ops.BACKENDS)})"
            continue
        if (b == "cpu") != (device.type == "cpu") and b not in ("reference",):
            missing[b] = f"the {b} backend does not run on {device.type} tensors"
            continue
        lacking = [op for op in ops_needed if not ops.available(op, b)]
        if lacking:
            missing[b] = "; ".join(f"{op}: {ops.unavailable_reason(op, b)}" for op in lacking)
        else:
            usable.append(b)
    return usable, missing


# --- stage e2e ----------------------------------------------------------------------------------

def score(model, batches, mode: str, backend: str):
    import sensitivity_lora

    return sensitivity_lora.compute_allocation(model, batches, 8, hessian=mode, backend=backend, streaming=True,
                                               progress=False)


def plain_forward(model, batches, device: torch.device) -> None:
    decoder = decoder_of(model)
    with torch.no_grad():
        for b in batches:
            decoder(**{k: v.to(device) for k, v in b.items()}, use_cache=False)


def fitted(device: torch.device, run: Callable[[list], object], batches: list, share_s: float | None) -> dict:
    """Warm up on one batch, estimate from a second one, time as many batches as fit ``share_s``."""
    warm_s, _, _ = timed(device, lambda: run(batches[:1]))
    n_use = len(batches)
    estimate_s = None
    if share_s is not None and len(batches) > 1:
        one_s, _, _ = timed(device, lambda: run(batches[:1]))
        estimate_s = one_s * len(batches)
        if estimate_s > share_s:
            n_use = max(1, min(len(batches), int(share_s / max(one_s, 1e-9))))
    seconds, peak, out = timed(device, lambda: run(batches[:n_use]))
    scale = len(batches) / n_use
    return {"seconds": seconds * scale, "seconds_timed": seconds, "batches_timed": n_use, "scaled": n_use < len(batches),
            "scale": scale, "warmup_seconds": warm_s, "estimate_seconds": estimate_s, "peak_gib": peak, "out": out}


def stage_e2e(args, device: torch.device, report: Report) -> int:
    dtype = getattr(torch, args.dtype)
    config = tiny_config(args.layers or 2) if args.tiny else llama31_8b_config(args.layers or 32)
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    data = report.data
    data["model"] = {"checkpoint": args.checkpoint, "tiny": args.tiny, "dtype": args.dtype}
    log(f"building the model ({'tiny' if args.tiny else 'LLaMA-3.1-8B shape'}, {args.dtype}) on {device}")
    build_s, _, model = timed(device, lambda: build_model(config, device, dtype, checkpoint=args.checkpoint))
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    data["model"].update(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                         vocab=cfg.vocab_size, parameters=params, build_seconds=build_s,
                         weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GIB)
    batches = token_batches(cfg.vocab_size, args.sequences, args.seq_len, args.batch_size)
    tokens = args.sequences * args.seq_len
    data["tokens"] = {"sequences": args.sequences, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "tokens": tokens, "batches": len(batches)}
    report.write()

    log("measuring the matmul rates (bf16 and fp32)")
    n_big = 256 if device.type == "cpu" else 8192
    rates = {"bfloat16": matmul_tflops(device, torch.bfloat16, n_big, 5 if device.type == "cpu" else 50),
             "float32": matmul_tflops(device, torch.float32, n_big, 3 if device.type == "cpu" else 5)}
    rate_key = "float32" if dtype == torch.float32 else "bfloat16"
    rate = args.peak_tflops if args.peak_tflops else rates[rate_key]["best_tflops"]
    groups = input_groups(model, device)
    fwd_flops, full_syrk = forward_flops(model, tokens, args.seq_len), syrk_flops(groups, tokens)
    data["floor"] = {"rates": rates, "rate_used_tflops": rate, "rate_source":
                     "--peak-tflops" if args.peak_tflops else f"measured {rate_key} matmul (best of reps)",
                     "forward_flops": fwd_flops, "syrk_flops_full": full_syrk, "input_groups": len(groups),
                     "input_group_dims": sorted(set(groups))}
    report.write()

    backends, missing = available_backends(args.backends, device, ("accumulate_sumsq", "accumulate_xtx", "diag_stats"))
    measurements = [(b, m) for m in args.modes for b in backends]
    data["forward"] = None
    data["runs"] = [{"backend": b, "mode": m, "status": "skipped", "error": why} for b, why in missing.items()
                    for m in args.modes]
    report.write()

    def share(left: int) -> float | None:
        if deadline is None:
            return None
        return max(0.0, (deadline - time.perf_counter()) / max(left, 1) - 2.0)

    log(f"plain forward over {tokens} tokens ({len(batches)} batches)")
    fwd = fitted(device, lambda bs: plain_forward(model, bs, device), batches, share(len(measurements) + 1))
    fwd.pop("out")
    data["forward"] = fwd
    report.write()
    log(f"plain forward: {fwd['seconds']:.2f} s" + (" (scaled)" if fwd["scaled"] else ""))

    failed = 0
    for i, (backend, mode) in enumerate(measurements):
        entry = {"backend": backend, "mode": mode, "status": "running", "error": None}
        data["runs"].append(entry)
        report.write()
        left = share(len(measurements) - i)
        if left is not None and left < 1.0:
            entry.update(status="timeout", error="not run: the time budget was spent")
            failed += 1
            report.write()
            continue
        log(f"scoring {mode} with {backend}")
        try:
            res = fitted(device, lambda bs: score(model, bs, mode, backend), batches, left)
        except Exception as exc:  # report and go on with the other measurements
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            failed += 1
            report.write()
            log(f"scoring {mode} with {backend} FAILED: {entry['error']}")
            continue
        allocation = res.pop("out")
        syrk = full_syrk if mode == "full" else 0.0
        floor_s = (fwd_flops + syrk) / (rate * 1e12)
        entry.update(status="ok", **res, modules=len(allocation.ranks()), tokens=tokens,
                     tokens_timed=tokens * res["batches_timed"] // len(batches), floor_seconds=floor_s,
                     syrk_flops=syrk, ratio_to_floor=res["seconds"] / floor_s,
                     ratio_to_forward=res["seconds"] / fwd["seconds"], ratio_to_paper=res["seconds"] / PAPER_SECONDS)
        report.write()
        log(f"scoring {mode} with {backend}: {res['seconds']:.2f} s, {entry['ratio_to_forward']:.2f}x forward, "
            f"{entry['ratio_to_floor']:.2f}x floor" + (" (scaled)" if res["scaled"] else ""))
    if not backends:
        log("no backend to time: " + "; ".join(f"{b}: {w}" for b, w in missing.items()))
        return 1
    print_e2e_table(data)
    return 1 if failed else 0


def print_e2e_table(data: dict) -> None:
    print(f"{data['machine'].get('name')}, {data['tokens']['tokens']} tokens, paper: {PAPER_SECONDS} s")
    print("| mode | backend | time s | peak GiB | plain forward s | × forward | FLOP floor s | × floor | × paper |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        if r["status"] != "ok":
            print(f"| {r['mode']} | {r['backend']} | {r['status']}: {r['error']} | | | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "–"
        print(f"| {r['mode']} | {r['backend']} | {r['seconds']:.2f} | {peak} | {data['forward']['seconds']:.2f} | "
              f"{r['ratio_to_forward']:.2f} | {r['floor_seconds']:.2f} | {r['ratio_to_floor']:.2f} | "
              f"{r['ratio_to_paper']:.3f} |")


# --- stage ops ----------------------------------------------------------------------------------

def stage_ops(args, device: torch.device, report: Report) -> int:
    from sensitivity_lora import ops

    dims = (48, 80) if args.tiny else (4096, 14336)
    n = 512 if args.tiny else args.batch_size * args.seq_len
    chol_d = 64 if args.tiny else 4096
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    data = report.data
    data["xtx"], data["cholesky"] = [], []
    failed = 0

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    def bench(rows: list, row: dict, fn: Callable[[], object]) -> None:
        nonlocal failed
        if out_of_time():
            row.update(status="timeout", error="not run: the time budget was spent")
            failed += 1
        else:
            try:
                row.update(status="ok", ms=median_seconds(device, fn) * 1e3, error=None)
            except Exception as exc:
                row.update(status="failed", ms=None, error=f"{type(exc).__name__}: {exc}")
                failed += 1
        rows.append(row)
        report.write()
        log(f"{row['op']} d={row['d']} {row['variant']}: " +
            (f"{row['ms']:.3f} ms" if row.get("ms") is not None else f"{row['status']} {row['error']}"))

    backends, missing = available_backends(args.backends + ["reference"], device, ("accumulate_xtx",))
    backends = list(dict.fromkeys(backends))
    g = torch.Generator(device=device).manual_seed(11)  # inputs drawn where they are used
    for d in dims:
        x = (torch.randn(n, d, generator=g, device=device) * torch.rand(d, generator=g, device=device).add(0.1)
             ).to(torch.bfloat16)
        acc = torch.zeros(d, d, dtype=torch.float64, device=device)
        for b in backends:
            fn = ops.get_op("accumulate_xtx", device, b)
            bench(data["xtx"], {"op": "accumulate_xtx", "d": d, "tokens": n, "dtype": "bfloat16", "variant": b},
                  lambda: fn(acc, x, None, None))
        for b, why in missing.items():
            data["xtx"].append({"op": "accumulate_xtx", "d": d, "tokens": n, "variant": b, "status": "skipped",
                                "ms": None, "error": why})
        del acc
        h16 = torch.zeros(d, d, dtype=torch.bfloat16, device=device)
        bench(data["xtx"], {"op": "accumulate_xtx", "d": d, "tokens": n, "dtype": "bfloat16",
                            "variant": "addmm_bf16"}, lambda: h16.addmm_(x.T, x))
        del h16
        x32, h32 = x.float(), torch.zeros(d, d, dtype=torch.float32, device=device)
        bench(data["xtx"], {"op": "accumulate_xtx", "d": d, "tokens": n, "dtype": "float32",
                            "variant": "addmm_fp32"}, lambda: h32.addmm_(x32.T, x32))
        del x32, h32, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {(r["d"], r["variant"]): r.get("ms") for r in data["xtx"]}
    for r in data["xtx"]:
        for ref in ("addmm_bf16", "addmm_fp32"):
            b_ms = base.get((r["d"], ref))
            r[f"ratio_to_{ref}"] = r["ms"] / b_ms if r.get("ms") and b_ms else None

    xs = torch.randn(2 * chol_d, chol_d, generator=g, dtype=torch.float64, device=device)
    H = xs.T @ xs / (2 * chol_d) + 0.1 * torch.eye(chol_d, dtype=torch.float64, device=device)
    del xs
    chol_backends, chol_missing = available_backends(args.backends + ["reference"], device, ("cholesky_damped",))
    bench(data["cholesky"], {"op": "cholesky", "d": chol_d, "dtype": "float64", "variant": "torch.linalg.cholesky"},
          lambda: torch.linalg.cholesky(H))
    for b in dict.fromkeys(chol_backends):
        fn = ops.get_op("cholesky_damped", device, b)
        bench(data["cholesky"], {"op": "cholesky_damped", "d": chol_d, "dtype": "float64", "variant": b},
              lambda: fn(H))
    for b, why in chol_missing.items():
        data["cholesky"].append({"op": "cholesky_damped", "d": chol_d, "variant": b, "status": "skipped", "ms": None,
                                 "error": why})
    base_ms = data["cholesky"][0].get("ms")
    for r in data["cholesky"]:
        r["ratio_to_torch"] = r["ms"] / base_ms if r.get("ms") and base_ms else None
    report.write()
    return 1 if failed else 0


# --- stage agree --------------------------------------------------------------------------------

def compare_statistics(ref, got, rtol: float = AGREE_RTOL) -> list[str]:
    """Disagreements of ``got`` against ``ref`` (two CalibrationStatistics), as messages.
    Compared where the statistics are (on the GPU for GPU runs), in fp64."""
    problems = []
    if set(ref.groups) != set(got.groups):
        return [f"input groups differ: {sorted(set(ref.groups) ^ set(got.groups))}"]
    for name, r in ref.groups.items():
        g = got.groups[name]
        if int(r.n_tokens) != int(g.n_tokens):
            problems.append(f"{name}: n_tokens {g.n_tokens} != {r.n_tokens}")
        sq_r, sq_g = r.sumsq.double(), g.sumsq.double().to(r.sumsq.device)
        worst = float(((sq_g - sq_r).abs() / (rtol * sq_r.abs() + 1e-300)).max())
        if worst > 1.0:
            problems.append(f"{name}: Σx² differs by {worst:.3g}× the bound {rtol:g}")
        s_r, s_g = getattr(r, "sum", None), getattr(g, "sum", None)
        if isinstance(s_r, torch.Tensor) and isinstance(s_g, torch.Tensor):
            scale = torch.sqrt(sq_r * max(int(r.n_tokens), 1))  # Cauchy-Schwarz bound of |Σx|
            worst = float(((s_g.double().to(s_r.device) - s_r.double()).abs() / (rtol * scale + 1e-300)).max())
            if worst > 1.0:
                problems.append(f"{name}: Σx differs by {worst:.3g}× the bound {rtol:g}")
        x_r, x_g = getattr(r, "xtx", None), getattr(g, "xtx", None)
        if (x_r is None) != (x_g is None):
            problems.append(f"{name}: one backend has XᵀX, the other not")
        elif x_r is not None:
            a, b = x_r.double(), x_g.double().to(x_r.device)
            dg = a.diagonal().clamp_min(0).sqrt()
            err = torch.triu((b - a).abs_()).div_(torch.outer(dg, dg).mul_(rtol).add_(1e-300))
            worst = float(err.max())
            del a, b, err
            if worst > 1.0:
                problems.append(f"{name}: XᵀX differs by {worst:.3g}× the bound {rtol:g} (of sqrt(H_ii H_jj))")
    return problems


def agreement_setup(args, device: torch.device):
    if args.tiny:
        config, sequences, seq_len, batch = tiny_config(2), 8, 64, 4
    else:
        config, sequences, seq_len, batch = llama31_8b_config(2), 16, 2048, 8
    model = build_model(config, device, getattr(torch, args.dtype))
    return model, token_batches(config.vocab_size, sequences, seq_len, batch, seed=7)


def reference_results(model, batches, modes=("diag", "full")) -> dict:
    """The reference backend's full-mode statistics and allocation ranks per mode (computed once)."""
    import sensitivity_lora

    return {"stats": sensitivity_lora.calibrate(model, batches, hessian="full", backend="reference", progress=False),
            **{mode: score(model, batches, mode, "reference").ranks() for mode in modes}}


def check_agreement(model, batches, backend: str, reference: dict | None = None, modes=("diag", "full")) -> dict:
    """Statistics (full mode) and allocations (each mode) of ``backend`` against the reference."""
    import sensitivity_lora

    reference = reference or reference_results(model, batches, modes)
    result = {"backend": backend, "problems": []}
    ref = reference["stats"]
    got = sensitivity_lora.calibrate(model, batches, hessian="full", backend=backend, progress=False)
    result["groups"] = len(ref.groups)
    result["problems"] += compare_statistics(ref, got)
    del got
    for mode in modes:
        expected = reference[mode]
        ranks = score(model, batches, mode, backend).ranks()
        differ = [n for n in expected if ranks.get(n) != expected[n]]
        if differ or set(ranks) != set(expected):
            result["problems"].append(f"{mode} allocation differs from the reference on {len(differ)} modules, "
                                      f"e.g. {differ[:3]}")
        result[f"modules_{mode}"] = len(expected)
    result["status"] = "ok" if not result["problems"] else "failed"
    return result


def stage_agree(args, device: torch.device, report: Report) -> int:
    backends, missing = available_backends(args.backends, device, ("accumulate_sumsq", "accumulate_xtx", "diag_stats"))
    backends = [b for b in backends if b != "reference"]
    data = report.data
    data["checks"] = [{"backend": b, "status": "skipped", "error": why} for b, why in missing.items()]
    report.write()
    if not backends:
        log("no backend to check against the reference: " + "; ".join(f"{b}: {w}" for b, w in missing.items()))
        return 1
    model, batches = agreement_setup(args, device)
    data["model"] = {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                     "tokens": sum(int(b["input_ids"].numel()) for b in batches)}
    log(f"agreement: the reference on {device} ({data['model']['tokens']} tokens, full-mode statistics)")
    reference = reference_results(model, batches)
    failed = 0
    for b in backends:
        log(f"agreement: {b} against the reference on {device}")
        try:
            res = check_agreement(model, batches, b, reference)
            res["error"] = "; ".join(res["problems"]) or None
        except Exception as exc:
            res = {"backend": b, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "problems": []}
        failed += res["status"] != "ok"
        data["checks"].append(res)
        report.write()
        log(f"agreement {b}: {res['status']}" + (f" ({res['error']})" if res.get("error") else ""))
    return 1 if failed else 0


# --- command line -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["e2e", "ops", "agree"], default="e2e")
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and small sizes (CPU runs of the code)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: cuda triton on a GPU, reference cpu on the CPU")
    parser.add_argument("--backend", default=None, help="one backend (same as --backends X)")
    parser.add_argument("--modes", nargs="+", default=["full", "diag"], choices=["diag", "full"])
    parser.add_argument("--checkpoint", help="local model folder (default: random LLaMA-3.1-8B-shaped weights)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sequences", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 4)")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the random model (8B: 32, tiny: 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="use this matmul rate for the FLOP floor instead of the one measured in the run")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the stage; measurements that would not fit are timed on fewer batches")
    parser.add_argument("--json", help="write the results here (rewritten after each measurement)")
    args = parser.parse_args(argv)
    if args.backend:
        args.backends = [args.backend]
    tiny = args.tiny
    args.sequences = args.sequences or (8 if tiny else 128)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    args.batch_size = args.batch_size or (4 if tiny else 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; use --device cpu --tiny for a CPU run of the same code",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny and args.device is None:
        print("bench_gpu: no CUDA device here: the GPU benchmark needs one (or pass --device cpu --tiny)",
              file=sys.stderr)
        return 2
    if args.backends is None:
        args.backends = ["cuda", "triton"] if device.type == "cuda" else ["reference", "cpu"]
    report = Report(args.stage, args.json, device, args)
    stage = {"e2e": stage_e2e, "ops": stage_ops, "agree": stage_agree}[args.stage]
    try:
        rc = stage(args, device, report)
    except Exception as exc:
        report.finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    report.finish("ok" if rc == 0 else "failed")
    return rc


# --- under pytest: every GPU backend against the reference on a two-block 8B-width model -----------

try:
    import pytest
except ImportError:  # plain script use
    pytest = None

if pytest is not None and __name__ != "__main__":

    @pytest.fixture(scope="module")
    def agreement_model():
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the GPU agreement check runs where one is")
        return agreement_setup(parse_args([]), torch.device("cuda"))

    @pytest.mark.gpu
    @pytest.mark.parametrize("backend", ["cuda", "triton"])
    def test_gpu_backend_agrees_with_reference(agreement_model, backend):
        from sensitivity_lora import ops

        for op in ("accumulate_sumsq", "accumulate_xtx", "diag_stats"):
            if not ops.available(op, backend):
                pytest.skip(f"{backend} backend unavailable: {ops.unavailable_reason(op, backend)}")
        model, batches = agreement_model
        result = check_agreement(model, batches, backend)
        assert result["status"] == "ok", "; ".join(result["problems"])


if __name__ == "__main__":
    sys.exit(main())
