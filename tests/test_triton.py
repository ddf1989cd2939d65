"""Triton kernels (sensitivity_lora/kernels/) against the fp64 oracles, three ways.

1. Interpreter (no GPU needed): a subprocess with TRITON_INTERPRET=1 runs every
   kernel on CPU inputs that this process drew (fresh random each run), and
   this process checks the outputs. A subprocess, because the interpreter is
   chosen when triton kernels are defined and must not leak into other tests.
2. AOT (no GPU needed): every kernel compiles for sm_80 and sm_90 with
   ``triton.compile`` and a ``GPUTarget``; the XᵀX and Cholesky-update PTX must
   contain mma.sync (sm_80) / wgmma (sm_90) instructions.
3. GPU: the same checks on CUDA tensors (bf16/fp16 too) when a GPU is present.

Run as ``python tests/test_triton.py --interpret-worker DIR`` it is the worker of 1.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

triton = pytest.importorskip("triton", reason="triton is not installed") if __name__ != "__main__" else None

from oracles import (  # noqa: E402
    ACCUMULATION_RTOL,
    FP64_RTOL,
    activation,
    assert_factor_close,
    assert_gram_close,
    assert_sums_close,
    oracle_diag_stats,
    oracle_sumsq,
    oracle_xtx,
    spd,
    token_mask,
    with_eigenvalues,
)

# --- the cases: small shapes whose last tiles/chunks are partly out of range --------------------------
# Interpreter block sizes are 16 (XᵀX tiles, token steps) and 32/64 (sumsq, diag_stats), chunks 64.
SUMSQ_CASES = [  # (n, d, layout, mask kind, with_sum, chunk)
    (300, 37, "contiguous", "random", True, 64),
    (70, 16, "transposed", "none", False, 4096),
    (129, 45, "row-strided", "random", True, 32),
    (40, 9, "contiguous", "all-masked", True, 64),
]
XTX_CASES = [  # (n, d, layout, mask kind, with diag, chunk, splits)
    (300, 37, "contiguous", "random", True, 64, 1),
    (300, 37, "contiguous", "random", False, 64, 3),
    (45, 50, "transposed", "none", True, 4096, None),
    (100, 33, "row-strided", "random", True, 32, 2),
    (20, 17, "contiguous", "all-masked", False, 64, 1),
]
DIAG_CASES = [  # (d, d_out, k, alpha, kind)
    (37, 5, 92, 0.85, "random"),
    (150, 3, 225, 0.85, "random"),  # d spans several tiles of the selection loop
    (64, 1, 1, 1.0, "random"),
    (8, 3, 12, 0.5, "ties"),  # equal entries: α·T lands exactly on a cumulative sum
    (20, 4, 7, 0.9, "zeros"),
    (30, 7, 209, 0.3, "massive"),
    (40, 3, 60, 1.0, "tiny-tail"),  # α = 1 with a negligible last entry: rounding must not overshoot
]
CHOL_CASES = [  # (n, panel, block)
    (1, 32, 16),
    (37, 16, 16),
    (70, 32, 16),
]


def _kernels():
    """The ``sensitivity_lora.kernels`` package.

    Imported directly, not through the triton backend, which refuses to load without a GPU or the
    interpreter (AOT compilation needs neither)."""
    import importlib

    return importlib.import_module("sensitivity_lora.kernels")


def _diag_input(d: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.full((d,), 2.0, dtype=torch.float64)
    if kind == "zeros":
        return torch.zeros(d, dtype=torch.float64)
    x = torch.rand(d, generator=g, dtype=torch.float64) ** 3
    if kind == "massive":
        x[:2] *= 1000.0
    if kind == "tiny-tail":
        x[-1] = 1e-14 * float(x.sum())
    return x


def _make_inputs(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Cases (JSON-able) and their tensors, drawn fresh from ``seed``."""
    cases, tensors = [], {}
    g = torch.Generator().manual_seed(seed)

    def seed_next() -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=g))

    for i, (n, d, layout, mk, with_sum, chunk) in enumerate(SUMSQ_CASES):
        x = activation(n, d, torch.float32, seed_next(), layout)
        name = f"sumsq{i}"
        tensors[f"{name}.x"] = x.contiguous() if layout == "contiguous" else x.T.contiguous()
        mask = token_mask(n, mk, seed_next())
        if mask is not None:
            tensors[f"{name}.mask"] = mask
        tensors[f"{name}.acc"] = torch.rand(d, generator=g, dtype=torch.float64)
        if with_sum:
            tensors[f"{name}.acc_sum"] = torch.rand(d, generator=g, dtype=torch.float64)
        cases.append(dict(name=name, op="sumsq", layout=layout, chunk=chunk, transposed=layout != "contiguous"))
    for i, (n, d, layout, mk, with_diag, chunk, splits) in enumerate(XTX_CASES):
        x = activation(n, d, torch.float32, seed_next(), layout)
        name = f"xtx{i}"
        tensors[f"{name}.x"] = x.contiguous() if layout == "contiguous" else x.T.contiguous()
        mask = token_mask(n, mk, seed_next())
        if mask is not None:
            tensors[f"{name}.mask"] = mask
        tensors[f"{name}.acc"] = torch.rand(d, d, generator=g, dtype=torch.float64)
        if with_diag:
            tensors[f"{name}.diag"] = torch.rand(d, generator=g, dtype=torch.float64)
        cases.append(dict(name=name, op="xtx", chunk=chunk, splits=splits, transposed=layout != "contiguous"))
    for i, (d, d_out, k, alpha, kind) in enumerate(DIAG_CASES):
        name = f"diag{i}"
        tensors[f"{name}.diag"] = _diag_input(d, kind, seed_next())
        cases.append(dict(name=name, op="diag_stats", d_out=d_out, k=k, alpha=alpha))
    for i, (n, panel, block) in enumerate(CHOL_CASES):
        name = f"chol{i}"
        tensors[f"{name}.H"] = spd(n, seed_next())
        cases.append(dict(name=name, op="cholesky", panel=panel, block=block))
    # Trailing update alone, and a matrix that no damping on the ladder can rescue.
    tensors["trail.c"] = torch.randn(40, 40, generator=g, dtype=torch.float64)
    tensors["trail.p"] = torch.randn(40, 12, generator=g, dtype=torch.float64)
    cases.append(dict(name="trail", op="trailing_update"))
    eig = torch.cat([torch.full((10,), -50.0), torch.ones(20)]).double()
    tensors["indef.H"] = with_eigenvalues(30, seed_next(), eig)
    cases.append(dict(name="indef", op="cholesky_indefinite"))
    return {"cases": cases}, tensors


def _run_case(case: dict, t: dict[str, torch.Tensor], out: dict[str, torch.Tensor], errors: dict[str, str]) -> None:
    """Run one case with the Triton kernels (in the worker, or on a GPU in this process)."""
    _kernels()
    from sensitivity_lora.kernels import cholesky, diag_stats, sumsq, xtx

    name = case["name"]
    get = lambda key: t.get(f"{name}.{key}")  # noqa: E731
    if case["op"] in ("sumsq", "xtx"):
        x = get("x").T if case["transposed"] else get("x")
        acc = get("acc").clone()
        if case["op"] == "sumsq":
            acc_sum = get("acc_sum").clone() if get("acc_sum") is not None else None
            sumsq.accumulate_sumsq(acc, x, get("mask"), acc_sum, chunk=case["chunk"])
            if acc_sum is not None:
                out[f"{name}.acc_sum"] = acc_sum
        else:
            diag = get("diag").clone() if get("diag") is not None else None
            xtx.accumulate_xtx(acc, x, get("mask"), diag, chunk=case["chunk"], splits=case["splits"])
            if diag is not None:
                out[f"{name}.diag"] = diag
        out[f"{name}.acc"] = acc
    elif case["op"] == "diag_stats":
        out[f"{name}.stats"] = diag_stats.diag_stats(get("diag"), case["d_out"], case["k"], case["alpha"])
    elif case["op"] == "cholesky":
        L, info = cholesky.cholesky_blocked(get("H"), panel=case["panel"], block=case["block"])
        out[f"{name}.L"], out[f"{name}.info"] = L, torch.tensor([info])
        L2, damp, tries = cholesky.cholesky_damped(get("H"))
        out[f"{name}.Ld"], out[f"{name}.damp"] = L2, torch.tensor([damp, float(tries)], dtype=torch.float64)
    elif case["op"] == "trailing_update":
        c = get("c").clone()
        cholesky.trailing_update(c, get("p"), block=16)
        out[f"{name}.c"] = c
    elif case["op"] == "cholesky_indefinite":
        try:
            cholesky.cholesky_damped(get("H"), max_tries=2)
            errors[name] = ""
        except Exception as exc:  # the type is what the test checks
            errors[name] = type(exc).__name__


def _worker(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run with TRITON_INTERPRET=1"
    spec = json.loads((folder / "cases.json").read_text())
    tensors = load_file(str(folder / "inputs.safetensors"))
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for case in spec["cases"]:
        _run_case(case, tensors, out, errors)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "outputs.safetensors"))
    (folder / "errors.json").write_text(json.dumps(errors))


# --- checks shared by the interpreter and GPU runs --------------------------------------------------------

def _check(case: dict, t: dict[str, torch.Tensor], out: dict[str, torch.Tensor], errors: dict[str, str],
           rtol: float = ACCUMULATION_RTOL) -> None:
    name = case["name"]
    get = lambda key: t.get(f"{name}.{key}")  # noqa: E731
    if case["op"] in ("sumsq", "xtx"):
        x = (get("x").T if case["transposed"] else get("x")).cpu()
        mask = get("mask").cpu() if get("mask") is not None else None
        sq, s = oracle_sumsq(x, mask)
        if case["op"] == "sumsq":
            assert_sums_close(out[f"{name}.acc"].cpu(), get("acc").cpu() + sq, sq + 1e-30, rtol, f"{name} Σx²")
            if get("acc_sum") is not None:
                n_kept = x.shape[0] if mask is None else int(mask.sum())
                scale = torch.sqrt(sq * max(n_kept, 1)) + 1e-30  # Cauchy-Schwarz bound of |Σx|
                assert_sums_close(out[f"{name}.acc_sum"].cpu(), get("acc_sum").cpu() + s, scale, rtol, f"{name} Σx")
        else:
            got = out[f"{name}.acc"].cpu() - get("acc").cpu()
            expected = oracle_xtx(x, mask)
            if mask is not None and not bool(mask.any()):
                assert torch.equal(got.triu(), torch.zeros_like(got).triu()), f"{name}: all-masked input changed acc"
            else:
                assert_gram_close(got, expected, rtol)
            if get("diag") is not None:
                assert_sums_close(out[f"{name}.diag"].cpu(), get("diag").cpu() + sq, sq + 1e-30, rtol, f"{name} diag")
    elif case["op"] == "diag_stats":
        trace, topk, eff = oracle_diag_stats(get("diag").cpu(), case["d_out"], case["k"], case["alpha"])
        got = out[f"{name}.stats"]
        assert got.dtype == torch.float64 and got.shape == (3,)
        assert float(got[0]) == pytest.approx(trace, rel=FP64_RTOL, abs=1e-300), f"{name} trace"
        assert float(got[1]) == pytest.approx(topk, rel=FP64_RTOL, abs=1e-300), f"{name} top-k mean"
        assert float(got[2]) == eff, f"{name} effective rank"
    elif case["op"] == "cholesky":
        H = get("H").cpu()
        assert int(out[f"{name}.info"]) == 0
        assert_factor_close(out[f"{name}.L"].cpu(), H, FP64_RTOL)
        from sensitivity_lora.ops import reference

        L_ref, damp_ref, tries_ref = reference.cholesky_damped(H)
        damp, tries = out[f"{name}.damp"].tolist()
        assert damp == pytest.approx(damp_ref) and int(tries) == tries_ref
        assert_factor_close(out[f"{name}.Ld"].cpu(), H + damp * torch.eye(H.shape[0], dtype=H.dtype), FP64_RTOL)
    elif case["op"] == "trailing_update":
        c, p = get("c").cpu(), get("p").cpu()
        expected = c - p @ p.T
        lower = torch.ones_like(c, dtype=torch.bool).tril()
        got = out[f"{name}.c"].cpu()
        assert torch.allclose(got[lower], expected[lower], rtol=1e-12, atol=1e-12), "trailing update (lower tiles)"
    elif case["op"] == "cholesky_indefinite":
        assert errors[name] == "NotPositiveDefiniteError", f"expected NotPositiveDefiniteError, got {errors[name]!r}"


# --- 1. interpreter ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs, outputs and errors of one interpreter run over every case (fresh random seed)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("triton-interpret")
    seed = int.from_bytes(os.urandom(4), "little")
    spec, tensors = _make_inputs(seed)
    (folder / "cases.json").write_text(json.dumps(spec))
    save_file(tensors, str(folder / "inputs.safetensors"))
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret-worker", str(folder)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter worker failed (seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = load_file(str(folder / "outputs.safetensors"))
    errors = json.loads((folder / "errors.json").read_text())
    return {c["name"]: c for c in spec["cases"]}, tensors, out, errors, seed


def _all_case_names() -> list[str]:
    spec, _ = _make_inputs(0)
    return [c["name"] for c in spec["cases"]]


@pytest.mark.parametrize("name", _all_case_names())
def test_interpreter_matches_oracle(interpreted, name):
    cases, tensors, out, errors, seed = interpreted
    try:
        _check(cases[name], tensors, out, errors)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (inputs drawn with seed {seed})") from exc


# --- 2. AOT compilation for sm_80 / sm_90 -----------------------------------------------------------------

def _aot_specs() -> dict[str, tuple]:
    _kernels()
    from sensitivity_lora.kernels import cholesky, diag_stats, sumsq, xtx

    x_sig = {"n_tokens": "i32", "d": "i32", "stride_t": "i32"}
    return {
        # kernel, signature, constexprs, 16-byte-divisible args, num_warps, PTX patterns per arch
        "sumsq_bf16": (sumsq._sumsq_kernel,
                       {"x_ptr": "*bf16", "mask_ptr": "*u8", "part_sq_ptr": "*fp64", "part_sum_ptr": "*fp64", **x_sig},
                       dict(stride_d=1, CHUNK=4096, BLOCK_T=32, BLOCK_D=128, HAS_MASK=True, WITH_SUM=True),
                       ("x_ptr", "part_sq_ptr", "part_sum_ptr", "d", "stride_t"), 4,
                       {80: [r"ld\.global(\.nc)?\.v4"], 90: [r"ld\.global(\.nc)?\.v4"]}),
        **{f"xtx_{dt}": (xtx._xtx_kernel,
                         {"x_ptr": f"*{dt}", "mask_ptr": "*u8", "out_ptr": "*fp64", "pairs_ptr": "*i32", **x_sig,
                          "stride_o": "i32", "stride_split": "i64", "tokens_per_split": "i32"},
                         dict(stride_d=1, CHUNK=4096, BLOCK_T=64, BLOCK=128, HAS_MASK=True, UPCAST=False,
                              PRECISION="tf32"),
                         ("x_ptr", "out_ptr", "d", "stride_t", "stride_o"), 8,
                         {80: [rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{pt}\.{pt}\.f32"],
                          90: [rf"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.{pt}\.{pt}"]})
           for dt, pt in (("bf16", "bf16"), ("fp16", "f16"))},
        "xtx_fp32": (xtx._xtx_kernel,
                     {"x_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp64", "pairs_ptr": "*i32", **x_sig,
                      "stride_o": "i32", "stride_split": "i64", "tokens_per_split": "i32"},
                     dict(stride_d=1, CHUNK=4096, BLOCK_T=32, BLOCK=64, HAS_MASK=False, UPCAST=True,
                          PRECISION="tf32x3"),
                     ("x_ptr", "out_ptr", "d", "stride_t", "stride_o"), 4,
                     {80: [r"mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32"], 90: [r"wgmma\.mma_async\.\S*tf32"]}),
        "diag_stats": (diag_stats._diag_stats_kernel,
                       {"diag_ptr": "*fp64", "alpha_ptr": "*fp64", "out_ptr": "*fp64", "d": "i32", "d_out": "i32",
                        "k": "i32", "q": "i32", "s": "i32"},
                       dict(BLOCK=1024), ("diag_ptr",), 4, {80: [], 90: []}),
        "cholesky_update_fp64": (cholesky._trailing_update_kernel,
                                 {"c_ptr": "*fp64", "p_ptr": "*fp64", "pairs_ptr": "*i32", "n": "i32", "kdim": "i32",
                                  "stride_c": "i32", "stride_p": "i32"},
                                 dict(BLOCK=64, BLOCK_K=32, PRECISION="ieee"), ("c_ptr", "p_ptr"), 4,
                                 {80: [r"mma\.sync\.aligned\.m8n8k4\.row\.col\.f64"],
                                  90: [r"mma\.sync\.aligned\.m8n8k4\.row\.col\.f64"]}),
        "cholesky_update_fp32": (cholesky._trailing_update_kernel,
                                 {"c_ptr": "*fp32", "p_ptr": "*fp32", "pairs_ptr": "*i32", "n": "i32", "kdim": "i32",
                                  "stride_c": "i32", "stride_p": "i32"},
                                 dict(BLOCK=64, BLOCK_K=32, PRECISION="ieee"), ("c_ptr", "p_ptr"), 4,
                                 {80: [], 90: []}),
    }


AOT_NAMES = ["sumsq_bf16", "xtx_bf16", "xtx_fp16", "xtx_fp32", "diag_stats", "cholesky_update_fp64",
             "cholesky_update_fp32"]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", AOT_NAMES)
def test_aot_compiles_for_gpu(name, arch):
    """Compiles without a GPU (triton ships ptxas); PTX has the tensor-core instructions."""
    _kernels()
    from sensitivity_lora.kernels._launch import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels are interpreted, not compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, const, aligned, num_warps, patterns = _aot_specs()[name]
    args = list(fn.arg_names)
    signature = dict(sig, **{k: "constexpr" for k in const})
    missing = set(args) - set(signature)
    assert not missing, f"AOT spec of {name} misses arguments {missing}"
    attrs = {(args.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature={a: signature[a] for a in args}, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert compiled.asm.get("cubin"), "ptxas produced no cubin"
    for pattern in patterns[arch]:
        assert re.search(pattern, ptx), f"{name} sm_{arch}: PTX lacks {pattern}"
    assert "__nv_" not in ptx, f"{name}: PTX calls libdevice (keep kernels libdevice-free for the interpreter)"


# --- 3. on a GPU -----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU Triton tests run where one is")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", _all_case_names())
def test_gpu_fp32_matches_oracle(name):
    seed = int.from_bytes(os.urandom(4), "little")
    spec, tensors = _make_inputs(seed)
    case = {c["name"]: c for c in spec["cases"]}[name]
    dev = {k: v.cuda() for k, v in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    _run_case(case, dev, out, errors)
    # fp32 operands run as 3xTF32 on tensor cores: a little above plain fp32 rounding.
    _check(case, dev, out, errors, rtol=4 * ACCUMULATION_RTOL)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,mask_kind", [(5000, 300, "random"), (9000, 1030, "none"), (777, 4096, "random")])
def test_gpu_half_matches_oracle(dtype, n, d, mask_kind):
    _kernels()
    from sensitivity_lora.kernels import sumsq, xtx

    seed = int.from_bytes(os.urandom(4), "little")
    x = activation(n, d, dtype, seed).cuda()  # the oracle sees the same rounded values
    mask = token_mask(n, mask_kind, seed + 1)
    mask_d = mask.cuda() if mask is not None else None
    sq, _ = oracle_sumsq(x.cpu(), mask)
    acc = torch.zeros(d, dtype=torch.float64, device="cuda")
    sumsq.accumulate_sumsq(acc, x, mask_d)
    assert_sums_close(acc.cpu(), sq, sq, ACCUMULATION_RTOL, "Σx² (GPU)")
    A = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    xtx.accumulate_xtx(A, x, mask_d)
    assert_gram_close(A.cpu(), oracle_xtx(x.cpu(), mask), ACCUMULATION_RTOL)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--interpret-worker":
    _worker(Path(sys.argv[2]))
