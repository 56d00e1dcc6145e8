"""The inventory shown by ``regfx show``: layer counts, traced/opaque map, layer graph drawings."""

from __future__ import annotations

import json
from typing import Any

import networkx as nx
from torch import nn

from regfx.graph import ROLES, ModelGraph
from regfx.select import is_inserted_path, is_leaf_layer, layer_word

__all__ = ["inventory", "render_show", "layer_graph", "FORMATS"]

FORMATS = ("text", "json", "mermaid", "dot")


def inventory(model: nn.Module, graph: ModelGraph) -> dict[str, Any]:
    """Counts and parameter numel by layer type, and the traced/opaque map of ``graph``.

    Parameters shared by several modules are counted once, with the first module owning them.
    """
    by_type: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    layers = []
    for name, mod in model.named_modules():
        if is_inserted_path(name) or not is_leaf_layer(mod):
            continue
        word = layer_word(mod) or "other"
        numel = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                numel += p.numel()
        if word == "other" and numel == 0:
            continue
        row = by_type.setdefault(word, {"count": 0, "numel": 0})
        row["count"] += 1
        row["numel"] += numel
        calls = graph.calls(name)
        layers.append({
            "name": name or "(root)",
            "type": type(mod).__name__,
            "kind": word,
            "numel": numel,
            "calls": len(calls),
            "opaque": any(graph.nx.nodes[c].get("opaque") for c in calls),
        })
    total = sum(p.numel() for p in model.parameters())
    return {
        "model": graph.model_type,
        "fully_traced": graph.fully_traced,
        "graph": graph.summary(),
        "parameters": total,
        "by_type": dict(sorted(by_type.items())),
        "inputs": graph.inputs,
        "not_run": graph.observe_error,
        "tiers": {"symbolic": len(graph.traced), "observed": len(graph.observed),
                  "opaque": len(graph.opaque)},
        "observed": [{"module": n or "(root)", "reason": r} for n, r in graph.observed.items()],
        "opaque": [{"module": n or "(root)", "reason": r} for n, r in graph.opaque.items()],
        "layers": layers,
    }


def layer_graph(graph: ModelGraph, depth: int | None = None) -> nx.DiGraph:
    """Module-level graph: op nodes folded away, modules deeper than ``depth`` grouped.

    Node ids are qualified module names (or their depth-``depth`` prefix), plus ``input`` and
    ``output``. Node attributes: ``label``, ``opaque``, ``count`` (module calls folded in).
    """
    g = graph.nx
    out = nx.DiGraph()

    def group(nid: str) -> str | None:
        data = g.nodes[nid]
        if data.get("op") in ("input", "output"):
            return str(data["op"])
        name = data.get("module")
        if name is None:
            return None
        if depth is not None and depth >= 0:
            name = ".".join(name.split(".")[:depth]) if depth > 0 else ""
        return name or "(root)"

    for nid, data in g.nodes(data=True):
        key = group(nid)
        if key is None:
            continue
        if key not in out:
            out.add_node(key, label=key, opaque=False, count=0, types=set())
        out.nodes[key]["count"] += 1
        out.nodes[key]["opaque"] |= bool(data.get("opaque"))
        if data.get("module") is not None and key != (data["module"] or "(root)"):
            group_type = graph.modules.get("" if key == "(root)" else key)
            if group_type:
                out.nodes[key]["types"].add(group_type)
        elif data.get("module_type"):
            out.nodes[key]["types"].add(data["module_type"])
    # an edge to each group reached through op nodes only (any role: shape reads included)
    for nid in g.nodes:
        src = group(nid)
        if src is None:
            continue
        for reached in graph.walk(nid, ROLES, ROLES, accept=lambda n: group(n) is not None,
                                  collect_all=True):
            dst = group(reached)
            if dst != src:
                out.add_edge(src, dst)
    return out


def _mermaid(lg: nx.DiGraph, marked: set[str] | None = None) -> str:
    ids = {n: f"n{i}" for i, n in enumerate(lg.nodes)}
    lines = ["flowchart TD"]
    for n, data in lg.nodes(data=True):
        types = sorted(data["types"])
        label = n if not types else f"{n}<br/>{'/'.join(types[:2])}"
        label = label.replace('"', "'")
        shape = f'(["{label}"])' if n in ("input", "output") else f'["{label}"]'
        lines.append(f"    {ids[n]}{shape}")
    for a, b in lg.edges:
        lines.append(f"    {ids[a]} --> {ids[b]}")
    opaque = [ids[n] for n, d in lg.nodes(data=True) if d["opaque"]]
    if opaque:
        lines.append("    classDef opaque stroke-dasharray: 5 5,fill:#eee")
        lines.append(f"    class {','.join(opaque)} opaque")
    if marked:
        reg = [ids[n] for n in lg.nodes if n in marked]
        if reg:
            lines.append("    classDef regularized fill:#d4f7d4,stroke:#2a2")
            lines.append(f"    class {','.join(reg)} regularized")
    return "\n".join(lines) + "\n"


def _dot(lg: nx.DiGraph) -> str:
    lines = ["digraph model {", "    rankdir=TB;", "    node [shape=box, fontname=Helvetica];"]
    for n, data in lg.nodes(data=True):
        types = sorted(data["types"])
        label = n if not types else f"{n}\\n{'/'.join(types[:2])}"
        label = label.replace('"', "'")
        style = ', style=dashed' if data["opaque"] else ""
        shape = ", shape=ellipse" if n in ("input", "output") else ""
        lines.append(f'    "{n}" [label="{label}"{style}{shape}];')
    for a, b in lg.edges:
        lines.append(f'    "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _text(inv: dict[str, Any]) -> str:
    g = inv["graph"]
    if not inv["fully_traced"]:
        state = f"{g['opaque_modules']} opaque module(s)"
    else:
        state = "fully traced" if not inv["observed"] else "no opaque region"
    tiers = inv["tiers"]
    ran = f"Inputs: {inv['inputs']}" if inv["inputs"] else f"Example forward: not run ({inv['not_run']})"
    lines = [
        f"Model {inv['model']}: {_fmt_int(inv['parameters'])} parameters, {state}",
        ran,
        f"Forwards: {tiers['symbolic']} traced symbolically (per call site), {tiers['observed']} "
        f"observed in the example forward, {tiers['opaque']} opaque",
        f"Graph: {g['nodes']} nodes ({g['module_calls']} module calls, {g['ops']} ops), "
        f"{g['edges']} edges",
        "",
        "Layers by type",
    ]
    rows = [("type", "count", "parameters")] + [
        (k, str(v["count"]), _fmt_int(v["numel"])) for k, v in inv["by_type"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    sections = (
        ("observed", "Observed modules (forward did not trace; dataflow recorded from the example "
                     "forward, dropout placed by hooks at layer boundaries)"),
        ("opaque", "Opaque modules (forward neither traced nor ran; placement falls back to their "
                   "outputs)"),
    )
    for key, title in sections:
        if inv[key]:
            lines += ["", title]
            width = max(len(o["module"]) for o in inv[key])
            lines += [f"  {o['module']:<{width}}  {o['reason']}" for o in inv[key]]
    return "\n".join(lines) + "\n"


def render_show(model: nn.Module, graph: ModelGraph, fmt: str = "text",
                depth: int | None = None) -> str:
    """Render ``regfx show`` output in one of :data:`FORMATS`."""
    if fmt == "text":
        return _text(inventory(model, graph))
    if fmt == "json":
        return json.dumps(inventory(model, graph), indent=2, sort_keys=False) + "\n"
    if fmt == "mermaid":
        return _mermaid(layer_graph(graph, depth))
    if fmt == "dot":
        return _dot(layer_graph(graph, depth))
    raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
