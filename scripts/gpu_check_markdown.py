"""The GPU check's report: ``gpu_check.json``'s stages as the markdown tables for benchmarks/RESULTS.md."""
from __future__ import annotations


def _f(value, fmt: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def markdown(data: dict) -> str:
    m = data.get("machine") or {}
    stages = {s["name"]: s for s in data["stages"]}
    lines = [f"### GPU check ({data['mode']}): {m.get('gpu', 'no GPU')}, {data['started'][:10]}", ""]
    lines.append(f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton {m.get('triton')}, transformers "
                 f"{m.get('transformers')}, peft {m.get('peft')}, nvcc {m.get('nvcc')}, {m.get('cpu_count')} cores"
                 + (f"; `nvidia-smi`: {m['nvidia_smi']}" if m.get("nvidia_smi") else "") + ". "
                 f"Total {data['seconds']:.0f} s; {'all stages passed' if data['ok'] else 'FAILED: ' + ', '.join(data.get('failed_stages', []))}."
                 + (" Dry run: CPU parts only, no GPU numbers." if data["mode"] == "dry-run" else ""))
    lines += ["", "| stage | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    for s in data["stages"]:
        note = (s.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {s['name']} | {s['status']} | {_f(s['seconds'], '.1f')} | {_f(s['limit_s'], '.0f')} | {note} |")

    rows, failures = [], []
    for name in ("tests_ops", "tests_triton"):
        for part in ((stages[name].get("result") or {}).get("parts") or []):
            label = f"{name} [{part['name']}]"
            if "collected" in part:
                rows.append(f"| {label} | collected {part.get('collected')} | | | | {part['status']} |")
                continue
            rows.append(f"| {label} | {part.get('passed')} | {part.get('failures')} | {part.get('errors')} | "
                        f"{part.get('skipped')} | {part['status']}{' (' + str(part['seconds']) + ' s)' if part.get('seconds') else ''} |")
            failures += [f"- {label} FAILED `{f['test']}`: {f['message'][:200]}" for f in part.get("failed_tests", [])[:10]]
    agree = stages["tests_e2e"].get("result") or {}
    for c in agree.get("checks", []):
        rows.append(f"| backend agreement: {c['backend']} | {int(c['status'] == 'ok')} | {int(c['status'] == 'failed')} "
                    f"| 0 | {int(c['status'] == 'skipped')} | {c['status']} |")
        if c.get("error"):
            failures.append(f"- backend agreement {c['backend']}: {c['error'][:300]}")
    if rows:
        lines += ["", "| tests | passed | failed | errors | skipped | status |", "|---|---|---|---|---|---|", *rows,
                  *([""] + failures if failures else [])]

    e2e = stages["bench_e2e"].get("result") or {}
    if e2e.get("runs"):
        model, tok, floor, fwd = e2e.get("model", {}), e2e.get("tokens", {}), e2e.get("floor", {}), e2e.get("forward") or {}
        shape = "tiny Llama (dry run)" if model.get("tiny") else "LLaMA-3.1-8B shape"
        lines += ["", f"Scoring, {shape}: {model.get('layers')} blocks, random {model.get('dtype')} weights, "
                  f"{tok.get('sequences')} × {tok.get('seq_len')} = {tok.get('tokens')} tokens, streamed "
                  f"(`compute_allocation(..., streaming=True)`); plain forward (decoder, no LM head) "
                  f"{_f(fwd.get('seconds'))} s{' (scaled from fewer batches)' if fwd.get('scaled') else ''}; "
                  f"FLOP floor at {_f(floor.get('rate_used_tflops'), '.4g')} TFLOP/s ({floor.get('rate_source', '')} ; bf16 {_f(floor.get('rates', {}).get('bfloat16', {}).get('best_tflops'), '.4g')}, "
                  f"fp32 {_f(floor.get('rates', {}).get('float32', {}).get('best_tflops'), '.4g')} TFLOP/s): forward "
                  f"{_f((floor.get('forward_flops') or 0) / 1e12, '.4g')} TFLOP, full-mode SYRK "
                  f"{_f((floor.get('syrk_flops_full') or 0) / 1e12, '.4g')} TFLOP.", "",
                  "| mode | backend | time s | × plain forward | FLOP floor s | × floor | × paper (25.78 s) | peak GiB | tokens timed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in e2e["runs"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['mode']} | {r['backend']} | {r.get('status')}: {(r.get('error') or '')[:100]} | | | | | | |")
                continue
            timed = f"{r['tokens_timed']}" + (f" (scaled ×{r['scale']:.1f})" if r.get("scaled") else "")
            lines.append(f"| {r['mode']} | {r['backend']} | {r['seconds']:.2f} | {r['ratio_to_forward']:.2f} | "
                         f"{r['floor_seconds']:.2f} | {r['ratio_to_floor']:.2f} | {r['ratio_to_paper']:.3f} | "
                         f"{_f(r.get('peak_gib'), '.1f')} | {timed} |")

    ops_r = stages["bench_ops"].get("result") or {}
    if ops_r.get("xtx") or ops_r.get("cholesky"):
        lines += ["", "| op | d | tokens | variant | ms | × addmm_ bf16 | × addmm_ fp32 |", "|---|---|---|---|---|---|---|"]
        for r in ops_r.get("xtx", []):
            ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else f"{r.get('status')}: {(r.get('error') or '')[:80]}"
            lines.append(f"| XᵀX | {r['d']} | {r.get('tokens')} | {r['variant']} | {ms} | "
                         f"{_f(r.get('ratio_to_addmm_bf16'))} | {_f(r.get('ratio_to_addmm_fp32'))} |")
        lines += ["", "| op | d | variant | ms | × torch.linalg.cholesky |", "|---|---|---|---|---|"]
        for r in ops_r.get("cholesky", []):
            ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else f"{r.get('status')}: {(r.get('error') or '')[:80]}"
            lines.append(f"| Cholesky fp64 | {r['d']} | {r['variant']} | {ms} | {_f(r.get('ratio_to_torch'))} |")

    eig = stages.get("bench_eig", {}).get("result") or {}
    if eig.get("rows"):
        lines += ["", f"Top-k eigenpairs on {eig.get('device')} (`bench_eigensolver.py`):", "",
                  "| d | k | block s | cycles | dense eigh s | dense ÷ block | max rel. eigenvalue diff | min signed cos "
                  "| H100 estimate ms |", "|---|---|---|---|---|---|---|---|---|"]
        for r in eig["rows"]:
            lines.append(f"| {r['d']} | {r['k']} | {_f(r.get('block_s'), '.4f')} | {r.get('cycles')} | "
                         f"{_f(r.get('dense_s'), '.3f')}{' (est.)' if r.get('dense') != 'measured' else ''} | "
                         f"{_f(r.get('dense_over_block'))} | {_f(r.get('max_rel_value_diff'), '.1e')} | "
                         f"{_f(r.get('min_signed_cos'), '.6f')} | {_f(r.get('h100_estimate_ms'), '.2f')} |")
    return "\n".join(lines) + "\n"
