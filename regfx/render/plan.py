"""Plan -> the site table ``regfx apply`` prints (what is, or would be, applied where)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regfx.apply import Plan

__all__ = ["render_plan"]


def render_plan(plan: Plan, model_name: str, dry_run: bool = False) -> str:
    """The plan as an aligned table of sites, then the skipped sites with their reasons.

    Args:
        plan: the :class:`~regfx.apply.Plan`.
        model_name: the model's class name, for the heading.
        dry_run: head the table "Plan for" (nothing applied) instead of "Applied to".
    """
    rows = plan.rows()
    head = "Plan for" if dry_run else "Applied to"
    lines = [f"{head} {model_name}: {len(rows)} site(s)"]
    if rows:
        table = [("site", "kind", "parameters")] + [(r["site"], r["kind"], r["parameters"])
                                                    for r in rows]
        w0 = max(len(r[0]) for r in table)
        w1 = max(len(r[1]) for r in table)
        for r in table:
            lines.append(f"  {r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}".rstrip())
    if plan.skipped:
        lines.append(f"Skipped {len(plan.skipped)}:")
        for site, kind, why in plan.skipped:
            lines.append(f"  {site}  {kind}: {why}")
    return "\n".join(lines) + "\n"
