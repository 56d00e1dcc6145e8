"""Small helpers shared by the report renderers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["regularizer_label", "shape_label", "ReportView", "GateView"]


def regularizer_label(r: dict[str, Any]) -> str:
    """``dropout(p=0.1)``, ``spectral_norm``, ``weight_decay=0.01 (decoupled)``... for tables."""
    kind = r["kind"]
    if kind in ("dropout", "drop_path"):
        p = r.get("p")
        label = f"{kind}(p={p:g})" if isinstance(p, (int, float)) else f"{kind}(p=?)"
        if r.get("inferred"):
            label += "~"
    elif kind in ("l1", "l2"):
        label = f"{kind}={r['value']:g}"
    elif kind == "weight_decay":
        label = f"weight_decay={r['value']:g}" + (" (decoupled)" if r.get("decoupled") else " (L2)")
    elif kind == "parametrization":
        label = f"parametrization({r.get('class', '?')})"
    else:
        label = kind
    if r.get("deprecated"):
        label += " (deprecated hook)"
    if "on" in r:
        label += f" [on {', '.join(r['on'])}]"
    return label


def shape_label(shape: list[int]) -> str:
    """``64x3x3x3`` (``scalar`` for a 0-d parameter)."""
    return "x".join(str(s) for s in shape) if shape else "scalar"


class ReportView(Protocol):
    """What the text and markdown renderers read of a report. :class:`regfx.AuditReport`
    satisfies it; the renderers do not import the audit package, which imports them."""

    @property
    def model(self) -> str: ...
    @property
    def params(self) -> Sequence[Any]: ...
    @property
    def findings(self) -> Sequence[Any]: ...
    @property
    def optimizer(self) -> Any: ...
    @property
    def opaque(self) -> Mapping[str, str]: ...
    @property
    def graph(self) -> Any: ...
    @property
    def source(self) -> str | None: ...
    @property
    def summary(self) -> dict[str, Any]: ...


class GateView(Protocol):
    """A pass/fail verdict as the renderers read it (:class:`regfx.audit.report.Gate`)."""

    @property
    def passed(self) -> bool: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...
