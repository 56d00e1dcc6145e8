"""``regfx.audit`` and ``AuditReport``: per-parameter records, summary, findings, the gate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regfx.audit.inspect import OptimizerInfo, ParamRecord, inspect_model, module_class_name
from regfx.audit.policy import Policy, as_policy
from regfx.audit.rules import SEVERITIES, Finding, active_rules, run_rules, summarize
from regfx.errors import BaselineError, RegfxError
from regfx.graph import ModelGraph
from regfx.render.markdown import render_markdown
from regfx.render.text import render_text
from regfx.state import state_of
from regfx.trace import trace
from regfx.util import gc_paused

__all__ = ["AuditReport", "Gate", "audit", "summarize", "SCHEMA_VERSION", "BaselineError",
           "read_baseline", "load_baselines", "pick_baseline", "json_schema"]

SCHEMA_VERSION = 1


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

        return render_text(self, color=color)

    def to_markdown(self) -> str:
        """The report as Markdown with a Mermaid layer graph (for CI job summaries)."""

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


@gc_paused()
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
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not isinstance(model, nn.Module):
        raise RegfxError(f"audit() needs an nn.Module, got {type(model).__name__}; pass the model")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise RegfxError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}; pass the optimizer or None")
    if graph is not None and not isinstance(graph, ModelGraph):
        raise RegfxError(f"graph must be a regfx.ModelGraph from regfx.trace(model), got "
                         f"{type(graph).__name__}; pass the graph or None")
    pol = as_policy(policy)
    if graph is None:
        state = state_of(model)  # a transformed model: reuse the traces its transform made
        graph = trace(model, example_inputs, cache=state.traces if state is not None else None)
    ctx = inspect_model(model, graph, optimizer)
    findings = run_rules(ctx, pol)
    return AuditReport(model=module_class_name(model), params=ctx.records, findings=findings,
                       policy=pol, rules=tuple(r.code for r in active_rules(pol)),
                       optimizer=ctx.optimizer, opaque=dict(graph.opaque), graph=graph)


def load_baselines(path: str | Path) -> list[dict[str, Any]]:
    """Every report in a baseline JSON file written by ``regfx audit --format json``, each
    checked against the report's shape (``schema_version``, ``summary.coverage``, ``findings``)
    before any of it is used.

    Raises:
        BaselineError: the file is missing, not UTF-8 JSON, nested too deeply, or a report in
            it has the wrong shape (the message names the field and the value).
    """
    p = Path(path)
    regenerate = "regenerate it with `regfx audit MODEL --format json -o FILE`"
    try:
        data = json.loads(p.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise BaselineError(f"baseline {str(p)!r} does not exist; write one with "
                            "`regfx audit MODEL --format json -o FILE`") from None
    except IsADirectoryError:
        raise BaselineError(f"baseline {str(p)!r} is a directory; give the JSON report file") from None
    except UnicodeDecodeError as exc:
        raise BaselineError(f"baseline {str(p)!r} is not UTF-8 text (offset {exc.start}); "
                            f"{regenerate}") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {str(p)!r} is not valid JSON ({exc}); {regenerate}") from None
    except RecursionError:
        raise BaselineError(f"baseline {str(p)!r} nests too deeply to be a report; {regenerate}") \
            from None
    except OSError as exc:
        raise BaselineError(f"cannot read baseline {str(p)!r}: {exc.strerror}") from None
    reports = data if isinstance(data, list) else [data]
    if not reports:
        raise BaselineError(f"baseline {str(p)!r} is an empty list, not a regfx audit report; "
                            f"{regenerate}")
    for i, report in enumerate(reports):
        where = f"baseline {str(p)!r}" + (f" report {i}" if isinstance(data, list) else "")
        reason = _baseline_shape_reason(report)
        if reason:
            raise BaselineError(f"{where} is not a regfx audit report: {reason}; {regenerate}")
        if report["schema_version"] > SCHEMA_VERSION:
            raise BaselineError(f"{where} has schema_version {report['schema_version']}, newer "
                                f"than this regfx ({SCHEMA_VERSION}); upgrade regfx")
    return reports


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _baseline_shape_reason(report: Any) -> str:
    """Why ``report`` cannot be used as a baseline ('' when it can)."""
    if not isinstance(report, dict):
        return f"expected an object, got {_short(report)}"
    for key in ("summary", "findings"):
        if key not in report:
            return f"no {key!r} field"
    version = report.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"schema_version must be an integer >= 1, got {_short(version)}"
    report.setdefault("schema_version", version)
    for key in ("model", "source"):
        if report.get(key) is not None and not isinstance(report[key], str):
            return f"{key} must be a string, got {_short(report[key])}"
    summary = report["summary"]
    if not isinstance(summary, dict):
        return f"summary must be an object, got {_short(summary)}"
    coverage = summary.get("coverage", 0.0)
    if not _is_number(coverage) or not 0.0 <= coverage <= 1.0:
        return f"summary.coverage must be a number in [0, 1], got {_short(coverage)}"
    findings = report["findings"]
    if not isinstance(findings, list):
        return f"findings must be a list, got {_short(findings)}"
    for j, finding in enumerate(findings):
        if not isinstance(finding, dict):
            return f"findings[{j}] must be an object, got {_short(finding)}"
        for key in ("code", "target"):
            if not isinstance(finding.get(key), str):
                return f"findings[{j}].{key} must be a string, got {_short(finding.get(key))}"
    return ""


def pick_baseline(reports: list[dict[str, Any]], path: str | Path, model: str | None = None,
                  source: str | None = None, *, only_model: bool = True) -> dict[str, Any]:
    """The report of ``reports`` for one audited model: the one with the same ``source`` (the
    MODEL argument), else the only one with the same ``model`` class name. A file holding one
    report is used as it is when ``only_model`` (one MODEL is audited).

    Raises:
        BaselineError: no report, or several, match.
    """
    if len(reports) == 1 and only_model:
        return reports[0]
    if source is not None:
        for r in reports:
            if r.get("source") == source:
                return r
    by_model = [r for r in reports if model is not None and r.get("model") == model]
    if len(by_model) == 1:
        return by_model[0]
    what = f"{source} ({model})" if source else str(model)
    if len(by_model) > 1:
        raise BaselineError(f"baseline {str(path)!r} has {len(by_model)} reports for model "
                            f"{model} and none for {source}; regenerate it with the same MODEL "
                            "arguments")
    raise BaselineError(f"baseline {str(path)!r} has no report for {what}; regenerate it with "
                        "the same MODEL arguments")


def read_baseline(path: str | Path, model: str | None = None, source: str | None = None
                  ) -> dict[str, Any]:
    """The baseline report for one model from a JSON file written by ``regfx audit --format json``.

    A file holding several reports (a list) is searched by ``source``, then by ``model``; a
    file holding one report is that report.
    """
    reports = load_baselines(path)
    if len(reports) == 1:
        return reports[0]
    if model is None and source is None:
        raise BaselineError(f"baseline {str(path)!r} holds {len(reports)} reports; name the "
                            "model (read_baseline(path, model=...)) to pick one")
    return pick_baseline(reports, path, model, source, only_model=False)
