"""Tiered torch.fx tracing that never gives up, producing a :class:`~regfx.graph.ModelGraph`.

Every module that is not a leaf layer is traced on its own, one level deep: the calls it makes to
its submodules are recorded as ``call_module`` nodes and not followed. The per-module graphs are
then stitched into one dataflow graph by inlining each traced submodule's graph at its call sites.

- Tier 1: every forward traces, so the stitched graph is the exact dataflow of the whole model.
- Tier 2: a module whose forward does not trace (data-dependent control flow, ``len()`` of a
  proxy, ...) becomes opaque: it is one node in its parent's graph, the reason is recorded in
  :attr:`ModelGraph.opaque`, and its children are traced on their own, recursively. Every leaf
  layer is in the graph either way.
- Tier 3 (placement) lives in the transforms: inside an opaque module, placement falls back to
  the output of the module.

Tracing is symbolic, so it works for models on the ``meta`` device without allocating weights.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from regfx.graph import ModelGraph
from regfx.select import _is_inserted_path, is_leaf_layer

__all__ = ["trace", "trace_module", "trace_signature", "op_name"]

_Value = Any  # frozenset[str] | tuple[_Value, ...] | dict[str, _Value]
_EMPTY: frozenset[str] = frozenset()


class _OneLevelTracer(fx.Tracer):
    """Traces only the root's own forward; every submodule call becomes a call_module node."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._traced_root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._traced_root


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


def trace_module(module: nn.Module) -> fx.Graph:
    """Trace the forward of ``module`` one level deep (submodule calls are not followed).

    Raises whatever torch.fx raises when the forward does not trace.
    """
    tracer = _OneLevelTracer(module)
    with _quiet():
        return tracer.trace(module)


_PRIMITIVES = (bool, int, float, str, type(None), torch.dtype, torch.device)
_MODULE_STATE = frozenset(vars(nn.Module()).keys())


def _attrs_key(module: nn.Module) -> tuple[tuple[Any, ...], ...]:
    """The instance attributes of ``module`` outside nn.Module's own state: plain values (ints,
    strings, flags, tuples of them) by value, anything else by identity."""
    attrs: list[tuple[Any, ...]] = []
    for key, value in module.__dict__.items():
        if key in _MODULE_STATE:
            continue
        if isinstance(value, _PRIMITIVES) or (
                isinstance(value, tuple) and all(isinstance(v, _PRIMITIVES) for v in value)):
            attrs.append((key, value))
        else:
            attrs.append((key, "id", id(value)))
    return tuple(attrs)


def trace_signature(module: nn.Module) -> tuple[Any, ...]:
    """A key under which two modules trace to the same one-level graph.

    The class, every instance attribute (plain values by value, anything else by identity), and
    for each child its name, class and attributes (a forward may branch on
    ``self.conv.stride``), which parameters and buffers exist, and the training flag. Two
    blocks of a deep stack share a key; a block whose flag or child differs does not. Used to
    trace each distinct block once.
    """
    return (
        type(module), _attrs_key(module),
        tuple((n, type(c), _attrs_key(c) if c is not None else ())
              for n, c in module._modules.items()),
        tuple((n, p is None) for n, p in module._parameters.items()),
        tuple((n, b is None) for n, b in module._buffers.items()),
        module.training,
    )


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


class _Builder:
    """Stitches the one-level graphs of every module into one networkx DiGraph."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.g = nx.DiGraph()
        self.names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, mod in model.named_modules():
            if "parametrizations" in name.split("."):
                continue
            self.names.setdefault(id(mod), name)
            self.modules.setdefault(name, mod)
        self.graphs: dict[str, fx.Graph] = {}
        self.opaque: dict[str, str] = {}
        self.call_count: dict[str, int] = {}
        self.covered: set[str] = set()
        self._trace_all()

    def _trace_all(self) -> None:
        # Identical blocks (same class, children, flags) trace to the same graph: trace once.
        # The graphs are only read here, so they can be shared.
        done: dict[tuple[Any, ...], fx.Graph | str] = {}
        for name, mod in self.modules.items():
            if self.names[id(mod)] != name or is_leaf_layer(mod) or is_container(mod):
                continue
            key = trace_signature(mod)
            result = done.get(key)
            if result is None:
                result = done[key] = self._trace_one(mod)
            if isinstance(result, str):
                self.opaque[name] = result
            else:
                self.graphs[name] = result

    @staticmethod
    def _trace_one(mod: nn.Module) -> fx.Graph | str:
        """The one-level graph of ``mod``, or the reason it is opaque."""
        try:
            graph = trace_module(mod)
        except Exception as exc:  # noqa: BLE001 - any failure makes the module opaque
            return _first_line(exc)
        hazard = _specialized_optional(graph)
        if hazard is not None:
            return (f"forward specializes on optional argument {hazard!r} (default None): the "
                    "traced code assumes it is always passed")
        return graph

    # -- node creation ----------------------------------------------------------------------

    def _next_call(self, name: str) -> int:
        idx = self.call_count.get(name, 0)
        self.call_count[name] = idx + 1
        return idx

    def _module_node(self, name: str, value_in: _Value, owner: str | None, region: str | None,
                     opaque: bool, fx_name: str | None) -> str:
        idx = self._next_call(name)
        nid = f"{name}#{idx}"
        mod = self.modules[name]
        self.g.add_node(
            nid, module=name, module_type=type(mod).__name__, call_index=idx, opaque=opaque,
            owner=owner, region=region, fx_name=fx_name, op=None,
            traced=name in self.graphs,
        )
        for src in _flatten(value_in):
            self.g.add_edge(src, nid)
        self.covered.add(name)
        return nid

    def _op_node(self, nid: str, op: str, value_in: _Value, owner: str, region: str | None,
                 fx_name: str, **extra: Any) -> str:
        self.g.add_node(nid, module=None, op=op, owner=owner, region=region, opaque=False,
                        fx_name=fx_name, call_index=None, module_type=None, **extra)
        for src in _flatten(value_in):
            self.g.add_edge(src, nid)
        return nid

    # -- inlining ---------------------------------------------------------------------------

    def call(self, name: str, args: Sequence[_Value], kwargs: dict[str, _Value],
             owner: str | None, region: str | None, fx_name: str | None,
             opaque_context: bool) -> _Value:
        """Record one call of module ``name`` with the given argument values; return its value."""
        mod = self.modules.get(name)
        if mod is None:  # a module reached under a second name: use its first name
            return _flatten((tuple(args), kwargs))
        canonical = self.names[id(mod)]
        if canonical != name:
            name = canonical
        if name in self.graphs:
            idx = self._next_call(name)
            self.covered.add(name)
            return self._inline(name, idx, args, kwargs, region)
        value_in = (tuple(args), kwargs)
        nid = self._module_node(name, value_in, owner, region,
                                opaque=opaque_context or name in self.opaque, fx_name=fx_name)
        return frozenset({nid})

    def _inline(self, name: str, call_idx: int, args: Sequence[_Value],
                kwargs: dict[str, _Value], region: str | None) -> _Value:
        graph = self.graphs[name]
        prefix = f"{name}." if name else ""
        env: dict[fx.Node, _Value] = {}
        positional = list(args)
        remaining = dict(kwargs)
        tag = f"{name}#{call_idx}" if name else f"#{call_idx}"

        def load(arg: Any) -> _Value:
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
                if not name and call_idx == 0 and region == "":
                    self._op_node("output", "output", result, owner="", region="",
                                  fx_name=node.name)
            elif node.op == "call_module":
                child = prefix + str(node.target)
                env[node] = self.call(
                    child, load(node.args), load(node.kwargs), owner=name, region=region,
                    fx_name=node.name, opaque_context=False,
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
                        region=region, fx_name=node.name)})
            elif node.op == "get_attr":
                env[node] = frozenset({self._op_node(
                    f"{tag}:{node.name}", "get_attr", _EMPTY, owner=name, region=region,
                    fx_name=node.name, attr=prefix + str(node.target))})
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
                    fx_name=node.name, **extra)})
        return result

    def _input_node(self, target: str) -> str:
        nid = f"input:{target.lstrip('*')}"
        if nid not in self.g:
            self.g.add_node(nid, module=None, op="input", owner="", region="", opaque=False,
                            fx_name=target, call_index=None, module_type=None)
        return nid

    # -- whole model ------------------------------------------------------------------------

    def build(self) -> None:
        root = self.modules[""]
        if "" in self.graphs:
            self.covered.add("")
            self._next_call("")
            self._inline("", 0, [], {}, region="")
        elif is_leaf_layer(root):
            self._module_node("", _EMPTY, owner=None, region=None, opaque=False, fx_name=None)
        else:
            self._module_node("", _EMPTY, owner=None, region=None, opaque=True, fx_name=None)
        # Modules no traced forward reaches: children of opaque modules, submodules of leaf
        # layers (MultiheadAttention.out_proj) and modules that are never called.
        for name, mod in self.modules.items():
            if name in self.covered or self.names[id(mod)] != name or is_container(mod):
                continue
            if name in self.graphs:
                self._next_call(name)
                self.covered.add(name)
                self._inline(name, 0, [], {}, region=name)
            else:
                layer = self._enclosing_layer(name)
                nid = self._module_node(name, _EMPTY, owner=None, region=None,
                                        opaque=layer is None, fx_name=None)
                self.g.nodes[nid]["within_layer"] = layer

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


def _specialized_optional(graph: fx.Graph) -> str | None:
    """The first argument defaulting to None whose value the traced code uses, if any.

    torch.fx turns every argument into a proxy, so ``if mask is None:`` takes the "passed" branch
    at trace time; code regenerated from such a graph breaks when the caller omits the argument.
    """
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        if node.args and node.args[0] is None and node.users:
            return str(node.target)
    return None


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


def _observe_outputs(model: nn.Module, example_inputs: Any) -> frozenset[str]:
    """Run the model once (eval mode, no grad) and name the modules whose output is returned."""
    # Tensors are kept alive until the end so that their ids cannot be reused.
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    handles = []

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            for t in _tensors(out):
                outputs[id(t)] = (t, name)
        return hook

    names = {}
    for name, mod in model.named_modules():
        if name and not _is_inserted_path(name) and is_leaf_layer(mod):
            names[name] = mod
            handles.append(mod.register_forward_hook(hook_for(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                result = model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                result = model(*example_inputs)
            else:
                result = model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return frozenset(outputs[id(t)][1] for t in _tensors(result) if id(t) in outputs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(value.to_tuple())


def trace(model: nn.Module, example_inputs: Any = None) -> ModelGraph:
    """Trace ``model`` into a :class:`ModelGraph`, never giving up on untraceable code.

    Args:
        model: any ``nn.Module``, on any device including ``meta``. It is not modified.
        example_inputs: optional inputs (a tensor, a tuple of positional arguments or a dict of
            keyword arguments). When given, the model is run once in eval mode under
            ``torch.no_grad()`` to observe which layers produce its outputs, which refines
            placement inside opaque modules. Omit it for meta-device models.

    Returns:
        The graph: exact dataflow where forwards trace, opaque nodes (with reasons in
        :attr:`ModelGraph.opaque`) where they do not.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.

    Example:
        >>> g = regfx.trace(model)
        >>> g.opaque            # {} when the whole model traced
        >>> g.calls("fc1")      # ['fc1#0']
    """
    if not isinstance(model, nn.Module):
        from regfx.errors import TraceError

        raise TraceError(
            f"trace() needs an nn.Module, got {type(model).__name__}; pass the model instance"
        )
    builder = _Builder(model)
    builder.build()
    outputs: frozenset[str] = frozenset()
    if example_inputs is not None:
        outputs = _observe_outputs(model, example_inputs)
    return ModelGraph(
        nx=builder.g,
        model_type=type(model).__name__,
        opaque=dict(builder.opaque),
        traced=sorted(builder.graphs),
        modules={n: type(m).__name__ for n, m in builder.modules.items()},
        output_layers=outputs,
    )
