"""Helpers for gating on the audit inside a user's own test suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from regfx.audit.policy import Policy
from regfx.audit.report import AuditReport, audit

__all__ = ["assert_regularized"]


def assert_regularized(model: nn.Module, policy: Policy | dict[str, Any] | str | Path | None = None,
                       optimizer: torch.optim.Optimizer | None = None, *,
                       fail_on: str | None = None, example_inputs: Any = None) -> AuditReport:
    """Audit ``model`` and raise ``AssertionError`` listing every reason when it fails.

    Args:
        model: the model to check (transformed by regfx or regularized by hand).
        policy: a :class:`~regfx.audit.policy.Policy`, a dict (``[tool.regfx.audit]`` table),
            a policy TOML path, or None for the default policy (fail on errors only).
        optimizer: its optimizer, so weight decay counts and missing parameters are caught.
        fail_on: ``"error"`` or ``"warning"``, overriding the policy's.
        example_inputs: optional inputs to locate the output layers exactly.

    Returns:
        The report, for further assertions.

    Raises:
        AssertionError: when the audit fails the policy; the message has one line per reason.

    Example:
        >>> from regfx.testing import assert_regularized
        >>> def test_model_is_regularized():
        ...     model = build_model()
        ...     assert_regularized(model, {"min_coverage": 0.9, "require": {"linear": ["any"]}},
        ...                        torch.optim.AdamW(model.parameters()))
    """
    report = audit(model, optimizer, policy=policy, example_inputs=example_inputs)
    gate = report.gate(fail_on=fail_on)
    if not gate.passed:
        lines = "\n".join(f"  {r}" for r in gate.reasons)
        raise AssertionError(f"{report.model} fails the regularization policy "
                             f"(coverage {report.summary['coverage']:.1%}):\n{lines}")
    return report
