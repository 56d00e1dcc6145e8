"""AuditReport(s) -> JUnit XML: one test suite per model, one test case per rule."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regfx.audit.report import AuditReport, Gate

__all__ = ["render_junit"]


def render_junit(reports: Sequence[AuditReport], gates: Sequence[Gate | None] = (),
                 fail_on: str | None = None) -> str:
    """A ``<testsuites>`` document. A rule's test case fails when it has findings at or above
    ``fail_on`` (default: each report's policy); lower findings go to ``system-out``. A
    ``baseline`` test case is added when a gate reports a baseline regression."""
    from regfx.audit.rules import RULES_BY_CODE, SEVERITIES

    root = ET.Element("testsuites", name="regfx audit")
    total = failures = 0
    for i, report in enumerate(reports):
        level = SEVERITIES.index(fail_on or report.policy.fail_on)
        suite_name = report.model + (f" ({report.source})" if report.source else "")
        suite = ET.SubElement(root, "testsuite", name=suite_name)
        n = f_count = 0
        for code in report.rules:
            rule = RULES_BY_CODE[code]
            case = ET.SubElement(suite, "testcase", classname=f"regfx.{report.model}",
                                 name=f"{code} {rule.name}")
            n += 1
            mine = [f for f in report.findings if f.code == code]
            bad = [f for f in mine if SEVERITIES.index(f.severity) >= level]
            if bad:
                f_count += 1
                failure = ET.SubElement(case, "failure", message=f"{len(bad)} finding(s): {rule.summary}",
                                        type=bad[0].severity)
                failure.text = "\n".join(f"{f.target}: {f.message}" for f in bad)
            rest = [f for f in mine if f not in bad]
            if rest:
                out = ET.SubElement(case, "system-out")
                out.text = "\n".join(f"{f.severity} {f.target}: {f.message}" for f in rest)
        gate = gates[i] if i < len(gates) else None
        if gate is not None:
            base = [r for r in gate.reasons if r.startswith(("coverage dropped", "new "))]
            if base:
                case = ET.SubElement(suite, "testcase", classname=f"regfx.{report.model}",
                                     name="baseline")
                n += 1
                f_count += 1
                failure = ET.SubElement(case, "failure", message="regressed against the baseline",
                                        type="baseline")
                failure.text = "\n".join(base)
        suite.set("tests", str(n))
        suite.set("failures", str(f_count))
        suite.set("errors", "0")
        total += n
        failures += f_count
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
