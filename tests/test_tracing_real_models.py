"""Tracing real models the way a new user would: ``regfx.trace(model)`` and nothing else.

* torchvision and timm classification models that ``torch.fx.symbolic_trace`` traces at the root
  (checked per model here) have no opaque module, run symbolically only or on synthesized inputs.
* Hugging Face transformers models (tiny configs, random weights, nothing downloaded) run on
  synthesized inputs, have almost no opaque module, and every attention module is in the graph:
  its q/k/v/out projections are called nodes with dataflow, and the attention op (the
  ``scaled_dot_product_attention`` op, or the softmax over a q·kᵀ matmul) is a node with role
  ``attention`` inside it, fed by the q/k/v projections and feeding the out projection.
* Tracing leaves every model as it was: every module's ``__dict__`` (recursively), the training
  flags, the tensors' version counters and the global random number generator state.

Each model is built and traced once (cached per test session) and the tests read the results.

torchvision and timm are not test dependencies, so their tests are skipped where either is
missing, except under ``CI``, where a missing one is a failure; transformers is a test dependency.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import pytest
import torch
import torch.fx
from torch import nn

import regfx
from regfx.graph import ModelGraph

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def _vision_libs() -> tuple[Any, Any]:
    """torchvision and timm; inside a test, a skip where either is missing (not under CI)."""
    if os.environ.get("CI"):
        import timm
        import torchvision
    else:
        torchvision = pytest.importorskip("torchvision")
        timm = pytest.importorskip("timm")
    return torchvision, timm


def _tv() -> Any:
    return _vision_libs()[0].models


# -- a deep snapshot of a model's state, compared by identity -------------------------------------

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_MAX_DEPTH = 12


@dataclass
class _Snap:
    """One value of a snapshot: what it is, the object itself (kept alive, so compared by
    identity) and, for containers and plain objects, the snapshots of what is inside."""

    kind: str  # "leaf", "tensor", "dict", "seq", "set", "object", "seen", "deep"
    obj: Any
    version: int | None = None
    items: list[tuple[Any, _Snap]] = field(default_factory=list)


def _key(key: Any) -> Any:
    return key if isinstance(key, _PLAIN) else ("id", id(key))


def _snap(value: Any, seen: dict[int, Any], depth: int = 0) -> _Snap:
    if isinstance(value, torch.Tensor):
        return _Snap("tensor", value, version=value._version)
    if isinstance(value, (nn.Module, type, types.ModuleType, types.FunctionType,
                          types.BuiltinFunctionType, types.MethodType)) or isinstance(value, _PLAIN):
        return _Snap("leaf", value)  # modules are snapshotted on their own, by the caller
    if id(value) in seen:
        return _Snap("seen", value)
    if depth > _MAX_DEPTH:
        return _Snap("deep", value)
    seen[id(value)] = value
    if isinstance(value, dict):
        return _Snap("dict", value, items=[(_key(k), _snap(v, seen, depth + 1))
                                           for k, v in list(value.items())])
    if isinstance(value, (list, tuple)):
        return _Snap("seq", value, items=[(i, _snap(v, seen, depth + 1))
                                          for i, v in enumerate(list(value))])
    if isinstance(value, (set, frozenset)):
        return _Snap("set", value, items=sorted(((_key(v), _Snap("leaf", v)) for v in value),
                                                key=lambda kv: repr(kv[0])))
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and not callable(value):
        # a plain object held by a module (a transformers config, a rotary embedding's config)
        return _Snap("object", value, items=[(k, _snap(v, seen, depth + 1))
                                             for k, v in list(attrs.items())])
    return _Snap("leaf", value)


def _diff(before: _Snap, after: _Snap, path: str) -> Iterator[str]:
    if before.obj is not after.obj:
        yield f"{path}: was {type(before.obj).__name__} {_short(before.obj)}, " \
              f"now {type(after.obj).__name__} {_short(after.obj)}"
        return
    if before.kind != after.kind:
        yield f"{path}: snapshotted as {before.kind}, now {after.kind}"
        return
    if before.version != after.version:
        yield f"{path}: tensor written in place (version {before.version} -> {after.version})"
    if before.kind in ("dict", "object", "seq", "set"):
        keys_before = [k for k, _ in before.items]
        keys_after = [k for k, _ in after.items]
        if keys_before != keys_after:
            added = [k for k in keys_after if k not in keys_before]
            removed = [k for k in keys_before if k not in keys_after]
            yield f"{path}: {before.kind} keys changed (added {added}, removed {removed}" \
                  f"{', reordered' if not added and not removed else ''})"
        if before.kind == "seq" and len(before.items) != len(after.items):
            return
        after_items = dict(after.items)
        for k, b in before.items:
            if k in after_items:
                yield from _diff(b, after_items[k],
                                 f"{path}[{k!r}]" if before.kind != "object" else f"{path}.{k}")


def _short(obj: Any) -> str:
    text = repr(obj) if isinstance(obj, _PLAIN) else f"at {id(obj):#x}"
    return text if len(text) < 60 else text[:57] + "..."


@dataclass
class ModelState:
    """Every module's ``__dict__`` (deep), the training flags and the global CPU RNG state."""

    modules: list[tuple[str, nn.Module, _Snap]]
    training: list[tuple[str, bool]]
    rng: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> ModelState:
        seen: dict[int, Any] = {}
        modules = [(name, mod, _snap(mod.__dict__, seen))
                   for name, mod in model.named_modules(remove_duplicate=False)]
        return cls(modules, [(n, m.training) for n, m in model.named_modules()],
                   torch.random.get_rng_state())

    def differences(self, after: ModelState) -> list[str]:
        """What changed from ``self`` to ``after``, one line each; empty when nothing did."""
        out: list[str] = []
        names_before = [(n, id(m)) for n, m, _ in self.modules]
        names_after = [(n, id(m)) for n, m, _ in after.modules]
        if names_before != names_after:
            return [f"the module tree changed: {sorted(set(names_before) ^ set(names_after))[:5]}"]
        for (name, _, b), (_, _, a) in zip(self.modules, after.modules):
            out.extend(_diff(b, a, f"{name or '(root)'}.__dict__"))
        if self.training != after.training:
            out.append("training flags changed: " + ", ".join(
                f"{n or '(root)'} {t0}->{t1}" for (n, t0), (_, t1) in zip(self.training, after.training)
                if t0 != t1))
        if not torch.equal(self.rng, after.rng):
            out.append("the global CPU random number generator state changed")
        return out


def mixed_training_flags(model: nn.Module) -> nn.Module:
    """Training mode, with every other module with children put in eval mode: restoring the
    flags is then more than setting one flag everywhere."""
    model.train()
    parents = [m for m in model.modules() if any(True for _ in m.children())]
    for mod in parents[1::2]:
        mod.training = False
    return model


# -- the models ---------------------------------------------------------------------------------


def _tv_small_convnext() -> nn.Module:
    convnext = _tv().convnext
    return convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                             num_classes=5)


def _tv_small_swin() -> nn.Module:
    return _tv().SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[1, 2], window_size=[7, 7], num_classes=5)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: _vision_libs()[1].create_model(name, pretrained=False, num_classes=5, **kwargs)


VISION: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": lambda: _tv().resnet18(num_classes=5),
    "tv_mobilenet_v3_small": lambda: _tv().mobilenet_v3_small(num_classes=5),
    "tv_regnet_y_400mf": lambda: _tv().regnet_y_400mf(num_classes=5),
    "tv_shufflenet_v2_x0_5": lambda: _tv().shufflenet_v2_x0_5(num_classes=5),
    "tv_squeezenet1_0": lambda: _tv().squeezenet1_0(num_classes=5),
    "tv_efficientnet_b0": lambda: _tv().efficientnet_b0(num_classes=5),
    "tv_convnext_small_widths": _tv_small_convnext,
    "tv_swin_small_widths": _tv_small_swin,
    "tv_vit": lambda: _tv().VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5),
    "timm_resnet10t": _timm("resnet10t"),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm_regnetx_002": _timm("regnetx_002"),
    "timm_vit_tiny_depth2": _timm("vit_tiny_patch16_224", depth=2),
    "timm_deit_tiny_depth2": _timm("deit_tiny_patch16_224", depth=2),
    "timm_poolformer_s12": _timm("poolformer_s12"),
}


def _hf() -> Any:
    import transformers

    return transformers


# Small widths, 2 layers, vocabularies under 100. Attention dropout is set (0.1) wherever the
# config has it, so the attention-dropout check has something to find everywhere.
def _bert(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.BertForSequenceClassification(hf.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3, **kw))


def _gpt2(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=32, **kw))


def _t5(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **kw))


def _llama(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_dropout=0.1, **kw))


def _mistral(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.MistralForCausalLM(hf.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        sliding_window=16, attention_dropout=0.1, **kw))


def _bart(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.BartForConditionalGeneration(hf.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=32, attention_dropout=0.1, **kw))


def _roberta(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.RobertaForSequenceClassification(hf.RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=34, num_labels=3, **kw))


def _clip(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.CLIPModel(hf.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         attention_dropout=0.1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8,
                           attention_dropout=0.1),
        projection_dim=16, **kw))


def _vit(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.ViTForImageClassification(hf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3, attention_probs_dropout_prob=0.1, **kw))


def _whisper(**kw: Any) -> nn.Module:
    hf = _hf()
    return hf.WhisperForConditionalGeneration(hf.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=16,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        attention_dropout=0.1, **kw))


TRANSFORMERS: dict[str, Callable[[], nn.Module]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "t5": _t5,
    "llama": _llama,
    "mistral": _mistral,
    "bart": _bart,
    "roberta": _roberta,
    "clip": _clip,
    "vit": _vit,
    "whisper": _whisper,
    # the same models with transformers' eager attention: a softmax over a q·kᵀ matmul
    "bert_eager": functools.partial(_bert, attn_implementation="eager"),
    "gpt2_eager": functools.partial(_gpt2, attn_implementation="eager"),
    "t5_eager": functools.partial(_t5, attn_implementation="eager"),
    "llama_eager": functools.partial(_llama, attn_implementation="eager"),
    "whisper_eager": functools.partial(_whisper, attn_implementation="eager"),
    "clip_eager": functools.partial(_clip, attn_implementation="eager"),
}

_QKVO = ("q_proj", "k_proj", "v_proj")
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "BertAttention": ("self.query", "self.key", "self.value", "output.dense"),
    "RobertaAttention": ("self.query", "self.key", "self.value", "output.dense"),
    "GPT2Attention": ("c_attn", "c_proj"),  # q, k and v from one fused Conv1D
    "T5LayerSelfAttention": tuple(f"SelfAttention.{p}" for p in "qkvo"),
    "T5LayerCrossAttention": tuple(f"EncDecAttention.{p}" for p in "qkvo"),
    "LlamaAttention": (*_QKVO, "o_proj"),
    "MistralAttention": (*_QKVO, "o_proj"),
    "BartAttention": (*_QKVO, "out_proj"),
    "WhisperAttention": (*_QKVO, "out_proj"),
    "CLIPAttention": (*_QKVO, "out_proj"),
    "ViTAttention": (*_QKVO, "o_proj"),
}
"""The projections of each attention module (relative names), by the module's class: q, k, v
and the output projection, or (GPT-2) the fused qkv projection and the output projection."""
# Config attributes holding the dropout on attention weights.
ATTENTION_DROPOUT_ATTRS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout",
                           "dropout_rate")


# -- building and tracing once ------------------------------------------------------------------


@dataclass
class Traced:
    model: nn.Module
    graph: ModelGraph  # regfx.trace(model, observe_forward=True): synthesized inputs, always run
    changes: list[str]  # what regfx.trace(model) changed in the model (empty: nothing)
    symbolic: ModelGraph | None = None  # regfx.trace(model, observe_forward=False)
    auto: ModelGraph | None = None  # regfx.trace(model): runs only where something does not trace
    fx_root: str | None = None  # why torch.fx.symbolic_trace(model) failed; None: it traced


def _build(builder: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder()


def _trace_checked(model: nn.Module) -> tuple[ModelGraph, list[str]]:
    """``regfx.trace`` on synthesized inputs (the forward always run, and the default), and
    what they changed in the model."""
    mixed_training_flags(model)
    before = ModelState.of(model)
    graph = regfx.trace(model, observe_forward=True)
    regfx.trace(model)
    return graph, before.differences(ModelState.of(model))


@functools.cache
def traced_vision(name: str) -> Traced:
    model = _build(VISION[name])
    graph, changes = _trace_checked(model)
    result = Traced(model, graph, changes, symbolic=regfx.trace(model, observe_forward=False),
                    auto=regfx.trace(model))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any failure means "does not trace at the root"
        result.fx_root = f"{type(exc).__name__}: {exc}"
    return result


@functools.cache
def traced_transformers(name: str) -> Traced:
    model = _build(TRANSFORMERS[name])
    graph, changes = _trace_checked(model)
    return Traced(model, graph, changes)


# -- graph queries a user would write -----------------------------------------------------------


def layers_without_node(model: nn.Module, graph: ModelGraph) -> list[str]:
    """Modules without children that have no node in the graph (each should have one: a call,
    or a node with ``called=False`` where it did not run)."""
    return [n for n, m in model.named_modules()
            if not any(True for _ in m.children()) and not graph.calls(n)]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose class name says Attention (BertAttention, not its
    BertSelfAttention; T5LayerSelfAttention, not its T5Attention)."""
    found = [(n, m) for n, m in model.named_modules() if "Attention" in type(m).__name__]
    names = [n for n, _ in found]
    return [(n, m) for n, m in found
            if not any(n.startswith(other + ".") for other in names if other != n)]


def _inside(name: str | None, scope: str) -> bool:
    return name is not None and (name == scope or name.startswith(scope + "."))


def nodes_inside(graph: ModelGraph, scope: str) -> list[tuple[str, dict[str, Any]]]:
    """Nodes of ``scope``'s own subtree: calls of its submodules and ops its forwards run."""
    return [(nid, d) for nid, d in graph.nx.nodes(data=True)
            if (_inside(d.get("module"), scope) and d.get("module") != scope)
            or (d.get("module") is None and _inside(d.get("owner"), scope))]


def attention_ops(graph: ModelGraph, scope: str) -> list[str]:
    return [nid for nid, d in nodes_inside(graph, scope)
            if d.get("module") is None and d.get("role") == "attention"]


def attention_kind(graph: ModelGraph) -> str:
    ops = sorted({d.get("op") for _, d in graph.nx.nodes(data=True)
                  if d.get("module") is None and d.get("role") == "attention"})
    words = {"scaled_dot_product_attention": "sdpa op", "softmax": "eager softmax·matmul"}
    return ", ".join(words.get(str(op), str(op)) for op in ops) or "none found"


def _attention_dropout(model: nn.Module) -> float:
    config = model.config
    values = []
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        for attr in ATTENTION_DROPOUT_ATTRS:
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, float):
                values.append(value)
    return max(values, default=0.0)


# -- torchvision and timm -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VISION))
def test_vision_model_has_no_opaque_module(name: str) -> None:
    result = traced_vision(name)
    assert result.fx_root is None, f"torch.fx does not trace {name} at the root ({result.fx_root}); " \
                                   "it does not belong in this list"
    assert result.symbolic is not None
    assert result.symbolic.opaque == {}, result.symbolic.opaque
    assert result.symbolic.inputs is None and result.symbolic.observe_error is not None
    graph = result.graph
    assert graph.observe_error is None, graph.observe_error
    assert graph.inputs is not None
    assert graph.opaque == {}, graph.opaque
    # the root traced symbolically, so nothing had to come from the observed forward
    assert "" in graph.traced and graph.observed == {}, graph.observed
    assert layers_without_node(result.model, graph) == []
    # by default nothing runs: every forward traced, so the symbolic graph is exact
    assert result.auto is not None and result.auto.opaque == {}
    assert result.auto.observe_error == "not needed: every forward traced symbolically"


@pytest.mark.parametrize("name", list(VISION))
def test_tracing_leaves_vision_model_unchanged(name: str) -> None:
    changes = traced_vision(name).changes
    assert changes == [], "\n".join(changes)


def test_timm_model_built_for_other_image_size_runs_on_synthesized_inputs() -> None:
    """A timm ViT built with ``img_size=64`` (the way to keep a ViT small) should run on the
    synthesized inputs: the model says its size in ``patch_embed.img_size``. Its
    ``pretrained_cfg`` keeps the 224 of the pretrained weights (timm's own
    ``resolve_model_data_config`` says 224 too)."""
    model = _build(_timm("vit_tiny_patch16_224", depth=2, img_size=64))
    graph = regfx.trace(model, observe_forward=True)
    assert graph.opaque == {}
    assert graph.observe_error is None, graph.observe_error
    assert graph.inputs is not None and "64, 64" in graph.inputs


# -- transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_model_runs_and_is_almost_fully_traced(name: str) -> None:
    result = traced_transformers(name)
    graph, model = result.graph, result.model
    assert graph.inputs is not None, graph.observe_error
    assert graph.observe_error is None
    n_modules = len(dict(model.named_modules()))
    assert len(graph.opaque) / n_modules <= 0.05, graph.opaque
    assert layers_without_node(model, graph) == []


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_attention_is_in_the_graph(name: str) -> None:
    result = traced_transformers(name)
    graph, model = result.graph, result.model
    found = attention_modules(model)
    assert found, f"{type(model).__name__} has no attention module"
    for scope, module in found:
        cls = type(module).__name__
        assert cls in PROJECTIONS, f"{scope}: {cls} has no expected projections here"
        expected = {f"{scope}.{p}" for p in PROJECTIONS[cls]}
        linear_like = {n for n, m in module.named_modules(prefix=scope)
                       if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
        assert linear_like == expected, f"{scope}: projections {sorted(linear_like)}"
        # the attention op: an sdpa op, or a softmax over a q·kᵀ matmul, inside the module
        ops = attention_ops(graph, scope)
        assert len(ops) == 1, f"{scope}: attention ops {ops}"
        (op,) = ops
        assert graph.producers(op), f"{scope}: the attention op {op} has no producers"
        calls = {}
        for proj in PROJECTIONS[cls]:
            calls[proj] = graph.calls(f"{scope}.{proj}")
            assert calls[proj], f"{scope}.{proj} is not in the graph"
            for call in calls[proj]:
                assert graph.nx.nodes[call]["called"] is not False, f"{call} did not run"
                assert graph.producers(call), f"{call} has no producers"
                assert graph.consumers(call), f"{call} has no consumers"
        # dataflow: q and k (or the fused qkv) feed the attention op, which feeds the output
        # projection; v feeds the sdpa op, or joins after the softmax in eager attention
        *inputs, out = PROJECTIONS[cls]
        sdpa = graph.nx.nodes[op]["op"] == "scaled_dot_product_attention"
        into_op = inputs if sdpa or len(inputs) == 1 else inputs[:2]
        for proj in inputs:
            first = calls[proj][0]
            if proj in into_op:
                assert nx.has_path(graph.nx, first, op), f"{first} does not reach {op}"
            assert nx.has_path(graph.nx, first, calls[out][0]), \
                f"{first} does not reach {calls[out][0]}"
        assert nx.has_path(graph.nx, op, calls[out][0]), f"{op} does not reach {calls[out][0]}"


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_attention_dropout_is_in_the_graph(name: str) -> None:
    """Where a config sets attention dropout: a dropout node inside each attention module, or
    the attention op itself carrying ``p`` (sdpa's ``dropout_p``)."""
    result = traced_transformers(name)
    graph, model = result.graph, result.model
    if _attention_dropout(model) <= 0:
        pytest.skip("no attention dropout configured")
    for scope, _ in attention_modules(model):
        dropout = [nid for nid, d in nodes_inside(graph, scope) if d.get("role") == "dropout"]
        carries_p = [op for op in attention_ops(graph, scope) if "p" in graph.nx.nodes[op]]
        assert dropout or carries_p, f"{scope}: no dropout node and no p on the attention op"


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_tracing_leaves_transformers_model_unchanged(name: str) -> None:
    changes = traced_transformers(name).changes
    assert changes == [], "\n".join(changes)


# -- the snapshot helper itself -----------------------------------------------------------------


def test_model_state_sees_changes() -> None:
    linear, relu = nn.Linear(2, 2), nn.ReLU()
    model = nn.Sequential(linear, relu)
    cache: dict[str, list[int]] = {"a": [1, 2]}
    setattr(linear, "cache", cache)  # noqa: B010 - an attribute nn.Module does not declare
    before = ModelState.of(model)
    assert before.differences(ModelState.of(model)) == []
    cache["a"].append(3)
    relu.training = False
    setattr(linear, "handle_hooks", linear._forward_hooks)  # noqa: B010 - a new key
    with torch.no_grad():
        linear.weight.add_(1.0)
    torch.rand(1)
    text = "\n".join(before.differences(ModelState.of(model)))
    assert "0.__dict__['cache']['a']: seq keys changed (added [2]" in text
    assert "0.__dict__: dict keys changed (added ['handle_hooks']" in text
    assert "1.__dict__['training']: was bool True, now bool False" in text
    assert "training flags changed: 1 True->False" in text
    assert "0.__dict__['_parameters']['weight']: tensor written in place" in text
    assert "random number generator" in text
    # the same value put back in place of another (a restored copy) is a change too
    after = ModelState.of(model)
    setattr(linear, "cache", dict(cache))  # noqa: B010
    assert "0.__dict__['cache']: was dict" in "\n".join(after.differences(ModelState.of(model)))
