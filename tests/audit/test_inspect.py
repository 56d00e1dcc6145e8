"""The audit's per-parameter records: each parameter exactly once, with exactly its regularizers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import regfx

from ..conftest import load_fixture
from ..test_invariants import RECIPES, transformed


def kinds(report: regfx.AuditReport) -> dict[str, list[str]]:
    return {r.name: [x["kind"] for x in r.regularizers] for r in report.params}


def listed_names(report: regfx.AuditReport) -> list[str]:
    return [n for r in report.params for n in (r.name, *r.aliases)]


def test_untouched_fixture_lists_every_parameter_once(fixture_name: str) -> None:
    loaded = load_fixture(fixture_name)
    report = regfx.audit(loaded.model, loaded.build_optimizer())
    names = listed_names(report)
    assert len(names) == len(set(names))
    expected = {n for n, _ in loaded.model.named_parameters(remove_duplicate=False)}
    assert set(names) == expected
    assert report.summary["numel"] == sum(p.numel() for p in loaded.model.parameters())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_7_transformed_fixture_lists_logical_names_once(fixture_name: str, recipe: str) -> None:
    loaded, model = transformed(fixture_name, recipe)
    report = regfx.audit(model)
    names = listed_names(report)
    assert len(names) == len(set(names))
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set(names) == logical_keys_of(params)
    assert not any("parametrizations" in n or "regfx_" in n for n in names)
    # the logical numel is the user's model's
    assert report.summary["numel"] == sum(p.numel() for p in loaded.model.parameters())


def logical_keys_of(names: set[str]) -> set[str]:
    out = set()
    for key in names:
        if ".parametrizations." in f".{key}":
            head, _, tail = key.partition("parametrizations.")
            out.add(f"{head}{tail.partition('.')[0]}")
        else:
            out.add(key)
    return out


def test_transform_regularizers_match_the_plan() -> None:
    loaded = load_fixture("cnn")
    recipe = regfx.Recipe(dropout=0.2, dropout_after="conv,linear", spectral="conv",
                          weight_norm="linear", l1=1e-5, l2=1e-4)
    the_plan = regfx.plan(loaded.model, recipe, example_inputs=loaded.example_inputs)
    model = regfx.transform(loaded.model, recipe, example_inputs=loaded.example_inputs)
    report = regfx.audit(model)
    expected: dict[str, set[str]] = {r.name: set() for r in report.params}
    for row in the_plan.rows():
        if row["kind"] == "dropout":
            layer = row["site"].split("#")[0]
            for name in expected:
                if name.rsplit(".", 1)[0] == layer:
                    expected[name].add("dropout")
        else:
            expected[row["site"]].add(row["kind"])
    assert {k: set(v) for k, v in kinds(report).items()} == expected
    # the classifier produces the output: no dropout after it, and the audit agrees
    assert "dropout" not in kinds(report)["classifier.weight"]


def test_hand_regularized_mlp() -> None:
    loaded = load_fixture("regularized_mlp")
    report = regfx.audit(loaded.model, loaded.build_optimizer())
    assert kinds(report) == {
        "fc1.weight": ["dropout", "weight_decay"], "fc1.bias": ["dropout"],
        "fc2.weight": ["dropout", "weight_decay"], "fc2.bias": ["dropout"],
        "norm.weight": [], "norm.bias": [],
        "head.weight": ["weight_decay"], "head.bias": [],
    }
    wd = report.param("fc1.weight").regularizers[1]
    assert wd == {"kind": "weight_decay", "value": 0.05, "decoupled": True, "optimizer": "AdamW",
                  "group": 0}
    assert report.findings == []
    assert report.gate().passed


def test_bad_practice_cnn() -> None:
    loaded = load_fixture("bad_practice")
    report = regfx.audit(loaded.model, loaded.build_optimizer())
    k = kinds(report)
    assert k["conv1.weight"] == ["dropout", "weight_decay"]
    assert k["bn1.weight"] == ["weight_decay"]
    assert report.param("fc.weight").regularizers[0]["p"] == 0.9
    assert report.param("conv1.weight").regularizers[1]["decoupled"] is False
    codes = sorted({f.code for f in report.findings})
    assert codes == ["RFX101", "RFX102", "RFX103", "RFX105", "RFX201", "RFX202"]
    assert not report.gate().passed  # RFX103 is an error


def test_legacy_norms_functional_dropout_and_frozen() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_fixture("legacy_norms")
    report = regfx.audit(loaded.model, loaded.build_optimizer())
    assert [r.name for r in report.params] == [
        "embed.weight", "proj.bias", "proj.weight", "conv.bias", "conv.weight", "mix.bias",
        "mix.weight", "head.weight", "head.bias"]
    embed = report.param("embed.weight")
    assert embed.trainable is False and embed.regularizers == []
    proj = report.param("proj.weight")
    assert proj.shape == [32, 16]
    assert proj.regularizers[:2] == [
        {"kind": "dropout", "p": 0.25, "via": "(root):F.dropout"},
        {"kind": "weight_norm", "deprecated": True, "dim": 0}]
    assert report.param("conv.weight").regularizers[0] == {
        "kind": "spectral_norm", "deprecated": True, "n_power_iterations": 1}
    assert report.param("mix.weight").regularizers[0] == {"kind": "orthogonal"}
    # frozen embedding: coverage counts trainable elements only
    assert report.summary["numel_trainable"] == report.summary["numel"] - 20 * 16
    assert {f.code for f in report.findings} == {"RFX201", "RFX302"}


def test_tied_weights_listed_once_with_aliases() -> None:
    loaded = load_fixture("tied")
    report = regfx.audit(loaded.model)
    embed = report.param("embed.weight")
    assert embed.aliases == ["lm_head.weight"]
    assert report.param("lm_head.weight") is embed
    model = regfx.transform(loaded.model, spectral="linear,embedding")
    embed = regfx.audit(model).param("embed.weight")
    assert [r["kind"] for r in embed.regularizers] == ["spectral_norm"]
    assert "on" not in embed.regularizers[0]


def test_hf_tied_embeddings() -> None:
    loaded = load_fixture("hf_gpt2")
    report = regfx.audit(loaded.model)
    wte = report.param("transformer.wte.weight")
    assert wte.aliases == ["lm_head.weight"]


def test_dropout_inside_opaque_modules_is_inferred() -> None:
    loaded = load_fixture("hf_bert")
    graph = regfx.trace(loaded.model, observe_forward=False)
    report = regfx.audit(loaded.model, graph=graph)
    dense = report.param("bert.encoder.layer.0.output.dense.weight")
    assert any(r["kind"] == "dropout" for r in dense.regularizers)
    assert any(f.code == "RFX001" for f in report.findings)


def test_dropout_inside_observed_forwards_is_read_from_the_dataflow() -> None:
    loaded = load_fixture("hf_bert")
    report = regfx.audit(loaded.model)  # inputs synthesized from the BertConfig
    dense = report.param("bert.encoder.layer.0.output.dense.weight")
    assert dense.regularizers == [{"kind": "dropout", "p": 0.1,
                                   "via": "bert.encoder.layer.0.output.dropout"}]
    assert not any(f.code == "RFX001" for f in report.findings)


def test_multihead_attention_dropout_argument() -> None:
    model = nn.MultiheadAttention(8, 2, dropout=0.1)
    report = regfx.audit(model)
    assert report.param("in_proj_weight").regularizers == [
        {"kind": "dropout", "p": 0.1, "via": "dropout"}]
    assert report.param("out_proj.weight").regularizers == []
    lstm = regfx.audit(nn.Sequential(nn.LSTM(4, 4, num_layers=2, dropout=0.2)))
    assert lstm.param("0.weight_hh_l1").regularizers == [{"kind": "dropout", "p": 0.2, "via": "0.dropout"}]


def test_drop_path_module() -> None:
    class DropPath(nn.Module):
        def __init__(self, drop_prob: float) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop_path = DropPath(0.1)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.drop_path(self.fc(x)))

    report = regfx.audit(Block())
    assert report.param("fc.weight").regularizers == [
        {"kind": "drop_path", "p": 0.1, "via": "drop_path"}]
    assert report.param("head.weight").regularizers == []


def test_adam_decoupled_flag_and_penalty_values() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = regfx.transform(model, l1=1e-5, l2=1e-4)
    report = regfx.audit(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert report.param("0.weight").regularizers == [{"kind": "l1", "value": 1e-5},
                                                     {"kind": "l2", "value": 1e-4}]
    assert report.param("0.bias").regularizers == []
    assert report.optimizer is not None and report.optimizer.adaptive is False


def test_audit_does_not_change_the_model() -> None:
    loaded = load_fixture("cnn")
    model = regfx.transform(loaded.model, spectral="conv,linear", weight_norm=None, dropout=0.1)
    model.train()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    regfx.audit(model, example_inputs=loaded.example_inputs)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # spectral norm's u/v did not advance
    assert [type(m) for m in model.modules()] == classes
    assert all(m.training for m in model.modules())


def test_meta_device_model() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    report = regfx.audit(model)
    assert report.summary["numel"] == 4096 * 4096 + 4096 + 4096 * 10 + 10


def test_half_precision_and_lazy_layers() -> None:
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2)).half()
    report = regfx.audit(model)
    lazy = report.param("0.weight")
    assert lazy.initialized is False and lazy.numel == 0
    assert lazy.to_dict()["initialized"] is False


def test_rejects_non_modules() -> None:
    with pytest.raises(regfx.RegfxError, match="needs an nn.Module"):
        regfx.audit("model.py")  # type: ignore[arg-type]
    with pytest.raises(regfx.RegfxError, match="must be a torch.optim.Optimizer"):
        regfx.audit(nn.Linear(2, 2), optimizer=[1, 2])  # type: ignore[arg-type]


def test_ddp_wrapper_is_unwrapped_for_audit() -> None:
    model = nn.DataParallel(nn.Sequential(nn.Linear(4, 4)))
    assert regfx.audit(model).model == "Sequential"


def test_attention_dropout_attribute_inside_opaque_attention() -> None:
    import sys

    from transformers import LlamaForCausalLM

    from ..conftest import FIXTURES

    sys.path.insert(0, str(FIXTURES))
    try:
        import hf_llama
    finally:
        sys.path.remove(str(FIXTURES))
    report = regfx.audit(LlamaForCausalLM(hf_llama.config(attention_dropout=0.1)))
    attn = "model.layers.0.self_attn"
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert report.param(f"{attn}.{proj}.weight").regularizers == [
            {"kind": "dropout", "p": 0.1, "via": f"{attn}.attention_dropout", "inferred": True}]
    assert report.param(f"{attn}.o_proj.weight").regularizers == []
    # the default, 0.0, is no regularization
    default = regfx.audit(LlamaForCausalLM(hf_llama.config()))
    assert default.param(f"{attn}.q_proj.weight").regularizers == []


class _FusedAttention(nn.Module):
    """timm's Attention: one qkv projection, F.scaled_dot_product_attention with dropout_p."""

    def __init__(self, dim: int = 8, heads: int = 2, attn_drop: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)  # only its p is used, as in timm's fused path
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def test_sdpa_dropout_p_is_found_and_unused_dropout_module_is_not() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = _FusedAttention()
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.attn(x))

    model = Net()
    report = regfx.audit(model)
    assert not report.opaque
    assert report.param("attn.qkv.weight").regularizers == [
        {"kind": "dropout", "p": 0.1, "via": "attn:F.scaled_dot_product_attention(dropout_p)"}]
    assert report.param("attn.proj.weight").regularizers == []
    # in eval mode the traced call has dropout_p=0: nothing to count
    assert regfx.audit(model.eval()).param("attn.qkv.weight").regularizers == []
