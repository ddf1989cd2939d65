"""Every fenced code block of README.md and docs/*.md runs or parses, so none can go stale (the links, the
index and the guarantees' test names: test_docs_links.py).

How a block is checked, by the language on its fence:

- ``python``: executed (``exec``, in a fresh namespace, in a temporary working directory). Tracebacks name
  the markdown file and its line.
- ``bash``, ``sh``, ``shell``, ``console`` and unlabelled blocks: nothing is run. Each command line
  (continuation lines joined, comments dropped, ``NAME=value`` assignments expanded as the shell would)
  is checked: ``sensitivity-lora ...``, ``python -m sensitivity_lora ...`` and ``torchrun``/``accelerate
  launch ... -m sensitivity_lora ...`` are parsed by the package's own argparse parser (a bare ``...``
  stands for options shown in full above and is dropped); ``bash X``, ``python X.py``, ``.ci/X``,
  ``scripts/X`` name files that exist; ``pip install`` lines and other commands are left alone.
- ``json``: parsed. Other languages (``text``, ...): not checked.

An HTML comment on the line(s) just before a fence tells the test what a block needs:

- ``<!-- doc-test: setup=tiny_llama -->``: the stand-ins of ``SETUPS`` below, injected before the block
  runs (``tiny_llama``: a tiny random Llama as ``model`` with a real tokenizer, short ``texts`` and
  ``batches``, and ``load_model_and_tokenizer()`` / ``load_texts()`` answering with them instead of the
  shipped SmolLM2-135M and BBC texts; ``cli_outputs``: ``sensitivity-lora allocate``'s files in
  ``sensitivity_lora_out/``; ``statistics``: full calibration statistics as ``source``;
  ``hessian_export``: an export in ``h/``). Several: ``setup=a,b``.
- ``<!-- doc-test: requires=MODULE -->``: run where MODULE imports, skipped (saying so) elsewhere.
- ``<!-- doc-test: skip reason=... -->``: not run here (a GPU, a launcher); a reason is required, and
  ``MAX_SKIPS`` keeps skips rare.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import shlex
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MAX_SKIPS = 2  # explicit skip directives over all pages
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    return files + sorted(DOCS.glob("*.md")) if DOCS.is_dir() else files


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # the opening fence's line, 1-based
    lang: str
    text: str
    directives: dict[str, str]

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line} (```{self.lang} block)"


def parse_directives(text: str) -> dict[str, str]:
    """``setup=a,b requires=x`` → {"setup": "a,b", "requires": "x"}; ``skip reason=...`` → {"skip": "..."}."""
    text = text.strip()
    if text == "skip" or text.startswith("skip "):
        reason = text[4:].strip()
        reason = reason[len("reason="):].strip() if reason.startswith("reason=") else reason
        return {"skip": reason}
    found = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or key not in ("setup", "requires"):
            raise ValueError(f"unknown doc-test directive {part!r} (use setup=..., requires=... or skip reason=...)")
        found[key] = value
    return found


def find_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = len(match.group(1)), match.group(2), match.group(3).lower()
        directives, j = {}, i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        while j >= 0 and DIRECTIVE.match(lines[j]):
            directives.update(parse_directives(DIRECTIVE.match(lines[j]).group(1)))
            j -= 1
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence[0] * len(fence))
                                        and set(lines[end].strip()) == {fence[0]}):
            end += 1
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[i + 1:end]]
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", directives))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in find_blocks(path)]


BLOCKS = all_blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in PYTHON_LANGS]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL_LANGS]
JSON_BLOCKS = [b for b in BLOCKS if b.lang == "json"]


def ids(blocks: list[Block]) -> list[str]:
    return [f"{rel(b.path)}:{b.line}" for b in blocks]


# --- stand-ins for the real model, data and outputs ------------------------------------------------------

STANDIN_TEXTS = [f"sample {i}: the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(16)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama with MiniLM's WordPiece tokenizer (the stand-in for SmolLM2-135M), and a text file."""
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path_factory.mktemp("doc-blocks") / "tiny-llama")
    (folder.parent / "texts.txt").write_text("\n".join(STANDIN_TEXTS) + "\n", encoding="utf-8")
    return folder


def setup_tiny_llama(names: dict, folder: Path, monkeypatch) -> None:
    import sensitivity_lora.data as data
    import sensitivity_lora.models as models
    from sensitivity_lora import calibration_batches

    real_load_model, real_load_texts = models.load_model_and_tokenizer, data.load_texts

    def load_model_and_tokenizer(path=None, *args, **kwargs):
        shipped = path is None or (str(path) in models.NAMED_MODELS and not Path(str(path)).exists())
        return real_load_model(folder if shipped else path, *args, **kwargs)

    def load_texts(path=None, max_samples=None, *args, **kwargs):
        if path is None:
            return list(STANDIN_TEXTS[:max_samples])
        return real_load_texts(path, max_samples, *args, **kwargs)

    monkeypatch.setattr(models, "load_model_and_tokenizer", load_model_and_tokenizer)
    monkeypatch.setattr(data, "load_texts", load_texts)
    model, tokenizer = real_load_model(folder)
    names.update(model=model, tokenizer=tokenizer, texts=list(STANDIN_TEXTS),
                 batches=calibration_batches(STANDIN_TEXTS, tokenizer, seq_len=32, batch_size=4))


def setup_cli_outputs(names: dict, folder: Path, monkeypatch) -> None:
    from sensitivity_lora.cli import main

    code = main(["allocate", "--model", str(folder), "--data", str(folder.parent / "texts.txt"), "--max-samples",
                 "8", "--seq-len", "32", "--no-plot", "-q", "--out", "sensitivity_lora_out"])
    assert code == 0, f"the stand-in `sensitivity-lora allocate` exited {code}"


def setup_statistics(names: dict, folder: Path, monkeypatch) -> None:
    from sensitivity_lora import calibrate

    names["source"] = calibrate(names["model"], names["batches"], hessian="full", progress=False)


def setup_hessian_export(names: dict, folder: Path, monkeypatch) -> None:
    from sensitivity_lora import export_hessians

    export_hessians(names["model"], names["batches"], "h/", progress=False)


SETUPS = {"tiny_llama": setup_tiny_llama, "cli_outputs": setup_cli_outputs, "statistics": setup_statistics,
          "hessian_export": setup_hessian_export}


# --- python blocks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=ids(PYTHON_BLOCKS))
def test_python_block_runs(block: Block, request, tmp_path, monkeypatch, one_thread):
    run_python_block(block, request, tmp_path, monkeypatch)


def run_python_block(block: Block, request, tmp_path: Path, monkeypatch) -> None:
    """Run ``block`` as the module doc says (its setups first, in ``tmp_path``); a failure names its line."""
    if "skip" in block.directives:
        pytest.skip(f"{block.where}: {block.directives['skip']}")
    required = block.directives.get("requires")
    if required and importlib.util.find_spec(required) is None:
        pytest.skip(f"{block.where} needs {required}, which is not installed here")
    setups = [s for s in block.directives.get("setup", "").split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    assert not unknown, f"{block.where}: unknown setup {unknown} (known: {', '.join(SETUPS)})"
    monkeypatch.chdir(tmp_path)
    names: dict = {"__name__": "__doc_block__"}
    folder = request.getfixturevalue("tiny_folder") if setups else None
    for setup in setups:
        SETUPS[setup](names, folder, monkeypatch)
    source = "\n" * block.line + block.text  # tracebacks give the line in the markdown file
    try:
        exec(compile(source, rel(block.path), "exec"), names)
    except Exception as exc:  # noqa: BLE001 - any failure of a documented block is the test's failure
        frames = "".join(traceback.format_exception(exc)[-6:])
        pytest.fail(f"{block.where} failed: {type(exc).__name__}: {exc}\n{frames}", pytrace=False)


# --- shell blocks ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Command:
    line: int  # in the markdown file
    argv: list[str]


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line in the markdown file, the command line with its continuation lines joined)."""
    out, current, start = [], "", None
    for offset, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if start is None:
            start = offset
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            out.append((start, current))
        current, start = "", None
    if current.strip():
        out.append((start, current))
    return out


def split_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def shell_commands(block: Block) -> list[Command]:
    """The simple commands of a shell block, variables expanded, redirections and ``...`` dropped."""
    variables: dict[str, str] = {}
    commands = []
    for line, text in logical_lines(block):
        try:
            words = shlex.split(text, comments=True)
        except ValueError as exc:
            pytest.fail(f"{rel(block.path)}:{line}: cannot split the command line ({exc}): {text.strip()}",
                        pytrace=False)
        if words[:1] == ["export"]:
            words = words[1:]
        if words and all(ASSIGNMENT.match(w) for w in words):  # NAME=value lines set variables
            for word in words:
                name, _, value = word.partition("=")
                if "$(" not in value and "`" not in value:
                    variables[name] = VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
                                                   value)
            continue
        expanded = VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)
        argv: list[str] = []
        tokens = split_words(expanded)
        index = 0
        while index < len(tokens):
            token = tokens[index]
            if token and set(token) <= set("<>&") and ("<" in token or ">" in token):  # a redirection
                if argv and argv[-1].isdigit():
                    argv.pop()
                index += 2
                continue
            if token in SEPARATORS:
                if argv:
                    commands.append(Command(line, argv))
                argv = []
            elif token != "...":
                argv.append(token)
            index += 1
        if argv:
            commands.append(Command(line, argv))
    return commands


def cli_argv(argv: list[str]) -> list[str] | None:
    """The arguments the package's CLI would get from this command, or None if it is not one of ours."""
    while argv and ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    name = Path(argv[0]).name
    if name == "sensitivity-lora":
        return argv[1:]
    if name in ("torchrun", "accelerate") or re.fullmatch(r"python[0-9.]*", name):
        for i, word in enumerate(argv[:-1]):
            if word == "-m" and argv[i + 1] in ("sensitivity_lora", "sensitivity_lora.cli"):
                return argv[i + 2:]
    return None


def referenced_path(argv: list[str]) -> str | None:
    """The repository file a command runs (``bash scripts/X``, ``python benchmarks/X.py``, ``.ci/X``)."""
    while argv and ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    name = Path(argv[0]).name
    if argv[0].startswith((".ci/", "scripts/", "benchmarks/", "./")):
        return argv[0]
    rest = [w for w in argv[1:]]
    if name in ("bash", "sh") or re.fullmatch(r"python[0-9.]*", name):
        for word in rest:
            if word in ("-m", "-c"):
                return None
            if not word.startswith("-"):
                return word if (name in ("bash", "sh") or word.endswith(".py")) else None
    return None


def check_cli(argv: list[str]) -> str | None:
    """None if the CLI's parser accepts ``argv`` (as ``main`` would), else its one-line error."""
    from sensitivity_lora.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return None if exc.code in (0, None) else err.getvalue().strip() or f"exit {exc.code}"
    if args.quiet and args.verbose:
        return "-q/--quiet and -v/--verbose contradict each other"
    return None


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=ids(SHELL_BLOCKS))
def test_shell_block_parses(block: Block):
    if "skip" in block.directives:
        pytest.skip(f"{block.where}: {block.directives['skip']}")
    problems = []
    for command in shell_commands(block):
        where = f"{rel(block.path)}:{command.line}"
        argv = cli_argv(command.argv)
        if argv is not None:
            error = check_cli(argv)
            if error:
                problems.append(f"{where}: `sensitivity-lora {' '.join(argv)}` does not parse: {error}")
            continue
        path = referenced_path(command.argv)
        if path is not None and not (ROOT / path).exists():
            problems.append(f"{where}: `{' '.join(command.argv)}` runs {path}, which does not exist")
    assert not problems, "\n".join(problems)


def test_json_blocks_parse():
    for block in JSON_BLOCKS:
        try:
            json.loads(block.text)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{block.where}: not JSON: {exc}", pytrace=False)


def test_the_checker_catches_what_it_should(tmp_path):
    """The shell checks themselves: a bad option, a missing script, and what the shell would expand."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- doc-test: setup=tiny_llama -->\n```bash\n"
                    'E="sensitivity-lora evaluate lm --steps 80"\n'
                    "$E --seeds 0 1 ... \\\n  --out x.json 2>&1 > log.txt   # a comment\n"
                    "bash scripts/nope.sh && .venv/bin/sensitivity-lora allocate --no-such-option\n```\n")
    (block,) = find_blocks(page)
    assert block.line == 4 and block.directives == {"setup": "tiny_llama"}
    commands = shell_commands(block)
    assert [c.argv for c in commands] == [
        ["sensitivity-lora", "evaluate", "lm", "--steps", "80", "--seeds", "0", "1", "--out", "x.json"],
        ["bash", "scripts/nope.sh"], [".venv/bin/sensitivity-lora", "allocate", "--no-such-option"]]
    assert [c.line for c in commands] == [6, 8, 8]
    assert check_cli(cli_argv(commands[0].argv)) is None
    assert referenced_path(commands[1].argv) == "scripts/nope.sh"
    assert "--no-such-option" in check_cli(cli_argv(commands[2].argv))
    assert cli_argv(["torchrun", "--nproc_per_node", "2", "-m", "sensitivity_lora", "hessians"]) == ["hessians"]
    assert check_cli(["evaluate", "--methods", "sra"]) is not None  # a sub-command is required
    assert parse_directives("skip reason=needs a GPU") == {"skip": "needs a GPU"}


def test_the_blocks_are_found_and_skips_are_few():
    assert (ROOT / "README.md").is_file()
    readme = [b for b in BLOCKS if b.path.name == "README.md"]
    commands = {" ".join(c.argv) for b in readme if b.lang in SHELL_LANGS for c in shell_commands(b)}
    for command in ("bash scripts/install.sh", ".venv/bin/sensitivity-lora allocate", ".venv/bin/python -m pytest"):
        assert command in commands, f"the README's set-up commands lost {command!r}"
    assert any(b.lang in PYTHON_LANGS for b in readme), "the README shows no Python"
    text = (ROOT / "README.md").read_text(encoding="utf-8")  # the results table is regenerated between these
    start, end = "<!-- results-table:start -->", "<!-- results-table:end -->"
    assert text.count(start) == text.count(end) == 1 and text.index(start) < text.index(end)
    skips = [b for b in BLOCKS if "skip" in b.directives]
    for block in skips:
        assert block.directives["skip"], f"{block.where}: a skip needs a reason (skip reason=...)"
    assert len(skips) <= MAX_SKIPS, f"{len(skips)} skipped blocks: {[b.where for b in skips]}"
    shell = [c for b in SHELL_BLOCKS for c in shell_commands(b)]
    print(f"\n{len(PYTHON_BLOCKS)} python blocks run ({sum('requires' in b.directives for b in PYTHON_BLOCKS)} "
          f"need an optional package), {len(shell)} shell commands in {len(SHELL_BLOCKS)} blocks "
          f"({sum(cli_argv(c.argv) is not None for c in shell)} parsed by the CLI), {len(JSON_BLOCKS)} json blocks, "
          f"{len(skips)} skipped: {[(b.where, b.directives['skip']) for b in skips]}")
