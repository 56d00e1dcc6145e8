import regfx

from .conftest import load_fixture


def test_solo_chain_conv_bn_relu() -> None:
    model = load_fixture("cnn").model
    g = regfx.trace(model)
    chain = g.solo_chain(g.calls("features.0")[0], model)
    assert chain == ["features.1#0", "features.2#0"]
    # functional relu counts as an activation
    assert g.solo_chain(g.calls("fc")[0], model) == ["#0:relu"]


def test_solo_chain_stops_at_a_branch() -> None:
    model = load_fixture("resnet").model
    g = regfx.trace(model)
    # stem relu output feeds both conv1 and the residual add of layer1.0: the chain from the
    # stem conv stops at that relu, and the relu itself has two consumers
    assert g.solo_chain(g.calls("conv1")[0], model) == ["bn1#0", "relu#0"]
    assert len(g.consumers("relu#0")) == 2
    # conv2 -> bn2 -> add: the add is not part of the chain
    assert g.solo_chain(g.calls("layer1.0.conv2")[0], model) == ["layer1.0.bn2#0"]


def test_reaches_output() -> None:
    model = load_fixture("mlp").model
    g = regfx.trace(model)
    assert g.reaches_output("head#0", model)
    assert not g.reaches_output("fc2#0", model)
    model = load_fixture("tied").model
    g = regfx.trace(model)
    assert g.reaches_output("lm_head#0", model)
    assert not g.reaches_output("proj#0", model)


def test_residual_adds() -> None:
    g = regfx.trace(load_fixture("resnet").model)
    adds = g.residual_adds()
    assert adds == ["layer1.0#0:add", "layer1.1#0:add", "layer2.0#0:add"]
    assert regfx.trace(load_fixture("mlp").model).residual_adds() == []


def test_dropout_follows() -> None:
    model = load_fixture("functional").model
    g = regfx.trace(model)
    assert g.dropout_follows("hidden#0", model)
    assert g.nx.nodes["#0:dropout"]["p"] == 0.1


def test_consumers_ignore_shape_reads() -> None:
    model = load_fixture("hf_bert").model
    g = regfx.trace(model)
    # embeddings forward reads input sizes; those reads are not value consumers
    for nid, _data in g.op_nodes("size"):
        assert nid not in sum((g.consumers(p) for p in g.producers(nid)), [])


def test_layers_query() -> None:
    model = load_fixture("transformer_block").model
    g = regfx.trace(model)
    assert g.layers(model, "attention") == ["blocks.0.attn", "blocks.1.attn"]
    assert "head" in g.layers(model, "linear")
    assert "head" not in g.layers(model, "linear", exclude=["head"])
