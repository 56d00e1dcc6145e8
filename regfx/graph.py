"""ModelGraph: the traced dataflow of a model as a networkx DiGraph, and the queries on it.

Nodes are module calls and ops. A module-call node has the attributes ``module`` (qualified
name), ``module_type`` (class name), ``call_index`` (0 for the first call of that module in the
graph, 1 for the second, ...), ``opaque`` (True when the call was not seen by a successful trace,
so its surroundings are unknown) and ``owner`` (the qualified name of the module whose traced
forward makes the call, None when no traced forward does). An op node has ``module=None``, ``op``
(``add``, ``relu``, ``dropout``, ``view``, ``input``, ``output``, ...), ``owner`` and ``opaque``.
Edges are dataflow: ``u -> v`` when a value produced by ``u`` is an argument of ``v``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import nn

from regfx.select import LayerSelector, is_norm, parse_types

__all__ = ["ModelGraph", "ACTIVATION_OPS", "NORM_OPS", "RESHAPE_OPS", "DROPOUT_OPS"]

ACTIVATION_OPS = frozenset(
    {
        "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "tanh", "leaky_relu",
        "leaky_relu_", "elu", "elu_", "selu", "celu", "hardswish", "hardsigmoid", "hardtanh",
        "mish", "softplus", "softsign", "prelu", "glu", "logsigmoid", "tanhshrink", "swish",
        "softmax", "log_softmax", "sigmoid_", "tanh_", "quick_gelu", "gelu_new",
    }
)
NORM_OPS = frozenset({"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm"})
RESHAPE_OPS = frozenset(
    {
        "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
        "unsqueeze", "getitem", "t", "view_as", "reshape_as", "unflatten", "float", "to",
        "type_as", "half", "bfloat16", "chunk", "split", "clone", "detach", "expand",
        "narrow", "movedim", "swapaxes",
    }
)
DROPOUT_OPS = frozenset(
    {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
)
# Ops that read a tensor's metadata, not its values: they do not count as consumers.
SHAPE_OPS = frozenset({"size", "dim", "shape", "numel", "getattr", "device", "dtype", "is_floating_point"})
ADD_OPS = frozenset({"add", "iadd", "add_"})

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)


def is_activation_module(module: nn.Module) -> bool:
    """True for torch activation modules (``nn.ReLU``...) and library ones (transformers')."""
    if isinstance(module, nn.MultiheadAttention):
        return False
    mod = type(module).__module__ or ""
    if mod == "torch.nn.modules.activation":
        return True
    return mod.endswith(".activations") and not any(True for _ in module.parameters())


def is_dropout_module(module: nn.Module) -> bool:
    """True for torch dropout modules and DropPath/StochasticDepth-style modules."""
    if isinstance(module, _DROPOUT_MODULES):
        return True
    name = type(module).__name__.lower()
    return "droppath" in name or "drop_path" in name or "stochasticdepth" in name


@dataclass
class ModelGraph:
    """The traced graph of a model.

    Attributes:
        nx: the networkx DiGraph (see the module docstring for node attributes).
        model_type: class name of the traced root module.
        opaque: qualified name -> first line of the reason its forward did not trace.
        traced: qualified names of the modules whose forward traced ("" is the root).
        modules: qualified name -> class name of every module of the model (inserted ones
            excluded), in ``named_modules`` order.
        output_layers: layers observed (by running ``example_inputs``) to produce a model
            output; empty when no example inputs were given.
    """

    nx: nx.DiGraph
    model_type: str
    opaque: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)
    output_layers: frozenset[str] = frozenset()
    _calls: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _reach_cache: dict[str, bool] = field(default_factory=dict, repr=False)

    # -- basic views ------------------------------------------------------------------------

    def __post_init__(self) -> None:
        calls: dict[str, list[str]] = {}
        for nid, data in self.nx.nodes(data=True):
            if data.get("module") is not None:
                calls.setdefault(data["module"], []).append(nid)
        for ids in calls.values():
            ids.sort(key=lambda n: self.nx.nodes[n]["call_index"])
        self._calls = calls

    @property
    def fully_traced(self) -> bool:
        """True when the whole model traced as one region (tier 1)."""
        return not self.opaque

    def module_nodes(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(node id, attributes)`` of every module-call node, in insertion order."""
        for nid, data in self.nx.nodes(data=True):
            if data.get("module") is not None:
                yield nid, data

    def op_nodes(self, *ops: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(node id, attributes)`` of op nodes, optionally only those whose op is in ``ops``."""
        for nid, data in self.nx.nodes(data=True):
            if data.get("module") is None and (not ops or data.get("op") in ops):
                yield nid, data

    def calls(self, module: str) -> list[str]:
        """Node ids of every call of the module named ``module`` (call-index order)."""
        return list(self._calls.get(module, ()))

    def layers(
        self,
        model: nn.Module,
        types: str | LayerSelector,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> list[str]:
        """Qualified names of the modules in the graph matching a layer-type spec and globs."""
        from regfx.select import matches

        selector = parse_types(types)
        inc, exc = tuple(include), tuple(exclude)
        named = dict(model.named_modules())
        return [
            name
            for name in self._calls
            if name in named and matches(name, named[name], selector, inc, exc)
        ]

    # -- dataflow queries -------------------------------------------------------------------

    def consumers(self, node: str) -> list[str]:
        """Nodes that use the value of ``node``, excluding shape/metadata reads."""
        return [
            s for s in self.nx.successors(node) if self.nx.nodes[s].get("op") not in SHAPE_OPS
        ]

    def producers(self, node: str) -> list[str]:
        """Nodes whose values ``node`` consumes."""
        return list(self.nx.predecessors(node))

    def _is_chain_member(self, node: str, model: nn.Module | None) -> bool:
        data = self.nx.nodes[node]
        op = data.get("op")
        if op in ACTIVATION_OPS or op in NORM_OPS:
            return True
        if data.get("module") is not None and model is not None:
            mod = _get(model, data["module"])
            return mod is not None and (is_norm(mod) or is_activation_module(mod))
        return False

    def solo_chain(self, node: str, model: nn.Module | None = None) -> list[str]:
        """The norm/activation nodes that solely consume ``node``'s output, in order.

        For ``conv -> bn -> relu`` (each the only consumer of the previous) this is
        ``[bn, relu]``. The chain stops at the first node with several consumers, or whose
        consumer is not a norm or an activation. ``model`` is needed to tell norm and
        activation modules apart from other module calls.
        """
        chain: list[str] = []
        current = node
        while True:
            nxt = self.consumers(current)
            if len(nxt) != 1 or not self._is_chain_member(nxt[0], model):
                return chain
            if len(self.producers(nxt[0])) != 1 and self.nx.nodes[nxt[0]].get("op") not in NORM_OPS:
                return chain
            chain.append(nxt[0])
            current = nxt[0]

    def dropout_follows(self, node: str, model: nn.Module | None = None) -> bool:
        """True when a dropout (op or module) consumes ``node``'s output or its solo chain's."""
        ends = [node, *self.solo_chain(node, model)]
        for end in ends:
            for succ in self.consumers(end):
                data = self.nx.nodes[succ]
                if data.get("op") in DROPOUT_OPS:
                    return True
                if data.get("module") is not None and model is not None:
                    mod = _get(model, data["module"])
                    if mod is not None and is_dropout_module(mod):
                        return True
        return False

    def reaches_output(self, node: str, model: nn.Module | None = None) -> bool:
        """True when ``node``'s value is a model output directly or through reshapes,
        activations, norms and dropout only (no further layer or arithmetic in between)."""
        cached = self._reach_cache.get(node)
        if cached is not None:
            return cached
        seen = {node}
        stack = [node]
        found = False
        while stack and not found:
            cur = stack.pop()
            for succ in self.consumers(cur):
                data = self.nx.nodes[succ]
                op = data.get("op")
                if op == "output":
                    found = True
                    break
                transparent = (
                    op in RESHAPE_OPS or op in ACTIVATION_OPS or op in DROPOUT_OPS
                    or op in NORM_OPS or self._is_chain_member(succ, model)
                    or (data.get("module") is not None and model is not None
                        and is_dropout_module(_get(model, data["module"]) or nn.Module()))
                )
                if transparent and succ not in seen:
                    seen.add(succ)
                    stack.append(succ)
        self._reach_cache[node] = found
        return found

    def residual_adds(self) -> list[str]:
        """Add nodes joining a value with a branch computed from that same value.

        ``out = x + f(x)``: one input of the add is an ancestor of the other; or the shortcut
        is a short projection of it (``out = f(x) + downsample(x)``, up to
        ``shortcut_depth`` nodes between ``x`` and the add).
        """
        found = []
        for nid, _ in self.op_nodes(*ADD_OPS):
            preds = [p for p in self.producers(nid) if self.nx.nodes[p].get("op") != "get_attr"]
            if len(preds) < 2:
                continue
            if any(self._is_shortcut(a, b) for a in preds for b in preds if a != b):
                found.append(nid)
        return found

    def _is_shortcut(self, shortcut: str, branch: str, shortcut_depth: int = 3) -> bool:
        frontier = [shortcut]
        for _ in range(shortcut_depth + 1):
            nxt = []
            for node in frontier:
                if nx.has_path(self.nx, node, branch):
                    return True
                nxt.extend(self.producers(node))
            frontier = nxt
            if not frontier:
                return False
        return False

    def region_of(self, node: str) -> str | None:
        """The traced region holding ``node`` (a module's qualified name, '' for the root)."""
        return self.nx.nodes[node].get("region")

    def summary(self) -> dict[str, Any]:
        """Counts used by ``regfx show``: nodes, module calls, op nodes, traced and opaque."""
        n_mod = sum(1 for _ in self.module_nodes())
        return {
            "nodes": self.nx.number_of_nodes(),
            "edges": self.nx.number_of_edges(),
            "module_calls": n_mod,
            "ops": self.nx.number_of_nodes() - n_mod,
            "traced_modules": len(self.traced),
            "opaque_modules": len(self.opaque),
        }


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None
