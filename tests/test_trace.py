import time

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
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
    graph = regfx.trace(loaded.model, loaded.inputs(), observe_forward=True)
    symbolic = regfx.trace(loaded.model, observe_forward=False)
    auto = regfx.trace(loaded.model, loaded.inputs())
    assert auto.opaque == {} and graph.opaque == {} and graph.fully_traced
    assert "output" in graph.nx
    assert any(d["op"] == "input" for _, d in graph.op_nodes())
    assert graph.inputs is not None and graph.observe_error is None
    if MODEL_FIXTURES[fixture_name]:
        assert graph.observed == {}
        assert symbolic.opaque == {} and symbolic.fully_traced
        assert auto.inputs is None  # nothing needed to run
    else:
        assert auto.inputs == graph.inputs and set(auto.observed) == set(graph.observed)
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


# -- tracing changes nothing ----------------------------------------------------------------


def test_trace_leaves_every_module_dict_as_it_was(fixture_name: str) -> None:
    from .snapshot import module_state, rng_state

    loaded = load_fixture(fixture_name)
    before, rng = module_state(loaded.model), rng_state()
    regfx.trace(loaded.model, loaded.inputs())
    regfx.trace(loaded.model)  # synthesized inputs
    regfx.trace(loaded.model, observe_forward=False)
    assert module_state(loaded.model) == before
    assert torch.equal(rng_state(), rng)


class _CachingBias(nn.Module):
    """Caches a tensor in a dict attribute in eval mode (as relative-position biases do)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if "bias" not in self.cache:
                self.cache["bias"] = self.bias * 1
            return x + self.cache["bias"]
        return x + self.bias


def test_a_forward_caching_a_tensor_keeps_no_proxy_and_traces_again() -> None:
    from .snapshot import module_state

    model = nn.Sequential(nn.Linear(4, 4), _CachingBias(), nn.ReLU(), nn.Linear(4, 2)).eval()
    before = module_state(model)
    for observe in (False, True):
        regfx.trace(model, observe_forward=observe)
        assert model[1].cache == {}
    assert module_state(model) == before
    out = regfx.transform(model, dropout=0.2)
    assert model[1].cache == {}
    again = regfx.transform(out, dropout=0.2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(again.eval()(x), model(x))


# -- call-site specialization ---------------------------------------------------------------


class _MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            x = x.masked_fill(attn_mask, 0.0)
        return x + self.act(self.fc(x))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.relu(self.pre(x.mean(1)))
        return x if pre_logits else self.fc(x)


class _TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_MaskedBlock() for _ in range(3))
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def test_optional_arguments_are_specialized_per_call_site() -> None:
    model = _TimmLike()
    torch.fx.symbolic_trace(model)  # torch.fx traces it at the root ...
    for observe in (False, True):
        graph = regfx.trace(model, observe_forward=observe)
        assert graph.opaque == {} and graph.observed == {}  # ... and so does regfx, per module
        assert len(graph.calls("blocks.1.fc")) == 1
        fc = graph.calls("blocks.1.fc")[0]
        assert graph.nx.nodes[fc]["owner_spec"] == (("attn_mask", None),)
    head = [n for n, d in graph.nx.nodes(data=True) if d.get("owner") == "head"]
    assert all(graph.nx.nodes[n]["owner_spec"] == (("pre_logits", False),) for n in head)


def test_specialized_forwards_are_edited_and_fall_back_for_other_arguments() -> None:
    torch.manual_seed(0)
    model = _TimmLike().eval()
    out = regfx.transform(model, dropout=0.5)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(out.eval()(x), model(x))
    # every inserted dropout runs in a training forward
    runs: list[str] = []
    for name, mod in out.named_modules():
        if name.endswith("regfx_dropout"):
            mod.register_forward_hook(lambda m, i, o, name=name: runs.append(name))
    out.train()(x)
    assert sorted(runs) == ["blocks.0.fc.regfx_dropout", "blocks.1.fc.regfx_dropout",
                            "blocks.2.fc.regfx_dropout", "head.pre.regfx_dropout"]
    # a call with other constants than the traced ones runs the original forward, with a warning
    runs.clear()
    with pytest.warns(regfx.RegfxWarning, match="called with arguments or flags other than"):
        feats = out.head(x, pre_logits=True)
    assert runs == [] and feats.shape == (2, 8)
    mask = torch.zeros(2, 5, 8, dtype=torch.bool)
    with pytest.warns(regfx.RegfxWarning):
        out.blocks[0].eval()(x, attn_mask=mask)
    # the generated forwards keep their signatures: tracing the transformed model again sees
    # through them, finds every inserted dropout, and the audit agrees with the plan
    graph = regfx.trace(out)
    assert graph.opaque == {} and graph.observed == {}
    dropped = {d["module"] for _, d in graph.module_nodes() if d["module"].endswith("regfx_dropout")}
    assert dropped == {"blocks.0.fc.regfx_dropout", "blocks.1.fc.regfx_dropout",
                       "blocks.2.fc.regfx_dropout", "head.pre.regfx_dropout"}
    report = regfx.audit(out)
    assert [r["kind"] for r in report.param("blocks.1.fc.weight").regularizers] == ["dropout"]


# -- call sites are real calls --------------------------------------------------------------


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _CallsForwardDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Inner()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block.forward(x))


def test_a_parent_calling_forward_directly_gives_one_call_site() -> None:
    model = _CallsForwardDirectly()
    for observe in (False, True):
        graph = regfx.trace(model, observe_forward=observe)
        assert graph.calls("block.fc") == ["block.fc#0"]
        assert graph.calls("block") == []
        assert graph.producers("block.fc#0") == ["input:x"]
    out = regfx.transform(model, dropout=0.3)
    runs: list[int] = []
    out.block.fc.regfx_dropout.register_forward_hook(lambda *a: runs.append(1))
    out.train()(torch.randn(2, 4))
    assert runs == [1]


class _FunctionalQKV(nn.Module):
    """An attention-like block using its projection's weight functionally, with an extra bias."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros(16)])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.proj(attn @ v)


def test_functional_use_of_a_weight_is_in_the_graph_and_not_a_call() -> None:
    model = nn.Sequential(_FunctionalQKV(), nn.Linear(8, 2))
    x = torch.randn(2, 5, 8)
    graph = regfx.trace(model, (x,))
    uses = graph.functional_uses("0.qkv")
    assert [graph.nx.nodes[n]["op"] for n in uses] == ["linear"]
    assert graph.role(uses[0]) == "linear"
    assert [graph.nx.nodes[c]["called"] for c in graph.calls("0.qkv")] == [False]
    assert any(d.get("role") == "attention" for _, d in graph.nx.nodes(data=True))
    symbolic = regfx.trace(model, observe_forward=False)
    assert [symbolic.nx.nodes[n]["op"] for n in symbolic.functional_uses("0.qkv")] == ["linear"]
    plan = regfx.plan(model, dropout=0.1, example_inputs=(x,))
    assert ("0.qkv", "dropout", "not called as a module: 0 uses its weight functionally (linear)") \
        in plan.skipped
    assert [s.layer for s in plan.dropout] == ["0.proj"]


# -- roles ----------------------------------------------------------------------------------


def test_roles_are_computed_at_trace_time() -> None:
    graph = regfx.trace(load_fixture("resnet").model)
    roles = {graph.role(c) for c in graph.calls("layer1.0.conv1")}
    assert roles == {"conv"}
    assert graph.role(graph.calls("layer1.0.bn1")[0]) == "norm"
    assert graph.role(graph.calls("layer1.0.relu")[0]) == "activation"
    assert graph.role("output") == "output"
    assert len(graph.residual_adds()) == 3  # one per BasicBlock
    assert graph.solo_chain(graph.calls("layer1.0.conv1")[0]) == ["layer1.0.bn1#0", "layer1.0.relu#0"]
    assert graph.reaches_output(graph.calls("fc")[0])
    assert not graph.reaches_output(graph.calls("layer1.0.conv1")[0])


def test_observed_attention_internals_are_in_the_graph() -> None:
    loaded = load_fixture("hf_bert")
    graph = regfx.trace(loaded.model)
    attn = "bert.encoder.layer.0.attention.self"
    for proj in ("query", "key", "value"):
        (call,) = graph.calls(f"{attn}.{proj}")
        assert graph.producers(call), proj
        assert graph.nx.nodes[call]["owner"] == attn
    assert any(d.get("role") == "attention" and d.get("owner") == attn
               for _, d in graph.nx.nodes(data=True))


def test_meta_device_model_is_observed_where_its_forward_runs() -> None:
    with torch.device("meta"):
        model = load_fixture("resnet").model.__class__()
    graph = regfx.trace(model, observe_forward=True)
    assert graph.inputs is not None and "first layer" in graph.inputs
    assert graph.fully_traced
    assert all(p.is_meta for p in model.parameters())


def test_a_loop_over_a_sequential_with_an_unused_module_makes_no_phantom_call() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn_drop = nn.Dropout(0.0)  # never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.fc(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for blk in self.blocks:
                x = blk(x)
            return self.head(x)

    graph = regfx.trace(Net())
    assert graph.calls("blocks.0.fc") == ["blocks.0.fc#0"]
    assert [graph.nx.nodes[c]["called"] for c in graph.calls("blocks.0.attn_drop")] == [False]
    out = regfx.transform(Net(), dropout=0.2)
    assert not any(n.endswith("regfx_dropout_1") for n, _ in out.named_modules())


def test_stages_of_different_lengths_do_not_share_a_trace() -> None:
    class Stage(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(n)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for blk in self.blocks:
                x = blk(x)
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Stage(1), Stage(3))
    plan = regfx.plan(model, dropout=0.5)
    assert [s for s, _, why in plan.skipped if why == "output layer"] == ["2.blocks.2.0#0"]
    graph = regfx.trace(model)
    assert graph.producers(graph.calls("2.blocks.2.0")[0]) == ["2.blocks.1.1#0"]


class _Counting(nn.Module):
    """A forward that writes into its buffers in place (a step counter, an observer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        self.running_max.copy_(torch.maximum(self.running_max, y.detach().amax(0)))
        return y


def test_the_example_forward_leaves_buffer_contents_as_they_were() -> None:
    from regfx.trace import run_example

    model = _Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    regfx.trace(model, observe_forward=False)  # torch.fx runs `self.calls += 1` for real
    graph = regfx.trace(model, torch.randn(3, 4) + 5, observe_forward=True)
    assert graph.observe_error is None  # it ran
    assert run_example(model, torch.randn(3, 4) + 5) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
