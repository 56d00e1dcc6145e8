"""Small helpers shared by the report renderers."""

from __future__ import annotations

from typing import Any

__all__ = ["regularizer_label", "shape_label"]


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
