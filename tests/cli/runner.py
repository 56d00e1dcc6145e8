"""Running the real ``regfx`` command from tests: through click, or through ``main``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from regfx.cli import cli, main


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``regfx ARGS`` through click's CliRunner: ``(exit code, stdout, stderr)``."""
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``regfx ARGS`` through the console-script entry point (exit codes, one-line errors)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err
