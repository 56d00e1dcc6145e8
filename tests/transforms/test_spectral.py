"""regfx's SpectralNorm against torch's parametrizations.spectral_norm: same state, same sigma,
same u/v, same gradients, on the per-layer path and on the batched path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from regfx.transforms import spectral
from regfx.transforms.spectral import SpectralNorm, batched_step, collect, spectral_norm

LAYERS = {
    "linear": lambda: nn.Linear(12, 7),
    "conv2d": lambda: nn.Conv2d(3, 5, 3),
    "conv_transpose": lambda: nn.ConvTranspose2d(4, 6, 3),
}
INPUTS = {
    "linear": lambda: torch.randn(4, 12),
    "conv2d": lambda: torch.randn(2, 3, 6, 6),
    "conv_transpose": lambda: torch.randn(2, 4, 5, 5),
}


def pair(kind: str, n_power_iterations: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = LAYERS[kind]()
    ours = copy.deepcopy(base)
    theirs = copy.deepcopy(base)
    torch.manual_seed(1)
    spectral_norm(ours, n_power_iterations=n_power_iterations)
    torch.manual_seed(1)
    parametrizations.spectral_norm(theirs, n_power_iterations=n_power_iterations)
    return ours, theirs


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("n", [1, 3])
def test_matches_torch_over_training_steps(kind: str, n: int) -> None:
    ours, theirs = pair(kind, n)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same init, same draws
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    x = INPUTS[kind]()
    for _ in range(4):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
        torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                                   theirs.parametrizations.weight.original.grad,
                                   rtol=1e-4, atol=1e-5)
        assert abs(sigma(ours) / sigma(theirs) - 1) < 1e-5
        opt_o.step()
        opt_t.step()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    for model in (ours, theirs):
        model.eval()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-4, atol=1e-5)


def sigma(layer: nn.Module) -> float:
    """torch's own formula, u^T W v, from the layer's current state."""
    sn = layer.parametrizations.weight[0]
    mat = sn._reshape_weight_to_matrix(layer.parametrizations.weight.original.detach())
    return float(torch.vdot(sn._u, torch.mv(mat, sn._v)))


def test_eval_does_not_advance_u_v() -> None:
    ours, _ = pair("linear")
    ours.eval()
    before = copy.deepcopy(ours.state_dict())
    ours(torch.randn(2, 12))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


def test_called_twice_per_forward_like_torch() -> None:
    ours, theirs = pair("linear")
    lin_o, lin_t = nn.Linear(7, 12), nn.Linear(7, 12)
    lin_t.load_state_dict(lin_o.state_dict())
    x = torch.randn(3, 12)
    for model, back in ((ours, lin_o), (theirs, lin_t)):
        model(back(model(x))).sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               theirs.parametrizations.weight.original.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.parametrizations.weight[0]._u,
                               theirs.parametrizations.weight[0]._u)


def stacked(kind: str, depth: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    layers = [LAYERS[kind]() if kind != "linear" else nn.Linear(12, 12) for _ in range(depth)]
    base = nn.Sequential(*layers)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for a, b in zip(ours, theirs, strict=True):
        torch.manual_seed(1)
        spectral_norm(a)
        torch.manual_seed(1)
        parametrizations.spectral_norm(b)
    return ours, theirs


def assert_layers_match(ours: nn.Module, theirs: nn.Module, vector: str) -> None:
    """Each layer pair has the same weight gradient and the same ``vector`` (``_u``/``_v``)."""
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                   b.parametrizations.weight.original.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(a.parametrizations.weight[0], vector),
                                   getattr(b.parametrizations.weight[0], vector),
                                   rtol=1e-5, atol=1e-6)


def test_batched_step_matches_per_layer_torch() -> None:
    """The GPU path (batched power iteration before the forward), exercised on CPU."""
    ours, theirs = stacked("linear", 5)
    norms = collect(ours)
    assert len(norms) == 5 and all(isinstance(sn, SpectralNorm) for sn, _ in norms)
    x = torch.randn(4, 12)
    for _ in range(3):
        batched_step(norms)
        assert all("_regfx_pending" in sn.__dict__ for sn, _ in norms)
        (ours(x) ** 2).sum().backward()
        assert not any("_regfx_pending" in sn.__dict__ for sn, _ in norms)  # consumed
        (theirs(x) ** 2).sum().backward()
        assert_layers_match(ours, theirs, "_u")


def test_stale_pending_is_ignored_after_an_update() -> None:
    ours, _ = stacked("linear", 3)
    norms = collect(ours)
    batched_step(norms)
    with torch.no_grad():
        for layer in ours:
            layer.parametrizations.weight.original.add_(0.01)  # an optimizer step in between
    saved = [sn.__dict__.pop("_regfx_pending") for sn, _ in norms]
    expected = copy.deepcopy(ours)  # without the pending values
    for (sn, _), pending in zip(norms, saved, strict=True):
        sn.__dict__["_regfx_pending"] = pending
    x = torch.ones(1, 12)
    # the pending 1/sigma belongs to the old weights: the forward iterates afresh instead
    assert torch.equal(ours(x), expected(x))


def test_installed_hook_batches_and_leaves_nothing_behind() -> None:
    ours, theirs = stacked("linear", 4)
    spectral.install(ours)
    ours.__dict__["_regfx_batch_cpu"] = True  # take the GPU path on this CPU
    x = torch.randn(3, 12)

    class Skip(nn.Module):  # calls only the first three layers
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner[2](self.inner[1](self.inner[0](x)))

    wrapped = Skip(ours)
    spectral.install(wrapped)
    wrapped.__dict__["_regfx_batch_cpu"] = True
    wrapped(x).sum().backward()
    assert not any("_regfx_pending" in sn.__dict__ for sn, _ in collect(wrapped))
    copy.deepcopy(wrapped)  # no tensor with a graph left in a module
    (theirs[2](theirs[1](theirs[0](x)))).sum().backward()
    for i in range(3):
        torch.testing.assert_close(ours[i].parametrizations.weight.original.grad,
                                   theirs[i].parametrizations.weight.original.grad,
                                   rtol=1e-5, atol=1e-6)


def test_install_only_with_several_norms_and_uninstall() -> None:
    ours, _ = stacked("linear", 3)
    spectral.install(ours)
    assert spectral._pre_hook in ours._forward_pre_hooks.values()
    clone = copy.deepcopy(ours)  # deep copies keep working
    clone(torch.randn(2, 12))
    spectral.uninstall(ours)
    assert spectral._pre_hook not in ours._forward_pre_hooks.values()
    single, _ = pair("linear")
    spectral.install(single)
    assert spectral._pre_hook not in single._forward_pre_hooks.values()


def test_foreach_step_matches_per_layer_torch() -> None:
    """The CPU path: one mv per layer, the rest as foreach ops over all layers."""
    ours, theirs = stacked("linear", 4)
    norms = collect(ours)
    x = torch.randn(4, 12)
    for _ in range(3):
        spectral.foreach_step(norms)
        assert all(len(sn.__dict__["_regfx_pending"]) == 4 for sn, _ in norms)
        (ours(x) ** 2).sum().backward()
        (theirs(x) ** 2).sum().backward()
        assert_layers_match(ours, theirs, "_v")


def test_transformed_model_uses_the_cpu_path_by_default() -> None:
    import regfx

    model = regfx.transform(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                                          nn.Linear(6, 2)), spectral="linear")
    assert spectral._pre_hook in model._forward_pre_hooks.values()
    seen = []
    original = spectral.foreach_step
    spectral.foreach_step = lambda norms: (seen.append(len(norms)), original(norms))  # type: ignore[assignment]
    try:
        model(torch.randn(2, 6)).sum().backward()
    finally:
        spectral.foreach_step = original
    assert seen == [3]


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose"])
def test_foreach_step_on_convolutions(kind: str) -> None:
    ours_list, theirs_list = zip(*(pair(kind) for _ in range(3)), strict=True)
    ours, theirs = nn.ModuleList(ours_list), nn.ModuleList(theirs_list)
    norms = collect(ours)
    assert len(norms) == 3
    x = INPUTS[kind]()
    for _ in range(2):
        spectral.foreach_step(norms)
        for a, b in zip(ours, theirs, strict=True):
            (a(x) ** 2).sum().backward()
            (b(x) ** 2).sum().backward()
            torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                       b.parametrizations.weight.original.grad,
                                       rtol=1e-4, atol=1e-5)
            assert abs(sigma(a) / sigma(b) - 1) < 1e-5
