import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import regfx
from regfx.transforms.norms import norm_kind_of

from ..conftest import load_fixture
from ..helpers import eval_out


def test_conv_transpose_uses_dim_1_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1))
    out = regfx.transform(model, weight_norm="conv")
    g = out[0].parametrizations.weight.original0
    assert g.shape == (1, 5, 1, 1)  # one magnitude per output channel (dim=1)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(eval_out(out, (x,)), eval_out(model, (x,)))


def test_spectral_norm_matches_torch() -> None:
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    ref = spectral_norm(nn.Linear(8, 8), n_power_iterations=3)
    ref.load_state_dict(model[0].state_dict(), strict=False)
    torch.manual_seed(1)
    out = regfx.transform(model, spectral="linear", n_power_iterations=3)
    assert norm_kind_of(out[0]) == "spectral_norm"
    sigma = torch.linalg.matrix_norm(model[0].weight.detach(), ord=2)
    out.train()
    for _ in range(30):
        out(torch.randn(1, 8))
    w = out[0].weight.detach()
    torch.testing.assert_close(torch.linalg.matrix_norm(w, ord=2), torch.tensor(1.0), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(w * sigma, model[0].weight.detach(), atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_normalized_on_output_dim() -> None:
    loaded = load_fixture("hf_gpt2")
    out = regfx.transform(loaded.model, weight_norm="linear", exclude=["lm_head"])
    c_fc = out.transformer.h[0].mlp.c_fc
    assert c_fc.parametrizations.weight.original0.shape == (1, c_fc.weight.shape[1])
    torch.testing.assert_close(eval_out(out, loaded.example_inputs),
                               eval_out(loaded.model, loaded.example_inputs), rtol=1e-4, atol=1e-5)


def test_both_norms_on_one_weight_is_an_error_naming_it() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1))
    with pytest.raises(regfx.RegfxError, match="layer '0' .*both weight_norm and spectral_norm"):
        regfx.transform(model, spectral="linear", weight_norm="all")


def test_existing_different_norm_is_an_error() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(nn.Linear(2, 2))
    weight_norm(model[0])
    with pytest.raises(regfx.RegfxError, match="already has weight_norm"):
        regfx.transform(model, spectral="linear")


def test_tied_weights_normalized_once_and_stay_tied() -> None:
    loaded = load_fixture("tied")
    out = regfx.transform(loaded.model, spectral="embedding")
    emb, head = out.embed, out.lm_head
    p_emb = emb.parametrizations.weight
    p_head = head.parametrizations.weight
    assert p_emb[0] is p_head[0]  # one parametrization instance
    assert p_emb.original is p_head.original  # one Parameter
    n_params = len(list(out.parameters()))
    assert n_params == len(list(loaded.model.parameters()))
    torch.testing.assert_close(emb.weight, head.weight)
    baked = regfx.bake(out)
    assert baked.embed.weight is baked.lm_head.weight


def test_load_plain_state_dict_into_normalized_model() -> None:
    loaded = load_fixture("cnn")
    plain_sd = loaded.model.state_dict()
    fresh = type(loaded.model)()
    out = regfx.transform(fresh, weight_norm="conv,linear")
    regfx.load_state_dict(out, plain_sd)
    torch.testing.assert_close(eval_out(out, loaded.example_inputs),
                               eval_out(loaded.model, loaded.example_inputs), rtol=1e-5, atol=1e-5)


def test_load_state_dict_reports_unknown_keys() -> None:
    out = regfx.transform(nn.Sequential(nn.Linear(2, 2)), weight_norm="linear")
    with pytest.raises(regfx.CheckpointError, match="unexpected 1 key"):
        regfx.load_state_dict(out, {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2),
                                    "nope": torch.zeros(1)})


def test_meta_device_model_transforms() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    out = regfx.transform(model, spectral="linear", dropout=0.1, l2=1e-4)
    assert all(p.is_meta for p in out.parameters())
    assert isinstance(out[0].regfx_dropout, nn.Dropout)


def test_half_precision_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(torch.bfloat16)
    out = regfx.transform(model, weight_norm="linear", dropout=0.1)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert eval_out(out, (x,)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["weight_norm", "spectral"])
def test_zero_initialized_layer_is_left_alone_with_a_warning(kind: str) -> None:
    """A zero-initialized head (as in torchvision's ViT) would turn into NaN under a norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    if kind == "weight_norm":
        model[0].weight.data[1] = 0  # one zero output row is enough for weight norm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = regfx.transform(model, **{kind: "linear"})
    warned = sorted(str(w.message).split("'")[1] for w in caught
                    if issubclass(w.category, regfx.RegfxWarning))
    assert warned == (["2"] if kind == "spectral" else ["0", "2"])
    assert all("not normalized: zero-initialized weight" in str(w.message) for w in caught)
    assert not parametrize.is_parametrized(out[2])
    assert parametrize.is_parametrized(out[0]) == (kind == "spectral")
    assert torch.isfinite(out(torch.randn(2, 4))).all()
    skipped = regfx.plan(model, **{kind: "linear"}).skipped
    assert any(layer == "2" and why.startswith("zero-initialized weight") for layer, _, why in skipped)


def test_bake_keeps_the_users_own_weight_norm() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        model(torch.randn(1, 3, 6, 6))
        weight_norm(model[0], "weight")
        return model

    model = build()
    out = regfx.transform(model, spectral="linear", dropout=0.2, dropout_after="conv")
    baked = regfx.bake(out)
    assert list(baked.state_dict()) == list(model.state_dict())
    assert "0.parametrizations.weight.original0" in baked.state_dict()
    fresh = build()
    fresh.load_state_dict(baked.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(baked.eval()(x), out.eval()(x))
