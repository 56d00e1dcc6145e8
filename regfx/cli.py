"""The ``regfx`` command: parse flags, call the library, render, set the exit code.

Exit codes: 0 ok, 1 policy/audit failure, 2 usage or input error (one line on stderr; a
traceback only with ``--debug``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from regfx.errors import RegfxError

__all__ = ["main", "cli"]

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug = False


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise RegfxError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist; "
                         "create it or choose another -o path")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise RegfxError(f"cannot write {str(target)!r}: {exc.strerror}; choose a writable "
                         "-o path") from None
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException as exc:
        with _suppress():
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise RegfxError(f"cannot write {str(target)!r}: {exc.strerror}; choose a writable "
                             "-o path") from None
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="regfx", prog_name="regfx")
def cli(debug: bool) -> None:
    """Automatic, auditable regularization for PyTorch models."""
    _State.debug = debug


@cli.command()
@click.argument("model_spec", metavar="MODEL")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "mermaid", "dot"]),
              default="text", show_default=True, help="Output format.")
@click.option("--depth", type=click.IntRange(min=0), default=None,
              help="mermaid/dot: group modules deeper than N into their ancestor.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to FILE (atomically) instead of stdout.")
def show(model_spec: str, fmt: str, depth: int | None, output: str | None) -> None:
    """Layer inventory of MODEL: counts by type, traced/opaque map, layer graph.

    MODEL is path/to/file.py, path/to/file.py:factory or package.module:factory.
    """
    from regfx.load import load_model
    from regfx.render.show import render_show
    from regfx.trace import trace

    loaded = load_model(model_spec)
    graph = trace(loaded.model)
    text = render_show(loaded.model, graph, fmt, depth)
    _emit(text, output)


def _emit(text: str, output: str | None) -> None:
    if output:
        write_atomic(output, text)
    else:
        click.echo(text, nl=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``regfx`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="regfx", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("regfx: aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except RegfxError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"regfx: error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, exit 2
        if debug:
            traceback.print_exc()
        click.echo(f"regfx: error: unexpected {type(exc).__name__}: {exc} "
                   "(rerun with --debug for the traceback and report it)", err=True)
        sys.exit(2)
    sys.exit(0)
