"""Example inputs: normalizing what users give, and synthesizing them from what a model says."""

from __future__ import annotations

import builtins
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from regfx.errors import RegfxError
from regfx.inputs import ExampleInputs, as_example_inputs, synthesize_inputs


def _run(model: nn.Module, inputs: ExampleInputs) -> Any:
    """One eval-mode forward without gradients, as regfx runs example inputs."""
    model.eval()
    with torch.no_grad():
        return inputs.call(model)


def _synthesized(model: nn.Module) -> ExampleInputs:
    inputs = synthesize_inputs(model)
    assert inputs is not None, f"no inputs synthesized for {type(model).__name__}"
    return inputs


# --- as_example_inputs -------------------------------------------------------------------------------


def test_tensor_is_one_positional_argument() -> None:
    x = torch.zeros(4, 3)
    inputs = as_example_inputs(x)
    assert inputs.args[0] is x and len(inputs.args) == 1 and inputs.kwargs == {}
    assert inputs.source == "given"
    assert inputs.describe() == "arg0: float32[4, 3] (given)"


@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_or_list_is_positional_arguments(container: Callable[[Any], Any]) -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, dtype=torch.long)
    inputs = as_example_inputs(container([a, b]), source="example_inputs() of fixtures/cnn.py")
    assert isinstance(inputs.args, tuple) and inputs.args[0] is a and inputs.args[1] is b
    assert inputs.describe() == "arg0: float32[2, 3], arg1: int64[2] (example_inputs() of fixtures/cnn.py)"


def test_dict_is_keyword_arguments_and_copied() -> None:
    given = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8)}
    inputs = as_example_inputs(given)
    assert inputs.args == () and inputs.kwargs == given and inputs.kwargs is not given
    assert inputs.describe() == "input_ids: int64[2, 8], attention_mask: float32[2, 8] (given)"


def test_example_inputs_returned_as_is() -> None:
    inputs = ExampleInputs((torch.zeros(1),), {}, "somewhere")
    assert as_example_inputs(inputs, source="ignored") is inputs


def test_call_passes_args_and_kwargs() -> None:
    def forward(a: int, b: int = 0, *, scale: int = 1) -> int:
        return (a - b) * scale

    assert ExampleInputs((5, 2), {"scale": 3}, "given").call(forward) == 9


def test_none_and_non_string_keys_are_rejected() -> None:
    with pytest.raises(RegfxError, match="None"):
        as_example_inputs(None)
    with pytest.raises(RegfxError, match="0"):
        as_example_inputs({0: torch.zeros(1)})


def test_describe_nested_values() -> None:
    inputs = ExampleInputs(([torch.zeros(3, 4, 4)] * 5, None), {"flag": True}, "given")
    assert inputs.describe() == (
        "arg0: [float32[3, 4, 4], float32[3, 4, 4], float32[3, 4, 4], float32[3, 4, 4], ... 5 in all], "
        "arg1: None, flag: True (given)"
    )


# --- Hugging Face transformers -----------------------------------------------------------------------


def _text(name: str, config_name: str, **overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        params: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=100)
        params.update(overrides)
        model: nn.Module = getattr(transformers, name)(getattr(transformers, config_name)(**params))
        return model
    return build


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def _t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, vocab_size=100, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _bart() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  vocab_size=100, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(cfg)


def _clip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=100, max_position_embeddings=16)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=16))


def _vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def _whisper() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                     num_mel_bins=16, max_source_positions=24, max_target_positions=6,
                                     decoder_start_token_id=0, pad_token_id=0)
    return transformers.WhisperForConditionalGeneration(cfg)


def _wav2vec2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
                                      conv_stride=(5, 2), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, vocab_size=100)
    return transformers.Wav2Vec2Model(cfg)


def _speech2text() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Speech2TextConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                         input_feat_per_channel=20)
    return transformers.Speech2TextForConditionalGeneration(cfg)


def _vision_encoder_decoder() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    encoder = _vit().vit
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=90, add_cross_attention=True)
    decoder = transformers.GPT2LMHeadModel(cfg)
    return transformers.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)


_KV = dict(num_key_value_heads=2, max_position_embeddings=64)

# name -> (builder, the keyword inputs and their shapes, batch 2)
TRANSFORMERS_CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, tuple[int, ...]]]] = {
    "bert": (_text("BertModel", "BertConfig"), {"input_ids": (2, 8), "attention_mask": (2, 8)}),
    "bert_classifier": (_text("BertForSequenceClassification", "BertConfig", num_labels=3),
                        {"input_ids": (2, 8), "attention_mask": (2, 8)}),
    "roberta": (_text("RobertaModel", "RobertaConfig", max_position_embeddings=8),
                {"input_ids": (2, 6), "attention_mask": (2, 6)}),
    "gpt2": (_gpt2, {"input_ids": (2, 8), "attention_mask": (2, 8)}),
    "t5": (_t5, {"input_ids": (2, 8), "attention_mask": (2, 8), "decoder_input_ids": (2, 8)}),
    "bart": (_bart, {"input_ids": (2, 8), "attention_mask": (2, 8), "decoder_input_ids": (2, 8)}),
    "llama": (_text("LlamaForCausalLM", "LlamaConfig", **_KV),
              {"input_ids": (2, 8), "attention_mask": (2, 8)}),
    "mistral": (_text("MistralForCausalLM", "MistralConfig", **_KV),
                {"input_ids": (2, 8), "attention_mask": (2, 8)}),
    "clip": (_clip, {"input_ids": (2, 8), "pixel_values": (2, 3, 32, 32), "attention_mask": (2, 8)}),
    "vit": (_vit, {"pixel_values": (2, 3, 32, 32)}),
    "whisper": (_whisper, {"input_features": (2, 16, 48), "decoder_input_ids": (2, 6)}),
    "wav2vec2": (_wav2vec2, {"input_values": (2, 110)}),
    # beyond the families regfx promises: the config layouts they show are handled
    "bert_multiple_choice": (_text("BertForMultipleChoice", "BertConfig"),
                             {"input_ids": (2, 2, 8), "attention_mask": (2, 2, 8)}),
    "speech2text": (_speech2text, {"input_features": (2, 32, 20), "decoder_input_ids": (2, 8)}),
    "vision_encoder_decoder": (_vision_encoder_decoder,
                               {"pixel_values": (2, 3, 32, 32), "decoder_input_ids": (2, 8)}),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CASES))
def test_transformers_models_run_on_synthesized_inputs(name: str) -> None:
    build, shapes = TRANSFORMERS_CASES[name]
    model = build()
    inputs = _synthesized(model)
    config_name = type(model.config).__name__
    assert inputs.source == f"transformers config ({config_name})"
    assert inputs.args == ()
    assert {k: tuple(v.shape) for k, v in inputs.kwargs.items()} == shapes
    for key in ("input_ids", "decoder_input_ids"):
        if key in inputs.kwargs:
            ids = inputs.kwargs[key]
            assert ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 100
    for key in ("pixel_values", "input_features", "input_values"):
        if key in inputs.kwargs:
            assert inputs.kwargs[key].dtype == torch.float32
    _run(model, inputs)


def test_wav2vec2_input_survives_default_feature_extractor_and_training_masks() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, conv_dim=(8,) * 7, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, mask_time_prob=0.5)
    model = transformers.Wav2Vec2Model(cfg)
    inputs = _synthesized(model)
    model.train()  # time masking needs at least mask_time_length frames
    output = inputs.call(model)
    assert output.last_hidden_state.shape[1] >= cfg.mask_time_length


def test_meta_llama_gives_meta_tensors() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    inputs = _synthesized(model)
    assert set(inputs.kwargs) == {"input_ids", "attention_mask"}
    assert all(v.device.type == "meta" and v.dtype == torch.long for v in inputs.kwargs.values())


def test_float_inputs_follow_the_model_dtype_and_device() -> None:
    model = _vit().to(torch.bfloat16)
    pixels = _synthesized(model).kwargs["pixel_values"]
    assert pixels.dtype == torch.bfloat16 and pixels.device.type == "cpu"
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Conv1d(4, 8, 3)).to(torch.float16)
    x = _synthesized(meta_model).args[0]
    assert (x.device.type, x.dtype, tuple(x.shape)) == ("meta", torch.float16, (2, 4, 32))


# --- timm and torchvision ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), [("resnet18", {}), ("vit_tiny_patch16_224", {"depth": 2})])
def test_timm_models_use_pretrained_cfg(name: str, kwargs: dict[str, Any]) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    shape = (3, 224, 224)
    inputs = _synthesized(model)
    assert inputs.source == f"timm pretrained_cfg input_size {shape}"
    assert tuple(inputs.args[0].shape) == (2, *shape)
    assert tuple(_run(model, inputs).shape) == (2, 5)


def _torchvision(builder: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        models = pytest.importorskip("torchvision.models")
        model: nn.Module = models.get_model(builder, weights=None, **kwargs)
        return model
    return build


@pytest.mark.parametrize(("builder", "family", "shape"), [
    ("resnet18", "resnet", (2, 3, 224, 224)),
    ("mobilenet_v3_small", "mobilenetv3", (2, 3, 224, 224)),
    ("lraspp_mobilenet_v3_large", "segmentation.lraspp", (2, 3, 224, 224)),
    ("r3d_18", "video.resnet", (1, 3, 16, 112, 112)),  # one clip: it costs as much as ~10 images
])
def test_torchvision_models_use_documented_input(builder: str, family: str, shape: tuple[int, ...]) -> None:
    extra = {"weights_backbone": None} if builder.startswith("lraspp") else {}
    model = _torchvision(builder, **extra)()
    inputs = _synthesized(model)
    assert inputs.source == f"torchvision documented input ({family})"
    assert tuple(inputs.args[0].shape) == shape
    _run(model, inputs)


def test_torchvision_inception_and_vit_sizes() -> None:
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):  # only shapes are checked: no need for the weights
        inception = models.inception_v3(weights=None, init_weights=False, aux_logits=False)
        vit = models.VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                       hidden_dim=32, mlp_dim=64)
    assert tuple(_synthesized(inception).args[0].shape) == (2, 3, 299, 299)
    assert tuple(_synthesized(vit).args[0].shape) == (2, 3, 64, 64)


def test_torchvision_detection_gets_none() -> None:
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        model = models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    assert synthesize_inputs(model) is None


# --- first layer -------------------------------------------------------------------------------------


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(ids).mean(1))
        return out


@pytest.mark.parametrize(("build", "source", "shape", "dtype"), [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
     "first layer Conv2d(in_channels=3)", (2, 3, 32, 32), torch.float32),
    (lambda: nn.Sequential(nn.Conv1d(2, 4, 5)), "first layer Conv1d(in_channels=2)", (2, 2, 32),
     torch.float32),
    (lambda: nn.Sequential(nn.Conv3d(1, 2, 3)), "first layer Conv3d(in_channels=1)", (2, 1, 32, 32, 32),
     torch.float32),
    (lambda: nn.Sequential(nn.ConvTranspose2d(4, 2, 3)), "first layer ConvTranspose2d(in_channels=4)",
     (2, 4, 32, 32), torch.float32),
    (lambda: nn.Sequential(nn.Conv1d(1, 4, 400)), "first layer Conv1d(in_channels=1)", (2, 1, 400),
     torch.float32),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)),
     "first layer Linear(in_features=12)", (2, 12), torch.float32),
    (_Embedder, "first layer Embedding(num_embeddings=50)", (2, 8), torch.long),
])
def test_first_layer_guess_runs(build: Callable[[], nn.Module], source: str, shape: tuple[int, ...],
                                dtype: torch.dtype) -> None:
    model = build()
    inputs = _synthesized(model)
    assert inputs.source == source
    x = inputs.args[0]
    assert (tuple(x.shape), x.dtype) == (shape, dtype)
    if dtype == torch.long:
        assert int(x.max()) < 50
    _run(model, inputs)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.rnn(x)[0])
        return out


@pytest.mark.parametrize("build", [
    _Recurrent,
    lambda: nn.Sequential(nn.ReLU(), nn.Flatten()),
    lambda: nn.Sequential(nn.LazyLinear(4)),
    lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)),
], ids=["lstm", "no_parameters", "lazy", "norm_first"])
def test_unknown_models_give_none(build: Callable[[], nn.Module]) -> None:
    assert synthesize_inputs(build()) is None


def test_failure_inside_synthesis_gives_none() -> None:
    class Broken(nn.Module):
        @property
        def pretrained_cfg(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    model = Broken()
    model.layer = nn.Linear(2, 2)
    assert synthesize_inputs(model) is None


# --- synthesis leaves the model and the RNG alone ----------------------------------------------------


def _state(model: nn.Module) -> list[tuple[str, bool, frozenset[str]]]:
    return [(name, m.training, frozenset(m.__dict__)) for name, m in model.named_modules()]


@pytest.mark.parametrize("build", [
    TRANSFORMERS_CASES["bert"][0],
    TRANSFORMERS_CASES["whisper"][0],
    TRANSFORMERS_CASES["clip"][0],
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
], ids=["bert", "whisper", "clip", "cnn"])
def test_synthesis_changes_neither_model_nor_rng(build: Callable[[], nn.Module]) -> None:
    model = build()
    model.train()
    model.get_submodule(next(n for n, _ in model.named_children())).eval()  # mixed flags
    before = _state(model)
    weights = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    assert synthesize_inputs(model) is not None
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert _state(model) == before
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_synthesized_inputs_are_deterministic() -> None:
    model = nn.Sequential(nn.Linear(6, 2))
    first, second = _synthesized(model), _synthesized(model)
    assert torch.equal(first.args[0], second.args[0])


def test_synthesis_imports_no_model_library(monkeypatch: pytest.MonkeyPatch) -> None:
    imported: list[str] = []
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    assert synthesize_inputs(nn.Sequential(nn.Linear(3, 2))) is not None
    assert [n for n in imported if n.split(".")[0] in ("transformers", "timm", "torchvision")] == []
