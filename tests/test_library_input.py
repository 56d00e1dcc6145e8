"""Wrong inputs to the library give a RegfxError naming the argument and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regfx


def test_script_modules_are_refused_with_the_fix() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    for call in (lambda: regfx.transform(scripted, dropout=0.2), lambda: regfx.trace(scripted),
                 lambda: regfx.audit(scripted)):
        with pytest.raises(regfx.RegfxError, match="script modules cannot be .*; pass the eager module"):
            call()


@pytest.mark.parametrize("value", [5, None, 1.5])
def test_include_and_exclude_of_the_wrong_type(value: object) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    for key in ("include", "exclude"):
        with pytest.raises(regfx.RegfxError, match=f"{key} must be a glob string or a list"):
            regfx.transform(model, dropout=0.2, **{key: value})


def test_penalty_of_something_that_is_not_a_module() -> None:
    with pytest.raises(regfx.RegfxError, match=r"penalty\(\) needs an nn.Module, got int"):
        regfx.penalty(5)  # type: ignore[arg-type]


def test_a_bare_leaf_layer_is_a_model_of_its_own() -> None:
    """The layer is the whole model, so its output is the model's output: no dropout there,
    while norms and penalties apply."""
    layer = nn.Linear(4, 3)
    plan = regfx.plan(layer, dropout=0.2, spectral="linear", l2=1e-4)
    assert plan.dropout == [] and ("", "dropout", "output layer") in [
        (s.split("#")[0], k, why) for s, k, why in plan.skipped]
    with warnings.catch_warnings():
        warnings.simplefilter("error", regfx.RegfxWarning)
        out = regfx.transform(layer, dropout=0.2, spectral="linear", l2=1e-4)
    assert regfx.audit(out).param("weight").kinds() >= {"spectral_norm", "l2"}
