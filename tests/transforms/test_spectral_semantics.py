"""regfx's spectral norm keeps torch's semantics where its fast paths could lose them: second-order
gradients (a backward differentiated again, ``create_graph=True``) and complex weights (the
conjugate transpose in the power iteration, ``sigma = u^H W v`` and the backward). Reference:
``torch.nn.utils.parametrizations.spectral_norm`` from the same weights and the same ``u``/``v``.

Both paths are covered: per layer (the CPU default of a transformed model) and ``fused`` (the
CUDA path, run eagerly here). The CUDA-graph replay of the fused path needs a GPU and is not run here; a
differentiated backward never replays a graph (it runs the differentiable ops eagerly)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import regfx
from regfx.transforms import spectral, spectral_fused
from regfx.transforms.spectral import _DivideBySigma, collect
from regfx.transforms.spectral_engine import Path, engine_of

PATHS = ["per-layer", "fused"]


class Net(nn.Module):
    """A Conv2d (dim 0, 4-d weight), a ConvTranspose2d (dim 1) and Linear layers, two of them of
    one shape (which the batched path stacks), with tanh between them so that second
    derivatives through the activations are not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.up = nn.ConvTranspose2d(3, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 4)
        self.fc2 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc(h.flatten(1))))))


class ComplexNet(nn.Module):
    """Complex Linear layers, two of them of one shape."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4, dtype=dtype)
        self.fc2 = nn.Linear(4, 4, dtype=dtype)
        self.fc3 = nn.Linear(4, 3, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(x)))


def torch_spectral(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            parametrizations.spectral_norm(m)  # dim 1 for ConvTranspose, as regfx's
    return model


def make_pair(base: nn.Module, path: str, types: str) -> tuple[nn.Module, nn.Module]:
    """regfx's (through ``regfx.transform``) and torch's spectral norm on copies of ``base``,
    with torch's ``u``/``v`` copied into regfx's buffers; ``path`` picks regfx's training path."""
    theirs = torch_spectral(copy.deepcopy(base))
    ours = regfx.transform(copy.deepcopy(base), spectral=types)
    state = theirs.state_dict()
    assert ours.state_dict().keys() == state.keys()
    ours.load_state_dict(state)  # same weights, same u/v
    norms = collect(ours)
    assert norms and all(type(m.norm) is spectral.SpectralNorm for m in norms)
    if path != "per-layer":  # per layer: the CPU default
        engine = engine_of(ours)
        assert engine is not None
        engine.path = Path(path)
    return ours, theirs


def close(a: torch.Tensor | None, b: torch.Tensor | None, what: str, tol: float = 1e-5) -> None:
    """``a`` equals ``b`` to ``tol`` relative to the largest magnitude in ``b`` (at least 1): the
    sums behind second-order gradients round at float32 resolution of their largest terms."""
    assert a is not None and b is not None, what
    scale = max(1.0, float(b.detach().abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def second_order(model: nn.Module, x: torch.Tensor, wrt: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """First-order gradients with ``create_graph=True`` and a penalty on them, backpropagated:
    ``||dL/dx||^2`` (a gradient penalty) or ``||dL/d(x, params)||^2`` (which differentiates the
    spectral norm's own backward). Returns the first-order gradients and the output."""
    x = x.clone().requires_grad_()
    out = model(x)
    loss = (out ** 2).sum()
    inputs = [x] if wrt == "input" else [x, *params(model).values()]
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    (loss + penalty).backward()  # type: ignore[union-attr]
    return [g.detach() for g in grads], out.detach()


def assert_same_state(ours: nn.Module, theirs: nn.Module, tol: float = 1e-5) -> None:
    """Same second-order parameter gradients and the same u/v."""
    p_o, p_t = params(ours), params(theirs)
    assert p_o.keys() == p_t.keys()
    for name in p_t:
        close(p_o[name].grad, p_t[name].grad, f"{name}.grad", tol)
    for key, value in theirs.state_dict().items():
        if key.endswith(("._u", "._v")):
            close(ours.state_dict()[key], value, key, tol)


@pytest.mark.parametrize(("make", "types"), [(Net, "linear,conv"),
                                             (lambda: ComplexNet(torch.complex64), "linear")])
@pytest.mark.parametrize("path", ["fused"])
def test_the_models_take_each_path(make: Callable[[], nn.Module], types: str, path: str) -> None:
    """The models below go through each fast path as named: every layer gets a prepared record
    (with the normalized weight itself on the fused path) and uses it."""
    torch.manual_seed(0)
    model, _ = make_pair(make(), path, types)
    engine = engine_of(model)
    assert engine is not None
    norms = [m.norm for m in engine.members]
    engine.before_forward(model)
    assert all(sn.prepared is not None for sn in norms)
    assert all((sn.prepared.normalized is not None) == (path == "fused") for sn in norms)  # type: ignore[union-attr]
    x = torch.randn(3, 2, 6, 6) if make is Net else torch.randn(3, 4, dtype=torch.complex64)
    model(x)
    assert all(sn.prepared is None for sn in norms)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wrt", ["input", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_order_gradients_match_torch(path: str, wrt: str, dtype: torch.dtype) -> None:
    """Training steps with a gradient penalty. In float32 each step starts from torch's weights
    and u/v (training with second-order terms amplifies float32 rounding from step to step, for
    torch against itself as well); in float64 the two train side by side undisturbed."""
    torch.manual_seed(0)
    ours, theirs = make_pair(Net().to(dtype), path, "linear,conv")
    x = torch.randn(3, 2, 6, 6, dtype=dtype)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.01)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for _ in range(3):  # u/v advance each step, the weights change
        if dtype == torch.float32:
            ours.load_state_dict(theirs.state_dict())
        opt_o.zero_grad()
        opt_t.zero_grad()
        grads_o, out_o = second_order(ours, x, wrt)
        grads_t, out_t = second_order(theirs, x, wrt)
        close(out_o, out_t, "output", tol)
        for i, (a, b) in enumerate(zip(grads_o, grads_t, strict=True)):
            close(a, b, f"first-order gradient {i}", tol)
        assert_same_state(ours, theirs, tol)
        opt_o.step()
        opt_t.step()


NAMES = ("conv", "up", "fc", "fc2", "head")


@pytest.mark.parametrize("path", PATHS)
def test_hessian_vector_product_of_a_weight_matches_torch(path: str) -> None:
    """d/dW <dL/dW, V>: the spectral norm's backward differentiated with respect to the weight."""
    torch.manual_seed(0)
    ours, theirs = make_pair(Net(), path, "linear,conv")
    x = torch.randn(3, 2, 6, 6)
    results = []
    for model in (ours, theirs):
        weights = [getattr(model, name).parametrizations.weight.original for name in NAMES]
        torch.manual_seed(2)
        vectors = [torch.randn_like(w) for w in weights]
        loss = (model(x) ** 2).sum()
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors, strict=True))
        results.append(torch.autograd.grad(dot, weights))  # type: ignore[arg-type]
    for name, a, b in zip(NAMES, *results, strict=True):
        close(a, b, f"Hessian-vector product of {name}")


def test_fast_backward_without_create_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The differentiable backward runs only when the backward is differentiated."""
    calls = []

    def counting(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(*args: object) -> torch.Tensor:
            calls.append(1)
            return original(*args)
        return wrapped

    monkeypatch.setattr(spectral, "differentiable_grad", counting(spectral.differentiable_grad))
    monkeypatch.setattr(spectral_fused, "differentiable_grad", counting(spectral_fused.differentiable_grad))
    for path in PATHS:
        torch.manual_seed(0)
        ours, _ = make_pair(Net(), path, "linear,conv")
        x = torch.randn(3, 2, 6, 6)
        (ours(x) ** 2).sum().backward()
        assert calls == [], path
        second_order(ours, x, "all")
        assert len(calls) == len(NAMES), path  # one per layer
        calls.clear()


def divide(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight / (u^H W v)`` through regfx's autograd function, with ``u``/``v`` constant (as
    the power iteration leaves them) and its precomputed ``1/sigma`` from this very weight
    (complex where the perturbations of gradcheck make it so)."""
    mat = spectral._to_matrix(weight.detach(), dim)
    inv = torch.vdot(u, torch.mv(mat, v)).reciprocal()
    return _DivideBySigma.apply(weight, inv, u, u * -(inv.conj() ** 2), v, dim)  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize(("shape", "dim"), [((5, 4), 0), ((3, 2, 3, 3), 0), ((2, 3, 3, 3), 1)])
def test_gradcheck_and_gradgradcheck(dtype: torch.dtype, shape: tuple[int, ...], dim: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype, requires_grad=True)
    mat = spectral._to_matrix(weight.detach(), dim)
    # u, v: the leading singular vectors, so that sigma = u^H W v is real as in training
    left, _, right_h = torch.linalg.svd(mat)
    u, v = left[:, 0], right_h[0].conj()
    sigma = torch.vdot(u, torch.mv(mat, v))
    assert torch.allclose(sigma, sigma.real.to(dtype))
    assert torch.autograd.gradcheck(lambda w: divide(w, u, v, dim), (weight,))
    assert torch.autograd.gradgradcheck(lambda w: divide(w, u, v, dim), (weight,))


def test_gradgradcheck_of_a_layer_with_its_vectors_fixed() -> None:
    """The per-layer forward in training mode, float64: ``u``/``v`` reset to the same converged
    vectors before each call, only the input and the weight vary."""
    torch.manual_seed(0)
    layer = regfx.transform(nn.Linear(4, 3, dtype=torch.float64), spectral="linear")
    sn = layer.parametrizations.weight[0]
    weight = layer.parametrizations.weight.original
    for _ in range(200):
        layer(torch.zeros(1, 4, dtype=torch.float64))  # converge
    u0, v0 = sn._u.clone(), sn._v.clone()

    def f(x: torch.Tensor) -> torch.Tensor:
        sn._u.copy_(u0)
        sn._v.copy_(v0)
        return torch.tanh(layer(x))

    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    # and with respect to the weight: a penalty on the gradients of the input and the weight,
    # differentiated again, against torch's
    ref = torch_spectral(nn.Linear(4, 3, dtype=torch.float64))
    ref.load_state_dict(layer.state_dict())
    for model, w in ((layer, weight), (ref, ref.parametrizations.weight.original)):
        model.zero_grad()
        xi = x.detach().clone().requires_grad_()
        grads = torch.autograd.grad((torch.tanh(model(xi)) ** 2).sum(), [xi, w], create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()  # type: ignore[union-attr]
        assert w.grad is not None
    close(weight.grad, ref.parametrizations.weight.original.grad, "weight.grad", 1e-10)


# -- complex weights -------------------------------------------------------------------------------


def spectral_norms_of(model: nn.Module) -> list[float]:
    """The largest singular value of each normalized weight, as the next eval forward uses it."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [float(torch.linalg.matrix_norm(m.weight, 2)) for m in model.modules()
                    if isinstance(m, nn.Linear)]
    finally:
        model.train(was)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("path", PATHS)
def test_complex_weights_match_torch(dtype: torch.dtype, path: str) -> None:
    torch.manual_seed(0)
    base: nn.Module = ComplexNet(dtype) if path != "per-layer" else nn.Linear(4, 3, dtype=dtype)
    ours, theirs = make_pair(base, path, "linear")
    x = torch.randn(5, 4, dtype=dtype)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.01)
    tol = 1e-4 if dtype == torch.complex64 else 1e-10
    for _ in range(5):
        opt_o.zero_grad()
        opt_t.zero_grad()
        out_o, out_t = ours(x), theirs(x)
        close(out_o, out_t, "output", tol)
        out_o.abs().pow(2).sum().backward()
        out_t.abs().pow(2).sum().backward()
        p_o, p_t = params(ours), params(theirs)
        for name in p_t:
            close(p_o[name].grad, p_t[name].grad, f"{name}.grad", tol)
        for key, value in theirs.state_dict().items():
            close(ours.state_dict()[key], value, key, tol)
        opt_o.step()
        opt_t.step()
    with torch.no_grad():  # training-mode forwards: the power iteration converges
        for _ in range(30):
            ours(x)
            theirs(x)
    for ours_norm, theirs_norm in zip(spectral_norms_of(ours), spectral_norms_of(theirs), strict=True):
        assert abs(theirs_norm - 1) < 1e-3
        assert abs(ours_norm - 1) < 1e-3


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_lone_layer_ends_with_norm_one(dtype: torch.dtype) -> None:
    """A complex Linear ends with spectral norm 1 (the power iteration uses the conjugate
    transpose)."""
    torch.manual_seed(0)
    layer = regfx.transform(nn.Linear(4, 3, dtype=dtype), spectral="linear")
    x = torch.randn(2, 4, dtype=dtype)
    for _ in range(20):
        layer(x)
    assert abs(spectral_norms_of(layer)[0] - 1) < 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_complex_second_order_gradients_match_torch(path: str) -> None:
    torch.manual_seed(0)
    base: nn.Module = ComplexNet(torch.complex128) if path != "per-layer" else nn.Linear(
        4, 3, dtype=torch.complex128)
    ours, theirs = make_pair(base, path, "linear")
    x = torch.randn(5, 4, dtype=torch.complex128)
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        loss = model(xi).abs().pow(2).sum()
        grads = torch.autograd.grad(loss, [xi, *params(model).values()], create_graph=True)
        sum(g.abs().pow(2).sum() for g in grads).backward()  # type: ignore[union-attr]
    assert_same_state(ours, theirs, 1e-10)
