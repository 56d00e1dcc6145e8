"""Example inputs for one forward of a model: normalized from what a user gives, or synthesized.

A model's inputs are needed to run it once (to observe its output layers, to check a transform
keeps its outputs). Users give them as a tensor, a tuple of positional arguments or a dict of
keyword arguments; :func:`as_example_inputs` turns any of these into one :class:`ExampleInputs`.

When none are given, :func:`synthesize_inputs` makes them from what the model says about itself.
The rules, in order (the first family that a model belongs to decides, ``None`` included):

1. Hugging Face transformers models: ``model.config``, ``model.main_input_name`` and the forward's
   signature give ``input_ids`` (+ ``attention_mask``), ``pixel_values``, ``input_features``
   (Whisper, Speech2Text) or ``input_values`` (wav2vec2-like), both ``input_ids`` and
   ``pixel_values`` for text-image models (CLIP), and ``decoder_input_ids`` for encoder-decoders.
   Batch 2, sequence length 8 (fewer where the model has fewer positions).
2. timm models: the ``input_size`` of ``pretrained_cfg`` (or ``default_cfg``).
3. torchvision models: the documented input size of the model's family (one 16-frame clip for
   video models); detection and optical flow models take lists of images (and targets), so they
   get ``None``.
4. Anything else: a guess from the first layer with parameters (``Conv*d``, ``Linear``,
   ``Embedding``). It is only a guess; use it when running the model on it succeeds.

Synthesis never runs the model, never changes it (no attribute writes, no mode changes), never
draws from the global random number generator, and never raises: whatever fails gives ``None``.
Tensors are made on the model's device (``meta`` included) with the dtype of its first
floating-point parameter.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regfx.errors import RegfxError
from regfx.select import is_leaf_layer

__all__ = ["ExampleInputs", "as_example_inputs", "synthesize_inputs"]

_BATCH = 2
_SEQ_LEN = 8
_MAX_TOKEN_ID = 100
_FIRST_LAYER_SIZE = 32
_IMAGE_SIZE = 224
_SEED = 0
_DESCRIBED_ITEMS = 4

# Models whose learned positions start after the padding index (RoBERTa's
# ``create_position_ids_from_input_ids``), so ``pad_token_id + 1`` positions are unusable.
_PADDING_OFFSET_MODEL_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm",
                               "camembert", "data2vec-text", "longformer", "ibert")

# torchvision families that take lists of images (and targets), not one batch tensor.
_TORCHVISION_NO_TENSOR_INPUT = ("detection", "optical_flow")


@dataclass(frozen=True, eq=False)
class ExampleInputs:
    """Inputs for one forward of a model, and where they came from.

    Equality is identity: comparing tensors element-wise has no single truth value.

    Attributes:
        args: positional arguments of the forward.
        kwargs: keyword arguments of the forward.
        source: where the inputs came from, in words (``"given"``,
            ``"transformers config (BertConfig)"``, ``"first layer Conv2d(in_channels=3)"``, ...).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    source: str

    def describe(self) -> str:
        """One line naming every input with its dtype and shape, then the source.

        Example::

            >>> ExampleInputs((torch.zeros(2, 3),), {}, "given").describe()
            'arg0: float32[2, 3] (given)'
        """
        parts = [f"arg{i}: {_describe_value(v)}" for i, v in enumerate(self.args)]
        parts += [f"{name}: {_describe_value(v)}" for name, v in self.kwargs.items()]
        return f"{', '.join(parts) or 'no inputs'} ({self.source})"

    def call(self, model: Callable[..., Any]) -> Any:
        """Run ``model(*args, **kwargs)`` and return its output."""
        return model(*self.args, **self.kwargs)


def as_example_inputs(value: Any, source: str = "given") -> ExampleInputs:
    """Normalize the example inputs a user passes into one :class:`ExampleInputs`.

    Args:
        value: a tensor (one positional argument), a tuple or list (positional arguments), a
            mapping such as a dict (keyword arguments), an :class:`ExampleInputs` (returned as
            is) or any other object (one positional argument).
        source: where ``value`` came from, kept in :attr:`ExampleInputs.source`.

    Returns:
        The inputs, with their source.

    Raises:
        RegfxError: ``value`` is None, or a mapping with a key that is not a string.

    Example::

        >>> as_example_inputs({"input_ids": torch.zeros(2, 8, dtype=torch.long)}).describe()
        'input_ids: int64[2, 8] (given)'
    """
    if isinstance(value, ExampleInputs):
        return value
    if value is None:
        raise RegfxError(
            "example inputs are None; pass a tensor, a tuple of positional arguments or a dict of "
            "keyword arguments"
        )
    if isinstance(value, torch.Tensor):
        return ExampleInputs((value,), {}, source)
    if isinstance(value, (tuple, list)):
        return ExampleInputs(tuple(value), {}, source)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise RegfxError(
                    f"example inputs dict has the key {key!r}, which is not a string; keyword "
                    "arguments need string names (pass a tuple for positional arguments)"
                )
        return ExampleInputs((), dict(value), source)
    return ExampleInputs((value,), {}, source)


def synthesize_inputs(model: nn.Module) -> ExampleInputs | None:
    """Inputs for one forward of ``model`` made from what the model says about itself, or None.

    See the module docstring for the rules. The model is never run nor changed, the global
    random number generator is not used, and nothing is raised: a model no rule covers, or any
    failure, gives None.

    Args:
        model: the model; any device, ``meta`` included.

    Returns:
        The inputs, with a :attr:`~ExampleInputs.source` naming the rule that made them, or None.

    Example::

        >>> synthesize_inputs(nn.Sequential(nn.Linear(4, 2))).describe()
        'arg0: float32[2, 4] (first layer Linear(in_features=4))'
    """
    try:
        return _synthesize(model)
    except Exception:  # noqa: BLE001 - synthesis is best effort by contract
        return None


# --- tensors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Factory:
    """Makes input tensors on a model's device, with its floating-point dtype."""

    device: torch.device
    float_dtype: torch.dtype

    @classmethod
    def for_model(cls, model: nn.Module) -> _Factory:
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(device, float_dtype)

    def floats(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard-normal values from a local generator, so the global RNG is not consumed."""
        if self.device.type == "meta":
            return torch.empty(tuple(shape), dtype=self.float_dtype, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(_SEED)
        values = torch.randn(tuple(shape), generator=generator, device="cpu")
        return values.to(device=self.device, dtype=self.float_dtype)

    def token_ids(self, shape: Sequence[int], vocab_size: int) -> torch.Tensor:
        """int64 ids cycling through ``[0, min(vocab_size, 100))``."""
        if self.device.type == "meta":
            return torch.empty(tuple(shape), dtype=torch.long, device=self.device)
        count = 1
        for size in shape:
            count *= size
        ids = torch.arange(count, dtype=torch.long, device="cpu") % min(vocab_size, _MAX_TOKEN_ID)
        return ids.reshape(tuple(shape)).to(self.device)

    def ones(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.ones(tuple(shape), dtype=torch.long, device=self.device)


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(size) for size in value.shape)}]"
    if isinstance(value, (tuple, list)):
        items = [_describe_value(v) for v in value[:_DESCRIBED_ITEMS]]
        if len(value) > _DESCRIBED_ITEMS:
            items.append(f"... {len(value)} in all")
        inner = ", ".join(items)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_describe_value(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return type(value).__name__


# --- the rules -------------------------------------------------------------------------------------


def _synthesize(model: nn.Module) -> ExampleInputs | None:
    make = _Factory.for_model(model)
    transformers_base = _transformers_base_class()
    if transformers_base is not None and isinstance(model, transformers_base):
        return _from_transformers(model, make)
    timm_inputs = _from_timm(model, make)
    if timm_inputs is not None:
        return timm_inputs
    if type(model).__module__.startswith("torchvision.models."):
        return _from_torchvision(model, make)
    return _from_first_layer(model, make)


def _transformers_base_class() -> type | None:
    """``transformers.PreTrainedModel`` when transformers' models are loaded; never imports it.

    A model of transformers is an instance of a class from ``transformers.modeling_utils``, so
    when that module is not loaded no model can be one.
    """
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling_utils, "PreTrainedModel", None)
    return base if isinstance(base, type) else None


def _sub_config(config: Any, *names: str) -> Any:
    """The first of ``config``'s sub-configs named ``names`` (``text_config``, ...), else ``config``."""
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def _positive_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text_length(config: Any, *position_names: str) -> int:
    """Sequence length 8, capped by the number of learned positions."""
    limit = _positive_int(config, *position_names)
    if limit is not None and getattr(config, "model_type", None) in _PADDING_OFFSET_MODEL_TYPES:
        limit -= (_positive_int(config, "pad_token_id") or 0) + 1
    return _SEQ_LEN if limit is None else max(1, min(_SEQ_LEN, limit))


def _text_ids(config: Any, make: _Factory, leading: tuple[int, ...], *position_names: str) -> torch.Tensor:
    vocab = _positive_int(config, "vocab_size")
    if vocab is None:
        raise ValueError(f"{type(config).__name__} has no vocab_size")
    return make.token_ids((*leading, _text_length(config, *position_names)), vocab)


def _pixel_values(config: Any, make: _Factory) -> torch.Tensor:
    size = getattr(config, "image_size", None) or _IMAGE_SIZE
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    channels = _positive_int(config, "num_channels") or 3
    return make.floats((_BATCH, channels, height, width))


def _conv_stack_length(config: Any) -> int | None:
    """Samples a wav2vec2-like conv feature extractor turns into enough frames.

    Enough is 8 frames and at least ``mask_time_length``, so time masking in training mode has
    room for one span.
    """
    kernels = getattr(config, "conv_kernel", None)
    strides = getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        return None
    length = max(_SEQ_LEN, _positive_int(config, "mask_time_length") or 0)
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        length = (length - 1) * stride + kernel
    return length


def _speech_features(config: Any, make: _Factory) -> torch.Tensor | None:
    """``input_features``: Whisper's (batch, mel bins, frames), Speech2Text's (batch, frames, features)."""
    mel_bins = _positive_int(config, "num_mel_bins")
    positions = _positive_int(config, "max_source_positions")
    if mel_bins is not None and positions is not None:
        # Whisper's encoder checks the frame count: two per source position (conv2 has stride 2).
        return make.floats((_BATCH, mel_bins, 2 * positions))
    features = _positive_int(config, "input_feat_per_channel")
    if features is not None:
        # Each subsampling conv halves the frames.
        frames = _SEQ_LEN * 2 ** (_positive_int(config, "num_conv_layers") or 0)
        return make.floats((_BATCH, frames, features * (_positive_int(config, "input_channels") or 1)))
    return None


def _from_transformers(model: nn.Module, make: _Factory) -> ExampleInputs | None:
    config = model.config
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    # Multiple-choice heads take (batch, choices, length) and flatten the first two.
    leading = (_BATCH, 2) if type(model).__name__.endswith("ForMultipleChoice") else (_BATCH,)
    positions = ("max_position_embeddings", "n_positions")
    kwargs: dict[str, Any] = {}
    if main in ("input_ids", "pixel_values") and "input_ids" in params and "pixel_values" in params:
        kwargs["input_ids"] = _text_ids(_sub_config(config, "text_config"), make, leading, *positions)
        kwargs["pixel_values"] = _pixel_values(_sub_config(config, "vision_config"), make)
    elif main == "input_ids":
        text_config = _sub_config(config, "text_config", "encoder")
        kwargs["input_ids"] = _text_ids(text_config, make, leading, *positions)
    elif main == "pixel_values":
        kwargs["pixel_values"] = _pixel_values(_sub_config(config, "vision_config", "encoder"), make)
    elif main == "input_features":
        features = _speech_features(config, make)
        if features is None:
            return None
        kwargs["input_features"] = features
    elif main == "input_values":
        samples = _conv_stack_length(config)
        if samples is None:
            return None
        kwargs["input_values"] = make.floats((_BATCH, samples))
    else:
        return None
    if "input_ids" in kwargs and "attention_mask" in params:
        kwargs["attention_mask"] = make.ones(kwargs["input_ids"].shape)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        decoder_config = _sub_config(config, "decoder", "text_config")
        kwargs["decoder_input_ids"] = _text_ids(decoder_config, make, (_BATCH,), "max_target_positions",
                                                *positions)
    return ExampleInputs((), kwargs, f"transformers config ({type(config).__name__})")


def _from_timm(model: nn.Module, make: _Factory) -> ExampleInputs | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else getattr(cfg, "input_size", None)
        if (isinstance(size, (tuple, list)) and len(size) == 3
                and all(isinstance(s, int) and s > 0 for s in size)):
            shape = tuple(size)
            source = f"timm {attr} input_size {shape}"
            # A model built with another img_size keeps the pretrained config's size; its patch
            # embedding knows the size its forward accepts.
            fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
            strict = getattr(getattr(model, "patch_embed", None), "strict_img_size", True)
            if (strict and isinstance(fixed, (tuple, list)) and len(fixed) == 2
                    and all(isinstance(s, int) and s > 0 for s in fixed) and tuple(fixed) != shape[1:]):
                shape = (shape[0], *fixed)
                source = f"timm patch_embed.img_size {tuple(fixed)}"
            return ExampleInputs((make.floats((_BATCH, *shape)),), {}, source)
    return None


def _from_torchvision(model: nn.Module, make: _Factory) -> ExampleInputs | None:
    family = type(model).__module__.removeprefix("torchvision.models.")
    if family.startswith(_TORCHVISION_NO_TENSOR_INPUT):
        return None
    class_names = {cls.__name__ for cls in type(model).__mro__}
    batch = _BATCH
    if family.startswith("video."):
        # 16-frame clips; the ResNet-based video models were trained on 112 x 112 crops. One clip,
        # as a clip costs about ten images; batch norm still sees many values per channel.
        side = 112 if "VideoResNet" in class_names else _IMAGE_SIZE
        shape: tuple[int, ...] = (3, 16, side, side)
        batch = 1
    elif "Inception3" in class_names:
        shape = (3, 299, 299)
    else:
        # Classification (VisionTransformer checks its own image_size) and segmentation, which
        # accepts any size.
        image_size = getattr(model, "image_size", None)
        side = image_size if isinstance(image_size, int) and image_size > 0 else _IMAGE_SIZE
        shape = (3, side, side)
    return ExampleInputs((make.floats((batch, *shape)),), {}, f"torchvision documented input ({family})")


def _from_first_layer(model: nn.Module, make: _Factory) -> ExampleInputs | None:
    """A guess from the first layer with parameters, in ``model.modules()`` order."""
    layer = next((m for m in model.modules()
                  if is_leaf_layer(m) and any(True for _ in m.parameters())), None)
    if layer is None or isinstance(layer, nn.modules.lazy.LazyModuleMixin):
        return None
    name = type(layer).__name__
    if isinstance(layer, nn.modules.conv._ConvNd):
        # At least 32 per spatial dimension, more where the (dilated) kernel is wider.
        spatial = tuple(max(_FIRST_LAYER_SIZE, d * (k - 1) + 1)
                        for k, d in zip(layer.kernel_size, layer.dilation))
        tensor = make.floats((_BATCH, layer.in_channels, *spatial))
        source = f"first layer {name}(in_channels={layer.in_channels})"
    elif isinstance(layer, nn.Linear):
        tensor = make.floats((_BATCH, layer.in_features))
        source = f"first layer {name}(in_features={layer.in_features})"
    elif isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        tensor = make.token_ids((_BATCH, _SEQ_LEN), layer.num_embeddings)
        source = f"first layer {name}(num_embeddings={layer.num_embeddings})"
    else:
        return None
    return ExampleInputs((tensor,), {}, source)
