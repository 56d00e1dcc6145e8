import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regfx

from ..conftest import load_fixture
from ..helpers import eval_out


def dropouts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if "regfx_dropout" in n}


def test_conv_bn_relu_gets_channel_dropout_after_relu() -> None:
    loaded = load_fixture("cnn")
    out = regfx.transform(loaded.model, dropout=0.25, dropout_after="conv")
    drops = dropouts(out)
    assert set(drops) == {"features.0.regfx_dropout", "features.3.regfx_dropout"}
    assert all(isinstance(d, nn.Dropout2d) and d.p == 0.25 for d in drops.values())
    # the dropout is applied to the relu output, not between conv and BatchNorm
    graph = regfx.trace(out)
    drop_node = graph.calls("features.0.regfx_dropout")[0]
    assert graph.producers(drop_node) == ["features.2#0"]


def test_output_position_and_element_kind() -> None:
    loaded = load_fixture("cnn")
    out = regfx.transform(loaded.model, dropout=0.1, dropout_after="conv",
                          dropout_position="output", dropout_kind="element")
    graph = regfx.trace(out)
    node = graph.calls("features.0.regfx_dropout")[0]
    assert graph.producers(node) == ["features.0#0"]
    assert type(out.features[0].regfx_dropout) is nn.Dropout


def test_never_after_output_layer_and_not_doubled() -> None:
    loaded = load_fixture("mlp")
    out = regfx.transform(loaded.model, dropout=0.5)
    assert set(dropouts(out)) == {"fc1.regfx_dropout", "fc2.regfx_dropout"}
    loaded = load_fixture("functional")
    out = regfx.transform(loaded.model, dropout=0.5)
    assert dropouts(out) == {}  # F.dropout already follows `hidden`


def test_per_call_site_for_shared_module() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lin(F.relu(self.lin(x))))

    out = regfx.transform(Shared(), dropout=0.2)
    assert set(dropouts(out)) == {"lin.regfx_dropout", "lin.regfx_dropout_1"}


def test_inverted_dropout_statistics_and_eval_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Identity(), nn.Linear(512, 1))
    out = regfx.transform(model, dropout=0.4, dropout_position="output")
    drop = out[0].regfx_dropout
    x = torch.ones(200, 512)
    drop.train()
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.6) < 0.01
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.6))
    drop.eval()
    assert torch.equal(drop(x), x)


def test_train_mode_actually_drops() -> None:
    loaded = load_fixture("mlp")
    out = regfx.transform(loaded.model, dropout=0.5)
    x = loaded.example_inputs[0]
    out.train()
    torch.manual_seed(0)
    a = out(x)
    assert not torch.allclose(a, eval_out(loaded.model, (x,)))


def test_opaque_modules_fall_back_to_output_hook() -> None:
    loaded = load_fixture("control_flow")
    out = regfx.transform(loaded.model, dropout=0.3, example_inputs=loaded.example_inputs)
    proj = out.blocks[0].proj
    assert isinstance(proj.regfx_dropout, nn.Dropout)
    assert len(proj._forward_hooks) == 1
    assert not hasattr(out.out, "regfx_dropout")  # the output layer


def test_mode_dependent_forward_keeps_both_modes() -> None:
    class ModeDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.lin(x))
            if self.training:
                h = h * 2
            return self.head(h)

    model = ModeDependent()
    out = regfx.transform(model, dropout=0.0001)
    x = torch.randn(3, 4)
    torch.testing.assert_close(eval_out(out, (x,)), eval_out(model, (x,)))
    out.train()
    model.train()
    out.lin.regfx_dropout.p = 0.0
    torch.testing.assert_close(out(x), model(x))


def test_hf_models_get_exact_sites_where_blocks_trace() -> None:
    loaded = load_fixture("hf_llama")
    out = regfx.transform(loaded.model, dropout=0.1, example_inputs=loaded.example_inputs)
    mlp = out.model.layers[0].mlp
    assert isinstance(mlp.gate_proj.regfx_dropout, nn.Dropout)
    assert type(mlp).__name__ == "LlamaMLP" and "_regfx_base" in type(mlp).__dict__
    assert not hasattr(out.lm_head, "regfx_dropout")


def test_p_validation() -> None:
    import pytest

    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(regfx.RegfxError, match="dropout must be a probability"):
            regfx.transform(nn.Linear(1, 1), dropout=bad)


def test_identical_blocks_share_code_but_tensor_constants_stay_their_own() -> None:
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x)) + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a constant

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    for block in (Shift, Plain):
        model = nn.Sequential(block(), block(), block(), nn.Linear(4, 2))
        out = regfx.transform(model, dropout=0.2)
        x = torch.randn(3, 4)
        assert torch.equal(eval_out(out, (x,)), eval_out(model, (x,)))
        out.train()
        out(x)  # every block runs its regenerated forward
        classes = {type(out[i]) for i in range(3)}
        assert len(classes) == (3 if block is Shift else 1)


class _ConfigGated(nn.Module):
    """A block whose forward branches on a flag of a config object it holds."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc(x))
        if self.config.use_dropout:  # type: ignore[attr-defined]
            x = self.drop(x)
        return x


def test_a_config_flag_read_by_the_forward_is_not_frozen_into_the_regenerated_forward() -> None:
    import warnings
    from types import SimpleNamespace

    config = SimpleNamespace(use_dropout=False, hidden=4)
    model = nn.Sequential(_ConfigGated(config), nn.Linear(4, 2))
    out = regfx.transform(model, dropout=0.1)
    block = out[0]
    assert "_regfx_base" in type(block).__dict__  # the block's forward was regenerated
    runs: list[str] = []
    block.drop.register_forward_hook(lambda *a: runs.append("drop"))
    block.fc.regfx_dropout.register_forward_hook(lambda *a: runs.append("inserted"))
    x = torch.randn(3, 4)
    out.train()
    out(x)
    assert runs == ["inserted"]
    runs.clear()
    block.config.use_dropout = True  # the flag, changed in place after the transform
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out(x)
    assert runs == ["drop"]  # the original forward runs, honouring the flag
    assert any("flags other than those it was traced with" in str(w.message) for w in caught)
    runs.clear()
    block.config.use_dropout = False
    out(x)
    assert runs == ["inserted"]


class _DescribedGated(_ConfigGated):
    def describe(self) -> str:  # reads a flag the forward does not
        return "verbose" if self.config.verbose else "quiet"  # type: ignore[attr-defined]


def test_a_flag_only_another_method_reads_does_not_stop_the_inserted_dropout() -> None:
    import warnings
    from types import SimpleNamespace

    block = _DescribedGated(SimpleNamespace(use_dropout=False, verbose=False))
    out = regfx.transform(nn.Sequential(block, nn.Linear(4, 2)), dropout=0.1)
    runs: list[int] = []
    out[0].fc.regfx_dropout.register_forward_hook(lambda *a: runs.append(1))
    out[0].config.verbose = True
    out.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out(torch.randn(3, 4))
    assert runs == [1]


class _KeyErrorGetattr:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        object.__setattr__(self, "_d", {"use_dropout": False})

    def __getattr__(self, name: str) -> object:
        return self._d[name]


class _NoneGetattr:
    def __init__(self) -> None:
        self.use_dropout = False

    def __getattr__(self, name: str) -> object:
        return None


class _RaisingDict:
    use_dropout = False

    @property
    def __dict__(self) -> dict[str, object]:  # type: ignore[override]
        raise RuntimeError("no introspection here")


@pytest.mark.parametrize("make", [_KeyErrorGetattr, _NoneGetattr, _RaisingDict])
def test_unusual_objects_a_block_holds_do_not_break_the_transform(make: type) -> None:
    model = nn.Sequential(_ConfigGated(make()), nn.Linear(4, 2))
    out = regfx.transform(model, dropout=0.1, inplace=True)
    out.train()
    out(torch.randn(3, 4)).sum().backward()
