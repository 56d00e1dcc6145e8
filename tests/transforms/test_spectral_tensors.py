"""regfx's spectral norm wherever the model's tensors go: substituted by ``functional_call``,
assigned by ``load_state_dict(assign=True)``, created by ``to_empty`` after a build on ``meta``,
converted by ``.to()``, copied by ``deepcopy``, replicated for ``DataParallel``, and traced by
``torch.compile``. Reference: ``torch.nn.utils.parametrizations.spectral_norm`` on the same
model, from the same weights and ``u``/``v``; float32, 1e-5.

The model's engine is forced onto the fast path (the CUDA default, run eagerly on a CPU); where
CUDA is available every test runs again on the GPU, where the fast path replays CUDA graphs
(TF32 off: the comparison is at float32 precision). Each test also checks that the fast path
was taken where the tensors it prepared from are the ones the layers use, and refused where
they are not (the numbers alone would also match if the fast path never ran)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import regfx
from regfx.transforms import spectral
from regfx.transforms.spectral_engine import Path, engine_of

TOL = 1e-5


class Net(nn.Module):
    """Five spectrally normalized layers: conv, transposed conv (dim 1) and linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.up = nn.ConvTranspose2d(3, 2, 3)
        self.fc1 = nn.Linear(2 * 6 * 6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(torch.tanh(self.conv(x))))
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h.flatten(1))))))


def torch_spectral(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            parametrizations.spectral_norm(m)
    return model


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """Each test on the CPU and, where available, on CUDA (with TF32 off)."""
    if request.param != "cuda":
        yield torch.device("cpu")
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_pair(device: torch.device, base: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """regfx's and torch's spectral norm on copies of one model on ``device``, with the same
    ``u``/``v``."""
    torch.manual_seed(0)
    base = (base if base is not None else Net()).to(device)
    theirs = torch_spectral(copy.deepcopy(base))
    ours = regfx.transform(copy.deepcopy(base), spectral="linear,conv")
    engine = engine_of(ours)
    assert engine is not None
    engine.path = Path.FUSED  # the fast path, whose records must follow the tensors
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def x_input(device: torch.device) -> torch.Tensor:
    return torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)


class Usage:
    """Counts prepared records used and refused by layers' forwards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.used = self.refused = 0
        fits = spectral.Prepared.fits

        def counting(record: spectral.Prepared, *args: torch.Tensor) -> bool:
            ok = fits(record, *args)
            if ok:
                self.used += 1
            else:
                self.refused += 1
            return ok

        monkeypatch.setattr(spectral.Prepared, "fits", counting)

    def take(self) -> tuple[int, int]:
        out = self.used, self.refused
        self.used = self.refused = 0
        return out


@pytest.fixture
def usage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Usage]:
    yield Usage(monkeypatch)


def close(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert a is not None and b is not None, what
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def assert_same_state(ours: nn.Module, theirs: nn.Module, grads: bool = True) -> None:
    """Same parameters, u/v and (with ``grads``) gradients, under the same keys."""
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert sd_o.keys() == sd_t.keys()
    for key, value in sd_t.items():
        close(sd_o[key], value, key)
    if grads:
        p_o = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            close(p_o[name].grad, p.grad, f"{name}.grad")


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """``steps`` SGD steps on ``model``; returns the last output."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        (out ** 2).sum().backward()
        opt.step()
    return out.detach()


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` with fresh random values (unit vectors for u/v)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        t = torch.randn(value.shape, generator=gen, dtype=value.dtype)
        out[key] = (t / t.norm() if key.endswith(("._u", "._v")) else t).to(value.device)
    return out


def test_functional_call_with_substituted_parameters(device: torch.device, usage: Usage) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    train(ours, x, 1)  # a step before: anything cached from the model's own tensors exists now
    train(theirs, x, 1)
    assert usage.take() == (5, 0)
    substitute = {k: v for k, v in random_state(ours, 2).items() if not k.endswith(("._u", "._v"))}
    outs, grads = [], []
    for model in (ours, theirs):
        params = {k: v.detach().clone().requires_grad_() for k, v in substitute.items()}
        out = torch.func.functional_call(model, params, (x,))
        (out ** 2).sum().backward()
        outs.append(out)
        grads.append({k: v.grad for k, v in params.items()})
    close(outs[0], outs[1], "output")
    for key in substitute:
        close(grads[0][key], grads[1][key], f"gradient of substituted {key}")
    assert usage.take() == (5, 0)  # prepared from the substituted weights, which the layers use
    assert_same_state(ours, theirs, grads=False)  # u/v advanced from the substituted weights
    close(ours(x), theirs(x), "output of the model's own parameters afterwards")
    assert usage.take() == (5, 0)


def test_functional_call_with_substituted_vectors(device: torch.device) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    vectors = {k: v for k, v in random_state(ours, 3).items() if k.endswith(("._u", "._v"))}
    given = [{k: v.clone() for k, v in vectors.items()} for _ in range(2)]
    before = copy.deepcopy(ours.state_dict())
    outs = [torch.func.functional_call(m, g, (x,)) for m, g in zip((ours, theirs), given, strict=True)]
    close(outs[0], outs[1], "output")
    for key in vectors:  # the substituted vectors advance in place, as torch's do
        close(given[0][key], given[1][key], key)
        assert not torch.equal(given[0][key], vectors[key]), key
    for key, value in ours.state_dict().items():  # the model's own vectors do not
        assert torch.equal(value, before[key]), key


def test_torch_func_grad_of_functional_call(device: torch.device) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    grads = []
    for model in (ours, theirs):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p: dict[str, torch.Tensor], model: nn.Module = model) -> torch.Tensor:
            return (torch.func.functional_call(model, p, (x,)) ** 2).sum()

        grads.append(torch.func.grad(loss)(params))
    for key in grads[1]:
        close(grads[0][key], grads[1][key], key)
    assert_same_state(ours, theirs, grads=False)


def test_load_state_dict_assign_then_train(device: torch.device, usage: Usage) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    train(ours, x, 1)
    train(theirs, x, 1)
    usage.take()
    state = random_state(ours, 4)
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    theirs.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    close(train(ours, x), train(theirs, x), "output")
    assert_same_state(ours, theirs)
    assert usage.take() == (15, 0)  # the fast path follows the assigned tensors


def test_meta_build_to_empty_reinit_then_train(device: torch.device, usage: Usage) -> None:
    with torch.device("meta"):
        torch.manual_seed(0)
        base = Net()
    theirs = torch_spectral(copy.deepcopy(base))
    ours = regfx.transform(copy.deepcopy(base), spectral="linear,conv")
    engine_of(ours).path = Path.FUSED  # type: ignore[union-attr]
    x = x_input(device)
    for model in (ours, theirs):
        model.to_empty(device=device)
    state = random_state(theirs, 5)
    for model in (ours, theirs):
        model.load_state_dict(state)  # the re-initialization
    close(train(ours, x), train(theirs, x), "output")
    assert_same_state(ours, theirs)
    assert usage.take() == (15, 0)


def test_to_another_dtype_and_back(device: torch.device, usage: Usage) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    train(ours, x, 1)
    train(theirs, x, 1)
    for model in (ours, theirs):
        model.to(torch.float64)
    close(train(ours, x.double()), train(theirs, x.double()), "float64 output")
    assert_same_state(ours, theirs)
    for model in (ours, theirs):
        model.to(torch.float32)
    close(train(ours, x), train(theirs, x), "float32 output")
    assert_same_state(ours, theirs)
    assert usage.take() == (35, 0)


def test_deepcopy_trains_on_its_own_tensors(device: torch.device, usage: Usage) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    train(ours, x, 1)
    train(theirs, x, 1)
    ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    engine = engine_of(ours_copy)
    assert engine is not None and engine.root is ours_copy
    usage.take()
    close(train(ours_copy, x), train(theirs_copy, x), "the copy's output")
    assert_same_state(ours_copy, theirs_copy)
    assert usage.take() == (15, 0)
    close(train(ours, x * 2), train(theirs, x * 2), "the original's output")
    assert_same_state(ours, theirs)
    assert usage.take() == (15, 0)


def cpu_replica(model: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` (``nn.DataParallel``) makes of ``model`` for one
    device, built on the CPU (``replicate`` itself refuses CPU devices): shallow module copies
    sharing ``__dict__`` entries and hooks, with differentiable copies of the parameters and
    copies of the buffers."""
    modules = list(model.modules())
    copies = {m: m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = copies[m]
        for key, child in m._modules.items():
            if child is not None:
                setattr(r, key, copies[child])
        for key, param in m._parameters.items():
            setattr(r, key, param * 1)
        for key, buf in m._buffers.items():
            setattr(r, key, buf.clone())
    return copies[model]


def test_dataparallel_style_replicas(device: torch.device, usage: Usage) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    before = copy.deepcopy(ours.state_dict())
    replicas = [cpu_replica(ours) for _ in range(2)], [cpu_replica(theirs) for _ in range(2)]
    outs = [[r(x[i::2]) for i, r in enumerate(rs)] for rs in replicas]
    for a, b in zip(*outs, strict=True):
        close(a, b, "replica output")
    for rep_o, rep_t in zip(*replicas, strict=True):
        assert_same_state(rep_o, rep_t, grads=False)  # each replica advanced its own vectors
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    sum((o ** 2).sum() for o in outs[0]).backward()  # type: ignore[union-attr]
    sum((o ** 2).sum() for o in outs[1]).backward()  # type: ignore[union-attr]
    for name, p in theirs.named_parameters():
        close(dict(ours.named_parameters())[name].grad, p.grad, f"{name}.grad through replicas")
    assert usage.take() == (0, 0)  # replicas never use the original's engine
    ours.zero_grad()
    theirs.zero_grad()
    close(train(ours, x, 1), train(theirs, x, 1), "the original afterwards")
    assert usage.take() == (5, 0)


def explain_graphs(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return int(torch._dynamo.explain(model)(x).graph_count)


def test_compile_no_extra_graphs_and_u_v_advance_once(device: torch.device) -> None:
    ours, theirs = make_pair(device)
    x = x_input(device)
    graphs = explain_graphs(ours, x), explain_graphs(theirs, x)
    assert graphs[0] == graphs[1] == 1
    ours, theirs = make_pair(device)  # explain ran training forwards: start again
    eager = copy.deepcopy(theirs)
    torch._dynamo.reset()
    compiled = [torch.compile(m, backend="aot_eager") for m in (ours, theirs)]
    for model in (*compiled, eager):
        train(model, x)
    assert_same_state(ours, eager)
    assert_same_state(theirs, eager)
    engine = engine_of(ours)
    assert engine is not None and all(m.norm.prepared is None for m in engine.members)
