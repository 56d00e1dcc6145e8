"""torchvision and timm architectures (random weights, small inputs): transform, audit, bake.

torchvision and timm are not test dependencies (torchvision's PyPI wheels import only beside
their matching torch), so they are skipped where either is missing; CI installs the matching
pair and sets ``CI``, where a missing one is a failure, not a skip.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import regfx

from .helpers import eval_out
from .transforms.test_placement import count_runs, inserted, transform_quietly

if os.environ.get("CI"):
    import timm
    import torchvision
else:
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")


def _cases() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor]]:
    tv = torchvision.models
    img = torch.randn(2, 3, 64, 64)
    return {
        "tv_resnet18": (lambda: tv.resnet18(num_classes=5), img),
        "tv_mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=5), img),
        "tv_efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=5), img),
        "tv_convnext_tiny": (lambda: tv.convnext_tiny(num_classes=5), img),
        "tv_vit": (lambda: tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5), img),
        "tv_swin_t": (lambda: tv.swin_t(num_classes=5), img),
        "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                                    num_classes=5), img),
        "timm_resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), img),
        "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False,
                                                         num_classes=5), img),
        "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False,
                                                           num_classes=5), img),
    }


NAMES = ["tv_resnet18", "tv_mobilenet_v3_small", "tv_efficientnet_b0", "tv_convnext_tiny", "tv_vit",
         "tv_swin_t", "timm_vit_tiny", "timm_resnet18", "timm_convnext_atto", "timm_efficientnet_b0"]


@pytest.mark.parametrize("name", NAMES)
def test_transform_audit_bake(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build().eval()
    expected = eval_out(model, (x,))
    names = sorted(n for n, _ in model.named_parameters(remove_duplicate=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        out = regfx.transform(model, dropout=0.2, dropout_after="linear,conv", weight_norm="linear",
                              l2=1e-4, example_inputs=(x,))
    # dropout is inserted, and in eval mode the output is unchanged
    assert any("regfx_dropout" in n for n, _ in out.named_modules())
    torch.testing.assert_close(eval_out(out, (x,)), expected, rtol=1e-4, atol=1e-4)
    # the audit lists every parameter exactly once and sees what was applied
    report = regfx.audit(out)
    assert sorted(n for r in report.params for n in (r.name, *r.aliases)) == names
    zero = zero_initialized(model, weight_norm="linear")  # torchvision's ViT head starts at zero
    for rec in report.params:
        if rec.layer_type == "linear" and rec.name.endswith(".weight"):
            assert ({"l2"} if rec.module in zero else {"weight_norm", "l2"}) <= rec.kinds(), rec.name
    # a training step runs, and bake gives back the original keys and outputs
    out.train()
    out(x).sum().backward()
    baked = regfx.bake(out)
    assert list(baked.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(eval_out(baked, (x,)), eval_out(out, (x,)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_spectral_every_layer(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        out = regfx.transform(model, spectral="linear,conv", example_inputs=(x,))
    out(x).sum().backward()
    report = regfx.audit(out)
    zero = zero_initialized(model, spectral="linear,conv")
    for rec in report.params:
        if rec.layer_type in ("linear", "conv") and rec.name.endswith(".weight"):
            assert ("spectral_norm" in rec.kinds()) == (rec.module not in zero), rec.name
    assert torch.isfinite(out(x)).all()


def zero_initialized(model: nn.Module, **recipe: str) -> set[str]:
    """Layers the recipe leaves alone because their weight starts at zero."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        skipped = regfx.plan(model, **recipe).skipped
    return {layer for layer, _, why in skipped if why.startswith("zero-initialized weight")}


# -- what a user gets in training --------------------------------------------------------------

RECIPE = {"dropout": 0.2, "dropout_after": "linear,conv"}
# Projections whose output becomes a query, key or value.
ATTENTION_PROJECTIONS = ("q", "k", "v", "qkv", "query", "key", "value", "q_lin", "k_lin", "v_lin",
                         "in_proj", "q_proj", "k_proj", "v_proj")
FEEDS_ATTENTION = "feeds attention; use attention dropout"


def layer_of(dropout_name: str) -> str:
    """``blocks.0.mlp.fc1.regfx_dropout_1`` -> ``blocks.0.mlp.fc1``."""
    return dropout_name.rsplit(".", 1)[0]


def skipped_reasons(plan: regfx.Plan) -> dict[str, str]:
    """Layer (call index dropped) -> why the dropout plan left it alone."""
    return {site.split("#")[0]: why for site, kind, why in plan.skipped if kind == "dropout"}


def assert_every_layer_accounted(model: nn.Module, plan: regfx.Plan) -> None:
    """Every selected layer is a dropout site or listed as skipped with a reason."""
    selected = {n for n, _ in regfx.select_layers(model, RECIPE["dropout_after"])}
    assert selected == {s.layer for s in plan.dropout} | set(skipped_reasons(plan))


def assert_attention_placement(name: str, model: nn.Module, plan: regfx.Plan, out: nn.Module) -> None:
    layers = {layer_of(n) for n in inserted(out)}
    for layer in layers:
        assert layer.rsplit(".", 1)[-1] not in ATTENTION_PROJECTIONS, layer
    skipped = skipped_reasons(plan)
    sites = {s.layer for s in plan.dropout}
    if name == "tv_vit":
        # nn.MultiheadAttention is a leaf: its in_proj is a parameter, its out_proj is called
        # functionally inside it; neither is a site, and nothing is attached inside it
        mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        assert mha
        for attn in mha:
            assert not any(n.startswith(attn + ".") for n in inserted(out)), attn
        assert skipped == {**{f"{a}.out_proj": f"inside layer {a}, not called on its own" for a in mha},
                           "heads.head": "output layer"}
        mlp = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n}
        assert sites == {"conv_proj"} | mlp
    elif name == "tv_swin_t":
        # ShiftedWindowAttention calls F.linear with qkv's and proj's weights
        qkv = [n for n, _ in model.named_modules() if n.endswith(".attn.qkv")]
        assert qkv
        for layer in qkv:
            assert skipped[layer].startswith("not called as a module"), (layer, skipped[layer])
        assert not any(".attn." in layer for layer in layers)
    elif name == "timm_vit_tiny":
        blocks = range(len(model.blocks))
        for i in blocks:
            assert skipped[f"blocks.{i}.attn.qkv"] == FEEDS_ATTENTION
            assert {f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"} <= sites


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_every_inserted_dropout_runs_in_training(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build().eval()
    plan = regfx.plan(model, **RECIPE, example_inputs=(x,))
    out = transform_quietly(model, **RECIPE, example_inputs=(x,))
    assert len(inserted(out)) == len(plan.dropout) > 0
    assert_every_layer_accounted(model, plan)
    assert_attention_placement(name, model, plan, out)
    # one training forward runs each of them
    runs = count_runs(out)
    out.train()(x)
    assert sorted(set(runs)) == sorted(inserted(out))
    # transforming again with the same arguments changes nothing
    twice = transform_quietly(out, **RECIPE, example_inputs=(x,))
    assert [n for n, _ in twice.named_modules()] == [n for n, _ in out.named_modules()]
    assert list(twice.state_dict()) == list(out.state_dict())
    assert torch.equal(eval_out(twice, (x,)), eval_out(out, (x,)))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_no_output_element_zeroed_in_training(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build().eval()
    with torch.no_grad():  # torchvision's ViT head starts at zero: its logits would all be 0
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and not mod.weight.any():
                nn.init.normal_(mod.weight, std=0.02)
    expected = eval_out(model, (x,))
    assert expected.all()  # else a zeroed logit could not be told from a zero one
    # p=0.5: a dropout on the head would zero about half of the logits
    out = transform_quietly(model, dropout=0.5, dropout_after=RECIPE["dropout_after"], example_inputs=(x,))
    assert inserted(out)
    torch.manual_seed(0)
    got = out.train()(x)
    assert not ((got == 0) & (expected != 0)).any(), "an inserted dropout zeroed a model output"


# -- gradient checkpointing (timm: ``set_grad_checkpointing``) ---------------------------------

# A layer inside a checkpointed block: called in the forward, then again in backward.
CHECKPOINTED_LAYER = {
    "timm_vit_tiny": "blocks.0.mlp.fc1",
    "timm_resnet18": "layer1.0.conv1",
    "timm_convnext_atto": "stages.0.blocks.0.conv_dw",
    "timm_efficientnet_b0": "blocks.1.0.conv_pw",
}
TIMM = sorted(CHECKPOINTED_LAYER)


def train_step_counting(out: nn.Module, x: torch.Tensor, layer: str
                        ) -> tuple[int, list[str], list[str]]:
    """(calls of ``layer``, inserted dropouts that ran, RegfxWarning texts) of forward + backward."""
    calls: list[int] = []
    out.get_submodule(layer).register_forward_hook(lambda *a: calls.append(1))
    runs = count_runs(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", regfx.RegfxWarning)
        out.train()(x).sum().backward()
    texts = [str(w.message) for w in caught if issubclass(w.category, regfx.RegfxWarning)]
    return len(calls), runs, texts


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", TIMM)
def test_checkpointing_switched_on_after_the_transform(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    out = transform_quietly(build(), **RECIPE, example_inputs=(x,))
    out.set_grad_checkpointing(True)
    calls, runs, texts = train_step_counting(out, x, CHECKPOINTED_LAYER[name])
    assert calls == 2  # the forward, then the recomputation in backward
    # the flags changed are read by forwards regfx never regenerates (they checkpoint): every
    # inserted dropout still runs, and there is no "does not run" warning
    assert sorted(set(runs)) == sorted(inserted(out))
    assert not texts, texts


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", TIMM)
def test_checkpointing_switched_on_before_the_transform(name: str) -> None:
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build()
    model.set_grad_checkpointing(True)
    plan = regfx.plan(model, **RECIPE, example_inputs=(x,))
    out = transform_quietly(model, **RECIPE, example_inputs=(x,))
    assert len(inserted(out)) == len(plan.dropout) > 0
    calls, runs, texts = train_step_counting(out, x, CHECKPOINTED_LAYER[name])
    assert calls == 2
    assert sorted(set(runs)) == sorted(inserted(out))
    assert not texts, texts


# With checkpointing on, timm's checkpoint_seq calls each child of ``blocks`` itself (the
# nn.Sequential is never called): no phantom second call of the Sequential (some of whose
# modules never run), and no trace shared between stages of different lengths.
CHECKPOINTED_PLACEMENT = ["timm_vit_tiny", "timm_resnet18", "timm_convnext_atto", "timm_efficientnet_b0"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", CHECKPOINTED_PLACEMENT)
def test_checkpointing_does_not_change_the_placement(name: str) -> None:
    """Checkpointing is a memory setting: the dropout inserted is the same with it on or off,
    one per call of a layer (the layers of these models run once per forward)."""
    torch.manual_seed(0)
    build, x = _cases()[name]
    model = build()
    plain = inserted(transform_quietly(model, **RECIPE, example_inputs=(x,)))
    model.set_grad_checkpointing(True)
    checkpointed = inserted(transform_quietly(model, **RECIPE, example_inputs=(x,)))
    assert sorted(checkpointed) == sorted(plain)


@pytest.mark.parametrize("name", ["tv_efficientnet_b0", "tv_swin_t", "timm_vit_tiny",
                                  "timm_convnext_atto"])
def test_the_audit_reusing_the_transforms_traces_equals_a_fresh_audit(name: str) -> None:
    build, _ = _cases()[name]
    out = transform_quietly(build(), dropout=0.1, dropout_after="linear,conv", spectral="conv")
    assert len(regfx.state_of(out).traces) > 0
    assert regfx.audit(out).to_dict() == regfx.audit(copy.deepcopy(out)).to_dict()
