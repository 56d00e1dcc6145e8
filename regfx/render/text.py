"""AuditReport -> aligned plain text for terminals (colour only when asked)."""

from __future__ import annotations

from regfx.render.common import GateView, ReportView, regularizer_label, shape_label

__all__ = ["render_text"]

_COLORS = {"error": "31", "warning": "33", "info": "36", "ok": "32", "dim": "2", "bold": "1"}


def _paint(text: str, what: str, color: bool) -> str:
    return f"\033[{_COLORS[what]}m{text}\033[0m" if color else text


def render_text(report: ReportView, color: bool = False, gate: GateView | None = None) -> str:
    """The report as a parameter table and a findings list.

    Args:
        report: the audit report.
        color: ANSI colours (the CLI turns them on only on a terminal without ``NO_COLOR``).
        gate: the pass/fail verdict to print at the end, if any.
    """
    s = report.summary
    head = f"Audit of {report.model}"
    if report.source:
        head += f" ({report.source})"
    lines = [
        _paint(head, "bold", color),
        f"  {s['parameters']} parameters, {s['regularized']} regularized; coverage "
        f"{s['coverage']:.1%} of {s['numel_trainable']:,} trainable elements",
    ]
    if report.optimizer is not None:
        groups = ", ".join(f"weight_decay={g['weight_decay']:g}" for g in report.optimizer.groups)
        lines.append(f"  optimizer {report.optimizer.type}: {groups}")
    if report.opaque:
        lines.append(f"  {len(report.opaque)} module(s) did not trace (see RFX001)")
    lines.append("")
    rows = [("parameter", "type", "shape", "regularizers")]
    for rec in report.params:
        name = rec.name + ("" if rec.trainable else " (frozen)")
        if rec.aliases:
            name += f" = {', '.join(rec.aliases)}"
        regs = ", ".join(regularizer_label(r) for r in rec.regularizers) or "-"
        rows.append((name, rec.module_type, shape_label(rec.shape), regs))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        line = f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
        if i == 0:
            line = _paint(line, "dim", color)
        elif r[3] == "-":
            line = line[:-1] + _paint("-", "warning", color)
        lines.append(line)
    lines.append("")
    if report.findings:
        lines.append(f"Findings ({len(report.findings)})")
        for f in report.findings:
            sev = _paint(f"{f.severity:<7}", f.severity, color)
            lines.append(f"  {f.code} {sev} {f.target}: {f.message}")
    else:
        lines.append("No findings")
    if any(r.get("inferred") for rec in report.params for r in rec.regularizers):
        lines.append("  ~ attributed by definition order inside a module that did not trace")
    if gate is not None:
        lines.append("")
        if gate.passed:
            lines.append(_paint("PASSED", "ok", color))
        else:
            lines.append(_paint(f"FAILED ({len(gate.reasons)} reason(s))", "error", color))
            for reason in gate.reasons:
                lines.append(f"  {reason}")
    return "\n".join(lines) + "\n"
