"""The bad-input catalogue: every case exits 2 with one line on stderr that names the problem
and the fix, prints no traceback (without --debug) and leaves no output file behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regfx.cli import main

MLP = ("from torch import nn\n"
       "def build_model():\n"
       "    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n")

FILES = {
    "mlp.py": MLP,
    "syntax.py": "def build_model(:\n",
    "nomodel.py": "x = 1\n",
    "raising.py": "def build_model():\n    raise RuntimeError('boom')\n",
    "notmodule.py": "def build_model():\n    return 42\n",
    "wrapped.py": "from torch import nn\ndef build_model():\n"
                  "    return nn.DataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))\n",
    "empty.py": "from torch import nn\ndef build_model():\n    return nn.Sequential()\n",
    "noparams.py": "from torch import nn\ndef build_model():\n"
                   "    return nn.Sequential(nn.ReLU(), nn.Dropout(0.1))\n",
    "badkey.toml": "[tool.regfx]\ndropuot = 0.1\n",
    "badtoml.toml": "dropout = [\n",
    "badpolicykey.toml": "min_coverag = 0.5\n",
    "badcode.toml": 'select = ["RFX999"]\n',
    "badignore.toml": 'ignore = ["RFX9"]\n',
    "baseline_corrupt.json": "{broken",
    "baseline_foreign.json": json.dumps({"model": "X", "layers": []}),
    "baseline_dir": None,
}

# (case id, argv, substrings the one stderr line must contain)
CASES = [
    ("missing-model-file", ["apply", "{d}/nope.py", "-o", "{out}"], ["'", "nope.py", "does not exist", "check the path"]),
    ("syntax-error", ["apply", "{d}/syntax.py", "-o", "{out}"], ["syntax error in", "syntax.py:1", "fix the file"]),
    ("no-model-found", ["audit", "{d}/nomodel.py", "-o", "{out}"], ["no model found", "define build_model()"]),
    ("factory-raises", ["apply", "{d}/raising.py", "-o", "{out}"], ["raised RuntimeError: boom", "fix the factory"]),
    ("factory-returns-non-module", ["audit", "{d}/notmodule.py", "-o", "{out}"],
     ["returned int, not an nn.Module", "return the model instance"]),
    ("unknown-layer-word", ["apply", "{d}/mlp.py", "--dropout", "0.1", "--dropout-after", "lineer", "-o", "{out}"],
     ["unknown layer type 'lineer'", "did you mean 'linear'"]),
    ("dropout-p-one", ["apply", "{d}/mlp.py", "--dropout", "1.0", "-o", "{out}"], ["[0, 1)", "got 1.0", "e.g. --dropout 0.1"]),
    ("dropout-p-negative", ["apply", "{d}/mlp.py", "--dropout", "-0.1", "-o", "{out}"], ["[0, 1)", "got -0.1"]),
    ("negative-l1", ["apply", "{d}/mlp.py", "--l1", "-1", "-o", "{out}"], ["l1 must be a finite number >= 0", "got -1.0"]),
    ("negative-l2", ["apply", "{d}/mlp.py", "--l2", "-0.001", "-o", "{out}"], ["l2 must be a finite number >= 0"]),
    ("nan-l2", ["apply", "{d}/mlp.py", "--l2", "nan", "-o", "{out}"], ["l2 must be a finite number >= 0"]),
    ("spectral-missing-type-strict", ["apply", "{d}/mlp.py", "--spectral", "conv", "--strict", "-o", "{out}"],
     ["spectral: layer type 'conv' matches no layer", "drop --strict"]),
    ("weight-norm-missing-type-strict", ["apply", "{d}/mlp.py", "--weight-norm", "conv2d", "--strict", "-o", "{out}"],
     ["weight_norm: layer type 'conv2d' matches no layer"]),
    ("both-norms-one-weight", ["apply", "{d}/mlp.py", "--spectral", "linear", "--weight-norm", "linear", "-o", "{out}"],
     ["layer '0' (Linear)", "both weight_norm and spectral_norm", "narrow one of the layer types"]),
    ("recipe-unknown-key", ["apply", "{d}/mlp.py", "--recipe", "{d}/badkey.toml", "-o", "{out}"],
     ["unknown key 'dropuot'", "did you mean 'dropout'"]),
    ("recipe-invalid-toml", ["apply", "{d}/mlp.py", "--recipe", "{d}/badtoml.toml", "-o", "{out}"],
     ["badtoml.toml is not valid TOML", "fix the syntax"]),
    ("recipe-missing", ["apply", "{d}/mlp.py", "--recipe", "{d}/none.toml", "-o", "{out}"], ["does not exist"]),
    ("policy-unknown-key", ["audit", "{d}/mlp.py", "--policy", "{d}/badpolicykey.toml", "-o", "{out}"],
     ["unknown key 'min_coverag'", "did you mean 'min_coverage'"]),
    ("policy-invalid-toml", ["audit", "{d}/mlp.py", "--policy", "{d}/badtoml.toml", "-o", "{out}"], ["not valid TOML"]),
    ("policy-unknown-select-code", ["audit", "{d}/mlp.py", "--policy", "{d}/badcode.toml", "-o", "{out}"],
     ["unknown rule code 'RFX999'", "regfx rules"]),
    ("policy-unknown-ignore-code", ["audit", "{d}/mlp.py", "--policy", "{d}/badignore.toml", "-o", "{out}"],
     ["unknown rule code 'RFX9'"]),
    ("baseline-corrupt", ["audit", "{d}/mlp.py", "--baseline", "{d}/baseline_corrupt.json", "-o", "{out}"],
     ["is not valid JSON", "regenerate it"]),
    ("baseline-not-a-report", ["audit", "{d}/mlp.py", "--baseline", "{d}/baseline_foreign.json", "-o", "{out}"],
     ["is not a regfx audit report"]),
    ("baseline-missing", ["audit", "{d}/mlp.py", "--baseline", "{d}/nothing.json", "-o", "{out}"], ["does not exist"]),
    ("baseline-is-a-folder", ["audit", "{d}/mlp.py", "--baseline", "{d}/baseline_dir", "-o", "{out}"],
     ["is a directory"]),
    ("unwritable-output-folder", ["apply", "{d}/mlp.py", "--dropout", "0.1", "-o", "{d}/no/such/dir/x.pt"],
     ["folder", "does not exist", "-o path"]),
    ("output-is-a-folder", ["audit", "{d}/mlp.py", "-o", "{d}/baseline_dir"], ["is a directory"]),
    ("wrapped-model", ["apply", "{d}/wrapped.py", "--dropout", "0.1", "-o", "{out}"],
     ["wrapped in DataParallel", "model.module"]),
    ("empty-model-apply", ["apply", "{d}/empty.py", "--dropout", "0.1", "-o", "{out}"],
     ["has no parameters", "nothing to regularize"]),
    ("no-parameters-audit", ["audit", "{d}/noparams.py", "-o", "{out}"], ["has no parameters", "nothing to audit"]),
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("argv", "needles"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input(folder: Path, argv: list[str], needles: list[str],
                   capsys: pytest.CaptureFixture[str]) -> None:
    out_file = folder / "result.out"
    args = [a.format(d=folder, out=out_file) for a in argv]
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    assert info.value.code == 2, captured
    lines = [line for line in captured.err.splitlines() if "FutureWarning" not in line
             and "WeightNorm.apply" not in line]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("regfx: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, no temp file


def test_debug_adds_the_traceback(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--debug", "apply", str(folder / "raising.py")])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("regfx: error: ")


def test_missing_type_is_a_warning_without_strict(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = folder / "ckpt.pt"
    with pytest.raises(SystemExit) as info:
        main(["apply", str(folder / "mlp.py"), "--spectral", "conv", "-o", str(out_file)])
    assert info.value.code == 0
    err = capsys.readouterr().err
    assert "regfx: warning: spectral: layer type 'conv' matches no layer of Sequential" in err
    assert out_file.is_file()


@pytest.mark.parametrize("body", [
    "import torch\nfrom torch import nn\ndef build_model():\n"
    "    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).half()\n",
    "import torch\nfrom torch import nn\ndef build_model():\n    with torch.device('meta'):\n"
    "        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 2))\n",
], ids=["half", "meta"])
def test_half_and_meta_models_work(tmp_path: Path, body: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.py"
    model.write_text(body)
    for argv in (["apply", str(model), "--dropout", "0.1", "--spectral", "linear", "--l2", "1e-4",
                  "--format", "json"],
                 ["audit", str(model), "--format", "json"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        captured = capsys.readouterr()
        assert info.value.code == 0, captured.err
        json.loads(captured.out)
