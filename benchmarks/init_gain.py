"""How much a data-driven A amplifies what its adapter sees, against PEFT's default A, per model.

    python benchmarks/init_gain.py --model smollm2-135m --model gemma3-270m --threads 1 \
        --out benchmarks/results/init_gain.json

With B = 0 and Adam, the first steps move B by about lr per entry whatever the gradient's size, so
the change of a module's output per step scales with the size of A x. PEFT's default A (Kaiming
uniform, a = √5) has entries U(±1/√d): a row a gives E[(a·x)²] = tr(M)/(3d), M = E[xxᵀ]. A row of
the covariance start is a unit eigenvector v_i of the input covariance: E[(v_i·x)²] ≈ λ_i (of M).
The gain of a start is sqrt(mean over its r̄ rows of E[(a·x)²] / (tr(M)/(3d))): how many times larger
its adapter's output moves per Adam step than plain LoRA's. Reported per model: the median and the
largest gain over the input groups, and the share of tr(M) held by the top 1 % of input features
(massive activations).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def model_gains(name: str, n_texts: int, seq_len: int, avg_rank: int) -> dict:
    from sensitivity_lora.calibration import calibrate
    from sensitivity_lora.data import bbc_articles, calibration_batches
    from sensitivity_lora.init.state import group_sums_from_statistics
    from sensitivity_lora.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, task="causal_lm")
    texts = [t for _, t in bbc_articles(["tech"])][:n_texts]
    stats = calibrate(model, calibration_batches(texts, tokenizer, seq_len=seq_len, batch_size=8),
                      hessian="full", progress=False)
    rows = []
    for group, sums in group_sums_from_statistics(stats).items():
        m = sums.xtx.double() / sums.n_tokens
        d = m.shape[0]
        eig = torch.linalg.eigvalsh(m).flip(0)
        default = float(torch.trace(m)) / (3 * d)
        diag = torch.diagonal(m).sort(descending=True).values
        rows.append({"group": group, "d_in": d, "members": list(sums.members),
                     "covariance_gain": (float(eig[:avg_rank].mean()) / default) ** 0.5,
                     "top1pct_feature_share": float(diag[:max(1, d // 100)].sum() / diag.sum())})
    gains = [r["covariance_gain"] for r in rows]
    shares = [r["top1pct_feature_share"] for r in rows]
    return {"model": name, "groups": len(rows), "median_gain": statistics.median(gains), "max_gain": max(gains),
            "median_top1pct_share": statistics.median(shares), "max_top1pct_share": max(shares), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a model name or folder (repeatable)")
    parser.add_argument("--n-texts", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--avg-rank", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [model_gains(m, args.n_texts, args.seq_len, args.avg_rank) for m in args.model]
    for r in results:
        print(f"{r['model']}: covariance start's gain over PEFT's A: median {r['median_gain']:.1f}x, "
              f"max {r['max_gain']:.1f}x; top 1 % of features hold {r['median_top1pct_share']:.0%} of tr(M) "
              f"(median), {r['max_top1pct_share']:.0%} (max)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/init_gain.py " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv),
                                    "avg_rank": args.avg_rank, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
