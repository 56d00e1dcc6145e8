"""The audit: what is regularized in any model, lint rules with stable codes, and the policy."""

from regfx.audit.inspect import ParamRecord
from regfx.audit.policy import Policy, PolicyError
from regfx.audit.report import AuditReport, BaselineError, Gate, audit, read_baseline
from regfx.audit.rules import RULES, Finding, Rule

__all__ = ["AuditReport", "BaselineError", "Finding", "Gate", "ParamRecord", "Policy",
           "PolicyError", "RULES", "Rule", "audit", "read_baseline"]
