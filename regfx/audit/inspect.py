"""What is regularized: one record per parameter, read from any model and optimizer. Pure.

Nothing here runs the model or computes a parametrized weight (that would advance spectral
norm's power iteration in training mode); shapes come from the stored tensors.

Regularizers found, by kind:

- ``dropout`` / ``drop_path``: dropout modules (``nn.Dropout*``, ``AlphaDropout``, DropPath- and
  StochasticDepth-style modules) and ``F.dropout`` calls seen in the traced graph, attributed to
  the layer whose output they drop: the nearest layer upstream through activations, norms,
  pooling, reshapes, additions and products (:data:`DROPPED_THROUGH`). Dropout inside a module
  whose forward did not trace is attributed to the layer defined just before it
  (``"inferred": true``). Dropout that regfx inserted is attributed to the layer it is attached
  to; the ``dropout`` argument of ``nn.MultiheadAttention`` and of RNNs to that layer.
- ``weight_norm``, ``spectral_norm``, ``orthogonal``, ``parametrization``: torch
  parametrizations, and the deprecated hook-based ``weight_norm``/``spectral_norm``
  (``"deprecated": true``).
- ``l1``, ``l2``: penalties attached by :func:`regfx.transform`.
- ``weight_decay``: the optimizer's weight decay for the group holding the parameter, with
  ``"decoupled"`` true for AdamW-style decay and false for coupled L2 (Adam, SGD...).
"""

from __future__ import annotations

import functools
import inspect as _pyinspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from regfx.distributed import fsdp_base_class
from regfx.graph import (
    DROPOUT_OPS,
    RESHAPE_OPS,
    ROLES,
    ModelGraph,
    is_activation_module,
    is_dropout_module,
)
from regfx.select import is_inserted_path, is_linear_like, is_norm, is_weight_like, layer_word
from regfx.transforms.norms import norm_kind_of
from regfx.transforms.penalty import penalized_parameters

__all__ = ["ParamRecord", "DropoutUse", "OptimizerInfo", "inspect_model", "module_class_name",
           "definition_site", "KINDS", "NORM_KINDS"]

KINDS = ("dropout", "drop_path", "weight_norm", "spectral_norm", "orthogonal", "parametrization",
         "l1", "l2", "weight_decay")
NORM_KINDS = ("weight_norm", "spectral_norm", "orthogonal")

DROPPED_THROUGH = frozenset({"activation", "norm", "dropout", "reshape", "residual_add",
                             "combine", "elementwise"})
"""The roles through which a dropout drops a layer's output (upstream of the dropout):
activations, norms, other dropout, reshapes and pooling, and of the ``combine`` and
``elementwise`` roles only additions and products (:data:`DROPPED_THROUGH_OPS`): a dropout after
a concatenation or a reduction is not attributed through it."""
DROPPED_THROUGH_OPS = frozenset({"add", "iadd", "add_", "mul", "imul"})
# Reshapes after which a conv feature map is no longer one (dtype casts and copies keep it).
_FLATTENING_OPS = RESHAPE_OPS - {"contiguous", "float", "to", "type_as", "half", "bfloat16",
                                 "clone", "detach"}
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop",
                       "Adadelta", "SparseAdam", "Adafactor")


@dataclass
class ParamRecord:
    """One logical parameter of a model and what regularizes it.

    Attributes:
        name: logical qualified name (``conv.weight``, never ``...parametrizations...``).
        module: qualified name of the module owning it.
        module_type: class name of that module (torch's and regfx's generated subclasses seen
            through).
        layer_type: layer-type word of the module (``linear``, ``conv``, ``norm``...) or None.
        shape, numel: of the logical parameter (``[]`` and 0 while a lazy layer's parameter is
            uninitialized; ``initialized`` is then False).
        trainable: ``requires_grad`` of the stored tensor(s).
        aliases: other logical names of the same tensor (tied weights).
        regularizers: one dict per regularizer, ``{"kind": ..., ...}`` in a stable order.
        tensors: the stored tensors (a weight-normed weight has two); not serialized.
    """

    name: str
    module: str
    module_type: str
    layer_type: str | None
    shape: list[int]
    numel: int
    trainable: bool
    aliases: list[str] = field(default_factory=list)
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False)
    initialized: bool = True

    @property
    def regularized(self) -> bool:
        """True when at least one regularizer applies."""
        return bool(self.regularizers)

    @property
    def is_bias(self) -> bool:
        """True for a parameter named ``bias``."""
        return self.name.rsplit(".", 1)[-1] == "bias"

    def kinds(self) -> set[str]:
        """The kinds of its regularizers (``{"dropout", "weight_decay"}``)."""
        return {r["kind"] for r in self.regularizers}

    def to_dict(self) -> dict[str, Any]:
        """The record as it appears under ``params`` in the JSON report."""
        out = {
            "name": self.name, "module": self.module, "module_type": self.module_type,
            "layer_type": self.layer_type, "shape": list(self.shape), "numel": self.numel,
            "trainable": self.trainable, "aliases": list(self.aliases),
            "regularizers": [dict(r) for r in self.regularizers],
        }
        if not self.initialized:
            out["initialized"] = False
        return out


@dataclass
class DropoutUse:
    """One dropout (module call or functional op) and the layers whose output it drops.

    ``layers`` holds ``(layer name, flattened)`` where ``flattened`` tells that a reshape lies
    between the layer and the dropout (a conv output is then no longer a feature map).
    ``how`` is ``graph``, ``inserted`` (regfx's own), ``built-in`` (the ``dropout`` argument of
    ``MultiheadAttention`` and RNNs), ``definition order`` or ``unattributed``.
    """

    node: str | None
    module: str | None
    kind: str
    variant: str
    p: float | None
    owner: str | None
    layers: list[tuple[str, bool]]
    how: str

    @property
    def label(self) -> str:
        """How reports name this dropout: the module, or ``owner:F.dropout`` for a call."""
        if self.variant == "scaled_dot_product_attention":
            return f"{self.owner or '(root)'}:F.scaled_dot_product_attention(dropout_p)"
        if self.how == "built-in":
            return _join(self.module or "", "dropout")
        if self.module is not None and self.node is None and self.how == "definition order":
            return _join(self.module, self.variant)  # an attention module's dropout attribute
        if self.module is not None:
            return self.module
        return f"{self.owner or '(root)'}:F.{self.variant}"


@dataclass
class OptimizerInfo:
    """The optimizer class and its groups: ``weight_decay``, ``decoupled``, parameter count."""

    type: str
    adaptive: bool
    groups: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The ``optimizer`` block of the JSON report."""
        return {"type": self.type, "adaptive": self.adaptive, "groups": list(self.groups)}


def module_class_name(module: nn.Module) -> str:
    """The user's class name of ``module``: parametrize's and regfx's subclasses seen through."""
    return _user_class(module).__name__


def _user_class(module: nn.Module) -> type:
    cls = type(module)
    while True:
        base = cls.__dict__.get("_regfx_base")
        if base is not None:
            cls = base
            continue
        base = fsdp_base_class(cls)  # fully_shard's FSDP<Class>
        if base is not None:
            cls = base
            continue
        if cls.__name__.startswith("Parametrized") and cls.__bases__ and \
                cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
            cls = cls.__bases__[0]
            continue
        return cls


def _logical(name: str, owner_names: dict[str, nn.Module]) -> tuple[str, str]:
    """``(module name, attribute)`` of the logical parameter stored under ``name``."""
    parts = name.split(".")
    if "parametrizations" in parts:
        i = parts.index("parametrizations")
        return ".".join(parts[:i]), parts[i + 1]
    module_name, attr = ".".join(parts[:-1]), parts[-1]
    module = owner_names.get(module_name)
    if module is not None:
        for hook in module._forward_pre_hooks.values():
            hname = getattr(hook, "name", None)
            cls = type(hook).__name__
            if cls == "WeightNorm" and attr in (f"{hname}_g", f"{hname}_v"):
                return module_name, str(hname)
            if cls == "SpectralNorm" and attr == f"{hname}_orig":
                return module_name, str(hname)
    return module_name, attr


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _norm_regularizers(module: nn.Module, attr: str) -> list[dict[str, Any]]:
    kind = norm_kind_of(module, attr)
    if kind is None:
        return []
    out: list[dict[str, Any]] = []
    if kind.endswith("(deprecated hook)"):
        base = kind.split(" ")[0]
        entry: dict[str, Any] = {"kind": base, "deprecated": True}
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "name", None) == attr:
                if base == "spectral_norm":
                    entry["n_power_iterations"] = int(getattr(hook, "n_power_iterations", 1))
                else:
                    entry["dim"] = getattr(hook, "dim", 0)
        return [entry]
    plist = module.parametrizations[attr]  # type: ignore[index]
    for part, p in zip(kind.split("+"), plist, strict=False):
        entry = {"kind": part}
        if part == "spectral_norm":
            entry["n_power_iterations"] = int(getattr(p, "n_power_iterations", 1))
        elif part == "weight_norm":
            entry["dim"] = getattr(p, "dim", 0)
        elif part == "parametrization":
            entry["class"] = type(p).__name__
        out.append(entry)
    return out


def _shape_of(tensors: list[torch.Tensor]) -> list[int] | None:
    """The logical shape: that of the largest stored tensor; None for lazy (uninitialized) ones."""
    lazy = nn.parameter.UninitializedTensorMixin  # type: ignore[attr-defined]
    if any(isinstance(t, lazy) for t in tensors):
        return None
    biggest = max(tensors, key=lambda t: t.numel())
    return list(biggest.shape)


# -- dropout attribution ----------------------------------------------------------------------


def _layer_of(model_modules: dict[str, nn.Module], name: str) -> bool:
    """True when the module named ``name`` is a layer with parameters of its own (not a norm)."""
    mod = model_modules.get(name)
    if mod is None or is_norm(mod):
        return False
    if layer_word(mod) is not None and layer_word(mod) != "norm":
        return True
    own = any(True for _ in mod.parameters(recurse=False))
    return own or parametrize.is_parametrized(mod)


def _trace_back(graph: ModelGraph, modules: dict[str, nn.Module], start: str) -> list[tuple[str, bool]]:
    """Layers whose output reaches ``start`` through :data:`DROPPED_THROUGH` roles only, each
    with whether a flattening reshape lies on the way."""
    def is_layer(node: str) -> bool:
        name = graph.nx.nodes[node].get("module")
        return name is not None and _layer_of(modules, name)

    def flattens(node: str) -> bool:
        data = graph.nx.nodes[node]
        name = data.get("module")
        if name is not None:
            return isinstance(modules.get(name), nn.Flatten)
        return data.get("op") in _FLATTENING_OPS

    def passes(node: str) -> bool:
        return graph.role(node) not in ("combine", "elementwise") \
            or graph.nx.nodes[node].get("op") in DROPPED_THROUGH_OPS

    found = graph.walk(start, DROPPED_THROUGH, ROLES, direction="backward", accept=is_layer,
                       enter=passes, collect_all=True, mark=flattens)
    return sorted((graph.nx.nodes[n]["module"], flat) for n, flat in found.items())


def _definition_order_layer(model: nn.Module, name: str) -> str | None:
    """The layer defined just before ``name`` among its siblings (skipping dropouts and norms),
    descending into a composite sibling to its last layer."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    names = [n for n in parent._modules if not is_inserted_path(n)]
    if child not in names:
        return None
    for sibling in reversed(names[: names.index(child)]):
        mod = parent._modules[sibling]
        if mod is None or is_dropout_module(mod) or is_norm(mod) or is_activation_module(mod):
            continue
        qual = _join(parent_name, sibling)
        if any(True for _ in mod.parameters(recurse=False)) or parametrize.is_parametrized(mod) \
                or layer_word(mod) not in (None, "norm"):
            return qual
        last = None
        for sub_name, sub in mod.named_modules(prefix=qual):
            if not is_inserted_path(sub_name) and not is_norm(sub) \
                    and layer_word(sub) not in (None, "norm"):
                last = sub_name
        if last is not None:
            return last
    return None


def _region_is_opaque(graph: ModelGraph, modules: dict[str, nn.Module], name: str) -> bool:
    """True when the nearest ancestor of ``name`` with a forward of its own did not trace."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:i])
        mod = modules.get(anc)
        if mod is None:
            continue
        if getattr(type(mod).forward, "__name__", "") == "_forward_unimplemented":
            continue  # ModuleList/ModuleDict: the grandparent calls the children
        return anc in graph.opaque or anc not in graph.traced
    return True


def _dropout_p(mod: nn.Module) -> float | None:
    for attr in ("p", "drop_prob", "drop_rate", "rate"):
        v = getattr(mod, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def find_dropout(model: nn.Module, graph: ModelGraph) -> list[DropoutUse]:
    """Every dropout of ``model`` with the layers it regularizes, in a stable order."""
    modules = dict(model.named_modules(remove_duplicate=False))
    uses: list[DropoutUse] = []
    covered: set[str] = set()
    for nid, data in graph.nx.nodes(data=True):
        name = data.get("module")
        if name is not None:
            mod = modules.get(name)
            if mod is None or not is_dropout_module(mod):
                continue
            kind = "dropout" if isinstance(mod, (nn.modules.dropout._DropoutNd,)) else "drop_path"
            variant = module_class_name(mod)
            p = _dropout_p(mod)
            owner = data.get("owner")
            covered.add(name)
            last = name.rsplit(".", 1)[-1]
            if is_inserted_path(last):
                layer = name.rsplit(".", 1)[0] if "." in name else ""
                uses.append(DropoutUse(nid, name, kind, variant, p, owner, [(layer, False)], "inserted"))
                continue
            if graph.producers(nid):
                layers = _trace_back(graph, modules, nid)
                uses.append(DropoutUse(nid, name, kind, variant, p, owner, layers,
                                       "graph" if layers else "unattributed"))
                continue
            if not _region_is_opaque(graph, modules, name):
                continue  # defined but never called by a forward that traced
            layer = _definition_order_layer(model, name)
            uses.append(DropoutUse(nid, name, kind, variant, p, owner,
                                   [(layer, False)] if layer is not None else [],
                                   "definition order" if layer is not None else "unattributed"))
        elif data.get("op") in DROPOUT_OPS:
            p = data.get("p")
            layers = _trace_back(graph, modules, nid)
            uses.append(DropoutUse(nid, None, "dropout", str(data["op"]), p, data.get("owner"),
                                   layers, "graph" if layers else "unattributed"))
        elif data.get("op") == "scaled_dot_product_attention" and (data.get("p") or 0.0) > 0:
            # attention-weight dropout of F.scaled_dot_product_attention(..., dropout_p=p),
            # attributed to the projections producing q, k and v
            layers = _trace_back(graph, modules, nid)
            uses.append(DropoutUse(nid, None, "dropout", "scaled_dot_product_attention",
                                   data.get("p"), data.get("owner"), layers,
                                   "graph" if layers else "unattributed"))
    # Hook-mode regfx dropout inside opaque modules (its module may not be a graph node).
    for name, mod in modules.items():
        if any(getattr(h, "__name__", "") == "dropout_output_hook" for h in mod._forward_hooks.values()):
            drop = mod._modules.get("regfx_dropout")
            full = _join(name, "regfx_dropout")
            if drop is not None and full not in covered:
                uses.append(DropoutUse(None, full, "dropout", module_class_name(drop),
                                       _dropout_p(drop), None, [(name, False)], "inserted"))
    # Dropout built into torch layers: attention-weight dropout, dropout between RNN layers.
    for name, mod in modules.items():
        if isinstance(mod, (nn.MultiheadAttention, nn.RNNBase)) and not is_inserted_path(name):
            p = float(getattr(mod, "dropout", 0.0) or 0.0)
            if p > 0:
                uses.append(DropoutUse(None, name, "dropout", f"{module_class_name(mod)}.dropout", p,
                                       None, [(name, False)], "built-in"))
    # Functional dropout inside forwards that did not trace cannot be seen, and the observed
    # forward runs in eval mode, where attention code passes ``dropout_p=0.0``; attention modules
    # (transformers' and others) keep the training probability in a float attribute such as
    # ``attention_dropout``. Attributed to the projections computing the attention weights.
    seen_attention = {u.owner for u in uses if u.variant == "scaled_dot_product_attention"}
    for name in (*graph.opaque, *graph.observed):
        if name in seen_attention:
            continue
        mod = modules.get(name)
        if mod is None or isinstance(mod, nn.MultiheadAttention) or "attention" not in \
                type(mod).__name__.lower():
            continue
        for attr in _ATTENTION_DROPOUT_ATTRS:
            p = getattr(mod, attr, None) if attr in mod.__dict__ else None
            if isinstance(p, float) and p > 0:
                layers = [(_join(name, child), False) for child, sub in mod.named_children()
                          if is_linear_like(sub) and child not in _OUTPUT_PROJECTIONS]
                if layers:
                    uses.append(DropoutUse(None, name, "dropout", f"{attr}", p, name, layers,
                                           "definition order"))
                break
    uses.sort(key=lambda u: (u.label, u.node or ""))
    return uses


_ATTENTION_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "attention_probs_dropout_prob",
                            "dropout_p", "dropout")
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "output", "out", "proj", "wo")


# -- optimizer --------------------------------------------------------------------------------


def describe_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """Class, adaptivity and per-group decay of ``optimizer``."""
    cls = type(optimizer)
    names = {c.__name__ for c in cls.__mro__}
    adaptive = bool(names & set(ADAPTIVE_OPTIMIZERS))
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        decoupled = bool(group.get("decoupled_weight_decay", False)) or "AdamW" in names
        groups.append({"index": i, "weight_decay": wd, "decoupled": decoupled,
                       "params": len(group["params"])})
    return OptimizerInfo(cls.__name__, adaptive, groups)


# -- the inspection ---------------------------------------------------------------------------


@dataclass
class Inspection:
    """Everything rules need: the records, dropout uses, optimizer and graph."""

    model_type: str
    records: list[ParamRecord]
    dropouts: list[DropoutUse]
    optimizer: OptimizerInfo | None
    optimizer_missing: list[str]
    graph: ModelGraph
    modules: dict[str, nn.Module]
    by_name: dict[str, ParamRecord] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {n: r for r in self.records for n in (r.name, *r.aliases)}

    def record(self, name: str) -> ParamRecord | None:
        """The record listing ``name`` (a logical name or an alias), or None."""
        return self.by_name.get(name)


def inspect_model(model: nn.Module, graph: ModelGraph,
                  optimizer: torch.optim.Optimizer | None = None) -> Inspection:
    """Build the per-parameter records of ``model`` (see the module docstring). Pure."""
    modules = {n: m for n, m in model.named_modules(remove_duplicate=False)}
    records: list[ParamRecord] = []
    by_logical: dict[str, ParamRecord] = {}
    by_tensor: dict[int, ParamRecord] = {}
    alias_of: dict[str, ParamRecord] = {}
    for stored, tensor in model.named_parameters(remove_duplicate=False):
        module_name, attr = _logical(stored, modules)
        if is_inserted_path(module_name):
            continue
        logical = _join(module_name, attr)
        existing = by_tensor.get(id(tensor))
        if logical in by_logical or logical in alias_of:
            rec = by_logical.get(logical) or alias_of[logical]
            if all(t is not tensor for t in rec.tensors):
                rec.tensors.append(tensor)
                by_tensor.setdefault(id(tensor), rec)
            continue
        if existing is not None:
            existing.aliases.append(logical)
            alias_of[logical] = existing
            continue
        module = modules[module_name]
        rec = ParamRecord(name=logical, module=module_name, module_type=module_class_name(module),
                          layer_type=layer_word(module), shape=[], numel=0, trainable=False,
                          tensors=[tensor])
        records.append(rec)
        by_logical[logical] = rec
        by_tensor[id(tensor)] = rec
    for rec in records:
        shape = _shape_of(rec.tensors)
        rec.initialized = shape is not None
        rec.shape = shape or []
        n = 1 if shape is not None else 0
        for s in rec.shape:
            n *= int(s)
        rec.numel = n
        rec.trainable = any(t.requires_grad for t in rec.tensors)

    # Normalizations, per logical name (aliases may differ: one may be normalized, one not).
    for rec in records:
        per_name: dict[str, list[dict[str, Any]]] = {}
        for logical in (rec.name, *rec.aliases):
            module_name, _, attr = logical.rpartition(".")
            per_name[logical] = _norm_regularizers(modules[module_name], attr)
        _merge_scoped(rec, per_name)

    dropouts = find_dropout(model, graph)
    drop_per_layer: dict[str, list[dict[str, Any]]] = {}
    for use in dropouts:
        if use.p == 0.0:
            continue  # does nothing: not a regularizer (rule RFX104 reports it)
        for layer, _flat in use.layers:
            entry: dict[str, Any] = {"kind": use.kind, "p": use.p, "via": use.label}
            if use.how == "definition order":
                entry["inferred"] = True
            drop_per_layer.setdefault(layer, []).append(entry)
    for rec in records:
        per_name = {}
        for logical in (rec.name, *rec.aliases):
            per_name[logical] = [dict(e) for e in drop_per_layer.get(logical.rpartition(".")[0], [])]
        _merge_scoped(rec, per_name)

    state = penalized_parameters(model)
    if state:
        for t in state.get("params", []):
            penalized = by_tensor.get(id(t))
            if penalized is None:
                continue
            for kind in ("l1", "l2"):
                value = float(state.get(kind) or 0.0)
                if value and not any(r["kind"] == kind for r in penalized.regularizers):
                    penalized.regularizers.append({"kind": kind, "value": value})

    info = None
    missing: list[str] = []
    if optimizer is not None:
        info = describe_optimizer(optimizer)
        in_optimizer: set[int] = set()
        for i, group in enumerate(optimizer.param_groups):
            g = info.groups[i]
            for t in group["params"]:
                in_optimizer.add(id(t))
                decayed = by_tensor.get(id(t))
                if decayed is None or not g["weight_decay"]:
                    continue
                if not any(r["kind"] == "weight_decay" for r in decayed.regularizers):
                    decayed.regularizers.append({"kind": "weight_decay", "value": g["weight_decay"],
                                             "decoupled": g["decoupled"], "optimizer": info.type,
                                             "group": i})
        for rec in records:
            if rec.trainable and not any(id(t) in in_optimizer for t in rec.tensors):
                missing.append(rec.name)

    order = {k: i for i, k in enumerate(KINDS)}
    for rec in records:
        rec.regularizers.sort(key=lambda r: (order.get(r["kind"], len(order)), str(r.get("via", ""))))
    return Inspection(type(model).__name__, records, dropouts, info, missing, graph, modules)


def _merge_scoped(rec: ParamRecord, per_name: dict[str, list[dict[str, Any]]]) -> None:
    """Add module-scoped regularizers; mark with ``on`` those only some aliases have."""
    names = list(per_name)
    merged: list[tuple[dict[str, Any], list[str]]] = []
    for logical, entries in per_name.items():
        for entry in entries:
            for existing, on in merged:
                if existing == entry:
                    on.append(logical)
                    break
            else:
                merged.append((entry, [logical]))
    for entry, on in merged:
        out = dict(entry)
        if len(names) > 1 and len(on) < len(names):
            out["on"] = on
        rec.regularizers.append(out)


# -- where a module is defined ----------------------------------------------------------------


def definition_site(model: nn.Module, module_name: str) -> tuple[str, int] | None:
    """``(file, line)`` of the statement defining the module ``module_name``, when known.

    This is the ``self.<attr> = ...`` line in the methods of the parent's class; a
    child of a ``Sequential`` (or another container) points to where the container is defined.
    """
    name = module_name
    while name:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            return None
        cls = _user_class(parent)
        if not attr.isdigit() and cls.__module__.split(".")[0] != "torch":
            return _assignment_site(cls, attr)
        name = parent_name
    return None


@functools.lru_cache(maxsize=4096)
def _assignment_site(cls: type, attr: str) -> tuple[str, int] | None:
    """The first ``self.<attr> = ...`` line in the methods of ``cls`` (``__init__`` first).

    Methods are read through their code objects, so this works for classes from files loaded
    outside ``sys.modules`` (``regfx audit path/to/model.py``).
    """
    pattern = re.compile(rf"self\.{re.escape(attr)}\s*(:[^=]*)?=(?!=)")
    methods = [v for k, v in vars(cls).items() if callable(v) and hasattr(v, "__code__")]
    methods.sort(key=lambda f: f.__name__ != "__init__")
    for fn in methods:
        try:
            lines, start = _pyinspect.getsourcelines(fn)
        except (OSError, TypeError):
            continue
        for offset, line in enumerate(lines):
            if pattern.search(line):
                return (str(Path(fn.__code__.co_filename)), start + offset)
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] in ("torch", "builtins"):
            break
        found = _assignment_site(base, attr)
        if found is not None:
            return found
    return None


def is_weight_of_layer(rec: ParamRecord, modules: dict[str, nn.Module]) -> bool:
    """True for a weight-like parameter (``weight``, ``weight_ih_l0``, ``in_proj_weight``) of a
    linear-like, conv, RNN or attention layer: the parameters penalties select by default."""
    if not is_weight_like(rec.name.rsplit(".", 1)[-1]):
        return False
    mod = modules.get(rec.module)
    return mod is not None and (is_linear_like(mod) or layer_word(mod) in ("conv", "rnn", "attention"))
