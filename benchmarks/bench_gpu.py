"""GPU end-to-end: scoring a LLaMA-3.1-8B-shaped model on 128 × 2048 tokens, diag and full mode.

    python benchmarks/bench_gpu.py                      # random weights, 128 × 2048 tokens
    python benchmarks/bench_gpu.py --checkpoint PATH    # a local checkpoint (any Llama-family model)
    python benchmarks/bench_gpu.py --backend triton --modes full --json out/gpu.json

Scoring = streamed calibration (one block's Hessians alive at a time), the three metrics and the
SRA allocation. Reported per mode: wall time, peak GPU memory, the plain forward pass over the same
tokens, the FLOP floor (forward + SYRK at the bf16 peak; diag mode: forward only) and the ratio to
the paper's 25.78 s (LLaMA-3.1-8B on an A100-class GPU). Target on one H100: ≤ 10 s in full mode.

Under pytest (benchmarks/ is collected) a small two-block model of the same widths runs each GPU
backend against the reference and checks that the allocation is identical; skipped without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PAPER_SECONDS = 25.78
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak


def llama31_8b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(checkpoint: str | None, layers: int, seed: int = 0):
    """bf16 model on the GPU: a local checkpoint, or random weights of the LLaMA-3.1-8B shape."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise ValueError(f"checkpoint {checkpoint} does not exist; pass a local model folder")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama31_8b_config(layers))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def token_batches(vocab: int, sequences: int, seq_len: int, batch_size: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, seq_len), generator=g)
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
            for i in range(0, sequences, batch_size)]


def forward_flops(model, tokens: int, seq_len: int) -> float:
    """2·(weights of the blocks' linear layers)·tokens + causal attention (2·seq·d per token and layer)."""
    cfg = model.config
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    return 2.0 * linear * tokens + 2.0 * seq_len * cfg.hidden_size * cfg.num_hidden_layers * tokens


@dataclass
class Result:
    mode: str
    backend: str
    seconds: float
    peak_gib: float
    forward_seconds: float
    floor_seconds: float
    ratio_to_floor: float
    ratio_to_paper: float
    tokens: int
    modules: int


def score(model, batches, mode: str, backend: str | None, avg_rank: float = 8):
    """Streamed calibration + metrics + SRA allocation; returns (allocation, SYRK FLOPs)."""
    from sensitivity_lora.allocation import allocate
    from sensitivity_lora.pipeline import score_modules
    from sensitivity_lora.streaming import iter_block_statistics

    metrics, syrk = {}, 0.0
    for block in iter_block_statistics(model, batches, hessian=mode, backend=backend, progress=False):
        stats = block.stats
        for group in stats.groups.values():
            d_in = stats.dims[group.members[0]][0]
            syrk += float(d_in) * d_in * group.n_tokens  # upper triangle: d²/2 MACs per token
        metrics.update(score_modules(stats, backend=backend))
    return allocate(metrics, avg_rank), (syrk if mode == "full" else 0.0)


def plain_forward(model, batches) -> None:
    with torch.no_grad():
        for b in batches:
            model(**{k: v.cuda() for k, v in b.items()}, use_cache=False, logits_to_keep=1)


def timed(fn) -> tuple[float, float, object]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30, out


def run(checkpoint: str | None, modes: list[str], backend: str | None, sequences: int, seq_len: int,
        batch_size: int, layers: int, peak_tflops: float) -> list[Result]:
    model = build_model(checkpoint, layers)
    batches = token_batches(model.config.vocab_size, sequences, seq_len, batch_size)
    tokens = sequences * seq_len
    plain_forward(model, batches[:1])  # warm-up: kernels, allocator
    fwd_s, _, _ = timed(lambda: plain_forward(model, batches))
    fwd_flops = forward_flops(model, tokens, seq_len)
    results = []
    for mode in modes:
        score(model, batches[:1], mode, backend)  # warm-up: Triton JIT, cuBLAS handles
        seconds, peak, (allocation, syrk) = timed(lambda: score(model, batches, mode, backend))
        floor = (fwd_flops + syrk) / (peak_tflops * 1e12)
        from sensitivity_lora import ops

        used = ops.resolve_backend("accumulate_xtx" if mode == "full" else "accumulate_sumsq", "cuda", backend)
        results.append(Result(mode, used, seconds, peak, fwd_s, floor, seconds / floor, seconds / PAPER_SECONDS,
                              tokens, len(allocation.modules)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="local model folder (default: random LLaMA-3.1-8B-shaped weights)")
    parser.add_argument("--modes", nargs="+", default=["diag", "full"], choices=["diag", "full"])
    parser.add_argument("--backend", default=None, help="auto (default), cuda, triton or reference")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32, help="blocks of the random model (8B: 32)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="bf16 dense peak of the GPU for the FLOP floor (H100 SXM: 989)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark needs one", file=sys.stderr)
        return 2
    results = run(args.checkpoint, args.modes, args.backend, args.sequences, args.seq_len, args.batch_size,
                  args.layers, args.peak_tflops)
    print(f"{torch.cuda.get_device_name()}, {results[0].tokens} tokens, paper: {PAPER_SECONDS} s")
    print("| mode | backend | time s | peak GiB | plain forward s | FLOP floor s | × floor | × paper |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.backend} | {r.seconds:.2f} | {r.peak_gib:.1f} | {r.forward_seconds:.2f} | "
              f"{r.floor_seconds:.2f} | {r.ratio_to_floor:.2f} | {r.ratio_to_paper:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


# --- under pytest: a small model of the same widths, every GPU backend against the reference --------------

try:
    import pytest
except ImportError:  # plain script use
    pytest = None

if pytest is not None and __name__ != "__main__":
    from sensitivity_lora import ops

    GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and ops.available("accumulate_xtx", b)]

    @pytest.fixture(scope="module")
    def small_setup():
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the GPU benchmarks run where one is")
        model = build_model(None, layers=2)
        return model, token_batches(model.config.vocab_size, 16, 2048, 8)

    @pytest.mark.gpu
    @pytest.mark.parametrize("mode", ["diag", "full"])
    @pytest.mark.parametrize("backend", GPU_BACKENDS or ["no GPU backend"])
    def test_gpu_scoring_matches_reference(benchmark, small_setup, mode, backend):
        if backend == "no GPU backend":
            pytest.skip("no CUDA device, or neither the CUDA extension nor Triton is available")
        model, batches = small_setup
        expected, _ = score(model, batches, mode, "reference")
        got, _ = benchmark.pedantic(lambda: score(model, batches, mode, backend), rounds=3, iterations=1,
                                    warmup_rounds=1)
        assert got.ranks() == expected.ranks(), f"{backend} {mode}: allocation differs from the reference backend"


if __name__ == "__main__":
    sys.exit(main())
