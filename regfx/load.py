"""Turn a MODEL argument of the CLI into an ``nn.Module`` (plus optional inputs and optimizer).

MODEL is ``path/to/file.py``, ``path/to/file.py:factory`` or ``package.module:factory``. Without a
factory name, the file's ``build_model``, ``get_model``, then ``model`` is used: a callable
returning an ``nn.Module``, or a module instance. The file may also define ``example_inputs()``
and ``build_optimizer(model)``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from regfx.errors import LoadError
from regfx.inputs import ExampleInputs, as_example_inputs

__all__ = ["LoadedModel", "load_model", "model_file", "inputs_do_not_fit", "DEFAULT_FACTORIES",
           "time_limit", "model_code_error", "PASS_THROUGH"]

DEFAULT_FACTORIES = ("build_model", "get_model", "model")


@dataclass
class LoadedModel:
    """What a MODEL argument provides.

    Attributes:
        model: the module.
        spec: the MODEL argument as given.
        source: the file the model came from (None for an installed package).
        example_inputs: result of the file's ``example_inputs()``, or None.
        optimizer_factory: the file's ``build_optimizer``, or None.
    """

    model: nn.Module
    spec: str
    source: Path | None
    example_inputs: Any = None
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None

    def inputs(self) -> ExampleInputs | None:
        """The file's ``example_inputs()`` as :class:`~regfx.inputs.ExampleInputs` naming the
        file as their source, or None when the file defines none."""
        if self.example_inputs is None:
            return None
        where = self.source if self.source is not None else self.spec
        return as_example_inputs(self.example_inputs, f"example_inputs() of {where}")

    def build_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer | None:
        """Call the file's ``build_optimizer`` on ``model`` (default: the loaded model)."""
        if self.optimizer_factory is None:
            return None
        target = self.model if model is None else model
        try:
            opt = self.optimizer_factory(target)
        except PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code; report in one line
            raise LoadError(
                f"build_optimizer() in {self.spec} raised {_describe(exc)}; "
                "fix the function or remove it"
            ) from exc
        if not isinstance(opt, torch.optim.Optimizer):
            raise LoadError(
                f"build_optimizer() in {self.spec} returned {type(opt).__name__}, not a "
                "torch.optim.Optimizer; return the optimizer instance"
            )
        return opt


class _Deadline(BaseException):
    """Raised into model code by the ``--timeout`` alarm; not an ``Exception``, so that model
    code catching ``Exception`` does not swallow it."""


# Exceptions from model code that are not the model's failure: ^C, and the --timeout alarm.
PASS_THROUGH: tuple[type[BaseException], ...] = (KeyboardInterrupt, _Deadline)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Bound the block to ``seconds`` of wall time (None or 0: no bound) with ``SIGALRM``.

    Python code (``while True: pass``) stops at the deadline; a long C call (one big matmul)
    stops when it returns. Needs the main thread of a POSIX system.

    Raises:
        LoadError: the block ran past the deadline (the message names ``what``), or
            ``seconds`` is given where no alarm signal is available.
    """
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        raise LoadError("--timeout needs a POSIX system and the main thread; run without "
                        "--timeout")

    message = (f"{what} did not finish within {seconds:g} s (--timeout); look for an endless "
               "loop in the model code or raise --timeout")
    alarms = 0

    def on_alarm(signum: int, frame: Any) -> None:
        nonlocal alarms
        alarms += 1
        if alarms > 1:
            # Model code swallowed the first alarm (a bare except): nothing else stops it.
            os.write(2, f"regfx: error: {message}\n".encode())
            os._exit(2)
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # A second alarm a second later, if the first one was swallowed, ends the process.
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    except _Deadline:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise LoadError(message) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def model_code_error(exc: BaseException, what: str, fix: str) -> LoadError:
    """A one-line :class:`LoadError` for an exception model code raised while ``what``."""
    return LoadError(f"{what} raised {_describe(exc)}; {fix}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, SystemExit):
        first = f"{exc.code!r}" if exc.code is not None else ""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        frame = tb[-1]
        where = f" at {Path(frame.filename).name}:{frame.lineno}"
    return f"{type(exc).__name__}: {first}{where}" if first else f"{type(exc).__name__}{where}"


def _split_spec(spec: str) -> tuple[str, str | None]:
    # A Windows drive letter ("C:\\...") is not a factory separator.
    head, sep, tail = spec.rpartition(":")
    if not sep or (len(head) == 1 and head.isalpha()) or "/" in tail or "\\" in tail:
        return spec, None
    return head, tail or None


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path, spec: str) -> ModuleType:
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        raise LoadError(f"cannot read model file {_shown(path)}: {exc.strerror}; check the path "
                        "in MODEL") from None
    if not exists:
        raise LoadError(f"model file {str(path)!r} does not exist; check the path in {spec!r}")
    if is_dir:
        raise LoadError(f"{str(path)!r} is a directory; give a .py file (path/to/model.py)")
    name = f"regfx_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise LoadError(f"cannot import {str(path)!r}; give a Python file ending in .py")
    module = importlib.util.module_from_spec(module_spec)
    # Registered like any import, so that the model's classes can be pickled (torch.save).
    sys.modules[name] = module
    with _on_sys_path(path.parent.resolve()):
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as exc:
            sys.modules.pop(name, None)
            raise LoadError(
                f"syntax error in {path}:{exc.lineno}: {exc.msg}; fix the file"
            ) from exc
        except PASS_THROUGH:
            sys.modules.pop(name, None)
            raise
        except BaseException as exc:  # noqa: BLE001 - user code; report in one line
            sys.modules.pop(name, None)
            raise LoadError(f"importing {path} raised {_describe(exc)}; fix the file") from None
    return module


def _shown(path: Path) -> str:
    text = repr(str(path))
    return text if len(text) <= 80 else text[:38] + "..." + text[-38:]


def _import_package(dotted: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        raise LoadError(
            f"cannot import module {dotted!r} ({exc}); give path/to/file.py or an "
            f"installed package.module:factory"
        ) from exc
    except PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code; report in one line
        raise LoadError(f"importing {dotted!r} raised {_describe(exc)}; fix the module") from None


def model_file(spec: str) -> Path | None:
    """The file a MODEL argument names (``path/to/file.py[:factory]``), or None for an
    installed ``package.module:factory``."""
    if not isinstance(spec, str) or not spec.strip():
        return None
    target, _ = _split_spec(spec.strip())
    try:
        is_path = Path(target).exists()
    except (OSError, ValueError):
        is_path = False
    if target.endswith(".py") or "/" in target or "\\" in target or is_path:
        return Path(target)
    return None


def load_model(spec: str) -> LoadedModel:
    """Load the model named by a MODEL argument.

    Args:
        spec: ``path/to/file.py``, ``path/to/file.py:factory`` or ``package.module:factory``.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        LoadError: the file is missing or does not import, no model is found, the factory
            raises or returns something other than an ``nn.Module`` (one-line message).

    Example:
        >>> load_model("fixtures/cnn.py").model
        SmallCNN(...)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LoadError("MODEL is empty; give path/to/file.py[:factory] or package.module:factory")
    if "\x00" in spec:
        raise LoadError("MODEL contains a NUL character; give path/to/file.py[:factory]")
    target, factory_name = _split_spec(spec.strip())
    source: Path | None
    try:
        is_path = Path(target).exists()
    except OSError:
        is_path = True  # a name too long to be a module is a path; reading it says what is wrong
    if target.endswith(".py") or "/" in target or "\\" in target or is_path:
        source = Path(target)
        module = _import_file(source, spec)
    else:
        if factory_name is None:
            raise LoadError(
                f"{spec!r} is neither a .py file nor package.module:factory; "
                f"give path/to/file.py or package.module:factory"
            )
        source = None
        module = _import_package(target, spec)

    if factory_name is not None:
        if not hasattr(module, factory_name):
            raise LoadError(f"{target} has no {factory_name!r}; define it or name another factory")
        obj = getattr(module, factory_name)
        used = factory_name
    else:
        for candidate in DEFAULT_FACTORIES:
            if hasattr(module, candidate):
                obj = getattr(module, candidate)
                used = candidate
                break
        else:
            raise LoadError(
                f"no model found in {target}: define build_model(), get_model() or model, "
                f"or name a factory with {target}:NAME"
            )

    if isinstance(obj, torch.jit.ScriptModule):
        raise LoadError(f"{used} in {target} is a script module; script modules cannot be "
                        "transformed; pass the eager module (the one given to torch.jit.script)")
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        with warnings.catch_warnings(record=True) as caught:
            try:
                model = obj()
            except PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001 - user code; report in one line
                raise LoadError(f"{used}() in {target} raised {_describe(exc)}; "
                                "fix the factory") from None
        if isinstance(model, torch.jit.ScriptModule):
            # torch.jit.script's deprecation warning is noise next to this error: dropped.
            raise LoadError(f"{used}() in {target} returned a script module; script modules "
                            "cannot be transformed; pass the eager module (return the model "
                            "before torch.jit.script)")
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        if not isinstance(model, nn.Module):
            raise LoadError(
                f"{used}() in {target} returned {type(model).__name__}, not an nn.Module; "
                "return the model instance"
            )
    else:
        raise LoadError(
            f"{used} in {target} is a {type(obj).__name__}, not an nn.Module or a factory; "
            "define a function returning the model"
        )

    example = None
    make_inputs = getattr(module, "example_inputs", None)
    if callable(make_inputs):
        try:
            example = make_inputs()
        except PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code; report in one line
            raise LoadError(
                f"example_inputs() in {target} raised {_describe(exc)}; fix it or remove it"
            ) from exc
    opt_factory = getattr(module, "build_optimizer", None)
    loaded = LoadedModel(
        model=model,
        spec=spec,
        source=source,
        example_inputs=example,
        optimizer_factory=opt_factory if callable(opt_factory) else None,
    )
    _initialize_lazy(loaded)
    return loaded


def _initialize_lazy(loaded: LoadedModel) -> None:
    """Lazy layers get their shapes from one forward on the file's ``example_inputs()``. The
    model is this command's own (built by the factory), so it is initialized in place."""
    model = loaded.model
    lazy = sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.lazy.LazyModuleMixin)
                   and m.has_uninitialized_params()})  # type: ignore[operator]
    if not lazy:
        return
    inputs = loaded.inputs()
    if inputs is None:
        raise LoadError(f"{type(model).__name__} has lazy layers ({', '.join(lazy)}) that are not "
                        "initialized; run one forward first, or define example_inputs() in "
                        f"{loaded.source or loaded.spec} so that regfx can")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs.call(model)
    except PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - user code; report in one line
        raise inputs_do_not_fit(model, str(exc)) from None
    finally:
        model.train(training)


def inputs_do_not_fit(model: nn.Module, error: str) -> LoadError:
    """The error for example inputs the forward fails on; ``error`` is the forward's error."""
    lines = error.strip().splitlines()
    first = lines[0] if lines else "(no message)"
    return LoadError(f"example_inputs() do not fit {type(model).__name__}.forward: {first}; "
                     "make example_inputs() return what forward takes")
