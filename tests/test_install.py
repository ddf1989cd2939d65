"""What a user installs and runs: no top-level name of ours shadows another package, a wheel is checked
for completeness, and output files get the permissions of the process umask."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHECK_WHEEL = ROOT / "scripts" / "check_wheel.py"
ALLOWED_TOP_LEVEL_MODULES = {"setup.py"}  # setuptools' entry; no package on PyPI is imported as `setup`


def _in_checkout(path: str) -> bool:
    """Whether ``path`` is a file of the checkout itself (a virtual environment inside it does not count)."""
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and "site-packages" not in resolved.parts


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_transformers_peft_and_the_package_import_from_the_repository_root():
    # transformers 5.x imports the `kernels` package; a folder of ours by that name used to shadow it here.
    proc = _python("import transformers, peft, sensitivity_lora; print(sensitivity_lora.__file__)", ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_regular_package_or_module_of_ours_at_the_repository_root():
    # A folder with __init__.py (or a .py file) at the root is imported before site-packages from a clone.
    regular = sorted(p.name for p in ROOT.iterdir()
                     if (p.is_dir() and (p / "__init__.py").exists() and p.name != "sensitivity_lora")
                     or (p.suffix == ".py" and p.name not in ALLOWED_TOP_LEVEL_MODULES))
    assert regular == []


@pytest.mark.parametrize("name", ["kernels", "benchmarks", "scripts", "tests"])
def test_top_level_names_never_resolve_to_a_module_of_the_checkout(name):
    # A plain folder is at most a namespace portion, which any installed package of that name outranks.
    code = (f"import importlib.util, json; s = importlib.util.find_spec({name!r}); "
            "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    proc = _python(code, ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    if found is not None:
        origin, _ = found
        assert origin is None or not _in_checkout(origin), origin


def test_kernels_resolves_to_the_installed_package_when_there_is_one():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the `kernels` package is not installed (transformers < 5 does not need it)")
    proc = _python("import kernels; print(kernels.__file__)", ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _in_checkout(proc.stdout.strip())


# ---------------------------------------------------------------- wheel completeness

def _check_wheel():
    if not CHECK_WHEEL.exists():
        pytest.skip("scripts/check_wheel.py is not in this tree")
    spec = importlib.util.spec_from_file_location("check_wheel", CHECK_WHEEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_package(root: Path) -> Path:
    package = root / "pkg"
    for rel in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "py.typed", "_build_info.py"):
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text("")
    return package


def _wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, "")
    return path


def test_check_wheel_passes_a_complete_wheel_and_names_what_a_wheel_lacks(tmp_path):
    check = _check_wheel()
    package = _fake_package(tmp_path)
    complete = ["pkg/__init__.py", "pkg/a.py", "pkg/sub/__init__.py", "pkg/sub/b.py", "pkg/py.typed",
                "pkg-0.1.dist-info/METADATA"]
    assert check.missing_from_wheel(_wheel(tmp_path / "ok.whl", complete), package) == []
    lacking = [n for n in complete if not n.startswith("pkg/sub/")]
    assert check.missing_from_wheel(_wheel(tmp_path / "bad.whl", lacking), package) == [
        "pkg/sub/__init__.py", "pkg/sub/b.py"]
    assert check.main([str(tmp_path / "bad.whl"), "--source", str(package)]) == 1
    assert check.main([str(tmp_path / "ok.whl"), "--source", str(package)]) == 0
    assert check.missing_from_wheel(_wheel(tmp_path / "ok.whl", complete), package, require_extension=True) == [
        "pkg/_C (the compiled extension)"]


def test_the_source_package_list_covers_every_subpackage():
    import sensitivity_lora

    check = _check_wheel()
    files = check.source_files(Path(sensitivity_lora.__file__).parent)
    for sub in ("training", "hyperadalora", "kernels", "evaluation", "init", "ops"):
        assert f"sensitivity_lora/{sub}/__init__.py" in files


# ---------------------------------------------------------------- output permissions

@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path, umask):
    from sensitivity_lora.files import atomic_save_safetensors, atomic_write_json, process_umask
    from sensitivity_lora.folders import FileSet
    from sensitivity_lora.init.corda import write_corda_covariance_file
    from sensitivity_lora.init.state import GroupSums

    assert process_umask() == umask
    expected = 0o666 & ~umask
    written = [atomic_write_json(tmp_path / "a.json", {"x": 1}),
               atomic_save_safetensors(tmp_path / "w.safetensors", {"t": torch.ones(2)}, {})]
    with FileSet(tmp_path / "set") as files:
        files.write_json("allocation.json", {"ranks": {}})
        files.write_text("notes.txt", "hi")
        files.commit()
    written += [tmp_path / "set" / "allocation.json", tmp_path / "set" / "notes.txt"]
    sums = GroupSums(xtx=torch.eye(3, dtype=torch.float64), total=None, n_tokens=4, members=("layer",))
    written.append(write_corda_covariance_file(tmp_path / "cov.pt", {"layer": sums}))
    for path in written:
        assert _mode(path) == expected, (path.name, oct(_mode(path)))


def test_the_cli_outputs_follow_the_umask(tiny_llama_dir, tmp_path, umask):
    from sensitivity_lora.cli import main

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"Text {i} on markets, music and football." * (1 + i % 3) for i in range(8)) + "\n")
    out = tmp_path / "out"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--avg-rank", "2",
                 "--max-samples", "8", "--seq-len", "32", "--batch-size", "4", "--quiet", "--no-plot",
                 "--init", "covariance"]) == 0
    files = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert {"allocation.json", "adapter_config.json", "initial_weights.safetensors"} <= {p.name for p in files}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, (path.name, oct(_mode(path)))


@pytest.mark.skipif(not os.environ.get("SENSITIVITY_LORA_EXPECT_INSTALLED"),
                    reason="only in CI's installed-wheel run (.ci/package_check.sh)")
def test_the_installed_package_is_what_gets_imported():
    import sensitivity_lora

    assert "site-packages" in Path(sensitivity_lora.__file__).parts, sensitivity_lora.__file__
    assert not (ROOT / "sensitivity_lora").exists()
