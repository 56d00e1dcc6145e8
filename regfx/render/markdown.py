"""AuditReport -> Markdown for CI job summaries: summary, findings, a marked layer diagram."""

from __future__ import annotations

from regfx.render.common import GateView, ReportView, regularizer_label, shape_label

__all__ = ["render_markdown", "MAX_DIAGRAM_NODES"]

MAX_DIAGRAM_NODES = 60
_ICON = {"error": "❌", "warning": "⚠️", "info": "ℹ️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def diagram(report: ReportView) -> str | None:
    """A Mermaid flowchart of the layer graph, regularized layers marked, or None.

    Deep models are grouped by module prefix until at most :data:`MAX_DIAGRAM_NODES` boxes
    remain; a group is marked when any layer in it is regularized.
    """
    from regfx.render.show import _mermaid, layer_graph

    if report.graph is None:
        return None
    regularized = {rec.module for rec in report.params if rec.regularized}
    depth = None
    lg = layer_graph(report.graph, depth)
    max_depth = max((len(m.split(".")) for m in report.graph.modules if m), default=1)
    while lg.number_of_nodes() > MAX_DIAGRAM_NODES and (depth is None or depth > 1):
        depth = max_depth - 1 if depth is None else depth - 1
        lg = layer_graph(report.graph, depth)
    marked = set()
    for node in lg.nodes:
        prefix = "" if node == "(root)" else node
        if any(m == prefix or m.startswith(prefix + ".") or prefix == "" for m in regularized):
            marked.add(node)
    return _mermaid(lg, marked)


def render_markdown(report: ReportView, gate: GateView | None = None, params: bool = True) -> str:
    """Markdown: a summary table, findings, a Mermaid diagram and (folded) the parameter table."""
    s = report.summary
    title = f"regfx audit: {report.model}" + (f" (`{report.source}`)" if report.source else "")
    out = [f"## {title}", ""]
    if gate is not None:
        out += ["**Result: " + ("passed ✅" if gate.passed else "failed ❌") + "**", ""]
    counts = {sev: sum(1 for f in report.findings if f.severity == sev)
              for sev in ("error", "warning", "info")}
    out += [
        "| parameters | regularized | trainable elements | coverage | errors | warnings | info |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['parameters']} | {s['regularized']} | {s['numel_trainable']:,} | {s['coverage']:.1%} "
        f"| {counts['error']} | {counts['warning']} | {counts['info']} |",
        "",
    ]
    if report.optimizer is not None:
        groups = ", ".join(f"weight_decay={g['weight_decay']:g}" for g in report.optimizer.groups)
        out += [f"Optimizer: `{report.optimizer.type}` ({groups})", ""]
    if gate is not None and not gate.passed:
        out += ["### Why it failed", ""] + [f"- {_cell(r)}" for r in gate.reasons] + [""]
    out += ["### Findings", ""]
    if report.findings:
        out += ["| code | severity | target | message |", "|---|---|---|---|"]
        for f in report.findings:
            out.append(f"| {f.code} | {_ICON[f.severity]} {f.severity} | `{_cell(f.target)}` "
                       f"| {_cell(f.message)} |")
    else:
        out.append("No findings.")
    out.append("")
    chart = diagram(report)
    if chart:
        out += ["### Layer graph", "", "Regularized layers are green; dashed boxes did not trace.",
                "", "```mermaid", chart.rstrip("\n"), "```", ""]
    if params:
        out += ["<details><summary>Parameters</summary>", "",
                "| parameter | type | shape | regularizers |", "|---|---|---|---|"]
        for rec in report.params:
            name = rec.name + ("" if rec.trainable else " (frozen)")
            if rec.aliases:
                name += " = " + ", ".join(rec.aliases)
            regs = ", ".join(regularizer_label(r) for r in rec.regularizers) or "—"
            out.append(f"| `{_cell(name)}` | {rec.module_type} | {shape_label(rec.shape)} "
                       f"| {_cell(regs)} |")
        out += ["", "</details>", ""]
    return "\n".join(out)
