"""Property-based tests: random architectures and recipes. ``transform`` + ``audit`` either
succeed with every invariant of the design contract holding, or raise a RegfxError with a
one-line message; never anything else.

200 examples by default (derandomized, so CI is reproducible); set
``HYPOTHESIS_PROFILE=explore`` for 1,000 random ones.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import regfx

from .test_invariants import logical_keys

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

ACTIVATIONS = ("relu", "gelu", "tanh", "relu_module", "silu_module")


@dataclass(frozen=True)
class Spec:
    """A random architecture: the kind and the choices that shape it."""

    kind: str             # mlp | cnn | residual | shared | tied | functional
    depth: int
    width: int
    norm: bool            # BatchNorm (cnn) / LayerNorm (others) after each layer
    activation: str
    dropout: float        # hand-written dropout already in the model (0: none)
    conv_dims: int        # 1 or 2 for cnn


class Generated(nn.Module):
    """A model built from a :class:`Spec`; its forward branches only on Python values."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        if spec.kind == "cnn":
            conv = nn.Conv1d if spec.conv_dims == 1 else nn.Conv2d
            bn = nn.BatchNorm1d if spec.conv_dims == 1 else nn.BatchNorm2d
            self.layers = nn.ModuleList(conv(3 if i == 0 else w, w, 3, padding=1)
                                        for i in range(spec.depth))
            self.norms = nn.ModuleList(bn(w) for _ in range(spec.depth)) if spec.norm else None
            self.head = nn.Linear(w, 3)
        elif spec.kind == "tied":
            self.embed = nn.Embedding(11, w)
            self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(spec.depth))
            self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in range(spec.depth)) if spec.norm else None
            self.head = nn.Linear(w, 11, bias=False)
            self.head.weight = self.embed.weight
        elif spec.kind == "functional":
            self.w_in = nn.Parameter(torch.randn(w, 5) * 0.3)
            self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(spec.depth))
            self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in range(spec.depth)) if spec.norm else None
            self.head = nn.Linear(w, 3)
        else:
            self.stem = nn.Linear(5, w)
            count = 1 if spec.kind == "shared" else spec.depth
            self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(count))
            self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in range(spec.depth)) if spec.norm else None
            self.head = nn.Linear(w, 3)
        self.act = nn.ReLU() if spec.activation == "relu_module" else (
            nn.SiLU() if spec.activation == "silu_module" else None)
        self.drop = nn.Dropout(spec.dropout) if spec.dropout else None

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            return self.act(x)
        if self.spec.activation == "gelu":
            return F.gelu(x)
        if self.spec.activation == "tanh":
            return torch.tanh(x)
        return torch.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "tied":
            x = self.embed(x)
        elif spec.kind == "functional":
            x = F.linear(x, self.w_in)
        elif spec.kind != "cnn":
            x = self.stem(x)
        for i in range(spec.depth):
            layer = self.layers[0] if spec.kind == "shared" else self.layers[i]
            y = layer(x)
            if self.norms is not None:
                y = self.norms[i](y)
            y = self._activate(y)
            if self.drop is not None:
                y = self.drop(y)
            x = x + y if spec.kind in ("residual", "shared") else y
        if spec.kind == "cnn":
            x = x.flatten(2).mean(-1)
        return self.head(x)


def example_input(spec: Spec) -> torch.Tensor:
    if spec.kind == "tied":
        return torch.randint(0, 11, (2, 4))
    if spec.kind == "cnn":
        return torch.randn(2, 3, 6) if spec.conv_dims == 1 else torch.randn(2, 3, 5, 5)
    return torch.randn(2, 5)


specs = st.builds(
    Spec,
    kind=st.sampled_from(["mlp", "cnn", "residual", "shared", "tied", "functional"]),
    depth=st.integers(1, 4),
    width=st.sampled_from([4, 6, 8]),
    norm=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    dropout=st.sampled_from([0.0, 0.0, 0.2]),
    conv_dims=st.sampled_from([1, 2]),
)
TYPES = ["linear", "conv", "embedding", "norm", "all", "linear,conv", "conv2d"]
recipes = st.fixed_dictionaries({}, optional={
    "dropout": st.one_of(st.none(), st.floats(0.0, 0.95)),
    "dropout_after": st.sampled_from(TYPES),
    "dropout_position": st.sampled_from(["block", "output"]),
    "dropout_kind": st.sampled_from(["auto", "element", "channel"]),
    "spectral": st.one_of(st.none(), st.sampled_from(TYPES)),
    "weight_norm": st.one_of(st.none(), st.sampled_from(TYPES)),
    "l1": st.sampled_from([0.0, 1e-5, -1.0]),
    "l2": st.sampled_from([0.0, 1e-4]),
    "exclude": st.sampled_from([(), ("head",), ("layers.0",)]),
})


def out_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def check(spec: Spec, recipe: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = Generated(spec)
    x = example_input(spec)
    before = copy.deepcopy(model.state_dict())
    expected = out_of(copy.deepcopy(model), x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", regfx.RegfxWarning)
            out = regfx.transform(model, **recipe)
            twice = regfx.transform(out, **recipe)
    except regfx.RegfxError as exc:
        message = str(exc)
        assert message and "\n" not in message
        event(f"RegfxError: {type(exc).__name__}")
        return
    event("transformed")
    # 1. input untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(before)
    # 2. classes kept
    assert isinstance(out, Generated)
    original = dict(model.named_modules())
    for name, mod in out.named_modules():
        if name in original:
            assert isinstance(mod, type(original[name])), name
    # 3. state-dict keys
    assert logical_keys(out) == set(before)
    # 4. eval outputs (dropout only: bitwise; weight norm only: to tolerance)
    got = out_of(out, x)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    if not recipe.get("spectral") and not recipe.get("weight_norm"):
        assert torch.equal(got, expected)
    elif not recipe.get("spectral"):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    out.train()
    assert all(m.training for m in out.modules())
    # 5. idempotent
    assert [n for n, _ in twice.named_modules()] == [n for n, _ in out.named_modules()]
    assert list(twice.state_dict()) == list(out.state_dict())
    # 6. bake
    baked = regfx.bake(out)
    assert list(baked.state_dict()) == list(before)
    torch.testing.assert_close(out_of(baked, x), out_of(out, x), rtol=1e-5, atol=1e-5)
    # 7. every parameter once in the audit, under its logical name
    report = regfx.audit(out)
    names = [n for r in report.params for n in (r.name, *r.aliases)]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # a training step works and keeps everything finite
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.01)
    loss = out(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(out_of(out, x)).all()


@settings(settings.get_profile(PROFILE))
@given(spec=specs, recipe=recipes)
def test_random_architectures_keep_the_invariants(spec: Spec, recipe: dict[str, Any]) -> None:
    check(spec, recipe)
