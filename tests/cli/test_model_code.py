"""Model code is the user's: what it prints never reaches the report stream, its exits and other
BaseExceptions are one-line errors (exit 2), and --timeout stops it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .runner import run_main

PRINTS = '''
import torch
from torch import nn
print("importing")

class Chatty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        print("forward ran")
        if x.sum() > 0:  # data-dependent: tracing needs the example forward
            x = x * 2
        return self.b(self.a(x))

def build_model():
    print("building")
    return Chatty()

def example_inputs():
    print("making inputs")
    return (torch.randn(2, 4),)

def build_optimizer(model):
    print("optimizer")
    return torch.optim.SGD(model.parameters(), lr=0.1)
'''


@pytest.mark.parametrize("argv", [
    ["audit", "{m}", "--format", "json"],
    ["show", "{m}", "--format", "json"],
    ["apply", "{m}", "--dropout", "0.1", "--format", "json"],
])
def test_prints_of_model_code_go_to_stderr(tmp_path: Path, argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "chatty.py"
    model.write_text(PRINTS)
    code, out, err = run_main([a.format(m=model) for a in argv], capsys)
    assert code == 0, err
    json.loads(out)
    assert "building" in err and "forward ran" in err and "forward ran" not in out


EXITS = {
    "sys-exit-int-at-import": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    "sys-exit-text-in-factory": ("import sys\ndef build_model():\n    sys.exit('bye')\n",
                                 "SystemExit: 'bye'"),
    "base-exception": ("class Boom(BaseException):\n    pass\n"
                       "def build_model():\n    raise Boom('x')\n", "Boom: x"),
    "exit-in-example-inputs": ("import sys\nfrom torch import nn\n"
                               "def build_model():\n    return nn.Linear(2, 2)\n"
                               "def example_inputs():\n    sys.exit(5)\n", "SystemExit: 5"),
    "exit-in-optimizer": ("import sys\nfrom torch import nn\n"
                          "def build_model():\n    return nn.Linear(2, 2)\n"
                          "def build_optimizer(model):\n    sys.exit(6)\n", "SystemExit: 6"),
    "exit-in-forward": ("import sys, torch\nfrom torch import nn\n"
                        "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                        "        self.a = nn.Linear(4, 4)\n"
                        "    def forward(self, x):\n        if x.sum() > 1e9:\n            return x\n"
                        "        sys.exit(4)\n"
                        "def build_model():\n    return M()\n"
                        "def example_inputs():\n    return (torch.randn(2, 4),)\n", "SystemExit: 4"),
}


@pytest.mark.parametrize(("case", "command"), [
    (case, command) for case in sorted(EXITS) for command in ("audit", "show", "apply")
    if command == "audit" or case != "exit-in-optimizer"])  # only audit builds the optimizer
def test_exits_of_model_code_are_one_line_errors(tmp_path: Path, case: str, command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    body, needle = EXITS[case]
    model = tmp_path / "model.py"
    model.write_text(body)
    out = tmp_path / "out.file"
    argv = [command, str(model), "-o", str(out)]
    if command == "apply":
        argv += ["--dropout", "0.1"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("regfx: error: ") and needle in err, err
    assert "Traceback" not in err and stdout == "" and not out.exists()


def test_keyboard_interrupt_keeps_130(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.py"
    model.write_text("def build_model():\n    raise KeyboardInterrupt\n")
    code, _, err = run_main(["audit", str(model)], capsys)
    assert code == 130 and err.strip() == "regfx: aborted"


def test_timeout_stops_an_endless_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "loop.py"
    model.write_text("while True:\n    pass\n")
    start = time.monotonic()
    code, out, err = run_main(["audit", str(model), "--timeout", "0.5"], capsys)
    assert code == 2 and time.monotonic() - start < 30
    assert err.count("\n") == 1 and "did not finish within 0.5 s (--timeout)" in err


def test_timeout_stops_model_code_that_swallows_it(tmp_path: Path) -> None:
    """A bare ``except`` around an endless loop swallows the first alarm; the second one ends
    the process with the same one-line error."""
    model = tmp_path / "stubborn.py"
    model.write_text("while True:\n    try:\n        while True:\n            pass\n"
                     "    except BaseException:\n        pass\n")
    result = subprocess.run([sys.executable, "-c", "from regfx.cli import main; main()",
                             "show", str(model), "--timeout", "0.3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"regfx: error: loading and running {model} did not finish within 0.3 s (--timeout); "
        "look for an endless loop in the model code or raise --timeout"]


def test_timeout_bounds_the_example_forward(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "slow.py"
    model.write_text(PRINTS.replace('print("forward ran")', "while True:\n            pass"))
    code, _, err = run_main(["audit", str(model), "--timeout", "1"], capsys)
    assert code == 2 and "(--timeout)" in err


def test_timeout_is_off_by_default_and_does_not_fire_late(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "chatty.py"
    model.write_text(PRINTS)
    code, _, err = run_main(["audit", str(model), "--timeout", "60"], capsys)
    assert code == 0, err
    import signal
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_console_script_prints_one_line_for_a_script_module(tmp_path: Path) -> None:
    """torch.jit.script's FutureWarning is not printed next to the error."""
    model = tmp_path / "scripted.py"
    model.write_text("import torch\nfrom torch import nn\ndef build_model():\n"
                     "    return torch.jit.script(nn.Sequential(nn.Linear(4, 4)))\n")
    result = subprocess.run([sys.executable, "-c", "from regfx.cli import main; main()",
                             "show", str(model)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"regfx: error: build_model() in {model} returned a script module; script modules cannot "
        "be transformed; pass the eager module (return the model before torch.jit.script)"]
