"""Hugging Face architectures beyond the fixtures (tiny configs, no download): transform, bake."""

import warnings

import pytest
import torch

import regfx

from .helpers import eval_out


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
