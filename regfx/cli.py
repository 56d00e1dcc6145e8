"""The ``regfx`` command: parse flags, call the library, render, set the exit code.

Exit codes: 0 ok, 1 policy/audit failure, 2 usage or input error (one line on stderr; a
traceback only with ``--debug``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from regfx.errors import OutputError, RegfxError

__all__ = ["main", "cli"]

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug = False


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to the output path ``path`` (``-o``) with nothing partial left behind.

    - a new path or an existing regular file: a temporary file in the same folder, then a
      rename; an existing file keeps its mode, a new one gets the umask's default;
    - an existing device, FIFO or socket (``/dev/null``, ``/dev/stdout``, a pipe): written
      through, as other command-line tools do, never replaced;
    - a symlink: its target is written (by the rules above), the link stays.

    Raises:
        OutputError: an empty path, a path ending in a separator, a folder, a missing folder,
            or the system refuses the write (the message names the path and the fix).
    """
    output = os.fspath(path)
    _check_path_text(output)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target = _output_target(output)
    existing = _stat(target, output)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise OutputError(f"cannot write {output!r}: it is a directory; give a file path")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            with open(target, "wb") as fh:
                fh.write(payload)
        except OSError as exc:
            raise OutputError(f"cannot write {output!r}: {exc.strerror}; choose a writable "
                              "-o path") from None
        return
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {output!r}: folder {str(folder)!r} does not exist; "
                          "create it or choose another -o path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {output!r}: {exc.strerror}; choose a writable "
                          "-o path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, stat.S_IMODE(existing.st_mode) if existing is not None else
                 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {output!r}: {exc.strerror}; choose a writable "
                              "-o path") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_path_text(output: str) -> None:
    if not output:
        raise OutputError("the -o path is empty; give a file path such as -o report.json")
    if "\x00" in output:
        raise OutputError(f"the -o path {output!r} contains a NUL character; give a file path")
    if output.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise OutputError(f"the -o path {output!r} ends with a path separator; give a file "
                          "path, not a folder")


def _output_target(output: str) -> Path:
    """The file ``-o output`` writes: a symlink's target, else the path itself."""
    return Path(os.path.realpath(output)) if os.path.islink(output) else Path(output)


def _stat(target: Path, output: str) -> os.stat_result | None:
    try:
        return os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot write {output!r}: {exc.strerror}; choose another -o path") \
            from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


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
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop with an error when loading or running the model "
              "takes longer (default: no limit).")
def show(model_spec: str, fmt: str, depth: int | None, output: str | None,
         timeout: float | None) -> None:
    """Layer inventory of MODEL: counts by type, traced/opaque map, layer graph.

    MODEL is path/to/file.py, path/to/file.py:factory or package.module:factory.
    """
    from regfx.load import load_model
    from regfx.render.show import render_show

    if output is not None:
        _check_writable(output, _input_files([model_spec]))
    with _model_code(model_spec, timeout):
        loaded = load_model(model_spec)
        graph = _trace_loaded(loaded)
        text = render_show(loaded.model, graph, fmt, depth)
    _emit(text, output)


@cli.command()
@click.argument("model_spec", metavar="MODEL")
@click.option("--dropout", type=float, default=None, help="Dropout probability p in [0, 1).")
@click.option("--dropout-after", default=None, metavar="TYPES",
              help="Layer types followed by dropout (default: linear).")
@click.option("--dropout-position", type=click.Choice(["block", "output"]), default=None,
              help="block: after the norm/activation chain (default); output: on the layer output.")
@click.option("--dropout-kind", type=click.Choice(["auto", "element", "channel"]), default=None,
              help="auto: channel dropout after conv, element-wise elsewhere (default).")
@click.option("--spectral", default=None, metavar="TYPES", help="Layer types to spectrally normalize.")
@click.option("--weight-norm", default=None, metavar="TYPES", help="Layer types to weight-normalize.")
@click.option("--n-power-iterations", type=int, default=None, help="Spectral norm power iterations.")
@click.option("--l1", type=float, default=None, help="L1 coefficient: l1*sum|w| per step.")
@click.option("--l2", type=float, default=None, help="L2 coefficient: (l2/2)*sum w^2 per step.")
@click.option("--penalty-on", default=None, metavar="TYPES",
              help="Layer types whose weights are penalized (default: linear,conv).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only modules matching GLOB.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip modules matching GLOB.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), default=None,
              help="Recipe TOML file (flags override it).")
@click.option("--strict", is_flag=True, default=None,
              help="A layer type matching no layer is an error, not a warning.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write a checkpoint (state dict + recipe), atomically.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--dry-run", is_flag=True, help="Show the plan; change and write nothing.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop with an error when loading or running the model "
              "takes longer (default: no limit).")
def apply(model_spec: str, recipe_file: str | None, output: str | None, fmt: str, dry_run: bool,
          timeout: float | None, **flags: Any) -> None:
    """Regularize MODEL and print what was inserted where.

    Configuration comes from [tool.regfx] in the nearest pyproject.toml, then --recipe FILE,
    then the flags (each overrides the one before).
    """
    import json

    import regfx
    from regfx.apply import apply_plan, save_checkpoint
    from regfx.load import load_model
    from regfx.recipe import NOT_GIVEN, resolve_recipe
    from regfx.render.plan import render_plan

    # click gives None (and () for repeatable flags) for a flag not on the command line
    recipe = resolve_recipe(_config_recipe(model_spec, recipe_file), **{
        k: NOT_GIVEN if v is None or v == () else v for k, v in flags.items()})
    if output is not None and not dry_run:
        _check_writable(output, _input_files([model_spec], recipe_file))
    with _model_code(model_spec, timeout):
        loaded = load_model(model_spec)
        _require_parameters(loaded.model, model_spec, "regularize")
        graph = None
        if recipe.dropout:
            graph = _trace_loaded(loaded)
        else:
            _check_own_inputs(loaded)
        the_plan = regfx.plan(loaded.model, recipe, graph=graph, example_inputs=loaded.inputs())
        for message in the_plan.warnings:
            click.echo(f"regfx: warning: {message}", err=True)
        checkpoint = None
        if not dry_run:
            # The loaded model is ours alone: apply the plan just printed to it, in place.
            apply_plan(loaded.model, the_plan)
            if output is not None:
                checkpoint = save_checkpoint(loaded.model)
    if checkpoint is not None and output is not None:
        write_atomic(output, checkpoint)
    if fmt == "json":
        data = the_plan.to_dict()
        data["model"] = type(loaded.model).__name__
        data["dry_run"] = dry_run
        data["checkpoint"] = None if dry_run else output
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(render_plan(the_plan, type(loaded.model).__name__, dry_run), nl=False)
    if output is not None and not dry_run:
        click.echo(f"checkpoint written to {output}")


AUDIT_FORMATS = ("text", "json", "markdown", "github", "junit")


@cli.command()
@click.argument("model_specs", nargs=-1, required=True, metavar="MODEL...")
@click.option("--format", "fmt", type=click.Choice(AUDIT_FORMATS), default="text",
              show_default=True, help="Report format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the report(s) to FILE (atomically) instead of stdout.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="Policy TOML (default: [tool.regfx.audit] of the nearest pyproject.toml).")
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Previous JSON report: fail when coverage drops or a new finding appears.")
@click.option("--fail-on", type=click.Choice(["error", "warning"]), default=None,
              help="Lowest severity that fails the audit (default: the policy's, else error).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop with an error when loading or running the model "
              "takes longer (default: no limit).")
def audit(model_specs: tuple[str, ...], fmt: str, output: str | None, policy_file: str | None,
          baseline: str | None, fail_on: str | None, timeout: float | None) -> None:
    """Audit which parameters of each MODEL are regularized, and lint the regularization.

    Exit code 0 when every MODEL passes, 1 when one fails the policy, 2 on bad input (the
    worst wins). The optimizer from the file's build_optimizer(model), if any, is audited too.
    """
    import regfx
    from regfx.audit.policy import Policy
    from regfx.audit.report import load_baselines, pick_baseline
    from regfx.load import load_model

    policy = Policy.from_toml(policy_file) if policy_file is not None else \
        Policy.from_pyproject(_spec_folder(model_specs[0]))
    if policy is None:
        policy = Policy()
    if output is not None:
        _check_writable(output, _input_files(model_specs, policy_file, baseline))
    # bad baselines are input errors before any model is loaded
    baselines = load_baselines(baseline) if baseline is not None else None
    progress = sys.stderr.isatty() and len(model_specs) > 1
    reports, gates, worst = [], [], 0
    for i, spec in enumerate(model_specs, 1):
        if progress:
            click.echo(f"[{i}/{len(model_specs)}] auditing {spec} ...", err=True)
        try:
            with _model_code(spec, timeout):
                loaded = load_model(spec)
                _require_parameters(loaded.model, spec, "audit")
                optimizer = loaded.build_optimizer()
                report = regfx.audit(loaded.model, optimizer, policy=policy,
                                     graph=_trace_loaded(loaded))
            report.source = spec
            base = None
            if baselines is not None and baseline is not None:
                base = pick_baseline(baselines, baseline, report.model, spec,
                                     only_model=len(model_specs) == 1)
        except RegfxError as exc:
            if len(model_specs) == 1:
                raise
            if _State.debug:
                traceback.print_exc()
            click.echo(f"regfx: error: {spec}: {exc}", err=True)
            worst = 2
            continue
        gate = report.gate(base, fail_on)
        worst = max(worst, gate.exit_code)
        reports.append(report)
        gates.append(gate)
    if reports:
        color = (output is None and fmt == "text" and sys.stdout.isatty()
                 and not os.environ.get("NO_COLOR"))
        _emit(_render_reports(reports, gates, fmt, color, fail_on), output)
    if worst:
        raise SystemExit(worst)


def _render_reports(reports: list[Any], gates: list[Any], fmt: str, color: bool,
                    fail_on: str | None) -> str:
    from regfx.render.github import render_github
    from regfx.render.json import render_json
    from regfx.render.junit import render_junit
    from regfx.render.markdown import render_markdown
    from regfx.render.text import render_text

    if fmt == "json":
        return render_json(reports, gates)
    if fmt == "junit":
        return render_junit(reports, gates, fail_on)
    parts = []
    for report, gate in zip(reports, gates, strict=True):
        if fmt == "markdown":
            parts.append(render_markdown(report, gate))
        elif fmt == "github":
            parts.append(render_github(report, gate))
        else:
            parts.append(render_text(report, color=color, gate=gate))
    return ("\n" if fmt in ("text", "markdown") else "").join(parts)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text",
              show_default=True, help="Output format (markdown is docs/rules.md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write to FILE (atomically) instead of stdout.")
def rules(fmt: str, output: str | None) -> None:
    """List every audit rule: code, name, severity and what it checks."""
    from regfx.render.rules import render_rules

    _emit(render_rules(fmt), output)


def _require_parameters(model: Any, spec: str, what: str) -> None:
    """A model without parameters is almost always a factory building the wrong thing."""
    if next(iter(model.parameters()), None) is None:
        raise RegfxError(f"the model from {spec!r} ({type(model).__name__}) has no parameters, so "
                         f"there is nothing to {what}; check that the factory builds the full model")


def _spec_folder(model_spec: str) -> Path:
    source = model_spec.split(":")[0] if model_spec.endswith(".py") or ".py:" in model_spec else "."
    start = Path(source).parent if Path(source).suffix == ".py" else Path(".")
    return start if start.exists() else Path(".")


def _config_recipe(model_spec: str, recipe_file: str | None) -> Any:
    from regfx.recipe import Recipe

    recipe = None
    if recipe_file:
        recipe = Recipe.from_toml(recipe_file)
    else:
        recipe = Recipe.from_pyproject(_spec_folder(model_spec))
    return recipe if recipe is not None else Recipe()


def _check_writable(output: str, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an ``-o`` path before any work: empty, ending in a separator, a folder, one of
    the command's ``inputs`` (model files, recipe, policy, baseline), or not writable."""
    _check_path_text(output)
    target = _output_target(output)
    for source in inputs:
        if _same_file(target, source):
            raise OutputError(f"-o {output!r} is an input of this command ({str(source)!r}); "
                              "choose another output path")
    existing = _stat(target, output)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise OutputError(f"cannot write {output!r}: it is a directory; give a file path")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        if not os.access(target, os.W_OK):
            raise OutputError(f"cannot write {output!r}: not writable; choose another -o path")
        return
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {output!r}: folder {str(folder)!r} does not exist; "
                          "create it or choose another -o path")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {output!r}: folder {str(folder)!r} is not writable; "
                          "choose another -o path")


def _input_files(model_specs: Sequence[str], *others: str | None) -> list[str]:
    """The files a command reads: each MODEL's file, the given recipe/policy/baseline files
    and the pyproject.toml its settings may come from (an output must be none of them)."""
    from regfx.load import model_file
    from regfx.recipe import find_pyproject

    files = [str(f) for f in (model_file(spec) for spec in model_specs) if f is not None]
    files += [f for f in others if f]
    with contextlib.suppress(OSError):
        for spec in model_specs:
            found = find_pyproject(_spec_folder(spec))
            if found is not None:
                files.append(str(found))
    return files


@contextlib.contextmanager
def _model_code(spec: str, timeout: float | None) -> Iterator[None]:
    """Where the model's own code runs (import, build, example inputs, forwards): what it
    prints goes to stderr, never into the report; its ``SystemExit`` and other
    ``BaseException``s become one-line errors; ``--timeout`` bounds it."""
    from regfx.load import PASS_THROUGH, model_code_error, time_limit

    not_model_exits: tuple[type[BaseException], ...] = (Exception, *PASS_THROUGH)
    with time_limit(timeout, f"loading and running {spec}"), \
            contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        except not_model_exits:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit & co. from model code
            raise model_code_error(exc, f"the model code of {spec}",
                                   "model code must return or raise an Exception, not exit") \
                from None


def _trace_loaded(loaded: Any) -> Any:
    """The graph of a loaded model, as the library traces it (the example forward only where
    some forward does not trace); the file's own ``example_inputs()`` are checked to fit."""
    from regfx.trace import trace

    graph = trace(loaded.model, loaded.inputs())
    _check_own_inputs(loaded, graph)
    return graph


def _check_own_inputs(loaded: Any, graph: Any = None) -> None:
    """The file's own ``example_inputs()`` must run the forward (synthesized inputs may not):
    what ``graph``'s example forward found, or, where tracing did not run them (a model whose
    every forward traces, or no graph), one run of them that cannot change the graph."""
    from regfx.load import inputs_do_not_fit
    from regfx.trace import run_example

    if loaded.example_inputs is None:
        return
    failed = "the forward failed on the example inputs: "
    error = graph.observe_error if graph is not None else None
    if graph is None or (error is not None and not error.startswith(failed)):
        error = run_example(loaded.model, loaded.inputs())
    if error is not None and error.startswith(failed):
        raise inputs_do_not_fit(loaded.model, error[len(failed):])


def _emit(text: str, output: str | None) -> None:
    if output is not None:
        write_atomic(output, text)
    else:
        click.echo(text, nl=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``regfx`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="regfx", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("regfx: aborted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "regfx"
        message = " ".join(exc.format_message().split()).rstrip(".")
        click.echo(f"regfx: error: {message}; see '{command} --help'", err=True)
        sys.exit(2)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
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
