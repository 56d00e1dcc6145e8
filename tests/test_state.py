"""The state regfx keeps on a transformed model, and the traces the audit reuses from it."""

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regfx
from regfx.state import RegfxState, state_of

from .conftest import load_fixture

trace_mod = sys.modules["regfx.trace"]

_MASK = torch.tensor([1.0, 0.5, 0.25, 0.0])  # read by a forward: torch.fx makes it a constant


class ConstantBlock(nn.Module):
    """A forward that reads a tensor which is neither a parameter nor a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) * _MASK


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConstantBlock(), ConstantBlock())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _count_traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = trace_mod.trace_module

    def counting(module: nn.Module, spec: tuple = ()) -> object:
        calls.append(type(module).__name__)
        return real(module, spec)

    monkeypatch.setattr(trace_mod, "trace_module", counting)
    return calls


def test_a_transformed_model_has_one_state_object() -> None:
    model = regfx.transform(Net(), dropout=0.1, l2=1e-4, spectral="linear")
    state = state_of(model)
    assert isinstance(state, RegfxState)
    assert state.recipe is not None and state.recipe["dropout"] == 0.1
    assert state.sites is not None
    assert regfx.state_of(Net()) is None
    assert state.penalty is not None and state.penalty.l2 == 1e-4
    assert state.spectral is not None and state.spectral.root is model
    assert sorted(state.norms) == ["blocks.0.fc", "blocks.1.fc", "head"]
    assert [k for k in vars(model) if k.startswith("_regfx")] == ["_regfx_state"]
    for mod in model.modules():
        if mod is not model:
            assert not [k for k in vars(mod) if k.startswith("_regfx")], type(mod).__name__


def test_bake_drops_the_state() -> None:
    assert state_of(regfx.bake(regfx.transform(Net(), dropout=0.1))) is None


def test_a_copy_has_its_own_state_without_the_traces() -> None:
    model = regfx.transform(Net(), dropout=0.1)
    regfx.audit(model)
    assert len(state_of(model).traces) > 0
    clone = copy.deepcopy(model)
    assert state_of(clone) is not state_of(model)
    assert state_of(clone).recipe == state_of(model).recipe
    assert state_of(clone).sites == state_of(model).sites
    assert len(state_of(clone).traces) == 0


def test_the_state_pickles_without_its_traces() -> None:
    state = RegfxState(recipe={"dropout": 0.1}, sites={"dropout": []})
    state.traces.get(nn.Sequential(nn.Linear(2, 2)))
    again = pickle.loads(pickle.dumps(state))
    assert again.recipe == state.recipe and again.sites == state.sites
    assert len(again.traces) == 0


def test_the_audit_of_a_transformed_model_retraces_only_what_the_transform_edited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = regfx.transform(Net(), dropout=0.1, dropout_after="linear", spectral="linear")
    calls = _count_traces(monkeypatch)
    regfx.audit(model)
    cached = list(calls)
    calls.clear()
    regfx.audit(copy.deepcopy(model))  # a copy has no traces: everything is traced
    fresh = list(calls)
    assert len(cached) < len(fresh)
    # the edited owners (their class changed) are traced again; nothing else is
    edited = {type(m).__name__ for m in model.modules()
              if "_regfx_base" in type(m).__dict__}
    assert set(cached) <= edited


@pytest.mark.filterwarnings("ignore::regfx.RegfxWarning")
def test_the_audit_with_reused_traces_is_the_audit_of_a_fresh_trace(fixture_name: str) -> None:
    model = load_fixture(fixture_name).model
    out = regfx.transform(model, dropout=0.1, dropout_after="linear,conv", spectral="conv",
                          l2=1e-4)
    reused = regfx.audit(out).to_dict()
    fresh = regfx.audit(copy.deepcopy(out)).to_dict()
    assert reused == fresh


def test_a_forward_with_a_tensor_constant_keeps_it_after_the_edit() -> None:
    torch.manual_seed(0)
    model = Net()
    out = regfx.transform(model, dropout=0.5, dropout_after="linear")
    x = torch.randn(8, 4)
    out.eval()
    model.eval()
    torch.testing.assert_close(out(x), model(x))
    runs: list[str] = []
    for name, mod in out.named_modules():
        if name.endswith("regfx_dropout"):
            mod.register_forward_hook(lambda m, i, o, name=name: runs.append(name))
    out.train()
    out(x).sum().backward()
    assert sorted(runs) == ["blocks.0.fc.regfx_dropout", "blocks.1.fc.regfx_dropout"]
    assert regfx.trace(copy.deepcopy(out)).opaque == {}


def test_bake_folds_the_norms_the_state_records_and_keeps_the_users_own() -> None:
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    model = Net()
    weight_norm(model.head)  # the user's own
    out = regfx.transform(model, spectral="linear", include="blocks.*")
    assert sorted(state_of(out).norms) == ["blocks.0.fc", "blocks.1.fc"]
    baked = regfx.bake(out)
    assert state_of(baked) is None
    assert not parametrize.is_parametrized(baked.blocks[0].fc)
    assert parametrize.is_parametrized(baked.head)
    assert list(baked.state_dict()) == list(model.state_dict())


class Branchy(nn.Module):
    """A forward that does not trace (it branches on a value): dropout runs from hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > -1:  # data-dependent: torch.fx cannot trace this
            h = torch.relu(self.fc2(h))
        return self.head(h)


def _hooked_layers(model: nn.Module) -> list[str]:
    from regfx.transforms.dropout import dropout_output_hook

    return [name for name, mod in model.named_modules()
            if any(h is dropout_output_hook for h in mod._forward_hooks.values())]


def test_dropout_hooks_are_removed_through_the_handles_the_state_keeps() -> None:
    model = regfx.transform(Branchy(), dropout=0.5, example_inputs=torch.randn(3, 4))
    state = state_of(model)
    hooked = _hooked_layers(model)
    assert hooked and len(state.dropout_hooks) == len(hooked)
    clone = copy.deepcopy(model)
    assert _hooked_layers(clone) == hooked
    baked = regfx.bake(clone)  # removes the copy's hooks through the copy's handles
    assert _hooked_layers(baked) == []
    assert _hooked_layers(clone) == hooked and _hooked_layers(model) == hooked
    regfx.transform(model, dropout=0.2, inplace=True)  # another recipe: the old hooks go
    assert len(_hooked_layers(model)) == len(hooked)
    assert len(state_of(model).dropout_hooks) == len(hooked)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_bake_of_a_model_holding_a_transformed_block_removes_everything() -> None:
    from torch.nn.utils import parametrize

    full = nn.Sequential(_mlp(), nn.Linear(2, 2))
    full[0] = regfx.transform(full[0], spectral="linear", l2=0.5)
    plain_keys = list(nn.Sequential(_mlp(), nn.Linear(2, 2)).state_dict())
    baked = regfx.bake(full)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert all(state_of(m) is None for m in baked.modules())
    assert list(baked.state_dict()) == plain_keys
    opt = torch.optim.SGD(baked.parameters(), lr=0.1)
    baked(torch.randn(3, 4)).sum().backward()
    grads = {n: p.grad.clone() for n, p in baked.named_parameters()}
    opt.step()  # no penalty hook left: the step sees the loss's gradients only
    assert all(torch.equal(p.grad, grads[n]) for n, p in baked.named_parameters())


class _Gated(nn.Module):
    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.config.use_dropout:  # type: ignore[attr-defined]
            x = self.drop(x)
        return x


def test_the_audit_sees_an_in_place_change_made_after_the_transform() -> None:
    from types import SimpleNamespace

    config = SimpleNamespace(use_dropout=False)
    model = nn.Sequential(_Gated(config), _Gated(config), nn.Linear(4, 2))
    out = regfx.transform(model, dropout=0.1, exclude=["0.*", "1.*"])  # blocks not edited
    assert not any("_regfx_base" in type(m).__dict__ for m in out.modules())
    out[0].config.use_dropout = True  # the same object, changed in place
    assert regfx.audit(out).to_dict() == regfx.audit(copy.deepcopy(out)).to_dict()
    graph = regfx.trace(out, cache=state_of(out).traces)
    assert graph.nx.nodes["0.drop#0"]["called"] is not False


def test_a_folded_norm_is_forgotten_and_the_users_later_norm_survives_bake() -> None:
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    model = regfx.transform(_mlp(), spectral="linear")
    model = regfx.transform(model, l2=1e-3, inplace=True)  # another norm recipe: folded
    assert state_of(model).norms == {}
    weight_norm(model[0])  # the user's own, after the transform
    assert parametrize.is_parametrized(regfx.bake(model)[0])


def test_norms_a_re_transform_keeps_stay_in_its_sites_and_checkpoint(tmp_path: Path) -> None:
    first = regfx.transform(_mlp(), spectral="linear", dropout=0.1)
    again = regfx.transform(first, spectral="linear", dropout=0.3)  # norms kept, dropout new
    assert [n["layer"] for n in state_of(again).sites["norms"]] == ["0", "2", "4"]
    regfx.save_checkpoint(again, tmp_path / "ck.pt")
    loaded = regfx.load_checkpoint(_mlp(), tmp_path / "ck.pt")
    assert loaded.state_dict().keys() == again.state_dict().keys()


def test_bake_leaves_a_weight_shared_with_a_module_outside_the_transformed_block() -> None:
    outer = nn.Module()
    outer.blk = _mlp()
    outer.head = nn.Linear(4, 8)
    outer.head.weight = outer.blk[0].weight  # tied across the block's boundary
    raw = outer.blk[0].weight.detach().clone()
    regfx.transform(outer.blk, spectral="linear", inplace=True)
    baked = regfx.bake(outer)
    assert torch.equal(baked.head.weight, raw)  # the head still computes with the raw weight
    assert torch.equal(outer.head.weight, raw)  # and the model baked from is untouched
