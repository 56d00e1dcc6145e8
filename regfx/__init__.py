"""regfx: automatic, auditable regularization for PyTorch models, driven by torch.fx graphs."""

from regfx.errors import LoadError, RegfxError, SelectionError, TraceError
from regfx.graph import ModelGraph
from regfx.select import WORDS, parse_types, select_layers
from regfx.trace import trace

__all__ = [
    "RegfxError",
    "LoadError",
    "SelectionError",
    "TraceError",
    "ModelGraph",
    "WORDS",
    "parse_types",
    "select_layers",
    "trace",
]
