"""AuditReport -> GitHub Actions workflow commands (annotations on the offending lines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regfx.audit.report import AuditReport, Gate

__all__ = ["render_github"]

_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def _data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(report: AuditReport, gate: Gate | None = None) -> str:
    """One ``::error``/``::warning``/``::notice`` line per finding, with ``file`` and ``line``
    pointing to where the offending layer is defined when known, then a summary notice."""
    from regfx.audit.report import relative_path

    lines = []
    for f in report.findings:
        props = []
        if f.location is not None:
            props += [f"file={_prop(relative_path(f.location[0]))}", f"line={f.location[1]}"]
        props.append(f"title={_prop(f'{f.code} {report.model}')}")
        lines.append(f"::{_LEVEL[f.severity]} {','.join(props)}::{_data(f'{f.target}: {f.message}')}")
    s = report.summary
    verdict = "" if gate is None else (" passed" if gate.passed else " FAILED")
    summary = f"coverage {s['coverage']:.1%}, {len(report.findings)} finding(s){verdict}"
    lines.append(f"::notice title={_prop('regfx audit ' + report.model)}::{_data(summary)}")
    if gate is not None and not gate.passed:
        for reason in gate.reasons:
            if reason.startswith(("coverage dropped", "new ")):
                lines.append(f"::error title={_prop('regfx baseline ' + report.model)}::{_data(reason)}")
    return "\n".join(lines) + "\n"
