"""What regfx keeps on a model it transformed: one typed object, reached through one accessor.

A transformed model carries a :class:`RegfxState` under one attribute of the root module.
Nothing else regfx needs later (the recipe, the applied sites, the one-level traces the
transform made) is written into user modules, and there is no registry keyed by ``id()``:
the state lives and dies with the model, and ``copy.deepcopy`` of the model copies it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from regfx.trace import TraceCache


@dataclass
class NormRecord:
    """A weight/spectral norm regfx registered on one layer.

    Attributes:
        param_order: the layer's parameter names before, so folding restores their order
            (and the state-dict order).
        load_hooks: keys of the ``load_state_dict`` pre-hooks torch's ``weight_norm`` added
            without returning a handle; removed when the norm is folded.
    """

    param_order: list[str]
    load_hooks: list[int] = field(default_factory=list)


_ATTR = "_regfx_state"


@dataclass(eq=False)
class RegfxState:
    """regfx's state on a transformed model.

    Attributes:
        recipe: the resolved recipe (``Recipe.to_dict()``) the model was transformed with.
        sites: the applied sites (``Plan.sites_dict()``), stored in checkpoints.
        penalty: the L1/L2 penalty (what is penalized, and the optimizer hook it registered),
            or None.
        spectral: the spectral-norm engine (its forward hooks on the root, the fast path's
            buffers), or None.
        norms: the weight/spectral norms regfx registered, by layer name: ``bake`` folds
            these and leaves the user's own parametrizations alone.
        dropout_hooks: the handles of the forward hooks that run inserted dropout on a layer's
            output (where the owner's forward is not regenerated); removal goes through them.
        traces: the one-level traces the transform made of the model; auditing the model
            re-traces only the modules the transform edited. Not copied or pickled with the
            model (a copy traces afresh).

    A deep copy (with the model) gets its own penalty, bound to the copy's modules, with a
    hook of its own.
    """

    recipe: dict[str, Any] | None = None
    sites: dict[str, Any] | None = None
    # typed loosely: the transforms that own these import this module, not the other way round
    penalty: Any = None  # regfx.transforms.penalty.PenaltyState | None
    spectral: Any = None  # regfx.transforms.spectral_engine.SpectralEngine | None
    norms: dict[str, NormRecord] = field(default_factory=dict)
    dropout_hooks: list[RemovableHandle] = field(default_factory=list)
    traces: TraceCache = field(default_factory=TraceCache)

    _COPIED = ("recipe", "sites", "penalty", "spectral", "norms", "dropout_hooks")

    def __deepcopy__(self, memo: dict[int, Any]) -> RegfxState:
        return RegfxState(**{k: copy.deepcopy(getattr(self, k), memo) for k in self._COPIED})

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._COPIED}

    def __setstate__(self, data: dict[str, Any]) -> None:
        for k in self._COPIED:
            setattr(self, k, data.get(k))
        self.norms = self.norms or {}
        self.dropout_hooks = self.dropout_hooks or []
        self.traces = TraceCache()


def state_of(model: nn.Module) -> RegfxState | None:
    """The :class:`RegfxState` of a model regfx transformed, or None for any other model."""
    found = model.__dict__.get(_ATTR)
    return found if isinstance(found, RegfxState) else None


def ensure_state(model: nn.Module) -> RegfxState:
    """The state of ``model``, made empty first where it has none."""
    found = state_of(model)
    if found is None:
        found = model.__dict__[_ATTR] = RegfxState()
    return found


def drop_state(model: nn.Module) -> None:
    """Forget regfx's state on ``model`` (after its edits were removed; a penalty still
    attached is detached)."""
    found = model.__dict__.pop(_ATTR, None)
    if isinstance(found, RegfxState) and found.penalty is not None:
        found.penalty.detach()
