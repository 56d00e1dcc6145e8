"""The one walk API on ModelGraph (walk/reaches/follow) and the one inserted-path predicate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regfx
from regfx.audit.inspect import find_dropout
from regfx.graph import CHAIN_ROLES, LAYER_ROLES, ROLES
from regfx.select import is_inserted_path


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.up = nn.Upsample(scale_factor=2)
        self.pool = nn.AvgPool3d(2)
        self.conv3 = nn.Conv3d(3, 4, 1)
        self.head = nn.Linear(4 * 36 + 20, 2)

    def forward(self, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        flat = F.dropout(torch.relu(self.conv(x)).flatten(1), 0.1, self.training)
        added = F.dropout(self.a(v) + self.b(v), 0.1, self.training)
        joined = F.dropout(torch.cat([self.a(v), self.b(v)], 1), 0.1, self.training)
        maps = F.dropout(self.up(self.conv(x)), 0.1, self.training).mean((2, 3))
        pooled = F.dropout(self.pool(self.conv3(w)), 0.1, self.training).flatten(1)
        return self.head(torch.cat([flat, added, joined, maps, pooled[:, :0]], 1))


def _graph() -> tuple[nn.Module, regfx.ModelGraph]:
    model = _Branches()
    g = regfx.trace(model, (torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.randn(2, 3, 4, 4, 4)))
    return model, g


def _dropouts(g: regfx.ModelGraph) -> list[str]:
    return [n for n, d in g.op_nodes("dropout")]


def test_walk_backward_collects_layers_and_marks() -> None:
    _, g = _graph()
    first = _dropouts(g)[0]  # dropout(relu(conv(x)).flatten(1))
    found = g.walk(first, CHAIN_ROLES | {"reshape"}, LAYER_ROLES, direction="backward",
                   collect_all=True, mark=lambda n: g.nx.nodes[n].get("op") == "flatten")
    assert found == {g.calls("conv")[0]: True}
    unmarked = g.walk(first, CHAIN_ROLES | {"reshape"}, LAYER_ROLES, direction="backward")
    assert unmarked == {g.calls("conv")[0]: False}
    # without reshape roles the walk stops at the flatten
    assert g.walk(first, CHAIN_ROLES, LAYER_ROLES, direction="backward") == {}


def test_walk_enter_and_accept_refine_roles() -> None:
    _, g = _graph()
    added = _dropouts(g)[1]  # dropout(a(v) + b(v))
    through = {"combine", "residual_add"}
    both = g.walk(added, through, LAYER_ROLES, direction="backward", collect_all=True)
    assert sorted(g.nx.nodes[n]["module"] for n in both) == ["a", "b"]
    assert g.walk(added, through, LAYER_ROLES, direction="backward", enter=lambda n: False) == {}
    only_b = g.walk(added, through, LAYER_ROLES, direction="backward", collect_all=True,
                    accept=lambda n: g.nx.nodes[n].get("module") == "b")
    assert [g.nx.nodes[n]["module"] for n in only_b] == ["b"]
    # target=ROLES: accept alone decides where the walk stops
    stops = g.walk(added, ROLES, ROLES, direction="backward", collect_all=True,
                   accept=lambda n: g.nx.nodes[n].get("module") is not None)
    assert sorted(g.nx.nodes[n]["module"] for n in stops) == ["a", "b"]


def test_reaches_is_the_forward_first_found_walk() -> None:
    _, g = _graph()
    conv = g.calls("conv")[0]
    assert g.reaches(conv, CHAIN_ROLES | {"reshape"}, ("dropout",)) is not None
    assert g.reaches(conv, (), ("dropout",)) is None
    with pytest.raises(ValueError, match="direction"):
        g.walk(conv, (), direction="sideways")


def test_dropout_attribution_through_adds_not_concatenation() -> None:
    model, g = _graph()
    by_node = {u.node: u.layers for u in find_dropout(model, g)}
    flat, added, joined, maps, pooled = _dropouts(g)
    assert by_node[flat] == [("conv", True)]
    assert by_node[added] == [("a", False), ("b", False)]
    assert by_node[joined] == []  # a concatenation is not walked through
    assert by_node[maps] == [("conv", False)]  # nn.Upsample is a reshape like F.interpolate
    assert by_node[pooled] == [("conv3", False)]  # every pooling module is a reshape


def test_pooling_modules_are_reshapes() -> None:
    _, g = _graph()
    assert g.role(g.calls("pool")[0]) == "reshape"
    assert g.role(g.calls("up")[0]) == "reshape"


@pytest.mark.parametrize(("name", "inserted"), [
    ("fc", False), ("encoder.layer.0", False), ("my_regfx_block", False),
    ("fc.regfx_dropout", True), ("regfx_dropout_1", True), ("conv.parametrizations.weight.0", True),
    ("parametrizations", True),
])
def test_is_inserted_path(name: str, inserted: bool) -> None:
    assert is_inserted_path(name) is inserted


def test_is_inserted_path_torch_only() -> None:
    assert not is_inserted_path("fc.regfx_dropout", by_regfx=False)
    assert is_inserted_path("fc.parametrizations.weight", by_regfx=False)
