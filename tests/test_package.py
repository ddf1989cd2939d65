"""The package's shape: imports run one way (no cycles), the public API resolves, the README's Python runs."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from test_docs_blocks import PYTHON_BLOCKS, run_python_block, tiny_folder  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
# The package as imported: the checkout's, or the installed one when CI tests the wheel.
PACKAGE = Path(importlib.util.find_spec("sensitivity_lora").origin).parent


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the package modules it imports (function-level imports count; parents of a module do not)."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                candidates = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for target in candidates:
                if target in modules and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("leaf", ["sensitivity_lora.errors", "sensitivity_lora.settings", "sensitivity_lora.files",
                                  "sensitivity_lora.progress", "sensitivity_lora.ops.registry"])
def test_leaves_import_nothing_of_ours(leaf):
    assert import_graph()[leaf] <= {"sensitivity_lora.errors"}  # the errors are the root every module may use


def test_layers_import_one_way():
    """ops ← calibration ← hessians/scoring ← api ← cli: a lower layer never imports a higher one."""
    order = ["ops", "calibration", "scoring", "hessians", "peft", "hyperadalora", "api", "training", "evaluation", "cli"]
    rank = {name: i for i, name in enumerate(order)}

    def layer(module: str) -> str | None:
        part = module.split(".")[1] if "." in module else ""
        return part if part in rank else None

    for module, targets in import_graph().items():
        for target in targets:
            a, b = layer(module), layer(target)
            if a and b and a != b and {a, b} != {"scoring", "hessians"}:
                assert rank[b] < rank[a], f"{module} (layer {a}) imports {target} (layer {b})"


def test_public_api_resolves_and_is_small():
    import sensitivity_lora

    names = [n for n in sensitivity_lora.__all__ if n != "__version__"]
    for name in names:
        assert getattr(sensitivity_lora, name) is not None
    entry_points = [n for n in names if not n.endswith("Error")]
    assert len(entry_points) <= 16, entry_points
    assert (PACKAGE / "py.typed").is_file()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sensitivity_lora.nope  # noqa: B018


README_PYTHON = [block for block in PYTHON_BLOCKS if block.path.name == "README.md"]


@pytest.mark.parametrize("block", README_PYTHON, ids=[f"README.md:{block.line}" for block in README_PYTHON])
def test_readme_python_runs_as_written(block, request, tmp_path, monkeypatch, one_thread):
    """The README's Python against the package as imported (the installed wheel in CI's package check), with
    the stand-ins of tests/test_docs_blocks.py, which runs every block of the README and docs/."""
    run_python_block(block, request, tmp_path, monkeypatch)
