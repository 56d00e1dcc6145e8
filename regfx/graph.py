"""ModelGraph: the traced dataflow of a model as a networkx DiGraph, and the queries on it.

Nodes are module calls and ops. A module-call node has the attributes ``module`` (qualified
name), ``module_type`` (class name), ``call_index`` (0 for the first call of that module in the
graph, 1 for the second, ...), ``opaque`` (True when the call was neither traced nor observed,
so its surroundings are unknown), ``called`` (False for a layer that did not run in the observed
forward, None where that is unknown) and ``owner`` (the qualified name of the module whose
forward makes the call, None when no traced or observed forward does). An op node has
``module=None``, ``op`` (``add``, ``relu``, ``dropout``, ``view``, ``input``, ``output``, ...),
``owner`` and ``opaque``; an op that reads a layer's parameter directly
(``F.linear(x, self.qkv.weight)``) lists that layer in ``uses``. Nodes stitched from a symbolic
trace carry ``fx_name`` and ``owner_spec`` (the owner's call-site specialization); nodes from the
observed forward carry ``observed=True``.

Every node has a ``role``, computed once at trace time (:func:`assign_roles`): a layer word
(``linear``, ``conv``, ``embedding``, ``attention``, ``rnn``), ``norm``, ``activation``,
``dropout`` (with ``p``), ``residual_add``, ``attention`` (also the attention op and the softmax
of a q·kᵀ product), ``input``, ``output``, ``reshape`` and ``elementwise`` (transparent ops),
``combine`` (add/sum/mean/cat that is not a residual), ``matmul``, ``param`` (a parameter read),
``metadata`` (shape reads), ``opaque`` (a call that neither traced nor ran) or ``other``
(:data:`ROLES`).

One walk API, parametrized by roles, answers every question about the dataflow around a node;
placement, the audit's rules and attribution and the renderers all use it:
:meth:`ModelGraph.follow` (the solo consumers of a node through these roles) and
:meth:`ModelGraph.walk` (the nodes of these roles reached, forward or backward, through only
those roles; :meth:`ModelGraph.reaches` is its forward, first-found form).

Edges are dataflow: ``u -> v`` when a value produced by ``u`` is an argument of ``v``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import nn

from regfx.select import LayerSelector, layer_word, parse_types

__all__ = ["ModelGraph", "ACTIVATION_OPS", "NORM_OPS", "RESHAPE_OPS", "DROPOUT_OPS", "assign_roles",
           "OUTPUT_TRANSPARENT", "CHAIN_ROLES", "LAYER_ROLES", "ROLES"]

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
        "narrow", "movedim", "swapaxes", "interpolate", "upsample", "upsample_nearest2d",
        "upsample_bilinear2d", "pad", "pixel_shuffle", "pixel_unshuffle", "roll", "flip",
        "unbind", "tensor_split", "select", "index_select", "squeeze_", "unsqueeze_", "T", "mT",
        "repeat", "tile", "repeat_interleave", "expand_as", "adaptive_avg_pool2d", "avg_pool2d",
        "max_pool2d", "adaptive_avg_pool1d", "adaptive_max_pool2d", "avg_pool1d", "max_pool1d",
        "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
        "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "max_pool2d_with_indices",
        "type", "double", "cpu", "cuda",
    }
)
ELEMENTWISE_OPS = frozenset(
    {
        "mul", "mul_", "imul", "div", "div_", "truediv", "sub", "sub_", "neg", "clamp", "clamp_",
        "clip", "exp", "log", "pow", "abs", "sqrt", "rsqrt", "where", "masked_fill", "masked_fill_",
        "scale", "floordiv", "tanh", "sign", "square", "reciprocal", "nan_to_num", "log1p",
        "expm1", "erf", "sin", "cos", "fill_", "zero_", "copy_", "setitem", "addcmul", "lerp",
    }
)
COMBINE_OPS = frozenset({"add", "iadd", "add_", "sum", "mean", "cat", "concat", "concatenate",
                         "stack", "hstack", "vstack", "amax", "max", "logsumexp"})
MATMUL_OPS = frozenset({"matmul", "bmm", "baddbmm", "einsum", "mm"})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward",
                           "flash_attention_forward", "sdpa_attention_forward"})
_FUNCTIONAL_LAYERS = {"linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
                      "conv_transpose1d": "conv", "conv_transpose2d": "conv",
                      "conv_transpose3d": "conv", "embedding": "embedding", "addmm": "linear"}
LAYER_ROLES = frozenset({"linear", "conv", "embedding", "attention", "rnn"})
"""Roles of nodes that compute with weights of their own (a walk through them stops)."""
ROLES = frozenset({"linear", "conv", "embedding", "attention", "rnn", "norm", "activation",
                   "dropout", "residual_add", "input", "output", "reshape", "elementwise",
                   "combine", "matmul", "param", "metadata", "opaque", "other"})
"""Every role a node can have (a walk with ``target=ROLES`` lets ``accept`` alone decide)."""
CHAIN_ROLES = frozenset({"norm", "activation"})
# rotary embeddings (q * cos + rotate_half(q) * sin) look like residual adds
_ATTENTION_PATH = frozenset({"reshape", "elementwise", "combine", "residual_add"})
"""The roles of a layer's block chain (``conv -> bn -> relu``)."""
OUTPUT_TRANSPARENT = frozenset({"reshape", "elementwise", "activation", "norm", "dropout",
                                "combine", "residual_add"})
"""Roles that pass a value on to a model output unchanged in kind: a layer whose value reaches
an output through only these is an output layer. Residual adds count only when their shortcut is
a projection (two heads summed look like one); an identity residual ``x + f(x)`` stops the walk."""
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
            output; empty when the model did not run.
        observed: qualified name -> why its forward did not trace symbolically, for the
            modules whose dataflow comes from the observed forward instead.
        inputs: the example inputs the model ran on and where they came from (one line), or
            None when it did not run.
        observe_error: why the model did not run (no inputs, or the forward failed), or None.
    """

    nx: nx.DiGraph
    model_type: str
    opaque: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)
    output_layers: frozenset[str] = frozenset()
    observed: dict[str, str] = field(default_factory=dict)
    inputs: str | None = None
    observe_error: str | None = None
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
        """True when every forward of the model traced or was observed (no opaque region)."""
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

    def role(self, node: str) -> str:
        """The role of ``node`` (see the module docstring)."""
        return str(self.nx.nodes[node].get("role", "other"))

    def _value_producers(self, node: str) -> list[str]:
        return [p for p in self.nx.predecessors(node)
                if self.nx.nodes[p].get("role") not in ("param", "metadata")]

    # -- the walk API: every graph walk of regfx goes through these ------------------------

    def follow(self, node: str, through: Iterable[str]) -> list[str]:
        """The solo consumers of ``node`` whose roles are in ``through``, in order.

        Each step takes the only consumer of the current node, when its role is in
        ``through`` and the current node is its only value input (parameter reads do not
        count). For ``conv -> bn -> relu`` with ``through=CHAIN_ROLES`` this is ``[bn, relu]``.
        """
        roles = frozenset(through)
        chain: list[str] = []
        current = node
        while True:
            nxt = self.consumers(current)
            if len(nxt) != 1 or self.role(nxt[0]) not in roles:
                return chain
            if len(self._value_producers(nxt[0])) != 1:
                return chain
            chain.append(nxt[0])
            current = nxt[0]

    def walk(self, node: str, through: Iterable[str], target: Iterable[str] = ("output",), *,
             direction: str = "forward", accept: Callable[[str], bool] | None = None,
             enter: Callable[[str], bool] | None = None, collect_all: bool = False,
             mark: Callable[[str], bool] | None = None) -> dict[str, bool]:
        """The nodes with a role in ``target`` reached from ``node`` through ``through`` roles.

        A depth-first walk from ``node`` (itself not tested) over the dataflow edges:
        consumers for ``direction="forward"``, producers for ``"backward"``. Each node reached
        is a *target* when its role is in ``target`` and ``accept`` (an optional predicate on
        node ids) takes it: the walk records it and goes no further there. Otherwise the walk
        goes on through it when its role is in ``through`` and ``enter`` (an optional
        predicate, for a caller that passes only some nodes of a role) takes it, and stops
        there when not. Metadata reads (``x.size()``) and parameter reads are roles like any
        other (``metadata``, ``param``), so a walk enters them only when asked to.

        Returns the targets found, in the order found, each mapped to whether some path to it
        went through a node for which ``mark`` holds (always False without ``mark``): only
        the first target unless ``collect_all``.

        Example: the layers whose output a dropout drops are
        ``walk(drop, {"activation", "norm", "reshape", ...}, ROLES, direction="backward",
        accept=is_layer, collect_all=True)``.
        """
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        step = self.nx.successors if direction == "forward" else self.nx.predecessors
        roles, targets = frozenset(through), frozenset(target)
        found: dict[str, bool] = {}
        stack = [(n, False) for n in step(node)]
        seen: set[tuple[str, bool]] = set()
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            cur, marked = state
            role = self.role(cur)
            if role in targets and (accept is None or accept(cur)):
                found[cur] = found.get(cur, False) or marked
                if not collect_all:
                    return found
            elif role in roles and (enter is None or enter(cur)):
                now = marked or (mark is not None and mark(cur))
                stack.extend((n, now) for n in step(cur))
        return found

    def reaches(self, node: str, through: Iterable[str], target: Iterable[str] = ("output",),
                accept: Callable[[str], bool] | None = None) -> str | None:
        """The first node with a role in ``target`` reached from ``node`` through ``through``.

        A depth-first walk over consumers (:meth:`walk` forward) that enters only nodes whose
        role is in ``through`` (or in ``target``, where it stops). ``accept`` (a predicate on
        node ids) can refuse a target node. Returns the node found, or None.
        """
        return next(iter(self.walk(node, through, target, accept=accept)), None)

    def solo_chain(self, node: str, model: nn.Module | None = None) -> list[str]:
        """The norm/activation nodes that solely consume ``node``'s output, in order.

        For ``conv -> bn -> relu`` (each the only consumer of the previous) this is
        ``[bn, relu]``. ``model`` is accepted for compatibility and not needed: roles are
        computed at trace time.
        """
        return self.follow(node, CHAIN_ROLES)

    def dropout_follows(self, node: str, model: nn.Module | None = None) -> bool:
        """True when a dropout with p > 0 (or an unknown p) takes ``node``'s value on its way
        to the next layer: directly, after its norm/activation chain, or after reshapes."""
        def real(n: str) -> bool:
            p = self.nx.nodes[n].get("p")
            return p is None or p > 0
        return self.reaches(node, CHAIN_ROLES | {"reshape"}, ("dropout",), accept=real) is not None

    def feeds_attention(self, node: str) -> bool:
        """True when ``node``'s value becomes a query, key or value of an attention.

        Through reshapes, elementwise ops and combinations (rotary embeddings, head splits), the
        value reaches the attention op (``scaled_dot_product_attention``,
        ``nn.MultiheadAttention``), or a q·kᵀ product that a softmax over attention scores
        consumes, or it is multiplied by the attention probabilities (the value).
        """
        def attention_input(n: str) -> bool:
            if self.role(n) == "attention":
                return True
            if self.reaches(n, _ATTENTION_PATH, ("attention",)) is not None:
                return True  # q·kᵀ: the scores go on to the softmax
            return any(self.role(p) == "attention" or self.walk(
                p, {"dropout", "reshape", "elementwise"}, ("attention",), direction="backward")
                for p in self.producers(n))  # probabilities · v
        return self.reaches(node, _ATTENTION_PATH, ("attention", "matmul"),
                            accept=attention_input) is not None

    def reaches_output(self, node: str, model: nn.Module | None = None) -> bool:
        """True when ``node``'s value reaches a model output through only transparent roles
        (:data:`OUTPUT_TRANSPARENT`: reshapes, interpolation, activations, norms, dropout,
        elementwise ops, add/sum/mean/cat, and adds of two short branches such as summed
        heads; never the add of a residual stream, ``x + f(x)``, where dropout on ``f`` does
        not zero the output)."""
        cached = self._reach_cache.get(node)
        if cached is None:
            cached = bool(self.walk(node, OUTPUT_TRANSPARENT, ("output",), enter=self._not_identity_add))
            self._reach_cache[node] = cached
        return cached

    def _not_identity_add(self, node: str) -> bool:
        return self.nx.nodes[node].get("shortcut") != "identity"

    def functional_uses(self, module: str) -> list[str]:
        """Op nodes that read a parameter of ``module`` directly (``F.linear(x, m.weight)``)."""
        return [n for n, d in self.nx.nodes(data=True) if module in d.get("uses", ())]

    def residual_adds(self) -> list[str]:
        """Add nodes joining a value with a branch computed from that same value.

        ``out = x + f(x)``: one input of the add is an ancestor of the other; or the shortcut
        is a short projection of it (``out = f(x) + downsample(x)``). Their role is
        ``residual_add``.
        """
        return [n for n, d in self.nx.nodes(data=True) if d.get("role") == "residual_add"]

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


_ROLE_OF_WORD = {"linear": "linear", "conv": "conv", "embedding": "embedding",
                 "attention": "attention", "rnn": "rnn", "norm": "norm"}
_RESHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle,
                    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                    nn.modules.pooling._LPPoolNd)


def module_role(module: nn.Module) -> tuple[str, dict[str, Any]]:
    """The role of a call of ``module`` and extra attributes (``p`` for dropout)."""
    word = layer_word(module)
    if word is not None:
        return _ROLE_OF_WORD[word], {"word": word}
    if is_dropout_module(module):
        p = getattr(module, "p", None)
        if p is None:
            p = getattr(module, "drop_prob", None)
        return "dropout", {"p": float(p) if isinstance(p, (int, float)) else None,
                           "drop_path": not isinstance(module, _DROPOUT_MODULES)}
    if is_activation_module(module):
        return "activation", {}
    if isinstance(module, _RESHAPE_MODULES):
        return "reshape", {}
    return "other", {}


def op_role(op: str | None) -> str:
    """The role of an op node named ``op``."""
    if op in ("input", "output"):
        return str(op)
    if op == "get_attr":
        return "param"
    if op in SHAPE_OPS:
        return "metadata"
    if op in DROPOUT_OPS:
        return "dropout"
    if op in ATTENTION_OPS:
        return "attention"
    if op in NORM_OPS:
        return "norm"
    if op in ACTIVATION_OPS:
        return "activation"
    if op in _FUNCTIONAL_LAYERS:
        return _FUNCTIONAL_LAYERS[op]
    if op in RESHAPE_OPS:
        return "reshape"
    if op in COMBINE_OPS:
        return "combine"
    if op in ELEMENTWISE_OPS:
        return "elementwise"
    if op in MATMUL_OPS:
        return "matmul"
    return "other"


def assign_roles(g: nx.DiGraph, modules: dict[str, nn.Module]) -> None:
    """Give every node of a freshly traced graph its ``role`` (and ``uses`` for functional
    parameter reads). Called once, by :func:`regfx.trace`."""
    owners: dict[str, str] = {}
    for name, mod in modules.items():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{name}.{pname}" if name else pname] = name
        if hasattr(mod, "parametrizations"):
            for tname in mod.parametrizations:  # type: ignore[union-attr]
                owners[f"{name}.{tname}" if name else tname] = name
    for _nid, data in g.nodes(data=True):
        name = data.get("module")
        if name is not None:
            called = modules.get(name)
            role, extra = module_role(called) if called is not None else ("other", {})
            if data.get("opaque") and role == "other":
                role = "opaque"
            data["role"] = role
            for k, v in extra.items():
                data.setdefault(k, v)
        else:
            data["role"] = op_role(data.get("op"))
    # functional uses: a parameter read (get_attr) feeding an op, or an observed op's params
    for nid, data in list(g.nodes(data=True)):
        if data["role"] == "param":
            owner = owners.get(str(data.get("attr")))
            if owner is not None:
                for succ in g.successors(nid):
                    g.nodes[succ]["uses"] = (*g.nodes[succ].get("uses", ()), owner)
        elif data.get("module") is None and data.get("params"):
            used = tuple(dict.fromkeys(owners[p] for p in data["params"] if p in owners))
            if used:
                data["uses"] = used
    # Nodes are created in execution order and edges only point to later nodes, so creation
    # order is a topological order: a search for an ancestor never needs to look before it.
    order = {n: i for i, n in enumerate(g.nodes)}
    for nid, data in g.nodes(data=True):
        shortcut = _residual_shortcut(g, nid, order) if data.get("op") in ADD_OPS else None
        if shortcut is not None:
            data["role"] = "residual_add"
            data["shortcut"] = shortcut
        elif data.get("op") in ("softmax", "_softmax") and _follows_matmul(g, nid):
            data["role"] = "attention"


def _residual_shortcut(g: nx.DiGraph, node: str, order: dict[str, int], shortcut_depth: int = 3,
                       branch_limit: int = 2048) -> str | None:
    """``"identity"`` for an add of a value and a branch computed from it (``x + f(x)``),
    ``"projection"`` for an add of two branches from one value, one of them short
    (``f(x) + downsample(x)``, or two heads summed), None for any other add.

    Shape reads do not count as dataflow (``x + pos_embed(arange(x.size(1)))`` is no residual).
    The branch is searched backwards for at most ``branch_limit`` nodes, so the cost per add is
    bounded and a deep stack of residual blocks stays linear in depth.
    """
    preds = [p for p in g.predecessors(node) if g.nodes[p].get("role") not in _NOT_DATAFLOW]
    if len(preds) < 2:
        return None
    if any(b != a and _bounded_search(g, b, {a}, order, branch_limit) for a in preds for b in preds):
        return "identity"
    for a in preds:
        shortcut = {a}
        frontier = [a]
        for _ in range(shortcut_depth):
            frontier = [p for n in frontier for p in _value_inputs(g, n)]
            shortcut.update(frontier)
        if any(b != a and _bounded_search(g, b, shortcut, order, branch_limit) for b in preds):
            return "projection"
    return None


_NOT_DATAFLOW = frozenset({"param", "metadata"})


def _value_inputs(g: nx.DiGraph, node: str) -> list[str]:
    return [p for p in g.predecessors(node) if g.nodes[p].get("role") not in _NOT_DATAFLOW]


def _bounded_search(g: nx.DiGraph, start: str, targets: set[str], order: dict[str, int],
                    limit: int) -> bool:
    """True when a node of ``targets`` is ``start`` or one of its first ``limit`` ancestors.

    Ancestors created before every target cannot lead to one and are not explored."""
    if start in targets:
        return True
    floor = min(order.get(t, 0) for t in targets)
    seen = {start}
    queue = [start]
    i = 0
    while i < len(queue) and len(seen) < limit:
        for p in _value_inputs(g, queue[i]):
            if p in targets:
                return True
            if p not in seen and order.get(p, 0) > floor:
                seen.add(p)
                queue.append(p)
        i += 1
    return False


def _follows_matmul(g: nx.DiGraph, node: str, depth: int = 4) -> bool:
    """A softmax over a q·kᵀ product (through masks, scaling and reshapes)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for p in g.predecessors(n):
                op = g.nodes[p].get("op")
                if op in MATMUL_OPS:
                    return True
                if op in ELEMENTWISE_OPS or op in RESHAPE_OPS or op in COMBINE_OPS:
                    nxt.append(p)
        frontier = nxt
    return False
