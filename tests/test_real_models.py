"""Hugging Face architectures beyond the fixtures (tiny configs, no download): transform, bake."""

import warnings

import pytest
import torch

import regfx

from .helpers import eval_out
from .transforms.test_placement import count_runs, inserted, transform_quietly


def _cases():  # type: ignore[no-untyped-def]
    import transformers as hf

    return {
        "t5": (lambda: hf.T5ForConditionalGeneration(hf.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            dropout_rate=0.0)),  # with its default 0.1, dropout already follows every site
            {"input_ids": torch.randint(0, 64, (2, 7)),
             "decoder_input_ids": torch.randint(0, 64, (2, 5))}),
        "vit": (lambda: hf.ViTForImageClassification(hf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)), {"pixel_values": torch.randn(2, 3, 16, 16)}),
        "distilbert": (lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
            {"input_ids": torch.randint(0, 64, (2, 7))}),
        "resnet": (lambda: hf.ResNetForImageClassification(hf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
            {"pixel_values": torch.randn(2, 3, 32, 32)}),
    }


@pytest.mark.parametrize("name", ["t5", "vit", "distilbert", "resnet"])
def test_transform_bake_roundtrip(name: str) -> None:
    torch.manual_seed(0)
    build, inputs = _cases()[name]
    model = build().eval()
    expected = eval_out(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        out = regfx.transform(model, dropout=0.2, dropout_after="linear,conv",
                              weight_norm="linear", example_inputs=inputs)
        twice = regfx.transform(out, dropout=0.2, dropout_after="linear,conv",
                                weight_norm="linear", example_inputs=inputs)
    assert any("regfx_dropout" in n for n, _ in out.named_modules())
    torch.testing.assert_close(eval_out(out, inputs), expected, rtol=1e-4, atol=1e-4)
    assert [n for n, _ in twice.named_modules()] == [n for n, _ in out.named_modules()]
    baked = regfx.bake(out)
    assert list(baked.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(eval_out(baked, inputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["t5", "vit", "distilbert", "resnet"])
def test_audit_untouched_and_transformed(name: str) -> None:
    build, inputs = _cases()[name]
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.01)
    report = regfx.audit(model, optimizer)
    names = [n for r in report.params for n in (r.name, *r.aliases)]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))
    # one AdamW group over everything: decay found on every trainable parameter
    assert all(any(x["kind"] == "weight_decay" and x["decoupled"] for x in r.regularizers)
               for r in report.params if r.trainable)
    dropout = [x for r in report.params for x in r.regularizers if x["kind"] == "dropout"]
    if name == "distilbert":  # its config defaults to dropout 0.1 (the t5 case sets 0.0)
        assert any(x["p"] == 0.1 for x in dropout)
    if name == "vit":  # dropout modules with p=0: reported, and not counted as regularization
        assert not dropout
        assert any(f.code == "RFX104" for f in report.findings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regfx.RegfxWarning)
        out = regfx.transform(model, spectral="linear,conv", l1=1e-6, example_inputs=inputs)
    after = regfx.audit(out)
    assert sorted(n for r in after.params for n in (r.name, *r.aliases)) == sorted(names)
    for rec in after.params:
        if rec.layer_type in ("linear", "conv") and rec.name.endswith(".weight"):
            assert {"spectral_norm", "l1"} <= rec.kinds(), rec.name


# -- what a user gets in training --------------------------------------------------------------

RECIPE = {"dropout": 0.2, "dropout_after": "linear,conv"}
FEEDS_ATTENTION = "feeds attention; use attention dropout"
# Projections whose output becomes a query, key or value.
ATTENTION_PROJECTIONS = ("q", "k", "v", "qkv", "query", "key", "value", "q_lin", "k_lin", "v_lin",
                         "in_proj", "q_proj", "k_proj", "v_proj")
# Per model: (attention module name suffix, its q/k/v projections, its output projection).
ATTENTION = {
    "t5": (("SelfAttention", "EncDecAttention"), ("q", "k", "v"), "o"),
    "vit": (("attention",), ("q_proj", "k_proj", "v_proj"), "o_proj"),
    "distilbert": (("attention",), ("q_lin", "k_lin", "v_lin"), "out_lin"),
}
NAMES = ["t5", "vit", "distilbert", "resnet"]


def skipped_reasons(plan: regfx.Plan) -> dict[str, str]:
    """Layer (call index dropped) -> why the dropout plan left it alone."""
    return {site.split("#")[0]: why for site, kind, why in plan.skipped if kind == "dropout"}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_every_inserted_dropout_runs_in_training(name: str) -> None:
    torch.manual_seed(0)
    build, inputs = _cases()[name]
    model = build().eval()
    plan = regfx.plan(model, **RECIPE, example_inputs=inputs)
    out = transform_quietly(model, **RECIPE, example_inputs=inputs)
    assert len(inserted(out)) == len(plan.dropout) > 0
    # every selected layer is a site or skipped with a reason
    skipped = skipped_reasons(plan)
    sites = {s.layer for s in plan.dropout}
    assert {n for n, _ in regfx.select_layers(model, RECIPE["dropout_after"])} == sites | set(skipped)
    # no dropout after a projection that feeds attention; the output projection is a site
    for layer in {n.rsplit(".", 1)[0] for n in inserted(out)}:
        assert layer.rsplit(".", 1)[-1] not in ATTENTION_PROJECTIONS, layer
    if name in ATTENTION:
        owners, projections, output = ATTENTION[name]
        attention = [n for n, _ in model.named_modules() if n.endswith(owners)]
        assert attention
        for attn in attention:
            for proj in projections:
                assert skipped[f"{attn}.{proj}"] == FEEDS_ATTENTION, f"{attn}.{proj}"
            assert f"{attn}.{output}" in sites
    # one training forward runs each of them
    runs = count_runs(out)
    out.train()(**inputs)
    assert sorted(set(runs)) == sorted(inserted(out))
    # transforming again with the same arguments changes nothing
    twice = transform_quietly(out, **RECIPE, example_inputs=inputs)
    assert [n for n, _ in twice.named_modules()] == [n for n, _ in out.named_modules()]
    assert list(twice.state_dict()) == list(out.state_dict())
    assert torch.equal(eval_out(twice, inputs), eval_out(out, inputs))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_no_logit_zeroed_in_training(name: str) -> None:
    torch.manual_seed(0)
    build, inputs = _cases()[name]
    model = build().eval()
    # p=0.5: a dropout on the head would zero about half of the logits
    out = transform_quietly(model, dropout=0.5, dropout_after=RECIPE["dropout_after"], example_inputs=inputs)
    assert inserted(out)
    expected = eval_out(model, inputs)
    assert expected.all()  # else a zeroed logit could not be told from a zero one
    torch.manual_seed(0)
    logits = out.train()(**inputs).logits
    assert not ((logits == 0) & (expected != 0)).any(), "an inserted dropout zeroed a logit"
