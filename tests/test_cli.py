"""The command line: every command is listed, has --help, and shows its defaults."""
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"prepare", "extract", "verify", "train", "export", "eval", "inspect", "demo"}
EVAL = {"knn", "linear", "finetune", "detection", "segmentation"}


def _all_commands():
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            for sub, subcmd in cmd.commands.items():
                yield [name, sub], subcmd
        else:
            yield [name], cmd


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in COMMANDS:
        assert f"  {name}" in out, name
    assert EVAL <= set(main.commands["eval"].commands)


def test_every_command_has_help_with_defaults_shown():
    runner = CliRunner()
    for path, cmd in _all_commands():
        r = runner.invoke(main, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        with_default = [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag
                        and not p.multiple and p.default is not None and not p.required]
        assert r.output.count("default:") >= len(with_default), (path, [p.name for p in with_default])
        undocumented = [p.name for p in cmd.params if isinstance(p, click.Option) and not p.help]
        assert not undocumented, (path, undocumented)


def test_every_command_is_declared_from_dataclasses():
    """cli.py writes no option or argument by hand (the group's --debug aside): each command's
    parameters are generated from the fields of its dataclasses (core/options.py), so every
    default and help text is written once, where the library reads it too."""
    import ast

    tree = ast.parse((ROOT / "cli.py").read_text())
    declares = ("option", "Option", "argument", "Argument")
    by_hand = [f"cli.py:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Attribute) and node.func.attr in declares
               and not (node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--debug")]
    assert not by_hand, by_hand
