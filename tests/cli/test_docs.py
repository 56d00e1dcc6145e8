"""docs/cli.md is the CLI reference: every option of every command, every exit code."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from regfx.cli import cli

DOC = " ".join((Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text().split())


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_is_documented(name: str) -> None:
    command = cli.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert any(re.search(re.escape(opt) + r"(?![\w-])", DOC) for opt in param.opts), \
                f"{name} {param.opts} is not in docs/cli.md"


def test_exit_codes_and_output_rules_are_documented() -> None:
    for needle in ("| `0` |", "| `1` |", "| `2` |", "| `130` |", "## Output files (`-o`)",
                   "written through", "keeps its mode", "--timeout SECONDS"):
        assert needle in DOC, needle
