import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import regfx
from regfx.cli import cli

from ..conftest import fixture_path, load_fixture
from ..helpers import eval_out
from .runner import run_main

CNN = str(fixture_path("cnn"))


def test_apply_prints_sites_and_checkpoint_round_trips(tmp_path: Path) -> None:
    ckpt = tmp_path / "cnn.pt"
    result = CliRunner().invoke(cli, ["apply", CNN, "--dropout", "0.3", "--spectral", "conv",
                                      "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "features.0.weight  spectral_norm" in result.stdout
    assert "fc                 dropout" in result.stdout
    payload = torch.load(ckpt, weights_only=True)
    assert payload["recipe"]["dropout"] == 0.3 and payload["recipe"]["spectral"] == "conv"
    loaded = load_fixture("cnn")
    rebuilt = regfx.load_checkpoint(loaded.model, ckpt)
    assert hasattr(rebuilt.fc, "regfx_dropout")
    # a freshly transformed model with the same weights gives identical eval outputs
    again = regfx.load_checkpoint(type(loaded.model)(), ckpt)
    torch.testing.assert_close(eval_out(again, loaded.example_inputs),
                               eval_out(rebuilt, loaded.example_inputs), rtol=0, atol=0)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "x.pt"
    result = CliRunner().invoke(cli, ["apply", CNN, "--dropout", "0.1", "--dry-run",
                                      "-o", str(ckpt), "--format", "json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["dry_run"] is True and data["checkpoint"] is None
    assert not ckpt.exists()


def test_pyproject_config_and_flag_override(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.regfx]\ndropout = 0.2\nl2 = 0.001\n")
    model = tmp_path / "m.py"
    model.write_text(fixture_path("mlp").read_text())
    result = CliRunner().invoke(cli, ["apply", str(model), "--l2", "0.5", "--format", "json"])
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"]
    assert recipe["dropout"] == 0.2 and recipe["l2"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dropout", "1.5"], "dropout must be a probability"),
        (["--l1", "-1"], "l1 must be a finite number"),
        (["--dropout-after", "lineer"], "did you mean 'linear'"),
        (["--spectral", "conv", "--weight-norm", "all"], "both weight_norm and spectral_norm"),
        (["--spectral", "rnn", "--strict"], "matches no layer"),
        (["--recipe", "/nonexistent/r.toml"], "does not exist"),
        (["--l2", "1", "-o", "/nonexistent/dir/c.pt"], "does not exist"),
    ],
)
def test_bad_input_exit_2_one_line(args: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["apply", CNN, *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_unmatched_type_is_warning_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["apply", CNN, "--spectral", "rnn", "--dry-run"], capsys)
    assert code == 0 and "warning" in err and "'rnn'" in err


def test_bad_recipe_file_names_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("spectal = 'conv'\n")
    code, _, err = run_main(["apply", CNN, "--recipe", str(recipe)], capsys)
    assert code == 2 and "did you mean 'spectral'" in err


def test_truncated_checkpoint_and_recipe_mismatch(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pt"
    assert CliRunner().invoke(cli, ["apply", CNN, "--weight-norm", "conv", "-o",
                                    str(ckpt)]).exit_code == 0
    loaded = load_fixture("cnn")
    other = regfx.transform(loaded.model, spectral="conv")
    with pytest.raises(regfx.CheckpointError, match="different recipe"):
        regfx.load_checkpoint(other, ckpt)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(regfx.CheckpointError, match="truncated"):
        regfx.load_checkpoint(loaded.model, broken)
    not_ours = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, not_ours)
    with pytest.raises(regfx.CheckpointError, match="not a regfx checkpoint"):
        regfx.load_checkpoint(loaded.model, not_ours)


def test_wrapped_model_is_rejected() -> None:
    wrapped = torch.nn.DataParallel(torch.nn.Linear(2, 2))
    with pytest.raises(regfx.RegfxError, match=r"model.module"):
        regfx.transform(wrapped, dropout=0.1)
