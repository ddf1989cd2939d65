"""Build of the compiled extension ``sensitivity_lora._C`` (metadata is in pyproject.toml).

    pip install --no-build-isolation -e .      # development; builds against the installed torch

Environment switches (read at build time):

- ``SENSITIVITY_LORA_SKIP_EXT=1``     build no extension at all (pure-Python package, reference ops); without
  it a build that cannot compile the extension (no torch at build time) fails, never silently
- ``SENSITIVITY_LORA_SKIP_CUDA=1``    never build the CUDA sources
- ``SENSITIVITY_LORA_FORCE_CUDA=1``   build the CUDA sources, and fail loudly if that is impossible
- ``SENSITIVITY_LORA_NATIVE_ARCH=1``  add ``-march=native`` (not portable; the hot loops are already
  multiversioned for AVX-512/AVX2 at run time)
- ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``CUDA_HOME``: honoured by torch's build helpers (ninja is
  used when installed)

``--no-build-isolation`` matters: the extension must be compiled against the torch it will run with.
The torch version it was built against is recorded in ``sensitivity_lora/_build_info.py`` and checked
when the extension is loaded.
"""
from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools wants them relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch_version_cuda: str | None, cuda_home: str | None, cuda_sources: list[str]) -> bool:
    """Whether to build the CUDA sources (see the module docstring for the switches)."""
    if _flag("SENSITIVITY_LORA_SKIP_CUDA"):
        return False
    missing = []
    if torch_version_cuda is None:
        missing.append("the installed torch has no CUDA support (torch.version.cuda is None)")
    if cuda_home is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if not cuda_sources:
        missing.append("csrc/cuda has no .cu sources")
    if _flag("SENSITIVITY_LORA_FORCE_CUDA") and missing:
        raise RuntimeError("SENSITIVITY_LORA_FORCE_CUDA=1 but the CUDA build is impossible: " + "; ".join(missing))
    return not missing


def _write_build_info(torch) -> None:
    """Record the torch the extension is compiled against (checked when ``_C`` is loaded)."""
    path = os.path.join(ROOT, "sensitivity_lora", "_build_info.py")
    text = ('"""Written by setup.py: the torch the compiled extension was built against."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA = {torch.version.cuda!r}\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _extensions() -> tuple[list, dict]:
    if _flag("SENSITIVITY_LORA_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "sensitivity-lora compiles its C++ extension against the torch it will run with, and torch is not "
            "importable in this build environment (pip's build isolation hides it). Install torch first, then "
            "`pip install --no-build-isolation .`; or set SENSITIVITY_LORA_SKIP_EXT=1 for a pure-Python install "
            "(reference ops only)."
        ) from exc
    _write_build_info(torch)

    cxx = ["-O3", "-fopenmp"]
    if _flag("SENSITIVITY_LORA_NATIVE_ARCH"):
        cxx.append("-march=native")
    sources = _sources("csrc/bindings.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    # rpath to the torch it was built against, so that `import sensitivity_lora._C` also works
    # before `import torch` (built without isolation, that is the torch it runs with).
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    common = dict(
        name="sensitivity_lora._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp", f"-Wl,-rpath,{torch_lib}"],
    )
    if _want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME, cuda_sources):
        ext = cpp_extension.CUDAExtension(
            sources=sources + _sources("csrc/cuda/*.cpp") + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSL_WITH_CUDA"], "nvcc": ["-O3", "-DSL_WITH_CUDA"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
