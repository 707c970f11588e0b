"""Every command line the README and docs/*.md show (``python cli.py ...``, ``torchrun ...
cli.py ...``, in code blocks and inline code) parses against the real CLI: options exist,
values convert, required options are given. Nothing runs; paths need not exist."""
import re
import shlex
from pathlib import Path

import click
import pytest

from cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Values for the shell variables the docs use (loop variables, host names).
SHELL_VARIABLES = {"t": "mae", "HEAD": "head-node"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")          # SRC, OUT, N: a synopsis, not a value
OPERATORS = {";", "&&", "||", "|", "&"}


def _snippets(text: str):
    """(line number, shell text) of every fenced code block line (continuations joined,
    comment marks removed) and every inline code span."""
    fenced = re.compile(r"^(```|~~~)")
    inside, pending, start = False, "", 0
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if fenced.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            continue
        line = re.sub(r"^\s*#\s?", "", line)        # a commented-out command is documented too
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    outside = re.sub(r"^(```|~~~).*?^(```|~~~)", lambda m: "\n" * m.group(0).count("\n"), text,
                     flags=re.M | re.S)
    for m in re.finditer(r"`([^`]+)`", outside):
        if "cli.py" in m.group(1):
            yield outside.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")


def _invocations(shell: str):
    """Argument lists after ``cli.py`` of each python/torchrun command in ``shell``."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, segment = [], []
    for token in list(lexer) + [";"]:
        if token in OPERATORS:
            words.append(segment)
            segment = []
        else:
            segment.append(token)
    for seg in words:
        at = [i for i, w in enumerate(seg) if w == "cli.py" or w.endswith("/cli.py")]
        if at and _launcher(seg[0]):
            yield [_expand(w) for w in seg[at[0] + 1:]]


def _launcher(word: str) -> bool:
    return word in ("torchrun", "python", "python3") or word.endswith(("/python", "/python3"))


def _expand(word: str) -> str:
    word = re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARIABLES[m.group(1)], word)
    return word.strip("[]")                 # [--option VALUE] of a synopsis


def _parse(args: list[str]) -> None:
    """Parse ``args`` down the command tree as click would, without running anything."""
    elided = "..." in args
    args = [a for a in args if a not in ("...", "")]
    cmd, name, parent = main, "cli.py", None
    while True:
        if isinstance(cmd, click.Group):
            ctx = cmd.make_context(name, list(args), parent=parent)
            rest = ctx._protected_args + ctx.args
            if not rest or PLACEHOLDER.match(rest[0]):      # `cli.py COMMAND --help`: a synopsis
                return
            name, cmd, args = cmd.resolve_command(ctx, rest)
            parent = ctx
            continue
        args = ["1" if PLACEHOLDER.match(a) else a for a in args]
        try:
            cmd.make_context(name, list(args), parent=parent)
        except click.MissingParameter:
            if not elided:                  # `train ... gate.mode=uniform` leaves out the rest
                raise
        return


def _documented():
    for doc in DOCS:
        for number, shell in _snippets(doc.read_text()):
            if "cli.py" not in shell:
                continue
            for args in _invocations(shell):
                yield pytest.param(args, id=f"{doc.name}:{number}")


DOCUMENTED = list(_documented())


@pytest.fixture
def no_path_checks(monkeypatch, tmp_path):
    """Paths in the docs do not exist here: parse in an empty folder, existence unchecked."""
    monkeypatch.chdir(tmp_path)

    def walk(cmd):
        for p in cmd.params:
            if isinstance(p.type, click.Path):
                monkeypatch.setattr(p.type, "exists", False)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
    walk(main)


def test_the_docs_show_commands_of_every_stage():
    shown = {a[0] if a[0] != "eval" else f"eval {a[1]}" for a in (p.values[0] for p in DOCUMENTED) if a}
    assert {"prepare", "extract", "verify", "train", "demo", "eval knn", "eval linear",
            "eval finetune", "eval detection", "eval segmentation"} <= shown, shown


@pytest.mark.parametrize("args", DOCUMENTED)
def test_documented_command_parses(args, no_path_checks):
    """Click stops with a UsageError (unknown option, bad value, missing argument) if a
    documented line drifted from the CLI."""
    try:
        _parse(args)
    except click.ClickException as error:
        pytest.fail(f"cli.py {shlex.join(args)}\n  {error.format_message()}")
