"""AuditReport(s) -> JSON: one object for one report, a list for several."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regfx.audit.report import AuditReport, Gate

__all__ = ["render_json"]


def render_json(reports: Sequence[AuditReport], gates: Sequence[Gate | None] = ()) -> str:
    """``report.to_dict()`` (plus ``gate`` when judged) for each report, deterministic."""
    docs: list[dict[str, Any]] = []
    for i, report in enumerate(reports):
        doc = report.to_dict()
        gate = gates[i] if i < len(gates) else None
        if gate is not None:
            doc["gate"] = {"passed": gate.passed, "reasons": list(gate.reasons)}
        docs.append(doc)
    data: Any = docs[0] if len(docs) == 1 else docs
    return json.dumps(data, indent=2) + "\n"
