import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from regfx.errors import SelectionError
from regfx.select import WORDS, is_leaf_layer, layer_word, parse_types, select_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.convt = nn.ConvTranspose1d(4, 4, 3)
        self.c3 = nn.Conv3d(1, 1, 1)
        self.emb = nn.Embedding(10, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.lstm = nn.LSTM(4, 4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)
        self.lazy = nn.LazyLinear(3)


def names(model: nn.Module, spec: str, **kw) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, _ in select_layers(model, spec, **kw)]


def test_words_match_their_layer_families() -> None:
    m = Net()
    assert names(m, "conv") == ["stem", "convt", "c3"]
    assert names(m, "conv1d") == ["convt"]
    assert names(m, "conv2d") == ["stem"]
    assert names(m, "conv3d") == ["c3"]
    assert names(m, "embedding") == ["emb"]
    assert names(m, "attention") == ["attn"]
    assert names(m, "norm") == ["bn", "ln", "gn"]
    assert names(m, "rnn") == ["lstm"]
    # MultiheadAttention.out_proj is a Linear subclass, LazyLinear too.
    assert names(m, "linear") == ["attn.out_proj", "head", "lazy"]


def test_all_selects_every_layer_with_parameters() -> None:
    m = Net()
    assert set(names(m, "all")) >= {"stem", "bn", "emb", "attn", "lstm", "head", "ln"}


def test_comma_list_and_case_and_spaces() -> None:
    assert parse_types(" Linear , conv ").words == ("linear", "conv")


def test_unknown_word_lists_valid_words_and_closest() -> None:
    with pytest.raises(SelectionError) as info:
        parse_types("linaer")
    msg = str(info.value)
    assert "'linaer'" in msg and "did you mean 'linear'" in msg
    for word in WORDS:
        assert word in msg
    assert "\n" not in msg


def test_dotted_class_path() -> None:
    m = Net()
    assert names(m, "torch.nn.LayerNorm") == ["ln"]
    with pytest.raises(SelectionError, match="cannot import"):
        parse_types("nosuchpkg.Layer")
    with pytest.raises(SelectionError, match="not a class"):
        parse_types("torch.nn.functional.relu")


def test_parametrized_layers_still_match() -> None:
    m = Net()
    parametrizations.weight_norm(m.head)
    assert type(m.head).__name__ == "ParametrizedLinear"
    assert "head" in names(m, "linear")
    # torch's inserted modules are never selected
    assert not any("parametrizations" in n for n in names(m, "all"))


def test_transformers_conv1d_is_linear_like() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(8, 4)
    assert layer_word(layer) == "linear"
    assert is_leaf_layer(layer)


def test_norm_like_third_party_classes() -> None:
    class MyRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class FakeNorm(nn.Module):  # name says Norm, but holds a matrix: not a norm
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

    assert layer_word(MyRMSNorm()) == "norm"
    assert layer_word(FakeNorm()) is None


def test_globs_include_exclude() -> None:
    m = Net()
    assert names(m, "all", include=["s*", "head"]) == ["stem", "head"]
    assert "attn.out_proj" not in names(m, "linear", exclude=["attn"])
