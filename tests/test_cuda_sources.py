"""The CUDA sources (csrc/cuda) compile alone with nvcc -c for sm_80 and sm_90, warnings as errors.

No GPU needed; skipped (with the reason) where nvcc is missing. The kernels are torch-free, so
they compile without torch's headers; the torch binding (cuda_ops.cpp) is compiled and linked by
.ci/cuda_build_check.sh against a CUDA build of torch. Numerical tests of the CUDA kernels need a
GPU and live with the other backends' op tests.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = (80, 90)
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA compile checks need it")

# What each kernel must compile to (PTX), beyond compiling at all.
PTX_PATTERNS = {
    "sumsq.cu": [r"ld\.global\.nc\.v4\.(u|b)32"],  # 16-byte vector loads
    # tensor cores: bf16 and fp16 WMMA (the fp16 form names only the accumulator types)
    "xtx.cu": [r"wmma\.mma\.sync\.aligned\.col\.row\.m16n16k16\.f32\.bf16\.bf16\.f32",
               r"wmma\.mma\.sync\.aligned\.col\.row\.m16n16k16\.f32\.f32"],
    "diag_stats.cu": [],
}


def _nvcc(src: str, arch: int, out: Path, ptx: bool) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-std=c++17", f"-arch=sm_{arch}", "-O3", "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra,-Werror", "-I", str(CUDA_DIR),
           "--ptx" if ptx else "-c", str(CUDA_DIR / src), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, int, bool], tuple[subprocess.CompletedProcess, Path]]:
    """Object files and PTX of every .cu for every arch, built in parallel (nvcc is slow)."""
    folder = tmp_path_factory.mktemp("nvcc")
    jobs = [(src, arch, ptx) for src in CU_FILES for arch in ARCHS for ptx in (False, True)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = [folder / f"{Path(src).stem}.sm{arch}.{'ptx' if ptx else 'o'}" for src, arch, ptx in jobs]
        results = list(pool.map(lambda job, out: _nvcc(job[0], job[1], out, job[2]), jobs, outs))
    return {job: (res, out) for job, res, out in zip(jobs, results, outs)}


def test_kernel_files_present():
    assert set(PTX_PATTERNS) <= set(CU_FILES), f"expected kernels {sorted(PTX_PATTERNS)}, found {CU_FILES}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES)
def test_compiles_without_warnings(compiled, src, arch):
    res, out = compiled[(src, arch, False)]
    assert res.returncode == 0, f"nvcc -c {src} for sm_{arch} failed:\n{res.stderr[-4000:]}"
    assert out.stat().st_size > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", sorted(PTX_PATTERNS))
def test_ptx_has_expected_instructions(compiled, src, arch):
    res, out = compiled[(src, arch, True)]
    assert res.returncode == 0, f"nvcc --ptx {src} for sm_{arch} failed:\n{res.stderr[-4000:]}"
    ptx = out.read_text()
    for pattern in PTX_PATTERNS[src]:
        assert re.search(pattern, ptx), f"{src} sm_{arch}: PTX lacks {pattern}"


@pytest.mark.parametrize("src", CU_FILES + ["launchers.h", "common.cuh"])
def test_kernels_are_torch_free(src):
    text = (CUDA_DIR / src).read_text()
    assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{src} includes torch headers"


def test_launcher_header_is_plain_c(tmp_path):
    """launchers.h is a C interface: it compiles as C with only the CUDA runtime headers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler found")
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    real = subprocess.run([NVCC, "-dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True)
    top = re.search(r"TOP=(\S+)", real.stdout + real.stderr)
    if top:  # nvcc may be a wrapper script: ask it where the toolkit is
        cuda_include = Path(top.group(1)).resolve() / "include"
    probe = tmp_path / "probe.c"
    probe.write_text('#include "launchers.h"\nint main(void) { return (int)sl_xtx_workspace_bytes(8, 1); }\n')
    res = subprocess.run([cc, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-std=c11", "-I", str(CUDA_DIR),
                          "-I", str(cuda_include), str(probe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
