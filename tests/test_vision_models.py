"""torchvision and timm architectures (random weights, small inputs): transform, audit, bake.

torchvision and timm are not test dependencies (torchvision's PyPI wheels import only beside
their matching torch), so they are skipped where either is missing; CI installs the matching
pair and sets ``CI``, where a missing one is a failure, not a skip.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import regfx

from .helpers import eval_out

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
