"""regfx: automatic, auditable regularization for PyTorch models, driven by torch.fx graphs."""

from regfx.apply import (
    CheckpointError,
    Plan,
    RegfxWarning,
    bake,
    load_checkpoint,
    load_state_dict,
    plan,
    save_checkpoint,
    transform,
)
from regfx.audit import AuditReport, Policy, audit
from regfx.errors import LoadError, RegfxError, SelectionError, TraceError
from regfx.graph import ModelGraph
from regfx.recipe import Recipe, RecipeError
from regfx.select import WORDS, parse_types, select_layers
from regfx.state import RegfxState, state_of
from regfx.trace import trace
from regfx.transforms.penalty import penalty

__all__ = [
    "RegfxError",
    "LoadError",
    "SelectionError",
    "TraceError",
    "RecipeError",
    "CheckpointError",
    "RegfxWarning",
    "AuditReport",
    "ModelGraph",
    "Plan",
    "Policy",
    "Recipe",
    "RegfxState",
    "WORDS",
    "audit",
    "bake",
    "load_checkpoint",
    "load_state_dict",
    "parse_types",
    "penalty",
    "plan",
    "save_checkpoint",
    "select_layers",
    "state_of",
    "trace",
    "transform",
]
