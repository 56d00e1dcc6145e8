"""A deep snapshot of every module's ``__dict__``, to check that something left a model as it was."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _leaf(value: Any, depth: int) -> Any:
    if depth > 4:
        return ("id", id(value))
    if type(value) in (dict,) or (isinstance(value, dict) and not hasattr(value, "__torch_function__")):
        return ("dict", type(value), tuple((k, _leaf(v, depth + 1)) for k, v in value.items()))
    if type(value) in (list, tuple, set, frozenset):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_leaf(v, depth + 1) for v in items))
    if isinstance(value, (bool, int, float, str, type(None))):
        return ("value", value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    return ("id", id(value))


def module_state(model: nn.Module) -> list[tuple[str, Any]]:
    """Every module's attributes, with containers compared by content (recursively) and every
    other value (tensors, modules, functions) by identity; tensors also by version counter."""
    return [(name, type(mod), _leaf(dict(mod.__dict__), 0))
            for name, mod in model.named_modules(remove_duplicate=False)]


def rng_state() -> torch.Tensor:
    return torch.random.get_rng_state()
