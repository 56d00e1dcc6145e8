"""``regfx.audit`` and ``AuditReport``: per-parameter records, summary, findings, the gate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regfx.audit.inspect import OptimizerInfo, ParamRecord, inspect_model
from regfx.audit.policy import Policy, as_policy
from regfx.audit.rules import SEVERITIES, Finding, active_rules, run_rules
from regfx.errors import RegfxError
from regfx.graph import ModelGraph

__all__ = ["AuditReport", "Gate", "audit", "summarize", "SCHEMA_VERSION", "BaselineError",
           "read_baseline", "json_schema"]

SCHEMA_VERSION = 1


class BaselineError(RegfxError):
    """A baseline report is unreadable, not JSON, or not a regfx audit report."""


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the JSON report, as a new dict on every call.

    It accepts one report (:meth:`AuditReport.to_dict`, ``regfx audit --format json`` for one
    MODEL) or a non-empty list of them (several MODELs); ``$defs/report`` is one report. The
    file ships in the package as ``regfx/audit/report.schema.json``.

    Example:
        >>> import jsonschema  # not a regfx dependency
        >>> jsonschema.Draft202012Validator(json_schema()).validate(report.to_dict())
    """
    text = resources.files("regfx.audit").joinpath("report.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def summarize(records: list[ParamRecord]) -> dict[str, Any]:
    """The summary block: counts, numel and coverage (regularized / trainable numel).

    A model with no trainable parameter has coverage 1.0: there is nothing left to regularize.
    """
    trainable = [r for r in records if r.trainable]
    numel_trainable = sum(r.numel for r in trainable)
    numel_reg = sum(r.numel for r in trainable if r.regularized)
    return {
        "parameters": len(records),
        "regularized": sum(1 for r in records if r.regularized),
        "numel": sum(r.numel for r in records),
        "numel_trainable": numel_trainable,
        "numel_regularized": numel_reg,
        "coverage": round(numel_reg / numel_trainable, 6) if numel_trainable else 1.0,
    }


@dataclass(frozen=True)
class Gate:
    """Whether a report passes: ``passed``, the ``exit_code`` (0/1) and one-line ``reasons``."""

    passed: bool
    reasons: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 when it passes, 1 when it fails (the CLI's exit code for this report)."""
        return 0 if self.passed else 1


@dataclass
class AuditReport:
    """What :func:`regfx.audit` found. Render it with ``to_text``/``to_json``/``to_markdown``
    or the functions in :mod:`regfx.render`.

    Attributes:
        model: class name of the audited model.
        params: one :class:`~regfx.audit.inspect.ParamRecord` per logical parameter.
        findings: rule findings, sorted by code and target.
        policy: the policy applied.
        rules: codes of the rules that ran.
        optimizer: the optimizer's type and groups, or None.
        opaque: qualified name -> reason, for forwards that did not trace.
        graph: the traced graph (for diagrams; not serialized).
        source: the MODEL argument when the report came from the CLI.
    """

    model: str
    params: list[ParamRecord]
    findings: list[Finding]
    policy: Policy = field(default_factory=Policy)
    rules: tuple[str, ...] = ()
    optimizer: OptimizerInfo | None = None
    opaque: dict[str, str] = field(default_factory=dict)
    graph: ModelGraph | None = field(default=None, repr=False)
    source: str | None = None

    @property
    def summary(self) -> dict[str, Any]:
        """Counts, numel and coverage (see :func:`summarize`)."""
        return summarize(self.params)

    def param(self, name: str) -> ParamRecord:
        """The record of ``name`` (a logical name or an alias). Raises KeyError."""
        for rec in self.params:
            if rec.name == name or name in rec.aliases:
                return rec
        raise KeyError(name)

    def failing(self, fail_on: str | None = None) -> list[Finding]:
        """Findings at or above ``fail_on`` (default: the policy's)."""
        level = SEVERITIES.index(fail_on or self.policy.fail_on)
        return [f for f in self.findings if SEVERITIES.index(f.severity) >= level]

    def gate(self, baseline: dict[str, Any] | None = None, fail_on: str | None = None) -> Gate:
        """Pass/fail: failing findings, and with a ``baseline`` report (JSON dict) a coverage
        drop or any new warning/error finding."""
        reasons = [f"{f.code} {f.severity}: {f.target}: {f.message}" for f in self.failing(fail_on)]
        if baseline is not None:
            before = float(baseline.get("summary", {}).get("coverage", 0.0))
            now = self.summary["coverage"]
            if now + 1e-9 < before:
                reasons.append(f"coverage dropped from {before:.1%} to {now:.1%} (baseline)")
            known = {(f.get("code"), f.get("target")) for f in baseline.get("findings", [])}
            for f in self.findings:
                if f.severity != "info" and (f.code, f.target) not in known:
                    reasons.append(f"new {f.code} {f.severity} since the baseline: {f.target}: "
                                   f"{f.message}")
        return Gate(not reasons, tuple(dict.fromkeys(reasons)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``schema_version`` 1): model, summary, params, findings..."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model": self.model}
        if self.source is not None:
            out["source"] = self.source
        out["summary"] = self.summary
        out["params"] = [r.to_dict() for r in self.params]
        out["findings"] = [_finding_dict(f) for f in self.findings]
        out["optimizer"] = self.optimizer.to_dict() if self.optimizer else None
        out["opaque"] = dict(sorted(self.opaque.items()))
        out["rules"] = list(self.rules)
        out["policy"] = self.policy.to_dict()
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_text(self, color: bool = False) -> str:
        """The report as an aligned text table (``regfx audit`` output)."""
        from regfx.render.text import render_text

        return render_text(self, color=color)

    def to_markdown(self) -> str:
        """The report as Markdown with a Mermaid layer graph (for CI job summaries)."""
        from regfx.render.markdown import render_markdown

        return render_markdown(self)


def _finding_dict(f: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"code": f.code, "severity": f.severity, "target": f.target,
                           "message": f.message}
    if f.location is not None:
        out["location"] = {"file": relative_path(f.location[0]), "line": f.location[1]}
    return out


def relative_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (stable in CI)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path


def audit(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
          policy: Policy | dict[str, Any] | str | Path | None = None,
          graph: ModelGraph | None = None, example_inputs: Any = None) -> AuditReport:
    """Audit which parameters of ``model`` are regularized, and how, and what is wrong.

    Works on any model, transformed by regfx or not, on any device including ``meta``. The
    model is not changed: nothing is run unless ``example_inputs`` is given (then one eval-mode
    forward under ``no_grad`` finds the output layers), and parametrized weights are never
    computed, so spectral norm's ``u``/``v`` do not advance.

    Args:
        model: the model.
        optimizer: its optimizer, to read weight decay per group and check every trainable
            parameter is in it.
        policy: a :class:`~regfx.audit.policy.Policy`, a dict (``[tool.regfx.audit]`` table),
            a policy TOML path, or None for the default policy.
        graph: a :class:`ModelGraph` of ``model`` from :func:`regfx.trace`, to skip tracing.
        example_inputs: optional inputs, as for :func:`regfx.trace`.

    Returns:
        An :class:`AuditReport`; ``report.gate().passed`` says whether it passes the policy.

    Raises:
        RegfxError: when ``model`` is not an ``nn.Module`` or the policy is invalid.

    Example:
        >>> report = regfx.audit(model, optimizer)
        >>> report.summary["coverage"]
        >>> print(report.to_text())
    """
    from regfx.state import state_of
    from regfx.trace import trace

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not isinstance(model, nn.Module):
        raise RegfxError(f"audit() needs an nn.Module, got {type(model).__name__}; pass the model")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise RegfxError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}; pass the optimizer or None")
    pol = as_policy(policy)
    if graph is None:
        state = state_of(model)  # a transformed model: reuse the traces its transform made
        graph = trace(model, example_inputs, cache=state.traces if state is not None else None)
    ctx = inspect_model(model, graph, optimizer)
    findings = run_rules(ctx, pol)
    return AuditReport(model=type(model).__name__, params=ctx.records, findings=findings,
                       policy=pol, rules=tuple(r.code for r in active_rules(pol)),
                       optimizer=ctx.optimizer, opaque=dict(graph.opaque), graph=graph)


def read_baseline(path: str | Path, model: str | None = None, source: str | None = None
                  ) -> dict[str, Any]:
    """The baseline report for one model from a JSON file written by ``regfx audit --format json``.

    A file holding several reports (a list) is searched by ``source``, then by ``model``.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"baseline {str(p)!r} does not exist; write one with "
                            "`regfx audit MODEL --format json -o FILE`") from None
    except IsADirectoryError:
        raise BaselineError(f"baseline {str(p)!r} is a directory; give the JSON report file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"baseline {str(p)!r} is not valid JSON ({exc}); regenerate it with "
                            "`regfx audit MODEL --format json -o FILE`") from None
    except OSError as exc:
        raise BaselineError(f"cannot read baseline {str(p)!r}: {exc.strerror}") from None
    reports = data if isinstance(data, list) else [data]
    for r in reports:
        if not isinstance(r, dict) or "summary" not in r or "findings" not in r \
                or not isinstance(r.get("findings"), list) or not isinstance(r.get("summary"), dict):
            raise BaselineError(f"baseline {str(p)!r} is not a regfx audit report (no summary/"
                                "findings); regenerate it with `regfx audit MODEL --format json`")
        if r.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise BaselineError(f"baseline {str(p)!r} has schema_version {r['schema_version']}, "
                                f"newer than this regfx ({SCHEMA_VERSION}); upgrade regfx")
    if len(reports) == 1:
        return reports[0]
    for key, value in (("source", source), ("model", model)):
        if value is None:
            continue
        for r in reports:
            if r.get(key) == value:
                return r
    raise BaselineError(f"baseline {str(p)!r} has no report for {source or model}; regenerate it "
                        "with the same MODEL arguments")
