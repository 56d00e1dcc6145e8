"""Every rule: registered, documented, and checked against its file of cases (cases/RFXnnn.toml).

A case is a small model (Python source defining ``build_model()`` and optionally
``build_optimizer(model)``), an optional regfx ``recipe`` applied first, an optional audit
``policy``, and ``expect``: the targets the rule must report, exactly (empty: must pass).
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
import torch.nn.functional as F
from torch import nn

import regfx
from regfx.audit import rules as rules_module
from regfx.audit.rules import RULES, RULES_BY_CODE, SEVERITIES

CASES = Path(__file__).parent / "cases"


def _load_cases() -> list[Any]:
    out = []
    for path in sorted(CASES.glob("RFX*.toml")):
        data = tomllib.loads(path.read_text())
        for case in data["case"]:
            out.append(pytest.param(data["rule"], case, id=f"{data['rule']}-{case['name']}"))
    return out


def build(case: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    namespace: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "regfx": regfx}
    exec(compile(case["code"], f"<case {case['name']}>", "exec"), namespace)
    model = namespace["build_model"]()
    if "recipe" in case:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", regfx.RegfxWarning)
            model = regfx.transform(model, **case["recipe"])
    factory = namespace.get("build_optimizer")
    return model, factory(model) if factory else None


@pytest.mark.parametrize(("code", "case"), _load_cases())
def test_rule_case(code: str, case: dict[str, Any]) -> None:
    model, optimizer = build(case)
    report = regfx.audit(model, optimizer, policy=case.get("policy"))
    found = sorted(f.target for f in report.findings if f.code == code)
    assert found == sorted(case["expect"]), [f for f in report.findings if f.code == code]


def test_every_rule_is_listed() -> None:
    checks = {name for name, obj in vars(rules_module).items()
              if inspect.isfunction(obj) and obj.__module__ == rules_module.__name__
              and not name.startswith("_") and obj.__code__.co_varnames[:2] == ("ctx", "policy")}
    assert checks == {r.check.__name__ for r in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.code)
def test_rule_is_documented_and_has_cases(rule: rules_module.Rule) -> None:
    assert re.fullmatch(r"RFX\d{3}", rule.code)
    assert re.fullmatch(r"[a-z]+(\.[a-z0-9-]+)+", rule.name)
    assert rule.severity in SEVERITIES
    assert rule.summary.endswith(".")
    assert "Anti-pattern:" in rule.doc and "Fix:" in rule.doc, rule.code
    path = CASES / f"{rule.code}.toml"
    assert path.is_file(), f"missing {path.name}"
    cases = tomllib.loads(path.read_text())["case"]
    assert any(c["expect"] for c in cases), "needs a case where the rule fires"
    assert any(not c["expect"] for c in cases), "needs a case where the rule stays quiet"


def test_codes_unique_and_sorted() -> None:
    codes = [r.code for r in RULES]
    assert len(set(codes)) == len(codes) == len(RULES_BY_CODE)
    assert codes == sorted(codes)
    assert len({r.name for r in RULES}) == len(RULES)


def test_findings_carry_the_rule_severity() -> None:
    model, optimizer = build({"name": "x", "code": "def build_model():\n"
                              "    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.95))\n"})
    report = regfx.audit(model, optimizer)
    assert report.findings
    for f in report.findings:
        assert f.severity == RULES_BY_CODE[f.code].severity
