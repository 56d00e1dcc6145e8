"""regfx's SpectralNorm against torch's parametrizations.spectral_norm: same state, same sigma,
same u/v, same gradients, on the per-layer path (the CPU default) and the CUDA fast path (fused;
run eagerly on this CPU, with recorded graphs, and on CUDA where there is one)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from regfx.transforms import spectral_engine
from regfx.transforms.spectral import SpectralNorm, collect, spectral_norm
from regfx.transforms.spectral_engine import Path, engine_of
from regfx.transforms.spectral_fused import FusedSpectral

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


def norm_pairs(model: nn.Module) -> list[tuple[SpectralNorm, torch.Tensor]]:
    return [(m.norm, m.weight) for m in collect(model)]


def prepare(norms: list[tuple[SpectralNorm, torch.Tensor]]) -> None:
    """Prepare every norm's next forward on the fused path (eagerly, as it runs without CUDA)."""
    FusedSpectral(norms, use_graphs=False).run()


def force(model: nn.Module, path: str | None) -> None:
    """Make ``model``'s engine take ``path`` (None: the device's default)."""
    engine = engine_of(model)
    assert engine is not None
    engine.path = Path(path) if path else None


def test_stale_prepared_record_is_ignored_after_an_update() -> None:
    ours, _ = stacked("linear", 3)
    norms = norm_pairs(ours)
    prepare(norms)
    with torch.no_grad():
        for layer in ours:
            layer.parametrizations.weight.original.add_(0.01)  # an optimizer step in between
    expected = copy.deepcopy(ours)  # deep copies drop prepared records
    assert all(sn.prepared is not None for sn, _ in norms)
    assert all(sn.prepared is None for sn, _ in norm_pairs(expected))
    x = torch.ones(1, 12)
    # the prepared 1/sigma belongs to the old weights: the forward iterates afresh instead
    assert torch.equal(ours(x), expected(x))
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a.parametrizations.weight[0]._u, b.parametrizations.weight[0]._u)


def test_installed_engine_prepares_and_leaves_nothing_behind() -> None:
    """A layer the forward does not call keeps its u/v (as torch's); nothing prepared is left."""
    ours, theirs = stacked("linear", 4)
    x = torch.randn(3, 12)

    class Skip(nn.Module):  # calls only the first three layers
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner[2](self.inner[1](self.inner[0](x)))

    wrapped = Skip(ours)
    engine = spectral_engine.install(wrapped)
    assert engine is not None and len(engine.members) == 4
    engine.path = Path.FUSED
    seen = []
    original = engine.before_forward

    def spy(model: nn.Module) -> None:
        original(model)
        seen.append(sum(m.norm.prepared is not None for m in engine.members))

    engine.before_forward = spy  # type: ignore[method-assign]
    wrapped(x).sum().backward()
    assert seen == [4]  # all four prepared, three used
    assert all(m.norm.prepared is None for m in engine.members)
    copy.deepcopy(wrapped)  # no tensor with a graph left in a module
    (theirs[2](theirs[1](theirs[0](x)))).sum().backward()
    for i in range(4):
        torch.testing.assert_close(ours[i].parametrizations.weight[0]._u,
                                   theirs[i].parametrizations.weight[0]._u, rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(ours[i].parametrizations.weight.original.grad,
                                   theirs[i].parametrizations.weight.original.grad,
                                   rtol=1e-5, atol=1e-6)


def test_install_only_with_several_norms_and_uninstall() -> None:
    ours, _ = stacked("linear", 3)
    engine = spectral_engine.install(ours)
    assert engine is not None and engine_of(ours) is engine and engine.root is ours
    assert len(ours._forward_pre_hooks) == 1 and len(ours._forward_hooks) == 1
    clone = copy.deepcopy(ours)  # deep copies keep working, with an engine of their own
    clone_engine = engine_of(clone)
    assert clone_engine is not None and clone_engine is not engine and clone_engine.root is clone
    assert [m.norm for m in clone_engine.members] == [layer.parametrizations.weight[0] for layer in clone]
    clone(torch.randn(2, 12))
    spectral_engine.uninstall(ours)
    assert engine_of(ours) is None
    assert not ours._forward_pre_hooks and not ours._forward_hooks
    assert engine_of(clone) is clone_engine and len(clone._forward_pre_hooks) == 1
    single, _ = pair("linear")
    assert spectral_engine.install(single) is None
    assert not single._forward_pre_hooks


def test_prepared_step_matches_per_layer_torch() -> None:
    """Records prepared for all layers at once (the fused step, run eagerly here)."""
    ours, theirs = stacked("linear", 4)
    norms = norm_pairs(ours)
    x = torch.randn(4, 12)
    for _ in range(3):
        prepare(norms)
        assert all(sn.prepared is not None for sn, _ in norms)
        (ours(x) ** 2).sum().backward()
        assert all(sn.prepared is None for sn, _ in norms)  # each layer used its record
        (theirs(x) ** 2).sum().backward()
        assert_layers_match(ours, theirs, "_v")


def test_transformed_model_iterates_per_layer_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fast path off CUDA: the engine prepares nothing and each layer iterates itself."""
    import regfx

    model = regfx.transform(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                                          nn.Linear(6, 2)), spectral="linear")
    engine = engine_of(model)
    assert engine is not None
    assert engine.choose(norm_pairs(model)) is Path.PER_LAYER
    runs = []
    monkeypatch.setattr(FusedSpectral, "run", lambda self: runs.append(1))
    calls = []
    for m in collect(model):
        m.norm.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(2, 6)).sum().backward()
    assert runs == [] and len(calls) == 3
    assert all(m.norm.prepared is None for m in collect(model))


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose"])
def test_prepared_step_on_convolutions(kind: str) -> None:
    ours_list, theirs_list = zip(*(pair(kind) for _ in range(3)), strict=True)
    ours, theirs = nn.ModuleList(ours_list), nn.ModuleList(theirs_list)
    norms = norm_pairs(ours)
    assert len(norms) == 3
    x = INPUTS[kind]()
    for _ in range(2):
        prepare(norms)  # one fused step for all three: one backward through them all
        sum((a(x) ** 2).sum() for a in ours).backward()
        sum((b(x) ** 2).sum() for b in theirs).backward()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                       b.parametrizations.weight.original.grad,
                                       rtol=1e-4, atol=1e-5)
            assert abs(sigma(a) / sigma(b) - 1) < 1e-5


class Mixed(nn.Module):
    """Linear, conv (optionally channels_last) and transposed conv layers in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.up = nn.ConvTranspose2d(5, 4, 3)
        self.fc1 = nn.Linear(4 * 8 * 8, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.up(x).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mixed_pair(path: str | None, device: str = "cpu", channels_last: bool = False,
               n: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Mixed().to(device)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for a, b in zip(ours.children(), theirs.children(), strict=True):
        torch.manual_seed(1)
        spectral_norm(a, n_power_iterations=n)
        torch.manual_seed(1)
        parametrizations.spectral_norm(b, n_power_iterations=n)
    spectral_engine.install(ours)
    force(ours, path)
    return ours, theirs


def assert_mixed_match(ours: nn.Module, theirs: nn.Module, grads: bool = True) -> None:
    for (name, a), b in zip(ours.named_children(), theirs.children(), strict=True):
        ga, gb = a.parametrizations.weight.original.grad, b.parametrizations.weight.original.grad
        if grads:
            assert ga is not None and gb is not None, name
            assert ga.stride() == gb.stride(), name  # same memory format as torch's gradient
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=name)
        for vec in ("_u", "_v"):
            torch.testing.assert_close(getattr(a.parametrizations.weight[0], vec),
                                       getattr(b.parametrizations.weight[0], vec), rtol=1e-5, atol=1e-6)


def train_pair(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, steps: int) -> None:
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05)
    for _ in range(steps):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
        assert_mixed_match(ours, theirs)
        opt_o.step()
        opt_t.step()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_step_matches_torch(channels_last: bool, n: int) -> None:
    """The GPU path (every layer in one fused step), run eagerly on this CPU."""
    ours, theirs = mixed_pair("fused", channels_last=channels_last, n=n)
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 3)
    fused = engine_of(ours).fused  # type: ignore[union-attr]
    assert fused is not None and fused.forward_calls == 3 and fused.backward_calls == 3


def test_fused_step_unused_layer_gets_no_gradient_and_reused_layer_iterates_again() -> None:
    ours, theirs = mixed_pair("fused")

    class Twice(nn.Module):  # fc2 skipped, fc1 called twice
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.inner
            h = torch.relu(m.conv2(torch.relu(m.conv1(x))))
            h = torch.relu(m.fc1(m.up(h).flatten(1)))
            return m.head(h + m.fc1(m.up(torch.relu(m.conv2(torch.relu(m.conv1(x))))).flatten(1)))

    wrapped_o, wrapped_t = Twice(ours), Twice(theirs)
    spectral_engine.install(wrapped_o)
    force(wrapped_o, "fused")
    x = torch.randn(2, 3, 8, 8)
    for model in (wrapped_o, wrapped_t):
        (model(x) ** 2).sum().backward()
    assert ours.fc2.parametrizations.weight.original.grad is None
    assert theirs.fc2.parametrizations.weight.original.grad is None
    for name in ("conv1", "conv2", "up", "fc1", "head"):
        a, b = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                   b.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)
    for name in ("conv1", "conv2", "up", "fc1", "fc2", "head"):  # fc2's u/v stay, as torch's
        a, b = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(a.parametrizations.weight[0]._u, b.parametrizations.weight[0]._u)
        torch.testing.assert_close(a.parametrizations.weight[0]._v, b.parametrizations.weight[0]._v)
    assert not any(sn.prepared is not None for sn, _ in norm_pairs(wrapped_o))
    copy.deepcopy(wrapped_o)  # nothing with a graph left in a module


def test_fused_step_two_forwards_one_backward() -> None:
    ours, theirs = mixed_pair("fused")
    x1, x2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for model in (ours, theirs):
        loss = (model(x1) ** 2).sum()
        loss = loss + (model(x2) ** 2).sum()  # u/v advance twice; each forward keeps its sigma
        loss.backward()
    assert_mixed_match(ours, theirs)


def test_fused_step_no_grad_training_forward_advances_like_torch() -> None:
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-6)
    assert_mixed_match(ours, theirs, grads=False)


def test_fused_step_weight_changed_before_backward_raises() -> None:
    ours, _ = mixed_pair("fused")
    out = ours(torch.randn(2, 3, 8, 8)).sum()
    with torch.no_grad():
        ours.fc1.parametrizations.weight.original.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_fused_step_forward_that_raises_still_advances_the_layers_that_ran() -> None:
    """The layers that ran advanced their u/v, and no record outlives the forward."""
    ours, theirs = mixed_pair("fused")

    class Fails(nn.Module):  # conv1 and conv2 run, then the forward fails
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inner.conv2(torch.relu(self.inner.conv1(x)))
            raise ValueError("bad batch")

    wrapped_o, wrapped_t = Fails(ours), Fails(theirs)
    spectral_engine.install(wrapped_o)
    force(wrapped_o, "fused")
    x = torch.randn(2, 3, 8, 8)
    for model in (wrapped_o, wrapped_t):
        with pytest.raises(ValueError, match="bad batch"):
            model(x)
    assert not any(sn.prepared is not None for sn, _ in norm_pairs(wrapped_o))
    before = mixed_pair("fused")[0]
    for name in ("conv1", "conv2", "up", "fc1", "fc2", "head"):
        a = getattr(ours, name).parametrizations.weight[0]
        b = getattr(theirs, name).parametrizations.weight[0]
        torch.testing.assert_close(a._u, b._u, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a._v, b._v, rtol=1e-5, atol=1e-6, msg=name)
        advanced = not torch.equal(a._u, getattr(before, name).parametrizations.weight[0]._u)
        assert advanced == (name in ("conv1", "conv2")), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_step_under_gradient_checkpointing_matches_torch(reentrant: bool) -> None:
    """A checkpointed block recomputes its layers in the backward: like torch's, they iterate
    again there (u/v advance twice), and the gradients are those of the recomputation."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner[0](x)
            h = checkpoint(lambda t: self.inner[2](torch.tanh(self.inner[1](t))), h,
                           use_reentrant=reentrant)
            return self.inner[3](h)

    ours, theirs = stacked("linear", 4)
    wrapped_o, wrapped_t = Checkpointed(ours), Checkpointed(theirs)
    engine = spectral_engine.install(wrapped_o)
    force(wrapped_o, "fused")
    x = torch.randn(3, 12, requires_grad=reentrant)  # reentrant: an input that needs grad
    calls = []
    for layer in ours:
        layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    for model in (wrapped_o, wrapped_t):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
            opt.step()
    assert len(calls) == 2 * 6  # per step: four layers, two of them again in the backward
    assert engine is not None and engine.fused is not None and engine.fused.forward_calls == 2
    assert_layers_match(ours, theirs, "_u")
    assert_layers_match(ours, theirs, "_v")


def test_fused_step_model_forward_hooks_see_the_new_vectors() -> None:
    """A forward hook of the model registered before the engine's (logging sigma, say) already
    sees every layer's advanced u/v."""
    ours, theirs = mixed_pair("fused")
    spectral_engine.uninstall(ours)
    seen = []
    ours.register_forward_hook(
        lambda m, a, o: seen.append(m.fc1.parametrizations.weight[0]._u.clone()))
    spectral_engine.install(ours)
    force(ours, "fused")
    x = torch.randn(2, 3, 8, 8)
    ours(x)
    theirs(x)
    torch.testing.assert_close(seen[0], theirs.fc1.parametrizations.weight[0]._u,
                               rtol=1e-5, atol=1e-6)


def clip_in_pre_hook(how: str):  # type: ignore[no-untyped-def]
    """A forward pre-hook changing its layer's weight before the layer runs (a max-norm
    constraint applied in the forward, say)."""
    def hook(layer: nn.Module, args: object) -> None:
        w = layer.parametrizations.weight.original
        if how == "inplace":
            with torch.no_grad():
                w.clamp_(-0.05, 0.05)
        else:  # a new tensor through .data: same parameter object, same version
            w.data = w.data.clamp(-0.05, 0.05)
    return hook


@pytest.mark.parametrize("how", ["inplace", "data_assign"])
def test_fused_step_weight_changed_in_the_forward_before_its_layer_runs(how: str) -> None:
    """That layer refuses its record and iterates on the changed weight, as torch's; the other
    layers' records and the backward through the fused step are unaffected."""
    ours, theirs = mixed_pair("fused")
    for model in (ours, theirs):
        model.fc1.register_forward_pre_hook(clip_in_pre_hook(how))
    train_pair(ours, theirs, torch.randn(2, 3, 8, 8), 2)


def test_fused_step_frozen_copy_updated_through_data_in_the_forward() -> None:
    """MoCo's key encoder: a copy that needs no gradient, updated in the forward through
    ``.data`` (which leaves no version or identity change) before it runs; its layers iterate
    on the updated weights, as torch's."""

    class Momentum(nn.Module):
        def __init__(self, online: nn.Module) -> None:
            super().__init__()
            self.online = online
            self.target = copy.deepcopy(online).requires_grad_(False)
            with torch.no_grad():
                for p in self.online.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.online(x)
            with torch.no_grad():
                for po, pt in zip(self.online.parameters(), self.target.parameters(), strict=True):
                    pt.data.mul_(0.5).add_(po.data, alpha=0.5)
                k = self.target(x)
            return q * k

    ours, theirs = mixed_pair("fused")
    wrapped_o, wrapped_t = Momentum(ours), Momentum(theirs)
    engine = spectral_engine.install(wrapped_o)
    force(wrapped_o, "fused")
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        for model in (wrapped_o, wrapped_t):
            model.zero_grad()
            (model(x) ** 2).sum().backward()
        assert_mixed_match(ours, theirs)
        assert_mixed_match(wrapped_o.target, wrapped_t.target, grads=False)
    assert engine is not None and engine.fused is not None
    assert len(engine.fused.members) == 6  # the online layers only


def test_fused_step_optimizer_step_between_two_backwards() -> None:
    """One forward, two losses: the head stepped after the first backward, the second loss not
    reaching the head (an auxiliary loss on hidden features)."""
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    features = {}
    for model in (ours, theirs):
        model.fc2.register_forward_hook(lambda m, a, out, model=model: features.update({model: out}))
    for model in (ours, theirs):
        out = model(x)
        (out ** 2).sum().backward(retain_graph=True)
        torch.optim.SGD(model.head.parameters(), lr=0.1).step()
        features[model].pow(2).sum().backward()
    assert_mixed_match(ours, theirs)


def test_fused_step_layer_hooks_read_the_new_vectors() -> None:
    """A layer's forward hook reading its u/v (to log sigma, say), directly, through the state
    dict or through ``named_buffers``, sees the vectors its call advanced, as with torch's."""
    ours, theirs = mixed_pair("fused")
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "theirs": []}
    for key, model in (("ours", ours), ("theirs", theirs)):
        def hook(layer: nn.Module, args: object, out: torch.Tensor, key: str = key) -> None:
            sn = layer.parametrizations.weight[0]
            seen[key] += [dict(layer.named_buffers())["parametrizations.weight.0._u"].clone(),
                          sn._u.clone(), layer.state_dict()["parametrizations.weight.0._v"].clone()]
        model.fc1.register_forward_hook(hook)
    x = torch.randn(2, 3, 8, 8)
    ours(x)
    theirs(x)
    for a, b in zip(seen["ours"], seen["theirs"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_steps_alternate_like_a_gan() -> None:
    """The discriminator's weights need no gradient in the generator's step (no fused step for
    a model of those alone; the generator's layers in a step of their own), then do again: each
    set of layers keeps its fused step, and the numbers stay torch's."""

    class Gan(nn.Module):
        def __init__(self, d: nn.Module) -> None:
            super().__init__()
            self.g = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3 * 8 * 8))
            self.d = d

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.d(self.g(z).view(-1, 3, 8, 8))

    ours_d, theirs_d = mixed_pair("fused")
    torch.manual_seed(5)
    ours = Gan(ours_d)
    theirs = copy.deepcopy(ours)
    theirs.d = theirs_d
    for a, b in zip(ours.g[::2], theirs.g[::2], strict=True):
        torch.manual_seed(1)
        spectral_norm(a)
        torch.manual_seed(1)
        parametrizations.spectral_norm(b)
    spectral_engine.uninstall(ours_d)
    engine = spectral_engine.install(ours)
    force(ours, "fused")
    z = torch.randn(2, 6)
    for step in range(4):
        for model in (ours, theirs):
            model.zero_grad()
            model.d.requires_grad_(step % 2 == 0)  # the generator's step: d frozen
            (model(z) ** 2).sum().backward()
        assert_mixed_match(ours.d, theirs.d, grads=step % 2 == 0)
        for a, b in zip(ours.g[::2], theirs.g[::2], strict=True):
            torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                       b.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.parametrizations.weight[0]._u, b.parametrizations.weight[0]._u)
    assert engine is not None and len(engine.steps) == 2
    assert sorted(step.forward_calls for step in engine.steps.values()) == [2, 2]
    with torch.no_grad():  # the discriminator alone, frozen: nothing to fuse, each layer on its own
        ours.d.requires_grad_(False)
        ours.g.requires_grad_(False)
        ours(z)
    ours.g.requires_grad_(True)
    ours.d.fc1.requires_grad_(True)  # a third set: the least recently used of the two goes
    before = list(engine.steps.values())
    ours(z)
    assert len(engine.steps) == 2 and engine.fused is not None and engine.fused not in before
    assert len(engine.fused.members) == 3 and list(engine.steps.values())[0] is before[1]
    ours.eval().double()  # moved (here to another dtype), then used for inference: the steps go
    ours(z.double())
    assert engine.steps == {} and engine.fused is None


def test_fused_step_backward_for_some_parameters_after_another_weight_changed() -> None:
    """``backward(inputs=...)`` for the first layers after the head's weight was stepped (one
    forward, a loss per part): the head's gradient is not asked for, so its change is no
    error, as with torch's."""
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    for model in (ours, theirs):
        out = model(x)
        head = model.head.parametrizations.weight.original
        (out ** 2).sum().backward(inputs=[head], retain_graph=True)
        with torch.no_grad():
            head.sub_(0.1 * head.grad)
        first = [model.conv1.parametrizations.weight.original,
                 model.conv2.parametrizations.weight.original]
        out.sum().backward(inputs=first, retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward(inputs=[head])  # asked for: autograd's error, as with torch's
    for name in ("conv1", "conv2", "head"):
        torch.testing.assert_close(getattr(ours, name).parametrizations.weight.original.grad,
                                   getattr(theirs, name).parametrizations.weight.original.grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_fused_steps_keep_no_replaced_or_substituted_weights_alive() -> None:
    """A fused step for weights assigned since, or for ``functional_call``'s fast weights (with
    an autograd history), is not kept: it would keep those weights (and their graph) alive."""
    import gc
    import weakref

    ours, _ = mixed_pair("fused")
    engine = engine_of(ours)
    assert engine is not None
    x = torch.randn(2, 3, 8, 8)
    ours(x).sum().backward()
    ours.head.requires_grad_(False)
    ours(x).sum().backward()  # a second set of layers
    assert len(engine.steps) == 2
    old = [weakref.ref(p) for p in ours.parameters()]
    ours.head.requires_grad_(True)
    ours.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, assign=True)
    ours(x).sum().backward()
    assert len(engine.steps) == 1  # the other set's step held the replaced weights
    gc.collect()
    assert all(ref() is None for ref in old)

    params = dict(ours.named_parameters())
    fast = {k: p * 1.0 for k, p in params.items()}  # fast weights with a history, as in MAML
    torch.func.functional_call(ours, fast, (x,)).sum().backward()
    refs = [weakref.ref(t) for t in fast.values()]
    del fast
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert all(step.leaf_weights for step in engine.steps.values())


def test_compiled_region_calls_a_layer_that_already_ran() -> None:
    """A layer run eagerly and then again inside a compiled function in one forward: torch's
    code there, from the vectors the eager call advanced."""
    ours, theirs = mixed_pair("fused")
    torch._dynamo.reset()

    def twice(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        again = torch.compile(lambda h: model.fc2(torch.relu(h)), backend="aot_eager")

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = model.fc2(torch.relu(model.fc1(model.up(torch.relu(model.conv2(
                torch.relu(model.conv1(x))))).flatten(1))))
            return model.head(again(h))
        return forward

    x = torch.randn(2, 3, 8, 8)
    for model in (ours, theirs):
        model.forward = twice(model)  # type: ignore[method-assign]
    train_pair(ours, theirs, x, 2)


def test_fused_step_follows_changed_settings_and_path() -> None:
    """Changing every norm's number of power iterations (or eps) between steps, or the path,
    takes effect at the next step."""
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 1)
    fused = engine_of(ours).fused  # type: ignore[union-attr]
    for model in (ours, theirs):
        for layer in model.children():
            layer.parametrizations.weight[0].n_power_iterations = 3
            layer.parametrizations.weight[0].eps = 1e-8
    train_pair(ours, theirs, x, 2)
    rebuilt = engine_of(ours).fused  # type: ignore[union-attr]
    assert rebuilt is not None and rebuilt is not fused and rebuilt.n == 3 and rebuilt.eps == 1e-8
    force(ours, "per-layer")
    runs = rebuilt.forward_calls
    train_pair(ours, theirs, x, 1)
    assert rebuilt.forward_calls == runs


def test_fused_step_follows_the_model_to_another_dtype() -> None:
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 1)
    ours.double()
    theirs.double()
    train_pair(ours, theirs, x.double(), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu.sh)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_step_cuda_graphs_match_torch(channels_last: bool) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ours, theirs = mixed_pair(None, device="cuda", channels_last=channels_last)
        x = torch.randn(2, 3, 8, 8, device="cuda")
        train_pair(ours, theirs, x, 4)
        fused = engine_of(ours).fused  # type: ignore[union-attr]
        assert fused is not None and fused.fwd_graph is not None and fused.bwd_graph is not None
        ours.float()  # a no-op: the graphs stay
        train_pair(ours, theirs, x, 1)
        assert engine_of(ours).fused is fused  # type: ignore[union-attr]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class RecordedGraph:
    """Stands in for a CUDA graph on a CPU: capturing records the body, replay runs it again."""

    def __init__(self, body, args) -> None:  # type: ignore[no-untyped-def]
        self.body, self.args, self.replays = body, args, 0

    def replay(self) -> None:
        self.replays += 1
        self.body(*self.args)


def test_fused_step_graph_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The static buffers, warm-ups and replays of the CUDA-graph path, with recorded graphs:
    each step must read this step's weights, vectors and gradients, and warm-ups must not
    advance u/v."""
    from regfx.transforms import spectral_fused
    from regfx.transforms.spectral_fused import FusedSpectral

    monkeypatch.setattr(spectral_fused, "_can_capture", lambda: True)
    monkeypatch.setattr(FusedSpectral, "_warm_up", lambda self, body, *args: body(*args))
    monkeypatch.setattr(FusedSpectral, "_capture", lambda self, body, *args: RecordedGraph(body, args))
    ours, theirs = mixed_pair("fused", channels_last=True)
    engine_of(ours).cuda_graphs = True  # type: ignore[union-attr]
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 4)
    fused = engine_of(ours).fused  # type: ignore[union-attr]
    assert fused is not None and fused.use_graphs
    assert fused.fwd_graph.replays == 3 and fused.bwd_graph.replays == 3  # first step eager
    # two forwards before one backward: each backward replay gets its own forward's scalars
    for model in (ours, theirs):
        model.zero_grad()
        ((model(x) ** 2).sum() + (model(x * 2) ** 2).sum()).backward()
    assert_mixed_match(ours, theirs)


def test_fused_step_capture_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import regfx
    from regfx.transforms import spectral_fused
    from regfx.transforms.spectral_fused import FusedSpectral

    def fail(self, body, *args):  # type: ignore[no-untyped-def]
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(spectral_fused, "_can_capture", lambda: True)
    monkeypatch.setattr(FusedSpectral, "_warm_up", lambda self, body, *args: body(*args))
    monkeypatch.setattr(FusedSpectral, "_capture", fail)
    ours, theirs = mixed_pair("fused")
    engine_of(ours).cuda_graphs = True  # type: ignore[union-attr]
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(regfx.RegfxWarning, match="without CUDA graphs, capture failed"):
        train_pair(ours, theirs, x, 3)
    assert not engine_of(ours).fused.use_graphs  # type: ignore[union-attr]


def cpu_replica(model: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` (``nn.DataParallel``) makes of ``model`` for one
    device, on the CPU: shallow module copies sharing ``__dict__`` entries and hooks, with
    differentiable copies of the parameters and copies of the buffers."""
    modules = list(model.modules())
    copies = {id(m): m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = copies[id(m)]
        for key, child in m._modules.items():
            setattr(r, key, copies[id(child)]) if child is not None else r._modules.__setitem__(key, None)
        for key, param in m._parameters.items():
            setattr(r, key, param * 1)
        for key, buf in m._buffers.items():
            setattr(r, key, buf.clone())
    return copies[id(model)]


@pytest.mark.parametrize("path", [None, "fused"])
def test_dataparallel_replica_iterates_on_its_own_like_torch(path: str | None) -> None:
    ours, theirs = mixed_pair(path)
    before = copy.deepcopy(ours.state_dict())
    x = torch.randn(2, 3, 8, 8)
    out_o, out_t = cpu_replica(ours)(x), cpu_replica(theirs)(x)
    torch.testing.assert_close(out_o, out_t, rtol=1e-4, atol=1e-6)
    for key, value in ours.state_dict().items():  # the original's u/v are not advanced
        assert torch.equal(value, before[key]), key
    (out_o ** 2).sum().backward()
    (out_t ** 2).sum().backward()
    assert_mixed_match(ours, theirs, grads=True)
    ours(x).sum().backward()  # the original still takes its own fast path afterwards


def test_engine_chooses_one_path_per_step() -> None:
    """The fused path on CUDA (or where forced) when all layers can share it, else each layer on
    its own."""
    ours, _ = stacked("linear", 3)
    engine = spectral_engine.install(ours)
    assert engine is not None
    current = norm_pairs(ours)
    assert engine.choose(current) is Path.PER_LAYER  # CPU: no fast path
    assert engine.choose(current[:1]) is Path.PER_LAYER  # nothing to share
    engine.path = Path.FUSED
    assert engine.choose(current) is Path.FUSED
    current[1][0].eps = 1e-6  # mixed settings
    assert engine.choose(current) is Path.PER_LAYER
    current[1][0].eps = current[0][0].eps
    noncontiguous = [(sn, w.t()) if i == 1 else (sn, w) for i, (sn, w) in enumerate(current)]
    assert engine.choose(noncontiguous) is Path.FUSED  # a transposed view is still dense
    strided = [(sn, w[:, ::2]) if i == 1 else (sn, w) for i, (sn, w) in enumerate(current)]
    assert engine.choose(strided) is Path.PER_LAYER  # the fused step needs dense weights
