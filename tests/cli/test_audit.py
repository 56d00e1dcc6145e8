"""``regfx audit`` and ``regfx rules`` driven through the real command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from regfx.render.rules import render_rules

from ..conftest import ROOT, fixture_path
from .runner import run, run_main

MLP = str(fixture_path("mlp"))
GOOD = str(fixture_path("regularized_mlp"))
BAD = str(fixture_path("bad_practice"))


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["audit", GOOD], capsys)[0] == 0
    assert run_main(["audit", MLP], capsys)[0] == 0          # warnings only
    assert run_main(["audit", MLP, "--fail-on", "warning"], capsys)[0] == 1
    assert run_main(["audit", BAD], capsys)[0] == 1          # RFX103 is an error
    code, out, err = run_main(["audit", str(tmp_path / "missing.py")], capsys)
    assert code == 2 and out == "" and err.startswith("regfx: error: ") and err.count("\n") == 1


def test_policy_file_pass_and_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text('min_coverage = 0.95\n[require]\nlinear = ["weight_decay"]\n')
    loose = tmp_path / "loose.toml"
    loose.write_text('min_coverage = 0.9\nignore = ["RFX4"]\n')
    code, out, _ = run_main(["audit", GOOD, "--policy", str(strict)], capsys)
    assert code == 0, out
    code, out, _ = run_main(["audit", MLP, "--policy", str(strict)], capsys)
    assert code == 1 and "RFX501" in out and "RFX502" in out and "FAILED" in out
    code, out, _ = run_main(["audit", MLP, "--policy", str(loose), "--format", "json"], capsys)
    assert code == 1 and json.loads(out)["gate"]["passed"] is False
    bad = tmp_path / "bad.toml"
    bad.write_text('ignroe = ["RFX104"]\n')
    code, out, err = run_main(["audit", MLP, "--policy", str(bad)], capsys)
    assert code == 2 and out == ""
    assert "unknown key 'ignroe'" in err and "did you mean 'ignore'" in err


def test_policy_from_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.regfx.audit]\nfail_on = "warning"\n')
    model = tmp_path / "model.py"
    model.write_text(fixture_path("mlp").read_text())
    assert run_main(["audit", str(model)], capsys)[0] == 1
    assert run_main(["audit", str(model), "--fail-on", "error"], capsys)[0] == 0


def test_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    assert run_main(["audit", GOOD, "--format", "json", "-o", str(base)], capsys)[0] == 0
    assert run_main(["audit", GOOD, "--baseline", str(base)], capsys)[0] == 0
    # a model with less regularization, compared with the same baseline
    code, out, _ = run_main(["audit", MLP, "--baseline", str(base)], capsys)
    assert code == 1
    assert "coverage dropped from 98.0% to 0.0% (baseline)" in out
    assert "new RFX401 warning since the baseline" in out


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "is not valid JSON"),
    ('{"model": "X"}', "is not a regfx audit report"),
    ('{"schema_version": 99, "summary": {}, "findings": []}', "newer than this regfx"),
])
def test_bad_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                      match: str) -> None:
    base = tmp_path / "base.json"
    base.write_text(content)
    out_file = tmp_path / "report.json"
    code, out, err = run_main(["audit", GOOD, "--baseline", str(base), "-o", str(out_file)], capsys)
    assert code == 2 and match in err and err.count("\n") == 1
    assert not out_file.exists()
    code, _, err = run_main(["audit", GOOD, "--baseline", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "does not exist" in err


def test_several_models_worst_exit_code_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["audit", GOOD, MLP, "--format", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [d["model"] for d in data] == ["RegularizedMLP", "MLP"]
    code, out, err = run_main(["audit", GOOD, BAD, str(tmp_path / "gone.py")], capsys)
    assert code == 2
    assert "Audit of RegularizedMLP" in out and "Audit of BadPracticeCNN" in out
    assert "gone.py" in err
    code, out, _ = run_main(["audit", GOOD, BAD, "--format", "junit"], capsys)
    assert code == 1 and out.count("<testsuite ") == 2


def test_output_file_is_written_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.md"
    code, out, _ = run_main(["audit", BAD, "--format", "markdown", "-o", str(target)], capsys)
    assert code == 1 and out == ""
    assert target.read_text().startswith("## regfx audit: BadPracticeCNN")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    code, _, err = run_main(["audit", BAD, "-o", str(tmp_path / "no" / "such" / "r.txt")], capsys)
    assert code == 2 and "does not exist" in err


def test_progress_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run_main(["audit", GOOD, MLP], capsys)
    assert "auditing" not in err


def test_colour_on_a_terminal_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    import regfx
    from regfx.cli import _render_reports
    from regfx.load import load_model

    report = regfx.audit(load_model(MLP).model)
    gate = report.gate()
    assert "\033[" in _render_reports([report], [gate], "text", True, None)
    assert "\033[" not in _render_reports([report], [gate], "text", False, None)
    # the CLI decides: not a terminal here, and NO_COLOR set
    code, out, _ = run("audit", MLP, env={"NO_COLOR": "1"})
    assert code == 0 and "\033[" not in out


def test_rules_command() -> None:
    code, out, _ = run("rules")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("RFX001  tracing.opaque-module")
    assert any(line.startswith("RFX101  dropout.before-batchnorm") for line in lines)
    code, out, _ = run("rules", "--format", "json")
    assert {r["code"] for r in json.loads(out)} >= {"RFX101", "RFX202", "RFX401"}


def test_docs_rules_md_is_current() -> None:
    current = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    assert current == render_rules("markdown"), (
        "docs/rules.md is out of date; run `regfx rules --format markdown -o docs/rules.md`")


def test_audit_uses_the_file_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["audit", BAD, "--format", "json"], capsys)
    data = json.loads(out)
    assert data["optimizer"]["type"] == "Adam"
    assert any(f["code"] == "RFX202" for f in data["findings"])


def test_cwd_independent_locations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        _, out, _ = run_main(["audit", BAD, "--format", "github"], capsys)
    finally:
        os.chdir(cwd)
    assert f"file={BAD}" in out
