"""Observed tracing: one real forward of the model, recorded module call by module call.

The model runs once in eval mode under ``torch.no_grad()``. Forward pre/post hooks on every
module record each call (who called whom, with which tensors, returning which tensors), and a
``torch.overrides.TorchFunctionMode`` records every torch op run directly by a forward that is not
a leaf layer (functional and in-place ones, ``Tensor`` methods and operators), with the tensors it
reads and writes and the parameters it reads (``F.linear(x, self.qkv.weight)`` is a use of
``qkv``). Tensors are identified by object for the duration of the run; an in-place op gives its
tensor a new identity in the record, so dataflow follows values, not storage.

The result is a tree of :class:`Frame` objects, one per module call, that the graph builder in
:mod:`regfx.trace` stitches exactly like a symbolic trace. Ops inside leaf layers (``nn.Linear``,
norms, activations...) are not recorded: a leaf layer is one node.

Recording works on any device where the forward runs, ``meta`` included. The model is restored
afterwards (training flags, hooks); :func:`regfx.trace` also restores every attribute the forward
may have written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["OTHER", "Tok", "OpEvent", "Frame", "Observation", "observe", "op_label", "tokens_of"]


class _Other:
    """Stands for an argument that is neither a tensor nor a plain constant."""

    def __repr__(self) -> str:
        return "OTHER"


OTHER = _Other()


@dataclass(frozen=True)
class Tok:
    """One tensor value seen during the run (a new one after every in-place write)."""

    id: int


@dataclass
class OpEvent:
    """One torch op run directly by a forward (not inside a leaf layer).

    Attributes:
        name: normalized op name (``linear``, ``add``, ``view``, ``getitem``...).
        inputs: the tensor values it read.
        outputs: the tensor values it produced (an in-place op produces a new value).
        params: qualified names of the parameters and buffers it read.
        p: dropout probability (``dropout*`` ops and ``scaled_dot_product_attention``).
    """

    name: str
    inputs: tuple[Tok, ...]
    outputs: tuple[Tok, ...]
    params: tuple[str, ...] = ()
    p: float | None = None


@dataclass
class Frame:
    """One module call: its arguments, what its forward did, and what it returned.

    ``args``/``kwargs``/``output`` hold :class:`Tok` where the value was a tensor (nested in
    tuples, lists and dicts as passed); any other value is kept only when it is a plain constant
    (None, bool, int, float, str), else replaced by :data:`OTHER`. ``events`` are :class:`OpEvent` and
    child :class:`Frame` objects in execution order; empty for leaf layers.
    """

    module: str
    leaf: bool
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    events: list[OpEvent | Frame] = field(default_factory=list)
    output: Any = None
    params: tuple[str, ...] = ()


@dataclass
class Observation:
    """The record of one forward: the root frame and every frame per module, in call order."""

    root: Frame
    calls: dict[str, list[Frame]]
    input_names: tuple[str, ...]


def tokens_of(value: Any) -> Iterator[Tok]:
    """Every :class:`Tok` in a recorded value (nested tuples, lists and dicts)."""
    if isinstance(value, Tok):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tokens_of(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tokens_of(v)


_ARITHMETIC = frozenset({"add", "sub", "mul", "truediv", "floordiv", "matmul", "mod", "pow", "and",
                         "or", "xor", "div", "lshift", "rshift"})
_METADATA = frozenset({"size", "dim", "numel", "shape", "dtype", "device", "is_floating_point",
                       "is_contiguous", "element_size", "stride", "storage_offset", "data_ptr",
                       "requires_grad", "is_cuda", "is_meta", "ndim", "layout", "names",
                       "is_complex", "get_device", "is_sparse", "item", "tolist", "__len__",
                       "__bool__", "__format__", "__repr__", "__hash__", "__iter__", "__eq__"})
_PLAIN = (type(None), bool, int, float, str)


def op_label(func: Callable[..., Any]) -> str:
    """A short, normalized name for a torch function or Tensor method.

    ``Tensor.__add__``/``__radd__``/``__iadd__`` give ``add``, ``__getitem__`` gives
    ``getitem``, property getters give the property's name (``T``, ``mT``); torch functions
    and methods keep their ``__name__`` (``linear``, ``view``, ``relu_``).
    """
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return str(getattr(owner, "__name__", "getattr"))
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core[:1] in ("r", "i") and core[1:] in _ARITHMETIC:
            core = core[1:]
        return core
    return name


def _dropout_p(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    if name == "scaled_dot_product_attention":
        p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
    elif "dropout" in name:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    else:
        return None
    return float(p) if isinstance(p, (int, float)) else None


class _Recorder(TorchFunctionMode):
    """Records ops and module calls into frames; one instance per observed forward."""

    def __init__(self, model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.is_leaf = is_leaf
        self.names: dict[int, str] = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(mod), name)
        self.param_names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self.param_names.setdefault(id(b), name)
        self.tokens: dict[int, Tok] = {}
        self.alive: list[Any] = []  # keeps every seen tensor alive so ids are not reused
        self.next_token = 0
        self.stack: list[Frame] = []
        self.suppress = 0
        self.calls: dict[str, list[Frame]] = {}
        self.root: Frame | None = None

    # -- values -----------------------------------------------------------------------------

    def fresh(self, t: torch.Tensor) -> Tok:
        tok = Tok(self.next_token)
        self.next_token += 1
        self.tokens[id(t)] = tok
        self.alive.append(t)
        return tok

    def tok(self, t: torch.Tensor) -> Tok:
        found = self.tokens.get(id(t))
        return found if found is not None else self.fresh(t)

    def record_value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tok(value)
        if depth > 6:
            return OTHER
        if isinstance(value, (tuple, list)):
            return type(value)(self.record_value(v, depth + 1) for v in value) \
                if type(value) in (tuple, list) else tuple(self.record_value(v, depth + 1) for v in value)
        if isinstance(value, dict):
            return {k: self.record_value(v, depth + 1) for k, v in value.items()}
        if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # transformers ModelOutput
            return {k: self.record_value(value[k], depth + 1) for k in value.keys()}
        return value if isinstance(value, _PLAIN) else OTHER

    def params_read(self, values: Any) -> tuple[str, ...]:
        out = []
        for t in _tensors(values):
            name = self.param_names.get(id(t))
            if name is not None:
                out.append(name)
        return tuple(out)

    # -- module hooks -----------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.suppress:  # a module called inside a leaf layer: not recorded
            self.suppress += 1
            return None
        name = self.names.get(id(module))
        if name is None:
            return None
        leaf = self.is_leaf(module) or ".parametrizations." in f".{name}."
        frame = Frame(module=name, leaf=leaf, args=self.record_value(args),
                      kwargs=self.record_value(kwargs), params=self.params_read((args, kwargs)))
        if self.stack:
            self.stack[-1].events.append(frame)
        else:
            self.root = frame
        self.calls.setdefault(name, []).append(frame)
        self.stack.append(frame)
        if leaf:
            self.suppress = 1
        return None

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.suppress > 1:  # a module called inside a leaf layer
            self.suppress -= 1
            return None
        name = self.names.get(id(module))
        if name is None:
            return None
        if not self.stack or self.stack[-1].module != name:
            return None
        frame = self.stack.pop()
        if frame.leaf:
            self.suppress = 0
            frame.output = self._fresh_values(output)
            if ".parametrizations." in f".{name}.":
                # the parametrized weight of `layer` is a use of `layer`'s weight
                owner = name.split(".parametrizations.")[0]
                tensor = name.rsplit(".", 1)[-1]
                for t in _tensors(output):
                    self.param_names[id(t)] = f"{owner}.{tensor}" if owner else tensor
        else:
            frame.output = self.record_value(output)
        return None

    def _fresh_values(self, value: Any) -> Any:
        for t in _tensors(value):
            self.fresh(t)
        return self.record_value(value)

    # -- ops --------------------------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress or not self.stack:
            return out
        name = op_label(func)
        if name in _METADATA:
            return out
        inputs = tuple(self.tok(t) for t in _tensors((args, kwargs)))
        params = self.params_read((args, kwargs))
        out_tensors = list(_tensors(out))
        if name == "setitem" and args and isinstance(args[0], torch.Tensor):
            out_tensors = [args[0]]  # x[i] = y writes x in place
        if not out_tensors:
            return out
        outputs = tuple(self.fresh(t) for t in out_tensors)
        self.stack[-1].events.append(OpEvent(name=name, inputs=inputs, outputs=outputs, params=params,
                                             p=_dropout_p(name, tuple(args), kwargs)))
        return out


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 6:
        return
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif hasattr(value, "to_tuple") and hasattr(value, "keys"):
        for k in value.keys():
            yield from _tensors(value[k], depth + 1)


def call_with(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``model(*args, **kwargs)``; here so that a traceback names the call."""
    return model(*args, **kwargs)


def observe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            is_leaf: Callable[[nn.Module], bool], input_names: tuple[str, ...]) -> Observation:
    """Run ``model`` once (eval mode, no grad) and record its calls, ops and dataflow.

    Args:
        model: the model; its training flags and hooks are restored afterwards.
        args, kwargs: the inputs.
        is_leaf: which modules are one node (their inner ops are not recorded).
        input_names: a name for each positional input, then the keyword names (graph labels).

    Returns:
        The :class:`Observation`.

    Raises:
        Whatever the forward raises (the caller decides what that means).
    """
    rec = _Recorder(model, is_leaf)
    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(rec.pre_hook, with_kwargs=True, prepend=True))
        handles.append(mod.register_forward_hook(rec.post_hook, with_kwargs=True, prepend=True,
                                                 always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        model.eval()
        if mha is not None:
            # Under no_grad, nn.TransformerEncoderLayer and friends take a fused fast path in
            # eval mode that never calls their Linear layers; training never takes it.
            mha.set_fastpath_enabled(False)
        # Inputs get their values first so that the root frame refers to them.
        for t in _tensors((args, kwargs)):
            rec.tok(t)
        with torch.no_grad(), rec:
            call_with(model, args, kwargs)
    finally:
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if rec.root is None:
        raise RuntimeError("the forward ran without calling the model's root module")
    return Observation(root=rec.root, calls=rec.calls, input_names=input_names)
