"""Policy loading, validation and its effect on findings and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

import regfx
from regfx.audit.policy import Policy, PolicyError


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))


def test_default_policy_fails_on_errors_only() -> None:
    report = regfx.audit(mlp())
    assert [f.code for f in report.findings] == ["RFX401"]  # the head: a warning
    assert report.gate().passed
    assert not report.gate(fail_on="warning").passed


def test_from_toml_top_level_and_tool_table(tmp_path: Path) -> None:
    top = tmp_path / "policy.toml"
    top.write_text('fail-on = "warning"\nmin_coverage = 0.5\nignore = ["RFX104"]\n'
                   '[require]\nlinear = "weight_decay|l2"\n'
                   '[per-module-ignores]\n"encoder.*" = ["RFX4"]\n')
    p = Policy.from_toml(top)
    assert p == Policy(fail_on="warning", min_coverage=0.5, ignore=("RFX104",),
                       require={"linear": ("weight_decay|l2",)},
                       per_module_ignores={"encoder.*": ("RFX4",)})
    py = tmp_path / "pyproject.toml"
    py.write_text('[tool.regfx]\ndropout = 0.1\n[tool.regfx.audit]\nmin_coverage = 1\n')
    assert Policy.from_toml(py).min_coverage == 1.0
    (tmp_path / "sub").mkdir()
    assert Policy.from_pyproject(tmp_path / "sub") == Policy(min_coverage=1.0)
    # and the recipe loader ignores the audit table
    assert regfx.Recipe.from_pyproject(tmp_path).dropout == 0.1


@pytest.mark.parametrize(("text", "match"), [
    ('min_coverag = 0.5', r"unknown key 'min_coverag' .*did you mean 'min_coverage'"),
    ('fail_on = "never"', r"fail_on must be one of error, warning, got 'never'"),
    ('min_coverage = 1.5', r"min_coverage must be a fraction in \[0, 1\], got 1.5"),
    ('select = ["RFX999"]', r"unknown rule code 'RFX999'.*regfx rules"),
    ('ignore = ["E501"]', r"unknown rule code 'E501'"),
    ('[require]\nlinaer = ["any"]', r"unknown layer type 'linaer'.*linear"),
    ('[require]\nlinear = ["wieght_decay"]', r"unknown regularizer 'wieght_decay'.*'weight_decay'"),
    ('[per-module-ignores]\n"a.*" = ["RFX60"]', r"unknown rule code 'RFX60'"),
    ('select = 3', r"select must be a string or a list of strings, got 3"),
    ('min_coverage = [', r"is not valid TOML"),
])
def test_invalid_policies(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text + "\n")
    with pytest.raises(PolicyError, match=match):
        Policy.from_toml(path)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_toml(tmp_path / "nope.toml")
    py = tmp_path / "pyproject.toml"
    py.write_text("[tool.black]\nline-length = 3\n")
    with pytest.raises(PolicyError, match=r"no \[tool.regfx.audit\] table"):
        Policy.from_toml(py)


def test_select_ignore_and_per_module_ignores() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 2))
    codes = lambda policy: sorted(f.code for f in regfx.audit(model, policy=policy).findings)  # noqa: E731
    # p=0 does nothing, so neither linear weight is regularized
    assert codes(None) == ["RFX104", "RFX401", "RFX401"]
    assert codes({"select": ["RFX1"]}) == ["RFX104"]
    assert codes({"ignore": ["RFX104"]}) == ["RFX401", "RFX401"]
    assert codes({"per-module-ignores": {"3": ["RFX401"]}}) == ["RFX104", "RFX401"]
    assert regfx.audit(model, policy={"select": ["RFX1"]}).rules == (
        "RFX101", "RFX102", "RFX103", "RFX104", "RFX105")


def test_min_coverage_and_require_fail_the_gate() -> None:
    report = regfx.audit(mlp(), policy={"min_coverage": 0.99})
    assert not report.gate().passed
    assert [f.code for f in report.failing()] == ["RFX502"]
    report = regfx.audit(mlp(), policy={"require": {"linear": ["any"]}})
    assert [f.target for f in report.failing()] == ["3.weight"]


def test_baseline_gate() -> None:
    base = regfx.audit(regfx.transform(mlp(), spectral="linear")).to_dict()
    same = regfx.audit(regfx.transform(mlp(), spectral="linear"))
    assert same.gate(base).passed
    worse = regfx.audit(mlp())
    gate = worse.gate(base)
    assert not gate.passed
    assert any(r.startswith("coverage dropped") for r in gate.reasons)
    assert any(r.startswith("new RFX401 warning") for r in gate.reasons)


def test_assert_regularized() -> None:
    from regfx.testing import assert_regularized

    report = assert_regularized(regfx.transform(mlp(), spectral="linear"), {"min_coverage": 0.9})
    assert report.summary["coverage"] > 0.9
    with pytest.raises(AssertionError, match=r"(?s)fails the regularization policy.*RFX502"):
        assert_regularized(mlp(), {"min_coverage": 0.9})
    with pytest.raises(AssertionError, match="RFX401"):
        assert_regularized(mlp(), fail_on="warning")
