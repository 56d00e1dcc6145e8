"""plan -> apply: ``regfx.plan``, ``regfx.transform``, ``bake``, state dicts and checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from regfx.distributed import broadcast_power_iteration_vectors, is_sharded
from regfx.errors import CheckpointError, RegfxError, RegfxWarning, SelectionError
from regfx.graph import ModelGraph
from regfx.recipe import NOT_GIVEN, Recipe, resolve_recipe
from regfx.select import parse_types, select_layers
from regfx.state import drop_state, ensure_state, state_of
from regfx.trace import TraceCache, has_uninitialized, trace
from regfx.transforms.dropout import DropoutSite, apply_dropout, plan_dropout, remove_dropout
from regfx.transforms.norms import ZERO_WEIGHT, NormSite, apply_norms, fold_norms, plan_norms
from regfx.transforms.penalty import PenaltySpec, apply_penalty, plan_penalty, remove_penalty
from regfx.util import gc_paused

__all__ = ["Plan", "plan", "transform", "bake", "load_state_dict", "save_checkpoint",
           "load_checkpoint", "CheckpointError", "RegfxWarning", "recipe_of"]

CHECKPOINT_FORMAT = "regfx-checkpoint"
CHECKPOINT_VERSION = 2
"""Version 2 stores the resolved sites (``plan``) beside the recipe; version 1 files still load."""
_READABLE_VERSIONS = (1, 2)


@dataclass
class Plan:
    """What a recipe does to a model, resolved against its graph. Pure data.

    Attributes:
        recipe: the validated recipe.
        dropout: dropout sites.
        norms: weight/spectral norm sites.
        penalty: the penalized parameters and coefficients, or None.
        skipped: ``(layer, regularizer, reason)`` for selected layers left alone.
        warnings: one-line messages (type words matching no layer...).
    """

    recipe: Recipe
    dropout: list[DropoutSite] = field(default_factory=list)
    norms: list[NormSite] = field(default_factory=list)
    penalty: PenaltySpec | None = None
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per site: ``site``, ``kind``, ``parameters`` (for tables and JSON)."""
        out: list[dict[str, Any]] = []
        for s in self.dropout:
            site = s.layer if s.call_index == 0 else f"{s.layer}#{s.call_index}"
            out.append({"site": site, "kind": "dropout",
                        "parameters": f"{s.module_cls}(p={s.p:g}) {s.where}"})
        for n in self.norms:
            extra = f", tied with {', '.join(n.aliases)}" if n.aliases else ""
            detail = f"dim={n.dim}" + (f", n_power_iterations={n.n_power_iterations}"
                                       if n.kind == "spectral_norm" else "")
            out.append({"site": f"{n.layer}.weight", "kind": n.kind, "parameters": detail + extra})
        if self.penalty is not None:
            for name in self.penalty.params:
                for kind, value in (("l1", self.penalty.l1), ("l2", self.penalty.l2)):
                    if value:
                        out.append({"site": name, "kind": kind, "parameters": f"{kind}={value:g}"})
        return out

    def sites_dict(self) -> dict[str, Any]:
        """The resolved sites as plain data, to store in a checkpoint and re-apply exactly."""
        return {
            "dropout": [{**dataclasses.asdict(d), "spec": [list(kv) for kv in d.spec]}
                        for d in self.dropout],
            "norms": [{**dataclasses.asdict(n), "aliases": list(n.aliases)} for n in self.norms],
            "penalty": None if self.penalty is None else {
                "params": list(self.penalty.params), "l1": self.penalty.l1, "l2": self.penalty.l2},
        }

    @classmethod
    def from_sites(cls, recipe: Recipe, data: dict[str, Any]) -> Plan:
        """The plan whose sites :meth:`sites_dict` wrote (checkpoints of ``regfx apply -o``)."""
        try:
            dropout = [DropoutSite(**{**d, "spec": tuple(tuple(kv) for kv in d.get("spec", ()))})
                       for d in data.get("dropout", [])]
            norms = [NormSite(**{**n, "aliases": tuple(n.get("aliases", ()))})
                     for n in data.get("norms", [])]
            pen = data.get("penalty")
            penalty = None if pen is None else PenaltySpec(tuple(pen["params"]), float(pen["l1"]),
                                                           float(pen["l2"]))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"the sites stored in the checkpoint are malformed ({exc}); "
                                  "write the checkpoint again with `regfx apply -o`") from None
        return cls(recipe=recipe, dropout=dropout, norms=norms, penalty=penalty)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (``regfx apply --format json``)."""
        return {
            "recipe": self.recipe.to_dict(),
            "sites": self.rows(),
            "skipped": [{"site": a, "kind": b, "reason": c} for a, b, c in self.skipped],
            "warnings": list(self.warnings),
        }


_DEFAULT_PENALTY_ON = Recipe().penalty_on


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise RegfxError(f"expected an nn.Module, got {type(model).__name__}; pass the model")
    if isinstance(model, torch.jit.ScriptModule):
        raise RegfxError("script modules cannot be transformed; pass the eager module (the one "
                         "given to torch.jit.script)")
    wrapped = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrapped):
        raise RegfxError(
            f"model is wrapped in {type(model).__name__}; transform the inner model "
            "(model.module) first, then wrap the result"
        )
    if is_sharded(model):
        raise RegfxError("model is already sharded by fully_shard (FSDP2); apply regfx before "
                         "fully_shard: transform the unsharded model, then shard the result")


def _unmatched(model: nn.Module, spec: str | None, field_name: str) -> list[str]:
    if not spec:
        return []
    terms = parse_types(spec).terms
    missing = [t for t in terms if not select_layers(model, t)]
    # A default such as "linear,conv" only warns when none of its words matches.
    if field_name == "penalty_on" and spec == _DEFAULT_PENALTY_ON and len(missing) < len(terms):
        return []
    return [f"{field_name}: layer type {t!r} matches no layer of {type(model).__name__}"
            for t in missing]


def plan(model: nn.Module, recipe: Recipe | None = None, *, graph: ModelGraph | None = None,
         example_inputs: Any = None, **overrides: Any) -> Plan:
    """Resolve a recipe against ``model`` into concrete sites, without changing anything.

    Args:
        model: the model.
        recipe: a :class:`Recipe`; keyword ``overrides`` (same names as ``transform``'s) win.
        graph: a graph from :func:`regfx.trace` of this model (traced when omitted).
        example_inputs: passed to :func:`regfx.trace` to observe the model's output layers.

    Returns:
        The :class:`Plan`.

    Raises:
        RegfxError: invalid recipe values, unknown layer words, two norms on one weight, or
            (``strict``) a layer word matching no layer.
    """
    _check_model(model)
    return _plan(model, resolve_recipe(recipe, **overrides), graph, example_inputs, None)


def _plan(model: nn.Module, rec: Recipe, graph: ModelGraph | None, example_inputs: Any,
          cache: TraceCache | None) -> Plan:
    if (rec.spectral or rec.weight_norm or rec.l1 or rec.l2) and has_uninitialized(model):
        raise RegfxError(f"{type(model).__name__} has lazy layers that are not initialized; "
                         "run one forward first")
    messages: list[str] = []
    if rec.dropout is not None:
        messages += _unmatched(model, rec.dropout_after, "dropout_after")
    messages += _unmatched(model, rec.spectral, "spectral")
    messages += _unmatched(model, rec.weight_norm, "weight_norm")
    if rec.l1 or rec.l2:
        messages += _unmatched(model, rec.penalty_on, "penalty_on")
    if messages and rec.strict:
        raise SelectionError(f"{messages[0]} (strict mode); use a type the model has or drop "
                             "--strict")
    result = Plan(recipe=rec, warnings=messages)
    if rec.dropout is not None and rec.dropout > 0:
        g = graph if graph is not None else trace(model, example_inputs, cache=cache)
        sites, skipped = plan_dropout(model, g, rec.dropout, rec.dropout_after,
                                      rec.dropout_position, rec.dropout_kind, rec.include,
                                      rec.exclude)
        result.dropout = sites
        result.skipped += [(layer, "dropout", why) for layer, why in skipped]
    norms, skipped_norms = plan_norms(model, rec.spectral, rec.weight_norm,
                                      rec.n_power_iterations, rec.include, rec.exclude)
    result.norms = norms
    result.skipped += [(layer, "norm", why) for layer, why in skipped_norms]
    result.warnings += [f"layer {layer!r} not normalized: {why}" for layer, why in skipped_norms
                        if why.startswith(ZERO_WEIGHT)]
    result.penalty = plan_penalty(model, rec.l1, rec.l2, rec.penalty_on, rec.include, rec.exclude)
    if result.penalty is not None and not result.penalty.params \
            and not any(m.startswith("penalty_on:") for m in messages):
        message = (f"penalty_on: {rec.penalty_on!r} selects no weight of {type(model).__name__}, so "
                   "l1/l2 penalize nothing")
        if rec.strict:
            raise SelectionError(f"{message} (strict mode); choose layer types the model has")
        result.warnings.append(message)
    return result


def transform(
    model: nn.Module,
    recipe: Recipe | None = None,
    *,
    dropout: float | None = NOT_GIVEN,
    dropout_after: str = NOT_GIVEN,
    spectral: str | None = NOT_GIVEN,
    weight_norm: str | None = NOT_GIVEN,
    l1: float = NOT_GIVEN,
    l2: float = NOT_GIVEN,
    penalty_on: str = NOT_GIVEN,
    include: str | tuple[str, ...] | list[str] = NOT_GIVEN,
    exclude: str | tuple[str, ...] | list[str] = NOT_GIVEN,
    inplace: bool = False,
    example_inputs: Any = None,
    **options: Any,
) -> nn.Module:
    """Apply regularization to ``model``: dropout, weight/spectral norm, L1/L2 penalties.

    Every keyword left out takes the recipe's value (or the :class:`Recipe` default); a keyword
    given, even ``None`` or ``0.0``, overrides the recipe (``l2=0.0`` switches a recipe's L2
    off).

    Args:
        model: any ``nn.Module`` (not a DDP/DataParallel wrapper: transform ``.module``).
        recipe: a :class:`Recipe`; explicit keywords override its fields.
        dropout: dropout probability after each ``dropout_after`` layer (default None: no
            dropout).
        dropout_after: layer types followed by dropout (default ``"linear"``; ``"conv"``, ...).
        spectral: layer types to spectrally normalize (default None).
        weight_norm: layer types to weight-normalize (default None).
        l1, l2: penalty coefficients (``l1*sum|w| + (l2/2)*sum w^2`` per optimizer step;
            default 0.0).
        penalty_on: layer types whose weights are penalized (default ``"linear,conv"``).
        include, exclude: globs on qualified module names (default none).
        inplace: edit ``model`` itself instead of a deep copy.
        example_inputs: optional inputs, run once to find output layers inside opaque modules.
        **options: other :class:`Recipe` fields (``dropout_position``, ``dropout_kind``,
            ``n_power_iterations``, ``strict``).

    Returns:
        The transformed model: same class, same state-dict keys except normalized weights
        (``<layer>.parametrizations.weight.original*``).

    Raises:
        RegfxError: invalid arguments (the message names the value and the fix).

    Example:
        >>> model2 = regfx.transform(model, dropout=0.1, spectral="conv", l2=1e-4)
    """
    _check_model(model)
    overrides = dict(dropout=dropout, dropout_after=dropout_after, spectral=spectral,
                     weight_norm=weight_norm, l1=l1, l2=l2, penalty_on=penalty_on,
                     include=include, exclude=exclude, **options)
    rec = resolve_recipe(recipe, **overrides)
    previous = recipe_of(model)
    with gc_paused():
        if previous is not None and previous == rec:
            return model if inplace else copy.deepcopy(model)  # transforming twice = once
        target = model if inplace else copy.deepcopy(model)
        if previous is not None:
            # Another recipe: undo regfx's own edits so the new one is planned from the
            # model's structure, not around the old dropout (norms are folded only where they
            # change).
            _strip(target, previous, rec)
        traces = TraceCache()
        result = _plan(target, rec, None, example_inputs, traces)
        for message in result.warnings:
            warnings.warn(message, RegfxWarning, stacklevel=2)
        apply_plan(target, result, traces)
    return target


def _strip(model: nn.Module, previous: Recipe, new: Recipe) -> None:
    """Remove what transforming with ``previous`` added, before transforming with ``new``."""
    remove_dropout(model)
    remove_penalty(model)
    norm_fields = ("spectral", "weight_norm", "n_power_iterations", "include", "exclude")
    state = state_of(model)
    if any(getattr(previous, f) != getattr(new, f) for f in norm_fields):
        fold_norms(model)
        kept: list[Any] = []
    else:  # the norms stay: their sites stay in the state (checkpoints store them)
        kept = list((state.sites or {}).get("norms") or []) if state is not None else []
    if state is not None:
        state.recipe = None
        state.sites = {"norms": kept} if kept else None
        state.traces = TraceCache()


def apply_plan(model: nn.Module, result: Plan, traces: TraceCache | None = None) -> None:
    """Apply a :class:`Plan` made for ``model`` (the only function that mutates).

    ``traces``: the one-level traces planning made of ``model``, reused for the edits and
    kept in the model's state for later audits.
    """
    traces = traces if traces is not None else TraceCache()
    state = ensure_state(model)
    apply_norms(model, result.norms)
    apply_dropout(model, result.dropout, traces)
    if result.penalty is not None:
        apply_penalty(model, result.penalty)
    broadcast_power_iteration_vectors(model)  # same spectral-norm u/v on every rank
    kept = (state.sites or {}).get("norms") or []  # norms a re-transform kept
    state.recipe = result.recipe.to_dict()
    state.sites = result.sites_dict()
    if kept:
        state.sites["norms"] = list(kept) + list(state.sites.get("norms") or [])
    traces.keep_reusable()
    state.traces = traces


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe ``model`` was transformed with, or None."""
    state = state_of(model)
    return Recipe.from_dict(state.recipe) if state is not None and state.recipe else None


def bake(model: nn.Module) -> nn.Module:
    """A plain copy of a transformed model: dropout removed, norms folded, hooks gone.

    The copy has exactly the original model's state-dict keys and, in eval mode, the
    transformed model's outputs. Spectral norm is folded with its current u/v (no iteration).
    """
    _check_model(model)
    out = copy.deepcopy(model)
    # the model itself, and any submodule transformed on its own (a transformed block put into
    # a larger model): each holds the state of what regfx applied to it
    holders = [m for m in out.modules() if state_of(m) is not None] or [out]
    for holder in holders:
        remove_dropout(holder)
        fold_norms(holder)
        remove_penalty(holder)
        drop_state(holder)
    remove_dropout(out)  # inserted modules and classes outside every holder's state
    return out


def _plain_key_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Plain weight key (``fc.weight``) -> module, for weights under a parametrization."""
    out = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tensor_name in mod.parametrizations:  # type: ignore[union-attr]
                out[f"{name}.{tensor_name}" if name else tensor_name] = mod
    return out


def load_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Load a plain (pre-transform) or transformed state dict into a transformed model.

    Plain weights of normalized layers are mapped through the parametrization's
    ``right_inverse`` (weight norm: ``g = ||w||``, ``v = w``; spectral norm: ``original = w``),
    so the layer computes the same weight it had before the transform (up to spectral
    scaling). Spectral norm's ``u``/``v`` vectors may be missing from a plain state dict.

    Raises:
        CheckpointError: keys that match neither form (listed in the message).
    """
    own = model.state_dict()
    plain_targets = _plain_key_targets(model)
    direct: dict[str, Any] = {}
    assign: dict[str, Any] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key in own:
            direct[key] = value
        elif key in plain_targets:
            assign[key] = value
        else:
            unexpected.append(key)
    missing = [k for k in own if k not in direct]
    covered = set()
    for key in assign:
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        tensor_name = key.rsplit(".", 1)[-1]
        base = f"{prefix}.parametrizations.{tensor_name}." if prefix else \
            f"parametrizations.{tensor_name}."
        covered |= {k for k in missing if k.startswith(base)}
    missing = [k for k in missing if k not in covered
               and not (".parametrizations." in f".{k}" and k.rsplit(".", 1)[-1] in ("_u", "_v"))]
    if strict and (unexpected or missing):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
        raise CheckpointError(
            f"state dict does not match {type(model).__name__}: {'; '.join(parts)}; "
            "load it into the model it was saved from (same recipe), or pass strict=False"
        )
    try:
        model.load_state_dict(direct, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        raise CheckpointError(
            f"state dict does not match {type(model).__name__}: {lines[0] if lines else exc}; load "
            "it into the model it was saved from"
        ) from None
    with torch.no_grad():
        for key, value in assign.items():
            mod = plain_targets[key]
            tensor_name = key.rsplit(".", 1)[-1]
            setattr(mod, tensor_name, value.to(dtype=getattr(mod, tensor_name).dtype))


def save_checkpoint(model: nn.Module, path: str | Path | io.BytesIO | None = None) -> bytes:
    """Serialize a transformed model's state dict with its recipe and the sites applied
    (``weights_only``-safe), so :func:`load_checkpoint` rebuilds exactly that placement.

    Returns the bytes; writes them to ``path`` when given (not atomically: the CLI does that).
    """
    state = state_of(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": type(model).__name__,
        "recipe": state.recipe if state is not None else None,
        "plan": state.sites if state is not None else None,
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    if isinstance(path, (str, Path)):
        Path(path).write_bytes(data)
    return data


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a regfx checkpoint with ``weights_only=True``; clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist; check the path")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files fail in many ways
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"cannot read checkpoint {str(p)!r} ({type(exc).__name__}: {first}); the file is "
            "truncated or not a torch checkpoint: write it again with regfx apply -o"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a regfx checkpoint; write one with "
                              "`regfx apply MODEL ... -o FILE`")
    if payload.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{str(p)!r} has checkpoint version {payload.get('version')!r}; "
                              f"this regfx reads version {CHECKPOINT_VERSION}")
    return payload


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a transformed model from the plain ``model`` and a checkpoint of ``regfx apply -o``.

    The sites stored in the checkpoint (the placement ``regfx apply`` printed) are applied to a
    copy of ``model`` exactly, without planning again; checkpoints written before sites were
    stored re-plan their recipe. Then the weights are loaded. When ``model`` is already
    transformed, its recipe must equal the checkpoint's.

    Raises:
        CheckpointError: unreadable/truncated file, not a regfx checkpoint, a different recipe,
            a stored site the model does not have, or weights that do not fit.
    """
    payload = read_checkpoint(path)
    stored = Recipe.from_dict(payload["recipe"] or {}, f"recipe in {path}")
    current = recipe_of(model)
    if current is not None:
        if current != stored:
            raise CheckpointError(
                f"model was transformed with a different recipe than {path} "
                f"({'; '.join(current.diff(stored))}); load into the plain model instead"
            )
        target = copy.deepcopy(model)
    elif payload.get("plan") is not None:
        stored_plan = Plan.from_sites(stored, payload["plan"])
        _check_sites(model, stored_plan, path)
        target = copy.deepcopy(model)
        try:
            apply_plan(target, stored_plan)
        except (LookupError, AttributeError) as exc:
            raise CheckpointError(f"{path} was written for a model whose code differs from "
                                  f"{type(model).__name__}'s ({exc}); load it into the model it was "
                                  "written from") from None
    else:
        target = transform(model, stored)
    load_state_dict(target, payload["state_dict"])
    return target


def _check_sites(model: nn.Module, stored: Plan, path: str | Path) -> None:
    """Every layer a stored site names exists in ``model``; else a CheckpointError naming it."""
    names = dict(model.named_modules())
    wanted = [s.layer for s in stored.dropout] + [s.owner or "" for s in stored.dropout
                                                  if s.mode == "graph"]
    wanted += [n.layer for n in stored.norms] + [a for n in stored.norms for a in n.aliases]
    if stored.penalty is not None:
        wanted += [p.rpartition(".")[0] for p in stored.penalty.params]
    missing = [w for w in dict.fromkeys(wanted) if w not in names]
    if missing:
        raise CheckpointError(f"{path} has sites on {', '.join(repr(m) for m in missing[:3])}, which "
                              f"{type(model).__name__} does not have; load it into the model it was "
                              "written from")
