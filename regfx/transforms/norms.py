"""Weight norm and spectral norm through ``torch.nn.utils.parametrizations``.

A weight gets one normalization. Tied weights (one Parameter used by several layers) get one
parametrization instance shared by every layer using it, so all of them compute with the same
normalized weight and the parameter stays tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, weight_norm

from regfx.errors import NormError
from regfx.select import is_linear_like, select_layers
from regfx.state import NormRecord, ensure_state, state_of
from regfx.transforms import spectral_engine
from regfx.transforms.spectral import spectral_norm

__all__ = ["NormSite", "NormError", "ZERO_WEIGHT", "plan_norms", "zero_weight_reason", "apply_norms",
           "fold_norms", "norm_kind_of", "output_dim"]


@dataclass(frozen=True)
class NormSite:
    """``kind`` (``weight_norm``/``spectral_norm``) on ``layer.weight``; ``aliases`` are the other
    layers sharing that Parameter, which get the same parametrization instance."""

    layer: str
    kind: str
    dim: int
    n_power_iterations: int = 1
    aliases: tuple[str, ...] = ()


def output_dim(module: nn.Module) -> int:
    """The weight dimension indexing output features (1 for ConvTranspose and HF Conv1D)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    if is_linear_like(module) and not isinstance(module, nn.Linear):
        return 1  # transformers' Conv1D stores its weight as (in_features, out_features)
    return 0


def norm_kind_of(module: nn.Module, name: str = "weight") -> str | None:
    """``weight_norm``, ``spectral_norm``, ``orthogonal``, ``parametrization``, the deprecated
    hook-based ``weight_norm (deprecated hook)``/``spectral_norm (deprecated hook)``, or None."""
    if parametrize.is_parametrized(module, name):
        kinds = []
        for p in module.parametrizations[name]:  # type: ignore[union-attr, index]
            cls = type(p).__name__
            if cls == "_WeightNorm":
                kinds.append("weight_norm")
            elif isinstance(p, _SpectralNorm):
                kinds.append("spectral_norm")
            elif cls == "_Orthogonal":
                kinds.append("orthogonal")
            else:
                kinds.append("parametrization")
        return "+".join(kinds)
    for hook in module._forward_pre_hooks.values():
        cls = type(hook).__name__
        if cls == "WeightNorm" and getattr(hook, "name", None) == name:
            return "weight_norm (deprecated hook)"
        if cls == "SpectralNorm" and getattr(hook, "name", None) == name:
            return "spectral_norm (deprecated hook)"
    return None


ZERO_WEIGHT = "zero-initialized weight"


def zero_weight_reason(weight: torch.Tensor, kind: str, dim: int) -> str | None:
    """Why ``kind`` cannot normalize ``weight``, if it is zero where the norm divides by it.

    Weight norm divides each output row by its norm, spectral norm the whole weight by its
    largest singular value: a zero row (weight norm) or an all-zero weight (spectral norm), as
    left by zero-initialized heads and residual branches, would make the layer output NaN.
    """
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialized: run one forward first"
    if weight.numel() == 0:
        return f"zero-size weight {tuple(weight.shape)}: nothing to normalize; exclude the layer"
    if weight.is_meta or weight.ndim < 2:
        return None
    with torch.no_grad():
        if kind == "weight_norm":
            dims = [d for d in range(weight.ndim) if d != dim]
            rows = int((weight.abs().amax(dim=dims) == 0).sum())
            if rows:
                return (f"{ZERO_WEIGHT}: {rows} of {weight.shape[dim]} output rows are all zeros, "
                        "and weight norm would make them NaN; normalize after initializing it, or "
                        "exclude the layer")
        elif not bool(weight.any()):
            return (f"{ZERO_WEIGHT}: the weight is all zeros, and spectral norm would make it NaN; "
                    "normalize after initializing it, or exclude the layer")
    return None


def plan_norms(
    model: nn.Module, spectral: str | None, weight_norm_types: str | None,
    n_power_iterations: int, include: tuple[str, ...], exclude: tuple[str, ...],
) -> tuple[list[NormSite], list[tuple[str, str]]]:
    """Norm sites for the selected layers. Pure; raises NormError on a conflict."""
    wanted: dict[str, str] = {}
    modules: dict[str, nn.Module] = {}
    for kind, types in (("weight_norm", weight_norm_types), ("spectral_norm", spectral)):
        if not types:
            continue
        for name, mod in select_layers(model, types, include, exclude):
            if name in wanted and wanted[name] != kind:
                raise NormError(
                    f"layer {name!r} ({type(mod).__name__}) was selected for both weight_norm and "
                    "spectral_norm; a weight gets one normalization: narrow one of the layer "
                    "types or add --exclude"
                )
            wanted[name] = kind
            modules[name] = mod
    sites: list[NormSite] = []
    skipped: list[tuple[str, str]] = []
    by_param: dict[int, list[str]] = {}
    for name, mod in modules.items():
        existing = norm_kind_of(mod)
        kind = wanted[name]
        if existing is not None:
            if existing == kind:
                skipped.append((name, f"already has {kind}"))
                continue
            raise NormError(
                f"layer {name!r} already has {existing} on its weight; asked for {kind}: "
                "a weight gets one normalization, remove the existing one or exclude the layer"
            )
        weight = mod._parameters.get("weight")
        if not isinstance(weight, nn.Parameter):
            skipped.append((name, "has no weight parameter"))
            continue
        zero = zero_weight_reason(weight, kind, output_dim(mod))
        if zero:
            skipped.append((name, zero))
            continue
        by_param.setdefault(id(weight), []).append(name)
    # Layers sharing a weight with a layer that is not selected: the alias is normalized too,
    # since one Parameter can only have one meaning.
    all_users: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        if isinstance(w, nn.Parameter) and id(w) in by_param:
            all_users.setdefault(id(w), []).append(name)
    for pid, names in by_param.items():
        first = names[0]
        users = all_users.get(pid, names)
        mod = modules[first]
        kinds = {wanted[n] for n in names}
        if len(kinds) > 1:
            raise NormError(
                f"tied weight of {', '.join(names)} was selected for both weight_norm and "
                "spectral_norm; a weight gets one normalization"
            )
        sites.append(NormSite(first, wanted[first], output_dim(mod), n_power_iterations,
                              tuple(u for u in users if u != first)))
    return sites, skipped


def apply_norms(model: nn.Module, sites: list[NormSite]) -> None:
    """Register the planned parametrizations (mutates ``model``)."""
    records = ensure_state(model).norms
    for site in sites:
        mod = model.get_submodule(site.layer)
        record = NormRecord(list(mod._parameters))
        if site.kind == "weight_norm":
            hooks = set(mod._load_state_dict_pre_hooks)
            weight_norm(mod, "weight", dim=site.dim)
            # torch's weight_norm adds a load_state_dict pre-hook (a local function, which
            # cannot be pickled) without returning its handle: keep its key to remove it on bake
            record.load_hooks = [k for k in mod._load_state_dict_pre_hooks if k not in hooks]
        else:
            spectral_norm(mod, "weight", n_power_iterations=site.n_power_iterations, dim=site.dim)
        records[site.layer] = record
        shared = cast(nn.Module, mod.parametrizations.weight[0])  # type: ignore[union-attr, index]
        for alias in site.aliases:
            other = model.get_submodule(alias)
            records[alias] = NormRecord(list(other._parameters))
            parametrize.register_parametrization(other, "weight", shared, unsafe=True)
            # register_parametrization made a fresh `original`: re-tie it to the first layer's.
            plist = cast(nn.Module, other.parametrizations.weight)  # type: ignore[union-attr]
            for key in list(plist._parameters):
                plist._parameters[key] = mod.parametrizations.weight._parameters[key]  # type: ignore
    if any(site.kind == "spectral_norm" for site in sites):
        spectral_engine.install(model)


def fold_norms(model: nn.Module) -> None:
    """Replace every weight/spectral-norm parametrization regfx applied by the weight it computes
    (eval mode semantics: spectral norm's u/v do not advance). Tied weights stay tied; the
    user's own parametrizations are left as they are."""
    spectral_engine.uninstall(model)
    state = state_of(model)
    records = state.norms if state is not None else {}
    folded: dict[int, nn.Parameter] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        record = records.get(name)
        if record is None or not parametrize.is_parametrized(mod, "weight"):
            continue
        kind = norm_kind_of(mod)
        if kind not in ("weight_norm", "spectral_norm"):
            continue
        plist = cast(nn.Module, mod.parametrizations.weight)  # type: ignore[union-attr]
        key = id(next(iter(plist._parameters.values())))
        if key not in folded:
            modes = [(m, m.training) for m in plist.modules()]
            for m, _ in modes:
                m.training = False
            try:
                with torch.no_grad():
                    value = cast(torch.Tensor, mod.weight).detach().clone()
            finally:
                for m, mode in modes:
                    m.training = mode
            folded[key] = nn.Parameter(value, requires_grad=next(iter(plist.parameters())).requires_grad)
        # A deep copy shares its Parametrized* class with the original, and removal deletes the
        # class property: give this module a class of its own first.
        cls = type(mod)
        mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for m in plist.modules():
            m.training = False  # folding must not advance spectral norm's u/v
        # the folded value is set below; leaving it parametrized would write it into the one
        # `original` tensor in place, and so into any module outside that shares that tensor
        single = "original" in plist._parameters
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=not single)
        for hook_key in record.load_hooks:
            mod._load_state_dict_pre_hooks.pop(hook_key, None)
        mod._parameters.pop("weight", None)
        mod._buffers.pop("weight", None)
        mod._parameters["weight"] = folded[key]
        records.pop(name, None)  # folded: no longer regfx's to fold
        order = record.param_order
        if order:
            mod._parameters = type(mod._parameters)(
                (k, mod._parameters[k]) for k in order if k in mod._parameters
            ) | {k: v for k, v in mod._parameters.items() if k not in order}
