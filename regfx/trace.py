"""Tiered tracing that never gives up, producing a :class:`~regfx.graph.ModelGraph`.

The graph is stitched module call by module call, from the root down. Each call of a module that
is not a leaf layer is described, best first, by:

1. its symbolic torch.fx graph, traced one level deep (calls to submodules are ``call_module``
   nodes, not followed) and *specialized on the call site*: the concrete non-tensor arguments the
   caller passes there (``attn_mask=None``, ``pre_logits=True``) and the defaults of those it
   omits are constants in the trace. Blocks with the same class, attributes and specialization
   share one trace. These graphs are what :mod:`regfx.transforms.dropout` edits.
2. the observed record of that very call (:mod:`regfx.observe`), when the model ran once on
   example inputs (given, or synthesized by :mod:`regfx.inputs`): every op the forward ran, the
   tensors it read and wrote and the parameters it used, and every submodule it called.
3. nothing: the call is one *opaque* node, the reason is kept in :attr:`ModelGraph.opaque`, and
   the module's children are traced on their own.

When the model ran, call sites are real calls: a module that never ran has no call (a leaf
layer that never ran is kept as a node with ``called=False``), and a parent that calls
``self.block.forward(x)`` makes no phantom call of ``block``.

Tracing never changes the model: the example forward runs in eval mode under ``no_grad`` with the
random number generators forked, and every module's ``__dict__`` (flags, caches, hook tables) is
restored afterwards, so a forward that caches a tensor (or an fx Proxy) in an attribute leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from regfx.errors import TraceError
from regfx.graph import ModelGraph, assign_roles
from regfx.inputs import ExampleInputs, as_example_inputs, synthesize_inputs
from regfx.observe import OTHER, Frame, Observation, OpEvent, Tok, observe
from regfx.select import is_inserted_path, is_leaf_layer
from regfx.util import gc_paused

__all__ = ["trace", "trace_module", "trace_signature", "op_name", "call_spec", "Spec"]

_Value = Any  # frozenset[str] | tuple[_Value, ...] | dict[str, _Value]
_EMPTY: frozenset[str] = frozenset()
_PLAIN = (type(None), bool, int, float, str)

Spec = tuple[tuple[str, Any], ...]
"""A call-site specialization: ``(argument name, concrete value)`` pairs, in signature order."""


class _OneLevelTracer(fx.Tracer):
    """Traces only the root's own forward; every submodule call becomes a call_module node."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._traced_root = root
        # the ids of the unpatched math functions: inside shared_fx_patches the math module
        # holds patched ones, which must not be wrapped again
        self._autowrap_function_ids = _AUTOWRAP_IDS

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._traced_root


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_AUTOWRAP_IDS: set[int] = set(fx.Tracer()._autowrap_function_ids)  # builtins: never freed; read only


@contextlib.contextmanager
def shared_fx_patches() -> Iterator[None]:
    """Keep torch.fx's function patches (``math.*`` and the ``torch.fx.wrap`` functions) in
    place across many traces, instead of each trace making and reverting them.

    torch.fx dedupes a patch an outer patcher already made, and a patched function records
    into whichever tracer owns the proxy it is called with, so the traces are the same; each
    costs a fraction (most of a small trace is patching). Reverted on exit, as each trace's
    own patches are.
    """
    try:
        from torch.fx import _symbolic_trace as st

        new_patcher = st._new_patcher
        wrap_all = st._patch_wrapped_functions
        autowrap = st._autowrap_check
    except (ImportError, AttributeError):  # another torch: each trace patches for itself
        yield
        return
    with new_patcher() as patcher:
        wrap_all(patcher)
        autowrap(patcher, math.__dict__, _AUTOWRAP_IDS)
        yield


_KNOWN_REASONS = {
    "co_varnames is too small": "forward is wrapped by a decorator torch.fx cannot see through",
    "missing the required \"forward\" function": "module has no forward",
}


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception, prefixed with its type, readable in one line."""
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    for needle, better in _KNOWN_REASONS.items():
        if needle in line:
            line = f"{better} ({line})"
            break
    if len(line) > 120 and ". " in line:
        line = line.split(". ")[0]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_ASSERTS = frozenset({"_assert_is_none", "_assert"})


def _drop_specialization_asserts(graph: fx.Graph) -> None:
    """Remove the value checks torch.fx adds for concrete arguments (callers check them)."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and getattr(node.target, "__name__", "") in _ASSERTS:
            cond = node.args[0] if node.args else None
            graph.erase_node(node)
            if isinstance(cond, fx.Node) and cond.op == "call_function" and not cond.users \
                    and cond.target is operator.eq:
                graph.erase_node(cond)


def trace_module(module: nn.Module, spec: Spec = ()) -> fx.Graph:
    """Trace the forward of ``module`` one level deep (submodule calls are not followed).

    Args:
        module: the module.
        spec: arguments to treat as constants (a call-site specialization, see :func:`call_spec`).

    Raises whatever torch.fx raises when the forward does not trace.
    """
    tracer = _OneLevelTracer(module)
    with _quiet():
        graph = tracer.trace(module, concrete_args=dict(spec) if spec else None)
    if spec:
        _drop_specialization_asserts(graph)
    return graph


def _forward_signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None


def call_spec(module: nn.Module, args: Sequence[Any] | None = None,
              kwargs: dict[str, Any] | None = None) -> Spec:
    """The specialization of one call of ``module``: which arguments are constants there.

    An argument is a constant when the caller passes a plain value (None, bool, int, float, str)
    or omits an argument whose default is one. ``args``/``kwargs`` hold what the caller passes,
    with anything that is not a plain constant (a tensor, an fx node, an object) in place; None
    for both means "not known": every argument with a plain default is taken at its default.
    Forwards with ``*args`` are not specialized.
    """
    sig = _forward_signature(module)
    if sig is None:
        return ()
    params = list(sig.parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return ()
    bound: dict[str, Any] = {}
    if args is not None or kwargs is not None:
        try:
            bound = dict(sig.bind(None, *(args or ()), **(kwargs or {})).arguments)
        except TypeError:
            return ()
    spec = []
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.name in bound:
            value = bound[p.name]
            if isinstance(value, _PLAIN) and value is not OTHER:
                spec.append((p.name, value))
        elif p.default is not inspect.Parameter.empty and isinstance(p.default, _PLAIN):
            spec.append((p.name, p.default))
    return tuple(spec)


_PRIMITIVES = (bool, int, float, str, type(None), torch.dtype, torch.device)
_MODULE_STATE = frozenset(vars(nn.Module()).keys())


def _attrs_key(module: nn.Module, blind: bool = False) -> tuple[tuple[Any, ...], ...]:
    """The instance attributes of ``module`` outside nn.Module's own state: plain values (ints,
    strings, flags, tuples of them) by value, anything else by identity. Never the
    ``_regfx_*`` attributes regfx keeps on a module (no forward reads them); ``blind``: nor
    the tensor constants torch.fx stored on a module it traced for an edit."""
    attrs: list[tuple[Any, ...]] = []
    for key, value in module.__dict__.items():
        if key in _MODULE_STATE or key.startswith("_regfx_") or (
                blind and key.startswith("_tensor_constant")):
            continue
        if isinstance(value, _PRIMITIVES) or (
                isinstance(value, tuple) and all(isinstance(v, _PRIMITIVES) for v in value)):
            attrs.append((key, value))
        else:
            attrs.append((key, _Same(value)))
    return tuple(attrs)


class _Same:
    """A key part equal only to the same object (holding it, so its ``id`` is never reused
    while the key lives)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _class_key(module: nn.Module | None, blind: bool = False) -> Any:
    """A child's class, seen through torch's per-instance ``Parametrized*`` classes (every
    parametrized layer gets a class of its own; a one-level trace only calls it).

    ``blind``: also through what regfx adds: a parametrization is no part of the key, and a
    class regfx generated for an edited forward counts as the class it was made from.
    """
    cls = type(module)
    if module is not None and getattr(cls, "__module__", "") == "torch.nn.utils.parametrize":
        if blind:
            cls = cls.__bases__[0]
        else:
            return (cls.__bases__[0], "parametrized", tuple(module.parametrizations))  # type: ignore[union-attr, arg-type]
    if blind:
        cls = cls.__dict__.get("_regfx_base", cls)
    return cls


def trace_signature(module: nn.Module, blind: bool = False) -> tuple[Any, ...]:
    """A key under which two modules trace to the same one-level graph.

    The class, every instance attribute (plain values by value, anything else by identity), and
    for each child its name, class, attributes (a forward may branch on ``self.conv.stride``) and
    the names of its own children (a forward may loop over ``self.blocks``), which parameters
    and buffers exist, and the training flag. Two blocks of a deep stack share a key; a block
    whose flag or child differs does not. Used to trace each distinct block once (per call-site
    specialization).

    ``blind=True`` gives the key blind to what regfx adds to the children (parametrizations,
    inserted dropout, regenerated classes, its own attributes). It is valid only for a graph
    that calls its children without reaching into them (see :class:`TraceCache`).
    """
    def kids(c: nn.Module) -> tuple[str, ...]:
        if blind:
            return tuple(k for k in c._modules if not is_inserted_path(k))
        return tuple(c._modules)

    return (
        type(module), _attrs_key(module),
        tuple((n, _class_key(c, blind), _attrs_key(c, blind) if c is not None else (),
               kids(c) if c is not None else ())  # a loop over a child's children
              for n, c in module._modules.items()
              if not (blind and is_inserted_path(n))),
        tuple((n, p is None) for n, p in module._parameters.items()),
        tuple((n, b is None) for n, b in module._buffers.items()),
        module.training,
    )


def _reaches_into_children(graph: fx.Graph) -> bool:
    """Whether a one-level graph reads a child's attribute (``self.qkv.weight``) or calls a
    module below a child (``self.qkv.parametrizations.weight``), not only its direct children
    and its own attributes (a ``self.blocks[0]`` call is a child's child, named in the key)."""
    for node in graph.nodes:
        if node.op == "get_attr" and "." in str(node.target):
            return True
        if node.op == "call_module" and is_inserted_path(str(node.target)):
            return True
    return False


def tensor_constants(graph: fx.Graph) -> list[str]:
    """The attributes holding the tensor constants torch.fx made for ``graph`` (it stores
    them on the module it traced, as ``_tensor_constant<N>``)."""
    return [str(n.target) for n in graph.nodes
            if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")]


_IMMUTABLE_BY_IDENTITY = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


def _mutable_parts(key: Any) -> bool:
    """Whether a cache key compares, by identity, an object that can change in place."""
    if isinstance(key, _Same):
        return not isinstance(key.obj, _IMMUTABLE_BY_IDENTITY)
    if isinstance(key, tuple):
        return any(_mutable_parts(k) for k in key)
    return False


class TraceCache:
    """One-level symbolic traces, keyed by :func:`trace_signature` and call-site specialization.

    Identical blocks of one model share a trace. A transformed model keeps the cache its
    transform filled, so auditing it re-traces only the modules the transform edited (their
    class, children or parametrizations changed, and with them the key). The key holds every
    object it compares by identity, so an entry never matches a different module by a reused
    ``id``.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple[Any, ...], fx.Graph | str] = {}
        # graphs that only call their children, under keys blind to what regfx adds to a
        # child (a parametrization, an inserted dropout): those do not change such a graph
        self._blind: dict[tuple[Any, ...], fx.Graph] = {}
        # the tensor constants torch.fx stored on the module it traced, per graph (graphs are
        # held by this cache, so their ids are not reused while these entries live)
        self._constants: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, module: nn.Module, spec: Spec = ()) -> fx.Graph | str:
        """The shared one-level graph of ``module`` under ``spec`` (do not edit it), or the
        first line of why it does not trace."""
        coarse = (trace_signature(module, blind=True), spec)
        shared = self._blind.get(coarse)
        if shared is not None:
            return shared
        key = (trace_signature(module), spec)
        found: fx.Graph | str | None = self._graphs.get(key)
        if found is None:
            try:
                found = trace_module(module, spec)
            except Exception as exc:  # noqa: BLE001 - any failure means "does not trace"
                found = _first_line(exc)
            self._graphs[key] = found
            if isinstance(found, fx.Graph):
                names = tensor_constants(found)
                if names:
                    self._constants[id(found)] = {n: getattr(module, n) for n in names}
                if not _reaches_into_children(found):
                    self._blind[coarse] = found
        return found

    def keep_reusable(self) -> None:
        """Drop what may not describe the model later: entries whose key compares an object
        that can change in place (a config object, a dict, a tensor) by identity, and graphs
        holding tensor constants. What stays is keyed by values, classes and functions only;
        the transform calls this before handing its cache to the model's state, so a later
        audit never reads a graph the model's own objects have since made stale, and the cache
        keeps none of them alive."""
        def reusable(key: tuple[Any, ...], graph: fx.Graph | str) -> bool:
            return isinstance(graph, fx.Graph) and id(graph) not in self._constants \
                and not _mutable_parts(key)

        self._graphs = {k: g for k, g in self._graphs.items() if reusable(k, g)}
        self._blind = {k: g for k, g in self._blind.items() if reusable(k, g)}
        self._constants = {}

    def editable(self, module: nn.Module, spec: Spec = ()) -> fx.Graph:
        """A fresh copy of ``module``'s one-level graph under ``spec``, to edit.

        The tensor constants torch.fx made for the graph are set on ``module``, where code
        generated from the graph reads them (as torch.fx itself stores them on the module it
        traces). They derive from values the trace key holds (plain attributes by value,
        others by identity, globals), so modules sharing the graph share them.

        Raises whatever torch.fx raises when the forward does not trace.
        """
        found = self.get(module, spec)
        if isinstance(found, str):
            return trace_module(module, spec)  # raises the full error
        for name, value in self._constants.get(id(found), {}).items():
            setattr(module, name, value)
        return copy.deepcopy(found)  # torch.fx's own copy: node names and codegen kept


def op_name(node: fx.Node) -> str:
    """A short, normalized name for what an fx node computes (``add``, ``relu``, ``view``)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return "getitem"
        name = getattr(target, "__name__", None) or str(target)
        if getattr(target, "__module__", "") in ("_operator", "operator") and name.startswith("i") \
                and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "matmul", "and", "or"):
            return name[1:]
        return name
    if node.op == "get_attr":
        return "get_attr"
    return node.op


def _flatten(value: _Value) -> frozenset[str]:
    if isinstance(value, frozenset):
        return value
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        out: set[str] = set()
        for v in value:
            out |= _flatten(v)
        return frozenset(out)
    return _EMPTY


def _consts(value: Any) -> Any:
    """What a caller passes, for :func:`call_spec`: fx nodes become ``OTHER``."""
    if isinstance(value, fx.Node):
        return OTHER
    if isinstance(value, (tuple, list)):
        return OTHER if any(isinstance(v, fx.Node) for v in value) else value
    if isinstance(value, dict):
        return OTHER
    return value


def _bind(env: dict[Tok, frozenset[str]], pattern: Any, value: _Value) -> None:
    """Give the tokens of a recorded structure the graph values passed in its place."""
    if isinstance(pattern, Tok):
        env[pattern] = _flatten(value)
    elif isinstance(pattern, (tuple, list)):
        if isinstance(value, (tuple, list)) and len(value) == len(pattern):
            for p, v in zip(pattern, value):
                _bind(env, p, v)
        else:
            for p in pattern:
                _bind(env, p, value)
    elif isinstance(pattern, dict):
        for k, p in pattern.items():
            _bind(env, p, value.get(k, _EMPTY) if isinstance(value, dict) else value)


def _load_recorded(env: dict[Tok, frozenset[str]], pattern: Any) -> _Value:
    """The graph value of a recorded structure (tokens replaced by the nodes producing them)."""
    if isinstance(pattern, Tok):
        return env.get(pattern, _EMPTY)
    if isinstance(pattern, (tuple, list)):
        return tuple(_load_recorded(env, p) for p in pattern)
    if isinstance(pattern, dict):
        return {k: _load_recorded(env, p) for k, p in pattern.items()}
    return _EMPTY


class _Builder:
    """Stitches per-call graphs (symbolic or observed) of every module into one DiGraph."""

    def __init__(self, model: nn.Module, observation: Observation | None,
                 cache: TraceCache) -> None:
        self.model = model
        self.obs = observation
        self.g = nx.DiGraph()
        self.names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, mod in model.named_modules():
            if is_inserted_path(name, by_regfx=False):
                continue
            self.names.setdefault(id(mod), name)
            self.modules.setdefault(name, mod)
        self.cache = cache  # shared by the builds of one trace
        self.traced: set[str] = set()
        self.observed: dict[str, str] = {}
        self.opaque: dict[str, str] = {}
        self.call_count: dict[str, int] = {}
        self.covered: set[str] = set()

    # -- per-module graphs ------------------------------------------------------------------

    def _symbolic(self, mod: nn.Module, spec: Spec) -> fx.Graph | str:
        """The one-level graph of ``mod`` under ``spec``, or the reason it does not trace."""
        return self.cache.get(mod, spec)

    def _frame(self, name: str, idx: int) -> Frame | None:
        if self.obs is None:
            return None
        frames = self.obs.calls.get(name, ())
        return frames[idx] if idx < len(frames) else None

    # -- node creation ----------------------------------------------------------------------

    def _next_call(self, name: str) -> int:
        idx = self.call_count.get(name, 0)
        self.call_count[name] = idx + 1
        return idx

    def _module_node(self, name: str, idx: int, value_in: _Value, owner: str | None,
                     region: str | None, opaque: bool, fx_name: str | None, spec: Spec = (),
                     **extra: Any) -> str:
        nid = f"{name}#{idx}"
        mod = self.modules[name]
        self.g.add_node(
            nid, module=name, module_type=type(mod).__name__, call_index=idx, opaque=opaque,
            owner=owner, region=region, fx_name=fx_name, op=None, owner_spec=spec,
            traced=name in self.traced, called=extra.pop("called", True), **extra,
        )
        for src in _flatten(value_in):
            self.g.add_edge(src, nid)
        self.covered.add(name)
        return nid

    def _op_node(self, nid: str, op: str, value_in: _Value, owner: str, region: str | None,
                 fx_name: str | None, spec: Spec = (), **extra: Any) -> str:
        self.g.add_node(nid, module=None, op=op, owner=owner, region=region, opaque=False,
                        fx_name=fx_name, call_index=None, module_type=None, owner_spec=spec,
                        **extra)
        for src in _flatten(value_in):
            self.g.add_edge(src, nid)
        return nid

    # -- one call ---------------------------------------------------------------------------

    def call(self, name: str, args: Sequence[_Value], kwargs: dict[str, _Value],
             raw: tuple[Sequence[Any], dict[str, Any]] | None, owner: str | None,
             region: str | None, fx_name: str | None, spec: Spec = (),
             observed: bool = False) -> _Value:
        """Record one call of module ``name`` with the given argument values; return its value.

        ``raw`` is what the caller passes (constants as values) for the call-site
        specialization; ``spec`` and ``fx_name`` locate the call in the caller's own graph.
        """
        mod = self.modules.get(name)
        if mod is None:  # a module reached under a second name: use its first name
            return _flatten((tuple(args), kwargs))
        name = self.names[id(mod)]
        idx = self._next_call(name)
        value_in = (tuple(args), kwargs)
        if is_leaf_layer(mod) or is_container(mod):
            return frozenset({self._module_node(name, idx, value_in, owner, region, opaque=False,
                                                fx_name=fx_name, spec=spec, observed=observed)})
        frame = self._frame(name, idx)
        if frame is not None:
            own_spec = call_spec(mod, frame.args, frame.kwargs)
        else:
            own_spec = call_spec(mod, *raw) if raw is not None else call_spec(mod)
        graph = self._symbolic(mod, own_spec)
        self.covered.add(name)
        if isinstance(graph, fx.Graph):
            self.traced.add(name)
            return self._inline(name, idx, graph, own_spec, args, kwargs, region)
        if frame is not None:
            self.observed.setdefault(name, graph)
            return self._inline_frame(name, idx, frame, args, kwargs, region)
        self.opaque.setdefault(name, graph)
        return frozenset({self._module_node(name, idx, value_in, owner, region, opaque=True,
                                            fx_name=fx_name, spec=spec, observed=observed)})

    def _inline(self, name: str, call_idx: int, graph: fx.Graph, spec: Spec,
                args: Sequence[_Value], kwargs: dict[str, _Value], region: str | None) -> _Value:
        prefix = f"{name}." if name else ""
        env: dict[fx.Node, _Value] = {}
        positional = list(args)
        remaining = dict(kwargs)
        tag = f"{name}#{call_idx}" if name else f"#{call_idx}"

        def load(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                return env.get(arg, _EMPTY)
            if isinstance(arg, (tuple, list)):
                return tuple(load(a) for a in arg)
            if isinstance(arg, dict):
                return {k: load(v) for k, v in arg.items()}
            if isinstance(arg, slice):
                return _flatten((load(arg.start), load(arg.stop), load(arg.step)))
            return _EMPTY

        result: _Value = _EMPTY
        for node in graph.nodes:
            if node.op == "placeholder":
                target = str(node.target)
                if target.startswith("**"):
                    env[node] = dict(remaining)
                    remaining.clear()
                elif target.startswith("*"):
                    env[node] = tuple(positional)
                    positional.clear()
                elif positional:
                    env[node] = positional.pop(0)
                elif target in remaining:
                    env[node] = remaining.pop(target)
                elif region == "" and not name:
                    env[node] = frozenset({self._input_node(target)})
                else:
                    env[node] = _EMPTY
            elif node.op == "output":
                result = load(node.args[0])
                if not name and region == "" and "output" not in self.g:
                    self._op_node("output", "output", result, owner="", region="",
                                  fx_name=node.name)
            elif node.op == "call_module":
                child = prefix + str(node.target)
                raw = ([_consts(a) for a in node.args], {k: _consts(v) for k, v in node.kwargs.items()})
                env[node] = self.call(
                    child, load(node.args), load(node.kwargs), raw, owner=name, region=region,
                    fx_name=node.name, spec=spec,
                )
            elif node.op == "call_function" and node.target is operator.getitem:
                container = load(node.args[0])
                index = node.args[1]
                if isinstance(container, (tuple, list)) and isinstance(index, int) \
                        and -len(container) <= index < len(container):
                    env[node] = container[index]
                elif isinstance(container, dict) and isinstance(index, str) and index in container:
                    env[node] = container[index]
                else:
                    env[node] = frozenset({self._op_node(
                        f"{tag}:{node.name}", "getitem", load(node.args), owner=name,
                        region=region, fx_name=node.name, spec=spec)})
            elif node.op == "get_attr":
                env[node] = frozenset({self._op_node(
                    f"{tag}:{node.name}", "get_attr", _EMPTY, owner=name, region=region,
                    fx_name=node.name, spec=spec, attr=prefix + str(node.target))})
            else:  # call_function / call_method
                value_in = (load(node.args), load(node.kwargs))
                extra: dict[str, Any] = {}
                op = op_name(node)
                if op in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                          "feature_alpha_dropout"):
                    extra["p"] = _dropout_p(node)
                elif op == "scaled_dot_product_attention":
                    extra["p"] = _sdpa_dropout_p(node)
                env[node] = frozenset({self._op_node(
                    f"{tag}:{node.name}", op, value_in, owner=name, region=region,
                    fx_name=node.name, spec=spec, **extra)})
        return result

    def _inline_frame(self, name: str, call_idx: int, frame: Frame, args: Sequence[_Value],
                      kwargs: dict[str, _Value], region: str | None) -> _Value:
        """Stitch the observed record of one call of ``name`` (its forward did not trace)."""
        env: dict[Tok, frozenset[str]] = {}
        _bind(env, tuple(frame.args), tuple(args))
        for key, pattern in frame.kwargs.items():
            if key in kwargs:
                _bind(env, pattern, kwargs[key])
        if not name and region == "" and self.obs is not None:
            for i, pattern in enumerate(frame.args):
                label = self.obs.input_names[i] if i < len(self.obs.input_names) else f"arg{i}"
                _bind(env, pattern, frozenset({self._input_node(label)}))
            for key, pattern in frame.kwargs.items():
                _bind(env, pattern, frozenset({self._input_node(key)}))
        tag = f"{name}#{call_idx}" if name else f"#{call_idx}"
        for i, event in enumerate(frame.events):
            if isinstance(event, OpEvent):
                value_in = frozenset().union(*(env.get(t, _EMPTY) for t in event.inputs)) \
                    if event.inputs else _EMPTY
                extra: dict[str, Any] = {"observed": True}
                if event.p is not None:
                    extra["p"] = event.p
                if event.params:
                    extra["params"] = event.params
                nid = self._op_node(f"{tag}:{i}:{event.name}", event.name, value_in, owner=name,
                                    region=region, fx_name=None, **extra)
                for t in event.outputs:
                    env[t] = frozenset({nid})
            else:
                child_args = tuple(_load_recorded(env, a) for a in event.args)
                child_kwargs = {k: _load_recorded(env, v) for k, v in event.kwargs.items()}
                result = self.call(event.module, child_args, child_kwargs, None, owner=name,
                                   region=region, fx_name=None, observed=True)
                if event.params:
                    for nid in _flatten(result):
                        self.g.nodes[nid].setdefault("params", event.params)
                _bind(env, event.output, result)
        result_value = _load_recorded(env, frame.output)
        if not name and region == "" and "output" not in self.g:
            self._op_node("output", "output", result_value, owner="", region="", fx_name=None)
        return result_value

    def _input_node(self, target: str) -> str:
        nid = f"input:{target.lstrip('*')}"
        if nid not in self.g:
            self.g.add_node(nid, module=None, op="input", owner="", region="", opaque=False,
                            fx_name=target, call_index=None, module_type=None, owner_spec=())
        return nid

    # -- whole model ------------------------------------------------------------------------

    def build(self) -> None:
        # The root's specialization: the observed call's constants when the model ran, else
        # the defaults of its arguments.
        result = self.call("", [], {}, None, owner=None, region="", fx_name=None)
        if is_leaf_layer(self.modules[""]):
            # The model is one layer: its input is the model's input, its output the model's.
            sig = _forward_signature(self.modules[""])
            first = next(iter(list(sig.parameters)[1:]), "input") if sig is not None else "input"
            self.g.add_edge(self._input_node(first), "#0")
            self._op_node("output", "output", result, owner="", region="", fx_name=None)
        # Modules no stitched call reached: children of opaque modules, submodules of leaf
        # layers (MultiheadAttention.out_proj), modules that never run.
        for name, mod in self.modules.items():
            if name in self.covered or self.names[id(mod)] != name or is_container(mod):
                continue
            if is_inserted_path(name):
                continue
            layer = self._enclosing_layer(name)
            if layer is not None:
                nid = self._module_node(name, self._next_call(name), _EMPTY, owner=None,
                                        region=None, opaque=False, fx_name=None)
                self.g.nodes[nid]["within_layer"] = layer
                continue
            if self.obs is not None:
                # The model ran: a module that did not run has no call. Leaf layers stay in
                # the graph (every layer is listed), marked as not called.
                if is_leaf_layer(mod):
                    self._module_node(name, self._next_call(name), _EMPTY, owner=None, region=None,
                                      opaque=False, fx_name=None, called=False)
                continue
            if not is_leaf_layer(mod) and self._some_descendant_covered(name):
                # Its children were called directly (``self.block.forward(x)``, a loop over a
                # Sequential's children): tracing it on its own would invent second calls. Its
                # layers that were not reached get nodes of their own in this loop.
                continue
            if is_leaf_layer(mod):
                # with no opaque region, every call is known: a layer no forward reached never runs
                known = not self.opaque
                self._module_node(name, self._next_call(name), _EMPTY, owner=None, region=None,
                                  opaque=not known, fx_name=None, called=False if known else None)
            else:
                self.call(name, [], {}, None, owner=None, region=name, fx_name=None)

    def _some_descendant_covered(self, name: str) -> bool:
        prefix = name + "."
        return any(n.startswith(prefix) for n in self.covered)

    def _enclosing_layer(self, name: str) -> str | None:
        """The leaf layer that owns ``name`` (``attn`` for ``attn.out_proj``), if any."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            mod = self.modules.get(parent)
            if mod is not None and is_leaf_layer(mod):
                return parent
        root = self.modules[""]
        return "" if name and is_leaf_layer(root) else None


def is_container(module: nn.Module) -> bool:
    """True for modules without a forward of their own (``ModuleList``, ``ModuleDict``)."""
    return getattr(type(module).forward, "__name__", "") == "_forward_unimplemented"


def _dropout_p(node: fx.Node) -> float | None:
    p = node.kwargs.get("p")
    if p is None and len(node.args) > 1:
        p = node.args[1]
    if p is None:
        return 0.5
    return float(p) if isinstance(p, (int, float)) else None


def _sdpa_dropout_p(node: fx.Node) -> float | None:
    """``dropout_p`` of a ``scaled_dot_product_attention`` call (0.0 when not given)."""
    p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    return float(p) if isinstance(p, (int, float)) else None


# -- leaving the model as it was --------------------------------------------------------------


_EMPTY_CONTAINER = ()


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    """Every module's ``__dict__`` and a shallow copy of each container in it (an empty one,
    such as most hook tables, is only marked empty)."""
    out = []
    for mod in model.modules():
        attrs = dict(mod.__dict__)
        contents: dict[str, Any] = {}
        for key, value in attrs.items():
            if type(value) in (dict, list, set) or isinstance(value, dict):
                if not value:
                    contents[key] = _EMPTY_CONTAINER
                    continue
                try:
                    contents[key] = value.copy()
                except Exception:  # noqa: BLE001 - a container that cannot be copied is skipped
                    pass
        out.append((mod, attrs, contents))
    return out


def _restore(snapshot: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]) -> None:
    """Put back every attribute a trace or the example forward wrote."""
    for mod, attrs, contents in snapshot:
        current = mod.__dict__
        if len(current) != len(attrs) or any(k not in attrs for k in current):
            for key in [k for k in current if k not in attrs]:
                del current[key]
        for key, value in attrs.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value
        for key, saved in contents.items():
            value = current[key]
            if saved is _EMPTY_CONTAINER:
                if value:
                    value.clear()
            elif _changed(value, saved):
                value.clear()
                value.update(saved) if not isinstance(value, list) else value.extend(saved)


_MISSING = object()


def _changed(value: Any, saved: Any) -> bool:
    if len(value) != len(saved):
        return True
    if isinstance(value, dict):
        return any(k not in saved or saved[k] is not v for k, v in value.items())
    if isinstance(value, list):
        return any(a is not b for a, b in zip(value, saved))
    return bool(value != saved)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run a block that may write into ``model`` (a trace, an example forward) and undo it.

    Restores every module's attributes and the containers in them (caches, hook tables), every
    training flag, the contents of buffers written in place (a counter, an observer: even a
    symbolic trace runs ``self.calls += 1`` on the real buffer), and the CPU (and, for CUDA
    models, CUDA) random number generator state.
    """
    snap = _snapshot(model)
    buffers = [(b, b._version, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        _restore(snap)
        with torch.no_grad():
            for buf, version, value in buffers:
                if buf._version != version:
                    buf.copy_(value)


def has_uninitialized(model: nn.Module) -> bool:
    """Whether ``model`` has lazy layers whose parameters are not initialized yet."""
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def _input_names(model: nn.Module, inputs: ExampleInputs) -> tuple[str, ...]:
    sig = _forward_signature(model)
    names = [p.name for p in list(sig.parameters.values())[1:]] if sig is not None else []
    out = [names[i] if i < len(names) and "*" not in names[i] else f"arg{i}"
           for i in range(len(inputs.args))]
    return tuple(out)


def _output_layers(graph: nx.DiGraph) -> frozenset[str]:
    if "output" not in graph:
        return frozenset()
    out = set()
    for p in graph.predecessors("output"):
        data = graph.nodes[p]
        if data.get("module"):
            out.add(data["module"])
    return frozenset(out)


def _resolve_inputs(model: nn.Module, example_inputs: Any) -> ExampleInputs | None:
    if example_inputs is None:
        return synthesize_inputs(model)
    try:
        return as_example_inputs(example_inputs)
    except Exception as exc:  # noqa: BLE001 - re-raised as a one-line regfx error
        raise TraceError(f"example_inputs: {_first_line(exc)}; pass a tensor, a tuple of "
                         "positional arguments or a dict of keyword arguments") from None


@gc_paused()
def trace(model: nn.Module, example_inputs: Any = None, *,
          observe_forward: bool | str = "auto", cache: TraceCache | None = None) -> ModelGraph:
    """Trace ``model`` into a :class:`ModelGraph`, never giving up on untraceable code.

    Args:
        model: any ``nn.Module``, on any device including ``meta``. It is not modified: every
            attribute, flag, cache and the random number generator state are as they were.
        example_inputs: inputs for one forward (a tensor, a tuple of positional arguments, a
            dict of keyword arguments, or :class:`~regfx.inputs.ExampleInputs`). None: inputs
            are synthesized where the model says what it takes (a transformers config, a timm
            ``pretrained_cfg``, a torchvision model, the first layer's shape). The model runs
            once on them in eval mode under ``no_grad``; if none can be had, or the forward
            fails on them, the graph is symbolic only (:attr:`ModelGraph.observe_error` says
            why).
        observe_forward: ``"auto"`` (default) runs the example forward when some forward does
            not trace symbolically (where every one traces, the symbolic graph is already the
            exact dataflow); True always runs it; False never does.
        cache: one-level traces to reuse and fill (a transformed model's own cache, or one
            shared by several traces of the same model); None: a fresh one.

    Returns:
        The graph: exact dataflow where forwards trace or were observed, opaque nodes (with
        reasons in :attr:`ModelGraph.opaque`) where neither.

    Raises:
        TraceError: when ``model`` is not an ``nn.Module`` or ``example_inputs`` has no usable
            form.

    Example:
        >>> g = regfx.trace(model)
        >>> g.opaque            # {} when every forward traced or was observed
        >>> g.calls("fc1")      # ['fc1#0']
        >>> g.inputs            # 'arg0: float32[2, 3, 224, 224] (torchvision documented input ...)'
    """
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"trace() needs an nn.Module, got {type(model).__name__}; pass the model instance"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError("script modules cannot be traced; pass the eager module (the one given "
                         "to torch.jit.script)")
    if observe_forward not in (True, False, "auto"):
        raise TraceError(f"observe_forward must be True, False or 'auto', got {observe_forward!r}")
    observation: Observation | None = None
    inputs: ExampleInputs | None = None
    cache = cache if cache is not None else TraceCache()
    with preserved(model):
        builder = _Builder(model, None, cache)
        with shared_fx_patches():
            builder.build()
        error: str | None = "not run (observe_forward=False)"
        if observe_forward is True or (observe_forward == "auto" and builder.opaque):
            error, inputs, observation = _observe(model, example_inputs)
        elif observe_forward == "auto":
            error = "not needed: every forward traced symbolically"
        if observation is not None:
            builder = _Builder(model, observation, cache)
            with shared_fx_patches():
                builder.build()
    assign_roles(builder.g, builder.modules)
    return ModelGraph(
        nx=builder.g,
        model_type=type(model).__name__,
        opaque=dict(builder.opaque),
        traced=sorted(builder.traced),
        observed=dict(builder.observed),
        modules={n: type(m).__name__ for n, m in builder.modules.items()},
        output_layers=_output_layers(builder.g),
        inputs=(inputs.describe() if inputs is not None and observation is not None else None),
        observe_error=error if observation is None else None,
    )


def run_example(model: nn.Module, example_inputs: Any) -> str | None:
    """Run ``model`` once, in eval mode under ``no_grad``, on ``example_inputs``, leaving it as
    it was (as :func:`trace` does); why it did not run (one line), or None when it ran."""
    with preserved(model):
        error, _, _ = _observe(model, example_inputs)
    return error


def _observe(model: nn.Module, example_inputs: Any
             ) -> tuple[str | None, ExampleInputs | None, Observation | None]:
    """Run the example forward: ``(why it did not run, the inputs, the record)``."""
    if has_uninitialized(model):
        return "lazy layers are not initialized", None, None
    inputs = _resolve_inputs(model, example_inputs)
    if inputs is None:
        return "no example inputs given and none could be synthesized", None, None
    try:
        observation = observe(model, inputs.args, inputs.kwargs, is_leaf_layer,
                              _input_names(model, inputs))
    except Exception as exc:  # noqa: BLE001 - the graph falls back to symbolic tracing
        return f"the forward failed on the example inputs: {_first_line(exc)}", inputs, None
    return None, inputs, observation
