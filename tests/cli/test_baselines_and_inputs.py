"""Multi-model baselines round-trip; a baseline never applies to a model it has no report for;
example inputs that do not fit the forward are a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .runner import run_main

TWO = {
    "a.py": "from torch import nn\ndef build_model():\n"
            "    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n",
    "b.py": "from torch import nn\nclass Other(nn.Sequential):\n    pass\n"
            "def build_model():\n    return Other(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n",
}


@pytest.fixture
def models(tmp_path: Path) -> list[str]:
    for name, body in TWO.items():
        (tmp_path / name).write_text(body)
    return [str(tmp_path / name) for name in TWO]


def test_multi_model_baseline_round_trips(models: list[str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    code, _, err = run_main(["audit", *models, "--format", "json", "-o", str(base)], capsys)
    assert code == 0, err
    code, out, err = run_main(["audit", *models, "--baseline", str(base)], capsys)
    assert code == 0, err
    assert out.count("PASSED") == 2


def test_one_report_baseline_is_not_applied_to_every_model(models: list[str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    run_main(["audit", models[0], "--format", "json", "-o", str(base)], capsys)
    code, out, err = run_main(["audit", *models, "--baseline", str(base)], capsys)
    assert code == 2  # the second model has no report in the baseline
    assert err.splitlines() == [f"regfx: error: {models[1]}: baseline {str(base)!r} has no report "
                                f"for {models[1]} (Other); regenerate it with the same MODEL "
                                "arguments"]
    assert out.count("PASSED") == 1


def test_recipe_pointing_at_another_tools_pyproject(models: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.black]\nline-length = 100\n")
    code, _, err = run_main(["apply", models[0], "--recipe", str(pyproject)], capsys)
    assert code == 2
    assert err.splitlines() == [f"regfx: error: {pyproject} has no [tool.regfx] table (only [tool] "
                                "tables of other tools); add [tool.regfx] or pass a file with the "
                                "recipe keys at the top level"]


BAD_INPUTS = '''
import torch
from torch import nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: the example forward is needed
            x = x * 2
        return self.b(self.a(x))

def build_model():
    return Branchy()

def example_inputs():
    return (torch.randn(2, 7),)
'''


TRACEABLE_BAD_INPUTS = BAD_INPUTS.replace(
    "        if x.sum() > 0:  # data-dependent: the example forward is needed\n"
    "            x = x * 2\n", "")


@pytest.mark.parametrize("source", [BAD_INPUTS, TRACEABLE_BAD_INPUTS],
                         ids=["untraceable", "traceable"])
@pytest.mark.parametrize("argv", [["audit"], ["show"], ["apply", "--dropout", "0.1"],
                                  ["apply", "--l2", "1e-3"]])
def test_example_inputs_that_do_not_fit(tmp_path: Path, argv: list[str], source: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Also where every forward traces, and where nothing needs a trace (only a penalty): the
    file's own inputs always run the forward once."""
    assert "x.sum()" not in TRACEABLE_BAD_INPUTS
    model = tmp_path / "branchy.py"
    model.write_text(source)
    code, out, err = run_main([argv[0], str(model), *argv[1:]], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "regfx: error: example_inputs() do not fit Branchy.forward: RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied (2x7 and 4x4); make example_inputs() return what forward "
        "takes"]


def test_baseline_json_from_a_list_keeps_its_sources(models: list[str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    run_main(["audit", *models, "--format", "json", "-o", str(base)], capsys)
    assert [r["source"] for r in json.loads(base.read_text())] == models


CONSTANT_ARGUMENT = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x, scale=1.0):
        return self.head(torch.relu(self.mid(torch.relu(self.fc(x)))) * scale)

def build_model():
    return Net()

def example_inputs():
    return {"x": torch.randn(2, 4), "scale": 2.0}
'''


def test_checking_the_files_inputs_does_not_change_the_placement(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Where every forward traces, the example inputs are only checked: the sites are planned
    for the forward's defaults, as the library plans them, not for the inputs' constants."""
    import torch

    import regfx
    from regfx.load import load_model

    model = tmp_path / "net.py"
    model.write_text(CONSTANT_ARGUMENT)
    ckpt = tmp_path / "net.pt"
    code, _, err = run_main(["apply", str(model), "--dropout", "0.1", "-o", str(ckpt)], capsys)
    assert code == 0, err
    stored = torch.load(ckpt, weights_only=True)["plan"]["dropout"]
    loaded = load_model(str(model))
    library = regfx.plan(loaded.model, dropout=0.1, example_inputs=loaded.inputs())
    assert [d["spec"] for d in stored] == [[list(kv) for kv in d.spec] for d in library.dropout]
    assert all(dict(map(tuple, d["spec"])).get("scale", 1.0) == 1.0 for d in stored)
