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
    ours.__dict__["_regfx_path"] = "batched"  # the GPU fallback, on this CPU
    x = torch.randn(3, 12)

    class Skip(nn.Module):  # calls only the first three layers
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner[2](self.inner[1](self.inner[0](x)))

    wrapped = Skip(ours)
    spectral.install(wrapped)
    wrapped.__dict__["_regfx_path"] = "batched"
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
        assert all(sn.__dict__["_regfx_pending"][0] == "divide" for sn, _ in norms)
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
    spectral.install(ours)
    if path:
        ours.__dict__["_regfx_path"] = path
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
    from regfx.transforms import spectral_fused

    ours, theirs = mixed_pair("fused", channels_last=channels_last, n=n)
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 3)
    state = spectral_fused._STATE[ours]
    assert state[2] is not None and state[2].forward_calls == 3 and state[2].backward_calls == 3


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
    spectral.install(wrapped_o)
    wrapped_o.__dict__["_regfx_path"] = "fused"
    x = torch.randn(2, 3, 8, 8)
    for model in (wrapped_o, wrapped_t):
        (model(x) ** 2).sum().backward()
    assert ours.fc2.parametrizations.weight.original.grad is None
    assert theirs.fc2.parametrizations.weight.original.grad is None
    for name in ("conv1", "conv2", "up", "fc1", "head"):
        a, b = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(a.parametrizations.weight.original.grad,
                                   b.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.parametrizations.weight[0]._u, b.parametrizations.weight[0]._u)
    assert not any("_regfx_pending" in sn.__dict__ for sn, _ in collect(wrapped_o))
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
    from regfx.transforms import spectral_fused

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ours, theirs = mixed_pair(None, device="cuda", channels_last=channels_last)
        x = torch.randn(2, 3, 8, 8, device="cuda")
        train_pair(ours, theirs, x, 4)
        fused = spectral_fused._STATE[ours][2]
        assert fused is not None and fused.fwd_graph is not None and fused.bwd_graph is not None
        ours.float()  # a no-op: the graphs stay
        train_pair(ours, theirs, x, 1)
        assert spectral_fused._STATE[ours][2] is fused
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
    ours, theirs = mixed_pair(None, channels_last=True)
    ours.__dict__["_regfx_path"] = "fused"
    monkeypatch.setattr(spectral_fused, "fused_step", _with_graphs(spectral_fused.fused_step))
    x = torch.randn(2, 3, 8, 8)
    train_pair(ours, theirs, x, 4)
    fused = spectral_fused._STATE[ours][2]
    assert fused is not None and fused.use_graphs
    assert fused.fwd_graph.replays == 3 and fused.bwd_graph.replays == 3  # first step eager
    # two forwards before one backward: each backward replay gets its own forward's scalars
    for model in (ours, theirs):
        model.zero_grad()
        ((model(x) ** 2).sum() + (model(x * 2) ** 2).sum()).backward()
    assert_mixed_match(ours, theirs)


def _with_graphs(original):  # type: ignore[no-untyped-def]
    return lambda model, norms, use_graphs: original(model, norms, True)


def test_fused_step_capture_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import regfx
    from regfx.transforms import spectral_fused
    from regfx.transforms.spectral_fused import FusedSpectral

    def fail(self, body, *args):  # type: ignore[no-untyped-def]
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(spectral_fused, "_can_capture", lambda: True)
    monkeypatch.setattr(FusedSpectral, "_warm_up", lambda self, body, *args: body(*args))
    monkeypatch.setattr(FusedSpectral, "_capture", fail)
    monkeypatch.setattr(spectral_fused, "fused_step", _with_graphs(spectral_fused.fused_step))
    ours, theirs = mixed_pair("fused")
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(regfx.RegfxWarning, match="without CUDA graphs, capture failed"):
        train_pair(ours, theirs, x, 3)
    assert not spectral_fused._STATE[ours][2].use_graphs


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


@pytest.mark.parametrize("path", [None, "fused", "batched"])
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
