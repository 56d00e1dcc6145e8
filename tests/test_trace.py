import time

import pytest
import torch
from torch import nn

import regfx
from regfx.select import layer_word

from .conftest import MODEL_FIXTURES, load_fixture

LAYER_WORDS = {"linear", "conv", "embedding", "norm", "attention", "rnn"}


def test_every_layer_appears_in_the_graph(fixture_name: str) -> None:
    loaded = load_fixture(fixture_name)
    graph = regfx.trace(loaded.model)
    in_graph = {d["module"] for _, d in graph.module_nodes()}
    for name, mod in loaded.model.named_modules():
        if layer_word(mod) in LAYER_WORDS:
            assert name in in_graph, f"{fixture_name}: {name} missing from the graph"


def test_traceable_models_are_one_traced_region(fixture_name: str) -> None:
    loaded = load_fixture(fixture_name)
    graph = regfx.trace(loaded.model, loaded.inputs())
    symbolic = regfx.trace(loaded.model, observe_forward=False)
    assert graph.opaque == {} and graph.fully_traced
    assert "output" in graph.nx
    assert any(d["op"] == "input" for _, d in graph.op_nodes())
    assert graph.inputs is not None and graph.observe_error is None
    if MODEL_FIXTURES[fixture_name]:
        assert graph.observed == {}
        assert symbolic.opaque == {} and symbolic.fully_traced
    else:
        # what does not trace symbolically is observed in the example forward ...
        assert graph.observed
        # ... and is opaque when the model does not run
        assert set(symbolic.opaque) == set(graph.observed)
        assert symbolic.observe_error == "not run (observe_forward=False)"
        for name, reason in symbolic.opaque.items():
            assert reason and "\n" not in reason, (name, reason)
            assert len(reason) < 200


def test_trace_does_not_modify_the_model(fixture_name: str) -> None:
    loaded = load_fixture(fixture_name)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    modes = [m.training for m in loaded.model.modules()]
    regfx.trace(loaded.model, loaded.example_inputs)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for m in loaded.model.modules()]


def test_example_inputs_reveal_output_layers(fixture_name: str) -> None:
    loaded = load_fixture(fixture_name)
    graph = regfx.trace(loaded.model, loaded.example_inputs)
    expected = {
        "mlp": {"head"}, "cnn": {"classifier"}, "resnet": {"fc"}, "transformer_block": {"head"},
        "control_flow": {"out"}, "tied": {"lm_head"}, "functional": set(), "head_only": {"head"},
        "hf_bert": {"classifier"}, "hf_gpt2": {"lm_head"}, "hf_llama": {"lm_head"},
    }[fixture_name]
    assert graph.output_layers == expected


def test_node_attributes() -> None:
    graph = regfx.trace(load_fixture("resnet").model)
    for _, data in graph.module_nodes():
        assert set(data) >= {"module", "module_type", "call_index", "opaque"}
    for _, data in graph.op_nodes():
        assert data["module"] is None and data["op"]
    # the ReLU module of each block is called twice: two call nodes with indices 0 and 1
    calls = graph.calls("layer1.0.relu")
    assert [graph.nx.nodes[c]["call_index"] for c in calls] == [0, 1]
    assert graph.nx.nodes[calls[0]]["module_type"] == "ReLU"


def test_untraceable_children_become_opaque_parent_stays_traced() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.lin(x)
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.gate = Gate()
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.gate(torch.relu(self.a(x))))

    graph = regfx.trace(Net(), observe_forward=False)
    assert list(graph.opaque) == ["gate"]
    gate = graph.calls("gate")[0]
    # the opaque call keeps exact dataflow at its boundary
    assert graph.producers(gate) == ["#0:relu"]
    assert graph.consumers(gate) == ["b#0"]
    lin = graph.calls("gate.lin")[0]
    assert graph.nx.nodes[lin]["opaque"] is True
    assert graph.nx.nodes[graph.calls("a")[0]]["opaque"] is False


def test_root_untraceable_children_traced_on_their_own() -> None:
    graph = regfx.trace(load_fixture("control_flow").model, observe_forward=False)
    assert "" in graph.opaque and "control flow" in graph.opaque[""]
    assert "stem" not in graph.opaque
    stem0, stem1 = graph.calls("stem.0")[0], graph.calls("stem.1")[0]
    assert graph.consumers(stem0) == [stem1]
    assert graph.region_of(stem0) == "stem"


def test_meta_device_model() -> None:
    with torch.device("meta"):
        model = load_fixture("cnn").model.__class__()
    graph = regfx.trace(model)
    assert graph.fully_traced
    assert all(p.is_meta for p in model.parameters())


def test_llama_7b_on_meta_device() -> None:
    from .fixtures_hf import llama_7b_meta

    model = llama_7b_meta()
    n = sum(p.numel() for p in model.parameters())
    assert n > 6.5e9
    start = time.perf_counter()
    graph = regfx.trace(model)
    elapsed = time.perf_counter() - start
    assert all(p.is_meta for p in model.parameters())
    linears = [d for _, d in graph.module_nodes() if d["module_type"] == "Linear"]
    assert len(linears) == 32 * 7 + 1
    assert elapsed < 30


def test_trace_rejects_non_modules() -> None:
    with pytest.raises(regfx.RegfxError, match="needs an nn.Module"):
        regfx.trace(lambda x: x)  # type: ignore[arg-type]


def test_model_without_parameters_and_empty_model() -> None:
    assert regfx.trace(nn.Sequential()).fully_traced
    g = regfx.trace(nn.ReLU())
    assert [d["module"] for _, d in g.module_nodes()] == [""]


def test_blocks_branching_on_a_child_attribute_are_traced_apart() -> None:
    """Identical blocks share one trace; a block whose forward reads a differing child
    attribute gets its own (and its own regenerated forward)."""

    class Block(nn.Module):
        def __init__(self, stride: int) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1, stride=stride)
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if self.conv.stride[0] > 1:  # concrete at trace time
                return self.fc(y.mean(-1))
            return self.fc(y.amax(-1))

    model = nn.Sequential(Block(1), Block(2), Block(1))
    x = torch.randn(3, 2, 4)
    out = regfx.transform(model, dropout=0.2, dropout_after="conv", dropout_kind="element")
    for i, block in enumerate(model):
        expected = block.eval()(x)
        got = out[i].eval()(x)
        assert torch.equal(got, expected), i
    assert type(out[0]) is type(out[2]) and type(out[0]) is not type(out[1])
