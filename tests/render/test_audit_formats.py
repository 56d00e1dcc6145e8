"""Golden files for every audit report format (refresh with ``pytest --refresh-golden``)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from regfx.cli import cli

from ..conftest import ROOT

FORMATS = {"text": "txt", "json": "json", "markdown": "md", "github": "github.txt", "junit": "xml"}
MODELS = {"bad_practice": "fixtures/bad_practice.py", "cnn_regularized": "fixtures/cnn.py:build_regularized"}


def audit_output(spec: str, fmt: str) -> tuple[int, str]:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(cli, ["audit", spec, "--format", fmt])
    finally:
        os.chdir(cwd)
    return result.exit_code, result.stdout


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_golden(model: str, fmt: str, golden) -> None:  # type: ignore[no-untyped-def]
    code, out = audit_output(MODELS[model], fmt)
    assert code == (1 if model == "bad_practice" else 0), out
    golden(f"audit_{model}.{FORMATS[fmt]}", out)


def test_formats_are_well_formed() -> None:
    _, out = audit_output(MODELS["bad_practice"], "json")
    data = json.loads(out)
    assert data["schema_version"] == 1 and data["model"] == "BadPracticeCNN"
    assert set(data["summary"]) >= {"parameters", "regularized", "numel", "numel_regularized",
                                    "coverage"}
    assert data["gate"]["passed"] is False
    first = data["findings"][0]
    assert first["location"] == {"file": "fixtures/bad_practice.py", "line": 14}
    _, out = audit_output(MODELS["bad_practice"], "junit")
    root = ET.fromstring(out)
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(data["rules"])
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["RFX103 dropout.after-output"]
    _, out = audit_output(MODELS["bad_practice"], "github")
    assert "::warning file=fixtures/bad_practice.py,line=14,title=RFX101 BadPracticeCNN::bn1:" in out
    assert "::error file=fixtures/bad_practice.py,line=21,title=RFX103" in out
    _, out = audit_output(MODELS["bad_practice"], "markdown")
    assert "```mermaid" in out and "class " in out and "regularized" in out


def test_text_has_no_colour_when_not_a_terminal() -> None:
    _, out = audit_output(MODELS["bad_practice"], "text")
    assert "\033[" not in out
