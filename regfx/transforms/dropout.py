"""Dropout insertion: plan sites on the ModelGraph, then edit the forwards that hold them.

Inserted dropout is a real ``nn.Module`` attached to the layer it regularizes, as the child
``regfx_dropout`` (``regfx_dropout_1``, ... for further call sites). It has no parameters or
buffers, so it adds no state-dict keys, and it follows ``.train()``/``.eval()``.

In traced regions the forward of the module whose graph holds the site (the *owner*) is
regenerated from the edited graph and bound by swapping the owner's class for a generated
subclass (as ``torch.nn.utils.parametrize`` does), so ``isinstance`` and every method and
attribute of the owner stay. torch.fx specializes ``self.training`` checks at trace time, so
the owner is traced in both modes; when the code differs, the generated forward dispatches on
``self.training``. Inside opaque modules, dropout is applied to the layer's output by a forward
hook that calls the attached module.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import re
import warnings
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch import nn

from regfx.errors import RegfxError, RegfxWarning
from regfx.graph import ModelGraph, is_dropout_module
from regfx.select import is_inserted_path, is_linear_like, select_layers
from regfx.state import ensure_state, state_of
from regfx.trace import TraceCache, shared_fx_patches, tensor_constants, trace_signature

__all__ = ["DropoutSite", "plan_dropout", "apply_dropout", "make_dropout", "remove_dropout",
           "dropout_output_hook", "restore_classes"]

HEAD_NAMES = ("lm_head", "classifier", "head", "score", "qa_outputs", "logits", "output_projection")


@dataclass(frozen=True)
class DropoutSite:
    """One planned dropout: after ``layer``'s call ``call_index``.

    ``mode`` is ``graph`` (edit ``owner``'s forward, traced with the call-site specialization
    ``spec``, after fx node ``fx_name``) or ``hook`` (a forward hook on the layer, at the module
    boundary: used where the owner's forward did not trace). ``anchor`` is the graph node whose
    output is dropped (the layer, or the end of its norm/activation chain).
    """

    layer: str
    call_index: int
    mode: str
    p: float
    module_cls: str
    anchor: str
    owner: str | None = None
    fx_name: str | None = None
    spec: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    @property
    def attr(self) -> str:
        """The name of the inserted dropout child (``regfx_dropout``, ``regfx_dropout_1``...)."""
        return "regfx_dropout" if self.call_index == 0 else f"regfx_dropout_{self.call_index}"

    @property
    def where(self) -> str:
        """Where the dropout goes, for plan tables."""
        if self.mode == "hook":
            return f"output (hook{': ' + self.note if self.note else ''})"
        return f"after {self.anchor}"


def _dropout_cls(module: nn.Module, kind: str) -> type[nn.Module]:
    if kind == "element":
        return nn.Dropout
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        return {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[dims]
    return nn.Dropout


def make_dropout(cls_name: str, p: float) -> nn.Module:
    """Instantiate the dropout class called ``cls_name`` (``Dropout``, ``Dropout2d``...)."""
    return getattr(nn, cls_name)(p=p)


def _likely_heads(model: nn.Module, graph: ModelGraph) -> set[str]:
    """Layers that probably produce the model output when dataflow there is unknown."""
    if graph.output_layers:
        return set(graph.output_layers)
    heads: set[str] = set()
    embed_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    last = None
    for name, mod in model.named_modules():
        if is_inserted_path(name):
            continue
        if any(True for _ in mod.parameters(recurse=False)) and not name.endswith("norm"):
            last = name
        w = getattr(mod, "weight", None)
        if is_linear_like(mod) and id(w) in embed_weights:
            heads.add(name)
        if name.rsplit(".", 1)[-1] in HEAD_NAMES and is_linear_like(mod):
            heads.add(name)
    if last is not None:
        heads.add(last)
    return heads


def _next_sibling_is_dropout(model: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(parent._modules)
    if child not in names:
        return False
    i = names.index(child)
    return i + 1 < len(names) and is_dropout_module(parent._modules[names[i + 1]] or nn.Module())


def _is_under(name: str, owner: str) -> bool:
    return owner == "" or name == owner or name.startswith(owner + ".")


def plan_dropout(
    model: nn.Module, graph: ModelGraph, p: float, after: str, position: str, kind: str,
    include: tuple[str, ...], exclude: tuple[str, ...],
) -> tuple[list[DropoutSite], list[tuple[str, str]]]:
    """Dropout sites for the layers selected by ``after`` and the globs.

    Returns ``(sites, skipped)`` where ``skipped`` holds ``(layer, reason)`` pairs. Pure.
    """
    sites: list[DropoutSite] = []
    skipped: list[tuple[str, str]] = []
    heads: set[str] | None = None
    regenerable: dict[type, str] = {}
    for name, layer in select_layers(model, after, include, exclude):
        calls = graph.calls(name)
        cls_name = _dropout_cls(layer, kind).__name__
        if not calls:
            skipped.append((name, "not called in the traced graph"))
            continue
        first = graph.nx.nodes[calls[0]]
        if all(graph.nx.nodes[c].get("called") is False for c in calls):
            uses = graph.functional_uses(name)
            if uses:
                owner = graph.nx.nodes[uses[0]].get("owner") or "(root)"
                skipped.append((name, f"not called as a module: {owner} uses its weight "
                                      f"functionally ({graph.nx.nodes[uses[0]].get('op')})"))
            else:
                skipped.append((name, _NEVER_RUNS if graph.inputs is None else _DID_NOT_RUN))
            continue
        if first.get("within_layer") is not None:
            skipped.append((name, f"inside layer {first['within_layer'] or '(root)'}, not called"
                                  " on its own"))
            continue
        if first.get("opaque"):
            if heads is None:
                heads = _likely_heads(model, graph)
            if hasattr(layer, "regfx_dropout"):
                skipped.append((name, "dropout already follows"))
            elif name in heads:
                skipped.append((name, "output layer"))
            elif _next_sibling_is_dropout(model, name):
                skipped.append((name, "dropout already follows"))
            else:
                sites.append(DropoutSite(name, 0, "hook", p, cls_name, calls[0]))
            continue
        hook_calls = []
        notes: set[str] = set()
        for nid in calls:
            data = graph.nx.nodes[nid]
            label = f"{name}#{data['call_index']}"
            if data.get("called") is False:
                skipped.append((label, _NEVER_RUNS if graph.inputs is None else _DID_NOT_RUN))
                continue
            consumers = graph.consumers(nid)
            if graph.reaches_output(nid, model) or (not consumers and name in graph.output_layers):
                skipped.append((label, "output layer"))
                continue
            if graph.dropout_follows(nid, model):
                skipped.append((label, "dropout already follows"))
                continue
            if graph.feeds_attention(nid):
                skipped.append((label, "feeds attention; use attention dropout"))
                continue
            if any(graph.nx.nodes[c].get("op") == "getitem" for c in consumers):
                skipped.append((label, "output is a tuple"))
                continue
            if data.get("fx_name") is None or data.get("owner") is None:
                hook_calls.append(nid)
                continue
            reason = _not_regenerable(model, data["owner"], regenerable)
            if reason:
                hook_calls.append(nid)
                notes.add(reason)
                continue
            anchor = nid
            if position == "block":
                for member in graph.solo_chain(nid, model):
                    mdata = graph.nx.nodes[member]
                    owner = mdata.get("owner")
                    if owner is None or not _is_under(name, owner) or mdata.get("fx_name") is None \
                            or mdata.get("owner_spec") != data.get("owner_spec"):
                        break
                    anchor = member
            adata = graph.nx.nodes[anchor]
            sites.append(DropoutSite(name, data["call_index"], "graph", p, cls_name, anchor,
                                     owner=adata.get("owner"), fx_name=adata.get("fx_name"),
                                     spec=tuple(adata.get("owner_spec") or ())))
        if hook_calls:
            # The owner's forward did not trace: the layer's output is dropped by a hook at
            # the module boundary, on every call (so every call must be a site).
            if len(hook_calls) < len([c for c in calls if graph.nx.nodes[c].get("called") is not False]):
                skipped.append((name, "called where dropout does not belong and where it does; "
                                      "its owner's forward did not trace"))
            elif hasattr(layer, "regfx_dropout"):
                skipped.append((name, "dropout already follows"))
            else:
                sites.append(DropoutSite(name, 0, "hook", p, cls_name, hook_calls[0],
                                         note="; ".join(sorted(notes))))
    return sites, skipped


# Calls that checkpoint a block: torch.utils.checkpoint's, timm's checkpoint_seq, transformers'
# Names a forward uses to checkpoint a block: torch.utils.checkpoint's, timm's, transformers'
_CHECKPOINT_NAMES = frozenset({"checkpoint", "checkpoint_seq", "checkpoint_sequential",
                               "_gradient_checkpointing_func"})


def _names_used(cls: type) -> frozenset[str]:
    """Every global and attribute name the methods of ``cls`` (and its bases other than
    ``nn.Module``) use, nested functions included: read from their code objects, which is
    what a forward can reach through ``self`` without parsing any source."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for value in vars(klass).values():
            func = getattr(value, "__func__", value)
            func = getattr(func, "fget", func)
            code = getattr(func, "__code__", None)
            if code is not None:
                names |= _code_names(code)
    return frozenset(names)


def _code_names(code: CodeType) -> set[str]:
    """The global and attribute names ``code`` uses, its nested functions' included."""
    names: set[str] = set()
    codes = [code]
    while codes:
        current = codes.pop()
        names.update(current.co_names)
        codes.extend(c for c in current.co_consts if isinstance(c, CodeType))
    return names


def _not_regenerable(model: nn.Module, owner: str, cache: dict[type, str]) -> str:
    """Why ``owner``'s forward must not be regenerated, or "".

    A forward that uses gradient checkpointing (``torch.utils.checkpoint``, timm's
    ``checkpoint_seq``, transformers' ``_gradient_checkpointing_func``) would lose it: torch.fx
    traces through the checkpoint call and fixes the flag that switches it. Sites there are
    edited at module boundaries instead.
    """
    mod = model.get_submodule(owner) if owner else model
    cls = type(mod).__dict__.get("_regfx_base", type(mod))
    found = cache.get(cls)
    if found is None:
        found = ""
        # the whole class: a forward may checkpoint through a helper method
        if _names_used(cls) & _CHECKPOINT_NAMES:
            found = f"{cls.__name__}.forward uses gradient checkpointing, edited at module boundaries"
        cache[cls] = found
    return found


_DID_NOT_RUN = "did not run in the observed forward"
_NEVER_RUNS = "never runs: no forward calls it"


def dropout_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook applying ``module.regfx_dropout`` to the module's (first) output."""
    drop = module._modules.get("regfx_dropout")
    if drop is None:
        return output
    if isinstance(output, torch.Tensor):
        return drop(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (drop(output[0]), *output[1:])
    return output


class _Codegen:
    """What one :func:`apply_dropout` call learns once and reuses: compiled sources (the blocks
    of a deep model regenerate to the same code) and what each class's source says."""

    def __init__(self) -> None:
        self.code: dict[str, Any] = {}
        self.training: dict[type, bool] = {}

    def compile(self, src: str, globals_: dict[str, Any], label: str) -> Any:
        """The ``forward`` function defined by ``src``, bound to ``globals_``."""
        code = self.code.get(src)
        if code is None:
            filename = f"<regfx-generated {label}>"
            linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
            code = self.code[src] = compile(src, filename, "exec", dont_inherit=True)
        namespace = dict(globals_)
        exec(code, namespace)
        return namespace["forward"]

    def reads_training(self, cls: type) -> bool:
        found = self.training.get(cls)
        if found is None:
            found = self.training[cls] = _reads_training(cls)
        return found


def _fx_target_expr(target: str) -> str:
    """The expression torch.fx generates for the submodule ``target`` of ``self``."""
    expr = "self"
    for part in target.split("."):
        expr = f"{expr}.{part}" if part.isidentifier() else f'getattr({expr}, "{part}")'
    return expr


_CALLED_EXPR = re.compile(r'(?:getattr\()*self(?:\.[A-Za-z_]\w*|, "[^"]*"\))*\(')


def _fast_module_lookups(src: str, graph: Any) -> str:
    """Call submodules through ``self._modules[...]`` instead of ``getattr``/attribute access.

    ``self.fc(x)`` goes through ``Module.__getattr__``, a Python function, on every call; a
    regenerated ``Sequential.forward`` then costs measurably more than the original, which
    iterates over ``self._modules``. Only call sites of registered submodules are rewritten,
    in one pass over the source (so a 10,000-child owner costs linear time).
    """
    fast = {_fx_target_expr(target) + "(": "self" + "".join(f"._modules[{part!r}]"
                                                             for part in target.split(".")) + "("
            for target in {str(n.target) for n in graph.nodes if n.op == "call_module"}}
    return _CALLED_EXPR.sub(lambda m: fast.get(m.group(0), m.group(0)), src)


def _edited_forward(owner: nn.Module, edits: list[tuple[str, str]], label: str,
                    spec: tuple[tuple[str, Any], ...], gen: _Codegen,
                    cache: TraceCache) -> tuple[Any, Any]:
    """The owner's forward regenerated with the edits: ``(train-mode code, eval-mode code)``
    (one function twice when torch.fx traced the same code in both modes)."""
    codes: dict[bool, tuple[str, dict[str, Any]]] = {}
    original = owner.training
    modes = (original, not original) if gen.reads_training(type(owner)) else (original,)
    for mode in modes:
        owner.training = mode
        try:
            graph = cache.editable(owner, spec)
        finally:
            owner.training = original
        nodes = {n.name: n for n in graph.nodes}
        for fx_name, target in edits:
            node = nodes.get(fx_name)
            if node is None:
                raise LookupError(f"node {fx_name} not found when tracing {label} in "
                                  f"{'train' if mode else 'eval'} mode")
            with graph.inserting_after(node):
                new = graph.call_module(target, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        graph.lint()
        code = graph.python_code(root_module="self")
        codes[mode] = (_fast_module_lookups(code.src, graph), code.globals)
        if tensor_constants(graph):
            # torch.fx stored a tensor constant on this owner: the code is its own
            owner.__dict__["_regfx_own_forward"] = True
    if len(codes) == 1 or codes[True][0] == codes[False][0]:
        same = gen.compile(*codes[original], label)
        return same, same
    return (gen.compile(*codes[True], label + " (train)"),
            gen.compile(*codes[False], label + " (eval)"))


def _reads_training(cls: type) -> bool:
    """Whether torch.fx may fix ``self.training`` in a trace of ``cls``'s forward: a method of
    the class (or of a base other than ``nn.Module``) reads a name ``training``. Only then is
    the forward traced in both modes."""
    return "training" in _names_used(cls)


def _same_value(value: Any, expected: Any) -> bool:
    return value is expected or (type(value) is type(expected) and value == expected)


def _dispatch_forward(base: type[nn.Module],
                      table: dict[tuple[tuple[str, Any], ...], tuple[Any, Any]],
                      flags: tuple[tuple[str, bool], ...], label: str, gen: _Codegen) -> Any:
    """A forward with the original signature that runs the edited code the call matches.

    Each entry of ``table`` (a ``(train, eval)`` pair of edited forwards) was traced with some
    arguments as constants (the values a caller
    passed, or the defaults it omitted) and with the owner's boolean attributes (``flags``, such
    as ``grad_checkpointing``) as they were. A call whose constants and flags match an entry runs
    its edited code; any other call runs the original forward (so a mask passed after all, or
    checkpointing switched on later, is honoured), with a one-time warning that the dropout regfx
    inserted there does not run for it. The generated function has the original signature and
    no ``*args`` indirection, so torch.fx traces through it when the model is traced again.
    """
    sig = inspect.signature(base.forward)
    params = list(sig.parameters.values())
    self_name, rest = params[0].name, params[1:]
    ns: dict[str, Any] = {"_same": _same_value, "_base": base.forward, "_miss": _miss_reporter(label)}
    kinds = inspect.Parameter
    has_varargs = any(p.kind is kinds.VAR_POSITIONAL for p in rest)
    header, edited_call, base_call = [self_name], [self_name], [self_name]
    star_done = False
    for i, p in enumerate(rest):
        default = ""
        if p.default is not kinds.empty:
            ns[f"_d{i}"] = p.default
            default = f"=_d{i}"
        if p.kind is kinds.POSITIONAL_ONLY:
            header.append(p.name + default)
            if i + 1 == len(rest) or rest[i + 1].kind is not kinds.POSITIONAL_ONLY:
                header.append("/")
        elif p.kind is kinds.VAR_POSITIONAL:
            header.append("*" + p.name)
            star_done = True
        elif p.kind is kinds.KEYWORD_ONLY:
            if not star_done:
                header.append("*")
                star_done = True
            header.append(p.name + default)
        elif p.kind is kinds.VAR_KEYWORD:
            header.append("**" + p.name)
        else:
            header.append(p.name + default)
        if p.kind is kinds.VAR_POSITIONAL:
            edited_call.append("*" + p.name)
            base_call.append("*" + p.name)
        elif p.kind is kinds.VAR_KEYWORD:
            edited_call.append("**" + p.name)
            base_call.append("**" + p.name)
        elif p.kind is kinds.KEYWORD_ONLY:
            edited_call.append(f"{p.name}={p.name}" if has_varargs else p.name)
            base_call.append(f"{p.name}={p.name}")
        else:
            edited_call.append(p.name)
            base_call.append(p.name)
    lines = [f"def forward({', '.join(header)}):"]
    flag_test = " and ".join(_flag_test(self_name, k, v) for k, v in flags)
    for j, (spec, (train_fn, eval_fn)) in enumerate(table.items()):
        ns[f"_e{j}t"], ns[f"_e{j}e"] = train_fn, eval_fn
        fn_expr = f"_e{j}t" if train_fn is eval_fn else f"(_e{j}t if {self_name}.training else _e{j}e)"
        tests = [f"_same({name}, _c{j}_{k})" for k, (name, _) in enumerate(spec)]
        for k, (_, value) in enumerate(spec):
            ns[f"_c{j}_{k}"] = value
        if flag_test:
            tests.append(flag_test)
        cond = " and ".join(tests) or "True"
        lines.append(f"    if {cond}:")
        lines.append(f"        return {fn_expr}({', '.join(edited_call)})")
    lines.append(f"    _miss({self_name})")
    lines.append(f"    return _base({', '.join(base_call)})")
    return gen.compile("\n".join(lines) + "\n", ns, label + " (dispatch)")


def _miss_reporter(label: str) -> Any:
    warned: list[bool] = []

    def miss(module: nn.Module) -> None:
        if warned or torch.fx._symbolic_trace.is_fx_tracing():
            return
        warned.append(True)
        warnings.warn(f"{label} was called with arguments or flags other than those it was traced "
                      "with; the original forward runs, and dropout regfx inserted in it does not "
                      "run for such calls (transform again to place it)", RegfxWarning, stacklevel=3)

    return miss


def _refuse_pickle(self: nn.Module, protocol: Any) -> Any:
    raise RegfxError(
        f"{type(self).__name__} at a transformed model runs a forward regfx regenerated, which "
        "cannot be pickled; save model.state_dict() or regfx.save_checkpoint(model), or pickle "
        "regfx.bake(model)"
    )


def _deepcopy_module(self: nn.Module, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` as for any object (pickling is refused, copying is not)."""
    return copy._reconstruct(self, memo, *object.__reduce_ex__(self, 4))  # type: ignore[attr-defined]


def _swap_forward(owner: nn.Module, forward: Any, classes: dict[Any, type] | None = None) -> None:
    current = type(owner)
    base = current.__dict__.get("_regfx_base", current)
    key = (base, forward)
    cls = classes.get(key) if classes is not None else None
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": forward,
            "__reduce_ex__": _refuse_pickle,
            "__deepcopy__": _deepcopy_module,
            "_regfx_base": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        })
        if classes is not None:
            classes[key] = cls
    owner.__class__ = cls


def apply_dropout(model: nn.Module, sites: list[DropoutSite],
                  cache: TraceCache | None = None) -> None:
    """Insert the planned dropout into ``model`` (mutates it).

    ``cache`` holds the one-level traces planning made of ``model`` (owners are re-traced
    where it has none).
    """
    cache = cache if cache is not None else TraceCache()
    by_owner: dict[str, dict[tuple[tuple[str, Any], ...], list[DropoutSite]]] = {}
    for site in sites:
        layer = model.get_submodule(site.layer)
        if site.attr not in layer._modules:
            layer.add_module(site.attr, make_dropout(site.module_cls, site.p))
        if site.mode == "hook":
            ensure_state(model).dropout_hooks.append(
                layer.register_forward_hook(dropout_output_hook))
        else:
            by_owner.setdefault(site.owner or "", {}).setdefault(site.spec, []).append(site)
    with shared_fx_patches():
        _edit_owners(model, by_owner, cache)


def _edit_owners(model: nn.Module,
                 by_owner: dict[str, dict[tuple[tuple[str, Any], ...], list[DropoutSite]]],
                 cache: TraceCache) -> None:
    """Regenerate each owner's forward with its dropout calls."""
    forwards: dict[Any, Any] = {}
    classes: dict[Any, type] = {}
    gen = _Codegen()
    for owner_name, per_spec in by_owner.items():
        owner = model.get_submodule(owner_name) if owner_name else model
        base = type(owner).__dict__.get("_regfx_base", type(owner))
        label = f"{type(owner).__name__}.forward at {owner_name or '(root)'}"
        table: dict[tuple[tuple[str, Any], ...], tuple[Any, Any]] = {}
        own = False
        for spec, owner_sites in per_spec.items():
            edits: list[tuple[str, str]] = []
            for site in owner_sites:
                rel = site.layer[len(owner_name) + 1:] if owner_name else site.layer
                edit = (str(site.fx_name), f"{rel}.{site.attr}")
                if edit not in edits:
                    edits.append(edit)
            # Identical owners with identical edits (the blocks of a deep stack) share one
            # regenerated forward and one generated class.
            key = (trace_signature(owner), spec, tuple(edits))
            forward = forwards.get(key)
            if forward is None:
                forward = _edited_forward(owner, edits, label, spec, gen, cache)
                if owner.__dict__.pop("_regfx_own_forward", False):
                    own = True
                else:
                    forwards[key] = forward
            table[spec] = forward
        flags = _flags(owner)
        tkey = (base, tuple(table.items()), flags)
        forward = None if own else forwards.get(tkey)
        if forward is None:
            plain = list(table) == [()] and not flags and table[()][0] is table[()][1]
            forward = table[()][0] if plain else _dispatch_forward(base, table, flags, label, gen)
            if not own:
                forwards[tkey] = forward
        _swap_forward(owner, forward, classes)


def _flags(owner: nn.Module) -> tuple[tuple[str, bool], ...]:
    """The boolean flags fixed in a regenerated forward: the owner's own boolean attributes
    (``grad_checkpointing``...) and the boolean attributes its forward (and the methods the
    forward calls) reads from an object it holds (``config.use_cache``, as
    ``config.<name>``)."""
    flags = [(k, v) for k, v in owner.__dict__.items() if type(v) is bool and k != "training"]
    used: frozenset[str] | None = None
    for key, value in owner.__dict__.items():
        if key.startswith("_") or isinstance(value, (nn.Module, torch.Tensor, type)) \
                or callable(value):
            continue
        try:
            attrs = object.__getattribute__(value, "__dict__")
        except Exception:  # noqa: BLE001 - no plain __dict__ (slots, proxies): nothing to read
            continue
        if not isinstance(attrs, dict):
            continue
        if used is None:
            used = _forward_names(type(owner))
        flags += [(f"{key}.{name}", v) for name, v in list(attrs.items())
                  if type(v) is bool and name in used]
    return tuple(flags)


def _forward_names(cls: type) -> frozenset[str]:
    """The attribute and global names ``cls.forward`` uses, and those of the methods of
    ``cls`` it calls (by name, transitively), nested functions included."""
    methods: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass in (nn.Module, object):
            continue
        for name, value in vars(klass).items():
            func = getattr(value, "__func__", value)
            code = getattr(func, "__code__", None)
            if code is not None:
                methods[name] = code
    names: set[str] = set()
    pending = [methods["forward"]] if "forward" in methods else []
    seen: set[str] = {"forward"}
    while pending:
        used = _code_names(pending.pop())
        names |= used
        for name in used:
            if name in methods and name not in seen:
                seen.add(name)
                pending.append(methods[name])
    return frozenset(names)


def _flag_test(self_name: str, name: str, value: bool) -> str:
    """The generated test that flag ``name`` (``attr`` or ``attr.sub``) still is ``value``."""
    head, _, sub = name.partition(".")
    expr = f"{self_name}.__dict__.get({head!r})"
    if sub:
        expr = f"getattr({expr}, {sub!r}, None)"
    return f"{expr} is {value!r}"


def restore_classes(model: nn.Module) -> None:
    """Give every module whose forward regfx regenerated its original class back."""
    for mod in model.modules():
        base = type(mod).__dict__.get("_regfx_base")
        if base is not None:
            mod.__class__ = base


def remove_dropout(model: nn.Module) -> None:
    """Remove every regfx-inserted dropout module and hook (mutates ``model``); the hooks go
    through the handles the model's state keeps."""
    state = state_of(model)
    if state is not None:
        for handle in state.dropout_hooks:
            handle.remove()
        state.dropout_hooks.clear()
    restore_classes(model)
    for mod in model.modules():
        for child in [n for n in mod._modules if n.startswith("regfx_dropout")]:
            del mod._modules[child]
