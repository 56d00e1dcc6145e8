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
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
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
