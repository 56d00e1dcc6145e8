"""Placement decided from the dataflow graph, checked by what runs in a training forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

import regfx

from ..conftest import MODEL_FIXTURES, load_fixture


def inserted(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1].startswith("regfx_dropout")]


def count_runs(model: nn.Module) -> list[str]:
    """Record the name of every inserted dropout each time it runs."""
    runs: list[str] = []
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1].startswith("regfx_dropout"):
            mod.register_forward_hook(lambda m, i, o, name=name: runs.append(name))
    return runs


def transform_quietly(model: nn.Module, **kwargs):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        return regfx.transform(model, **kwargs)


def outputs_of(value):  # type: ignore[no-untyped-def]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in outputs_of(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in outputs_of(v)]
    if hasattr(value, "to_tuple"):
        return outputs_of(value.to_tuple())
    return []


def assert_no_output_zeroed(model: nn.Module, inputs, plain: nn.Module) -> None:  # type: ignore[no-untyped-def]
    """In training, no output element is exactly zero where the untransformed model's is not."""
    torch.manual_seed(0)
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(*inputs))
    for out, ref in zip(outputs_of(call(model.train())), outputs_of(call(plain.eval()))):
        if out.is_floating_point():
            assert not ((out == 0) & (ref != 0)).any(), "an inserted dropout zeroed a model output"


# -- output layers ---------------------------------------------------------------------------


class SegHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2,
                                                                                           padding=1))
        self.classifier = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.classifier(torch.relu(self.backbone(x)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class SummedHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head_a(h) + self.head_b(h)


class DictHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 3), "b": nn.Linear(6, 2)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {k: head(h) for k, head in self.heads.items()}


class BranchyClassifier(nn.Module):
    """A root forward that does not trace (a branch on a tensor); the head is its last call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 30)
        self.after = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > -1e9:
            h = torch.relu(self.fc2(h))
        return self.after(self.classifier(h))


CASES = {
    "interpolated_segmentation_head": (SegHead, (torch.randn(2, 3, 8, 8),), {"classifier"}),
    "summed_heads": (SummedHeads, (torch.randn(4, 6),), {"head_a", "head_b"}),
    "module_dict_heads": (DictHeads, (torch.randn(4, 6),), {"heads.a", "heads.b"}),
    "untraceable_root_classifier": (BranchyClassifier, (torch.randn(4, 6),), {"classifier"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_dropout_on_output_layers(case: str) -> None:
    build, inputs, heads = CASES[case]
    torch.manual_seed(0)
    model = build()
    plan = regfx.plan(model, dropout=0.5, dropout_after="linear,conv", example_inputs=inputs)
    assert not {s.layer for s in plan.dropout} & heads
    assert heads <= {site.split("#")[0] for site, _, why in plan.skipped if why == "output layer"}
    out = transform_quietly(model, dropout=0.5, dropout_after="linear,conv", example_inputs=inputs)
    runs = count_runs(out)
    assert_no_output_zeroed(out, inputs, model)
    assert sorted(set(runs)) == sorted(inserted(out)) and runs


# -- "dropout already follows" ----------------------------------------------------------------


def test_dropout_with_p_zero_is_no_regularization() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 8), nn.Dropout(0.2),
                          nn.Linear(8, 2))
    plan = regfx.plan(model, dropout=0.1)
    assert [s.layer for s in plan.dropout] == ["0"]
    assert ("3#0", "dropout", "dropout already follows") in plan.skipped


def test_transformer_encoder_layer_gets_no_second_dropout() -> None:
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True),
                          nn.Linear(16, 3))
    x = torch.randn(2, 5, 16)
    plan = regfx.plan(model, dropout=0.1, example_inputs=(x,))
    layers = {s.layer for s in plan.dropout}
    assert "0.linear2" not in layers  # dropout2 follows it in the forward
    assert "0.linear1" not in layers  # so does dropout (after the activation)
    out = transform_quietly(model, dropout=0.1, example_inputs=(x,))
    runs = count_runs(out)
    out.train()(x)
    assert sorted(set(runs)) == sorted(inserted(out))


# -- attention --------------------------------------------------------------------------------


def test_no_dropout_on_projections_feeding_attention() -> None:
    for fixture in ("hf_bert", "hf_llama", "hf_gpt2"):
        loaded = load_fixture(fixture)
        plan = regfx.plan(loaded.model, dropout=0.1, example_inputs=loaded.inputs())
        layers = {s.layer for s in plan.dropout}
        reasons = {site.split("#")[0]: why for site, _, why in plan.skipped}
        for name in layers:
            assert not name.endswith(("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn")), name
        fed = [n for n, why in reasons.items() if why == "feeds attention; use attention dropout"]
        assert fed, fixture
    loaded = load_fixture("hf_llama")
    plan = regfx.plan(loaded.model, dropout=0.1, example_inputs=loaded.inputs())
    layers = {s.layer for s in plan.dropout}
    assert "model.layers.0.self_attn.o_proj" in layers and "model.layers.0.mlp.down_proj" in layers
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}" not in layers


class EagerAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / 8 ** 0.5
        h = x + self.o(torch.softmax(scores, dim=-1) @ self.v(x))
        return h + torch.relu(self.mlp(h))


def test_eager_attention_projections_are_skipped_output_projection_kept() -> None:
    model = nn.Sequential(EagerAttention(), nn.Linear(8, 2))
    plan = regfx.plan(model, dropout=0.1)
    assert sorted(s.layer for s in plan.dropout) == ["0.mlp", "0.o"]
    for proj in "qkv":
        assert (f"0.{proj}#0", "dropout", "feeds attention; use attention dropout") in plan.skipped


# -- semantics kept -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc(x)))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(8, 2)
        self.grad_checkpointing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing else blk(x)
        return self.head(x)


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_is_kept(enabled: bool) -> None:
    model = Checkpointed()
    model.grad_checkpointing = enabled
    out = transform_quietly(model, dropout=0.2)
    out.grad_checkpointing = True  # switched on after the transform, as set_grad_checkpointing does
    calls: list[int] = []
    out.blocks[0].fc.register_forward_hook(lambda *a: calls.append(1))
    runs = count_runs(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        y = out.train()(torch.randn(4, 8))
        y.sum().backward()
    assert len(calls) == 2  # the forward, then the recomputation in backward
    assert "blocks.0.fc.regfx_dropout" in runs
    assert "inp.regfx_dropout" in runs  # placed at the module boundary, not in a regenerated forward


def test_a_flag_changed_after_the_transform_is_honoured_with_a_warning() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)
            self.use_shortcut = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x))
            return self.out(h + x if self.use_shortcut else h)

    model = Gated()
    out = regfx.transform(model, dropout=0.3)
    x = torch.randn(2, 4)
    out.use_shortcut = True
    model.use_shortcut = True
    with pytest.warns(regfx.RegfxWarning, match="called with arguments or flags other than"):
        got = out.eval()(x)
    torch.testing.assert_close(got, model.eval()(x))


# -- every inserted dropout runs ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_FIXTURES))
def test_every_inserted_dropout_runs_on_every_fixture(name: str) -> None:
    loaded = load_fixture(name)
    inputs = loaded.inputs()
    assert inputs is not None
    plan = regfx.plan(loaded.model, dropout=0.1, dropout_after="linear,conv,embedding",
                      example_inputs=inputs)
    out = transform_quietly(loaded.model, dropout=0.1, dropout_after="linear,conv,embedding",
                            example_inputs=inputs)
    runs = count_runs(out)
    inputs.call(out.train())
    assert len(inserted(out)) == len(plan.dropout)
    assert inserted(out) or name == "functional", name  # its one Linear is followed by F.dropout
    assert sorted(set(runs)) == sorted(inserted(out))
    assert_no_output_zeroed(out, inputs.kwargs or inputs.args, loaded.model)
