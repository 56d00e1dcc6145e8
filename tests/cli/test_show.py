import json
from pathlib import Path

import pytest

from ..conftest import MODEL_FIXTURES, fixture_path
from .runner import run, run_main


@pytest.mark.parametrize("name", sorted(MODEL_FIXTURES))
def test_show_text_every_fixture(name: str) -> None:
    code, out, _ = run("show", str(fixture_path(name)))
    assert code == 0
    assert "Layers by type" in out
    if not MODEL_FIXTURES[name]:  # the example forward fills in what did not trace
        assert "Inputs: " in out and "example_inputs() of" in out
        assert "Observed modules" in out and "Opaque modules" not in out
        assert "no opaque region" in out
    else:  # every forward traces: the symbolic graph is exact (the inputs are only checked)
        assert "Example forward: not run (not needed: every forward traced symbolically)" in out


@pytest.mark.parametrize("fmt", ["json", "mermaid", "dot"])
def test_show_formats(fmt: str) -> None:
    code, out, _ = run("show", str(fixture_path("resnet")), "--format", fmt, "--depth", "1")
    assert code == 0
    if fmt == "json":
        data = json.loads(out)
        assert data["model"] == "ResNet" and data["fully_traced"] is True
        assert data["by_type"]["conv"]["count"] == 8
    elif fmt == "mermaid":
        assert out.startswith("flowchart TD")
        assert '["layer1<br/>Sequential"]' in out
    else:
        assert out.startswith("digraph model {") and '"layer1" -> "layer2";' in out


def test_show_opaque_marked_in_mermaid(tmp_path: Path) -> None:
    model = tmp_path / "gated.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "class Gate(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x, scale):\n        return self.fc(x) if x.sum() > 0 else x * scale\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.gate = Gate()\n"
        "    def forward(self, x, scale):\n        return self.gate(x, scale)\n"
        "def build_model():\n    return Net()\n")
    code, out, _ = run("show", str(model), "--format", "mermaid")
    assert code == 0 and "classDef opaque" in out
    code, out, _ = run("show", str(model))
    assert "Example forward: not run (the forward failed on the example inputs: TypeError" in out
    assert "Opaque modules" in out


def test_show_writes_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "inv.json"
    code, out, _ = run("show", str(fixture_path("mlp")), "--format", "json", "-o", str(target))
    assert code == 0 and out == ""
    assert json.loads(target.read_text())["model"] == "MLP"
    assert [p.name for p in tmp_path.iterdir()] == ["inv.json"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py", "does not exist"),
        ("{tmp}/syntax.py", "syntax error"),
        ("{tmp}/empty.py", "no model found"),
        ("{tmp}/raises.py", "raised ValueError"),
        ("{tmp}/notmodule.py", "not an nn.Module"),
    ],
)
def test_bad_model_arguments_exit_2_one_line(tmp_path: Path, spec: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "syntax.py").write_text("def build_model(:\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "raises.py").write_text("def build_model():\n    raise ValueError('bad')\n")
    (tmp_path / "notmodule.py").write_text("def build_model():\n    return [1]\n")
    code, out, err = run_main(["show", spec.format(tmp=tmp_path)], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("regfx: error:")
    assert "Traceback" not in err


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["--debug", "show", str(tmp_path / "missing.py")], capsys)
    assert code == 2 and "Traceback" in err


def test_unwritable_output_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "no" / "such" / "dir.txt"
    code, _, err = run_main(["show", str(fixture_path("mlp")), "-o", str(target)], capsys)
    assert code == 2 and "does not exist" in err
    assert not target.parent.exists()


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["show", str(fixture_path("mlp")), "--format", "xml"], capsys)
    assert code == 2 and "xml" in err


def test_show_runs_no_forward_for_a_traceable_model_without_example_inputs(tmp_path: Path) -> None:
    model = tmp_path / "mlp.py"
    model.write_text("from torch import nn\n\n"
                     "def build_model():\n"
                     "    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    code, out, _ = run("show", str(model))
    assert code == 0
    assert "Example forward: not run (not needed: every forward traced symbolically)" in out
