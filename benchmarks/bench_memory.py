"""Memory held in Hessians (and the process peak), full mode: naive one-pass vs streaming.

    python -m pytest benchmarks/bench_memory.py --benchmark-enable -s     # SmolLM2-135M: table + JSON
    python benchmarks/bench_memory.py --all                               # the same without pytest
    python benchmarks/bench_memory.py --all --quick --out /tmp/memory     # 3-block model, seconds (smoke run)
    python benchmarks/bench_memory.py --mode streaming                    # one measurement, printed as JSON

Modes, each in a fresh process so its peak RSS is its own:
  plain      the model's forward only (no statistics): the floor of the process peak
  naive      one pass, one fp32 Σxxᵀ per target module (what a GPTQ-style hook script holds)
  one-pass   calibration.one_pass.calibrate(hessian="full"): one fp64 accumulator per input group, all blocks
  streaming  calibration.streaming.iter_block_statistics: one block's input groups at a time (fp64)

"Hessians held" is the peak over the run of the bytes of all live accumulators (Σxxᵀ, Σx², Σx;
sampled at every block call and every finished block); "process peak" is ru_maxrss. The full
measurement writes ``benchmarks/results/memory.json`` (``--quick``: ``memory-quick.json``), from
which ``benchmarks/render_results.py`` renders RESULTS.md. Without --benchmark-enable only the
quick pytest variant runs: a 3-block model of SmolLM2's width, checking the bound exactly.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import LoadMonitor, column, new_run, write_table  # noqa: E402

MiB = 2**20
SMOL = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
MODES = ("plain", "naive", "one-pass", "streaming")
KEEPS = {"plain": "no statistics (the floor)",
         "naive": "one fp32 Σxxᵀ per module (GPTQ-style hooks)",
         "one-pass": "one fp64 sum per input group, all blocks (`calibrate(hessian=\"full\")`)",
         "streaming": "one block's 4 input groups, fp64 (`iter_block_statistics`)"}
COLUMNS = [column("mode", "mode"), column("keeps", "what it keeps"),
           column("hessian_peak_bytes", "Hessians held (peak) MiB", "mib"),
           column("rss_peak_bytes", "process peak RSS MiB", "mib0"), column("seconds", "time s", "f0")]
NOTES = ["SmolLM2-135M (fp32, 30 blocks, 210 target modules, 120 input groups), 16 BBC articles × 128 tokens, "
         "batch 8, CPU.",
         "\"Hessians held\" is the peak of the bytes of all live accumulators, sampled at every block call and every "
         "finished block; \"process peak\" is ru_maxrss (model, activations and Hessians together)."]


class HessianMeter:
    """Peak bytes of live statistics accumulators (GroupStatistics) or of given tensors."""

    def __init__(self) -> None:
        self.alive: list[weakref.ref] = []
        self.peak = 0
        self.extra: list[torch.Tensor] = []  # the naive baseline's own tensors

    def install(self) -> None:
        from sensitivity_lora.calibration.statistics import GroupStatistics
        original = GroupStatistics.__post_init__
        meter = self

        def tracked(group):
            original(group)
            meter.alive.append(weakref.ref(group))

        GroupStatistics.__post_init__ = tracked

    def sample(self, *_args, **_kwargs) -> None:
        total = sum(t.numel() * t.element_size() for t in self.extra)
        for ref in self.alive:
            g = ref()
            if g is not None:
                for t in (g.sumsq, getattr(g, "sum", None), g.xtx):
                    total += t.numel() * t.element_size() if t is not None else 0
        self.peak = max(self.peak, total)


def smollm2_like(n_layers: int, seed: int = 0):
    """SmolLM2-135M's shapes with random weights (the Hessians' sizes depend only on the shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layers, **SMOL)).eval()


def load(quick: bool):
    """(model, batches): the real SmolLM2-135M on BBC text, or (quick) a 3-block model of its width."""
    if quick:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, SMOL["vocab_size"], (2, 16), generator=g) for _ in range(2)]
        return smollm2_like(3), [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None, dtype=torch.float32)
    return model, calibration_batches(load_texts(None, max_samples=16), tok, seq_len=128, batch_size=8)


def run_mode(mode: str, model, batches) -> dict:
    """One measurement in this process; returns Hessian peak bytes and seconds."""
    from sensitivity_lora.calibration.one_pass import calibrate
    from sensitivity_lora.calibration.forward import forward_kwargs
    from sensitivity_lora.calibration.streaming import iter_block_statistics
    from sensitivity_lora.calibration.targets import block_containers, resolve_targets

    meter = HessianMeter()
    meter.install()
    blocks = model.get_submodule(block_containers(model)[0])
    handles = [b.register_forward_pre_hook(meter.sample) for b in blocks]
    t0 = time.perf_counter()
    try:
        if mode == "plain":
            with torch.no_grad():
                for b in batches:
                    model(**b, **forward_kwargs(model))
        elif mode == "naive":
            mods = dict(model.named_modules())
            hs = {}

            def make(name):
                def hook(_m, args):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    if name not in hs:
                        hs[name] = torch.zeros(x.shape[1], x.shape[1])
                        meter.extra.append(hs[name])
                    hs[name].addmm_(x.T, x)
                return hook

            handles += [mods[n].register_forward_pre_hook(make(n)) for n in resolve_targets(model)]
            with torch.no_grad():
                for b in batches:
                    model(**b, **forward_kwargs(model))
        elif mode == "one-pass":
            stats = calibrate(model, batches, hessian="full", progress=False)
            meter.sample()
            del stats
        elif mode == "streaming":
            for block in iter_block_statistics(model, batches, hessian="full", progress=False):
                meter.sample()
                block.stats = None  # the consumer is done with it (scored or written)
        else:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        meter.sample()
    finally:
        for h in handles:
            h.remove()
    return {"mode": mode, "hessian_peak_bytes": meter.peak, "seconds": time.perf_counter() - t0}


def block_unique_bytes(model) -> int:
    """fp64 bytes (Σxxᵀ, Σx² and Σx) of one Llama block's 4 input groups: q/k/v, o, gate/up, down."""
    from sensitivity_lora.calibration.targets import block_containers, module_dims, resolve_targets

    container = block_containers(model)[0]
    lookup = dict(model.named_modules())
    d = [module_dims(lookup[n])[0] for n in resolve_targets(model) if n.startswith(container + ".0.")]
    return sum(w * w * 8 + 2 * w * 8 for w in (d[0], d[3], d[4], d[6]))  # q (=k=v), o, gate (=up), down


def _measure_in_subprocess(mode: str, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__)), "--mode", mode] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(quick: bool, folder: Path | None = None) -> list[dict]:
    """Every mode in its own process; writes ``memory.json`` (``memory-quick.json``) and returns the results."""
    monitor = LoadMonitor()
    results = [_measure_in_subprocess(mode, quick) for mode in MODES]
    rows = [{"mode": r["mode"], "keeps": KEEPS[r["mode"]], "hessian_peak_bytes": r["hessian_peak_bytes"],
             "rss_peak_bytes": r["rss_peak_bytes"], "seconds": round(r["seconds"], 2)} for r in results]
    notes = NOTES if not quick else ["Quick variant: a 3-block model of SmolLM2's widths, random weights, 2 × 2 × 16 "
                                     "random tokens (checks the writer and the bound, not a measurement to quote)."]
    write_table("memory-quick" if quick else "memory", benchmark="bench_memory",
                title="Hessians held at once in full mode" + (" (quick variant)" if quick else ", SmolLM2-135M"),
                columns=COLUMNS, rows=rows, run=new_run(monitor.stop()), notes=notes, folder=folder)
    return results


def table(results: list[dict]) -> str:
    lines = ["| mode | Hessians held (peak) | process peak RSS | time |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['hessian_peak_bytes'] / MiB:.1f} MiB | {r['rss_peak_bytes'] / MiB:.0f} MiB "
                     f"| {r['seconds']:.1f} s |")
    return "\n".join(lines)


# ---------------------------------------------------------------- pytest

pytestmark = pytest.mark.filterwarnings("ignore:sensitivity_lora._C is not built")


def test_memory_quick_streaming_holds_one_block():
    """Quick (CI) variant: 3 blocks of SmolLM2's width, in this process."""
    model, batches = load(quick=True)
    one_block = block_unique_bytes(model)
    assert one_block == 3 * (576**2 + 2 * 576) * 8 + (1536**2 + 2 * 1536) * 8
    streaming = run_mode("streaming", model, batches)
    one_pass = run_mode("one-pass", model, batches)
    assert streaming["hessian_peak_bytes"] == one_block
    assert one_pass["hessian_peak_bytes"] == 3 * one_block


@pytest.mark.integration
@pytest.mark.benchmark(group="memory-smollm2")
def test_memory_smollm2(benchmark, request):
    opt = request.config.getoption
    if opt("benchmark_disable") and not opt("benchmark_enable"):
        pytest.skip("the SmolLM2 memory measurement runs with --benchmark-enable (the quick variant runs always)")
    from sensitivity_lora.models import load_model_and_tokenizer  # noqa: F401  (fails early if unavailable)

    results = measure_all(quick=False)
    print("\n" + table(results))
    benchmark.extra_info.update({r["mode"]: r for r in results})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    streaming = next(r for r in results if r["mode"] == "streaming")
    assert streaming["hessian_peak_bytes"] <= block_unique_bytes(smollm2_like(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--mode", choices=MODES, help="one measurement in this process, printed as JSON")
    what.add_argument("--all", action="store_true", help="every mode in its own process; writes the results JSON")
    parser.add_argument("--quick", action="store_true", help="a 3-block model of SmolLM2's width, random tokens")
    parser.add_argument("--out", type=Path, help="folder for the JSON of --all (default: benchmarks/results/)")
    args = parser.parse_args()
    if args.all:
        print(table(measure_all(args.quick, args.out)))
        return
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, batches = load(args.quick)
    gc.collect()
    result = run_mode(args.mode, model, batches)
    result["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps(result))


if __name__ == "__main__":
    main()
