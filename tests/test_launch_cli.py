from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from launch.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


EXPECTED = {
    ("quickstart",),
    ("data", "synth"),
    ("data", "build"),
    ("data", "tokenizer"),
    ("data", "inspect"),
    ("models",),
    ("train",),
    ("export",),
    ("embed",),
    ("eval", "retrieval"),
    ("eval", "cluster"),
    ("report",),
    ("search",),
}


def test_every_design_command_is_registered():
    registered = set(_subcommands(build_parser()))
    assert EXPECTED <= registered, f"missing: {sorted(EXPECTED - registered)}"


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vatp " + " ".join(command))
    assert len(out.splitlines()) > 3  # a description or options, not just the usage line


def test_unknown_command_fails_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "no-such-command"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid choice: 'no-such-command'" in result.stderr
