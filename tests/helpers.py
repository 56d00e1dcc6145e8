"""Running fixture models the same way in every test."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if hasattr(out, "logits"):
        out = out.logits
    return out


def eval_out(model: nn.Module, inputs: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return call(model, inputs)
