from torch import nn

import regfx
from regfx.render.plan import render_plan


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_plan_table_lists_each_site_aligned_and_the_skipped_ones() -> None:
    plan = regfx.plan(_model(), dropout=0.1, spectral="linear")
    text = render_plan(plan, "Sequential", dry_run=True)
    lines = text.splitlines()
    assert lines[0] == f"Plan for Sequential: {len(plan.rows())} site(s)"
    assert lines[1].split() == ["site", "kind", "parameters"]
    body = lines[2:2 + len(plan.rows())]
    assert [line.split()[0] for line in body] == [r["site"] for r in plan.rows()]
    # the kind column starts at the same offset on every row
    offsets = {line.index(row["kind"], len(row["site"])) for line, row in zip(body, plan.rows())}
    assert len(offsets) == 1
    skipped = lines[2 + len(plan.rows()):]
    assert skipped[0] == f"Skipped {len(plan.skipped)}:"
    assert any("4" in line and "output" in line for line in skipped[1:])  # the head's reason
    assert text.endswith("\n")


def test_an_applied_plan_says_applied_and_an_empty_one_lists_no_rows() -> None:
    assert render_plan(regfx.plan(_model()), "Sequential").splitlines() == [
        "Applied to Sequential: 0 site(s)"]
