"""Audit rules: stable codes, a severity, a docstring with the anti-pattern and the fix.

Each rule is a plain function from an :class:`~regfx.audit.inspect.Inspection` (and the policy)
to findings, listed in the explicit :data:`RULES` tuple; a test checks that every rule is listed,
documented and has a file of cases. Codes are never reused: a retired rule keeps its code.

Code ranges: ``RFX0xx`` tracing, ``RFX1xx`` dropout, ``RFX2xx`` penalties and weight decay,
``RFX3xx`` normalization, ``RFX4xx`` coverage, ``RFX5xx`` policy.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from regfx.audit.inspect import (
    NORM_KINDS,
    Inspection,
    ParamRecord,
    definition_site,
    is_weight_of_layer,
    module_class_name,
)
from regfx.select import is_norm, matches, parse_types


class PolicyView(Protocol):
    """What the rules read of a policy. :class:`regfx.audit.policy.Policy` satisfies it; the
    rules do not import the policy module, which imports the rule table to check codes."""

    @property
    def min_coverage(self) -> float | None: ...
    @property
    def select(self) -> tuple[str, ...]: ...
    @property
    def ignore(self) -> tuple[str, ...]: ...
    @property
    def require(self) -> dict[str, tuple[str, ...]]: ...
    @property
    def per_module_ignores(self) -> dict[str, tuple[str, ...]]: ...

__all__ = ["Rule", "Finding", "RULES", "RULES_BY_CODE", "SEVERITIES", "run_rules"]

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One problem: ``code``, ``severity``, ``target`` (a module or parameter name) and a
    one-line ``message`` that says what to do. ``location`` is ``(file, line)`` when known."""

    code: str
    severity: str
    target: str
    message: str
    location: tuple[str, int] | None = None

    def sort_key(self) -> tuple[str, str, str]:
        """Reports list findings by code, then target, then message."""
        return (self.code, self.target, self.message)


@dataclass(frozen=True)
class Rule:
    """A rule: ``code`` (``RFX`` + 3 digits), dotted ``name``, default ``severity`` and the
    ``check`` function whose docstring states the anti-pattern and the fix."""

    code: str
    name: str
    severity: str
    check: Callable[[Inspection, PolicyView], Iterator[Finding]]

    @property
    def doc(self) -> str:
        """The check's docstring: the anti-pattern and the fix."""
        return (self.check.__doc__ or "").strip()

    @property
    def summary(self) -> str:
        """The first line of :attr:`doc`."""
        return self.doc.splitlines()[0] if self.doc else ""


# -- helpers ----------------------------------------------------------------------------------


def _finding(rule_code: str, target: str, message: str, ctx: Inspection,
             module: str | None = None) -> Finding:

    rule = RULES_BY_CODE[rule_code]
    site = None
    if module is not None:
        try:
            site = definition_site(_root(ctx), module)
        except Exception:  # noqa: BLE001 - a location is a nicety; never fail the audit on it
            site = None
    return Finding(rule.code, rule.severity, target, message, site)


def _root(ctx: Inspection) -> nn.Module:
    return ctx.modules[""]


_FEEDS_THROUGH = frozenset({"activation", "reshape", "dropout"})
"""The roles between a dropout and the layer it feeds (``dropout -> relu -> flatten -> bn``)."""


# -- RFX0xx: tracing --------------------------------------------------------------------------


def opaque_modules(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Some forwards did not trace, so dropout inside them is placed and found approximately.

    Anti-pattern: none in the model itself; torch.fx could not trace these forwards
    (data-dependent control flow, ``**kwargs``, optional arguments...). Inside them, dropout
    modules are attributed to the layer defined just before them and ``F.dropout`` calls are not
    seen. Fix: nothing is required; make the forward traceable for an exact audit, or pass
    ``example_inputs``. One finding per module class.
    """
    by_class: dict[str, list[str]] = {}
    for name in ctx.graph.opaque:
        mod = ctx.modules.get(name)
        if mod is None:
            continue
        by_class.setdefault(module_class_name(mod), []).append(name)
    for cls, names in sorted(by_class.items()):
        names.sort()
        reason = ctx.graph.opaque[names[0]]
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        yield _finding("RFX001", names[0] or "(root)",
                       f"{cls} forward did not trace ({reason}) at {names[0] or '(root)'}{more}; "
                       "dropout inside is attributed by definition order and F.dropout calls are "
                       "not seen", ctx)


# -- RFX1xx: dropout --------------------------------------------------------------------------


def dropout_before_batchnorm(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Dropout feeds a BatchNorm layer.

    Anti-pattern: ``Dropout -> BatchNorm``. Dropout changes the variance of its output between
    training and evaluation, so the running statistics BatchNorm collects in training do not
    match what it sees in evaluation (the "variance shift"). Fix: move the dropout after the
    BatchNorm and its activation (``conv -> bn -> relu -> dropout``), which is where
    ``regfx.transform`` places it.
    """

    def is_bn(node: str) -> bool:
        data = ctx.graph.nx.nodes[node]
        if data.get("op") == "batch_norm":
            return True
        name = data.get("module")
        return name is not None and isinstance(ctx.modules.get(name), nn.modules.batchnorm._BatchNorm)

    for use in ctx.dropouts:
        if use.node is None or use.how == "definition order" or use.kind != "dropout":
            continue
        bn = ctx.graph.reaches(use.node, _FEEDS_THROUGH, ("norm",), accept=is_bn)
        if bn is None:
            continue
        data = ctx.graph.nx.nodes[bn]
        target = data.get("module") or f"{data.get('owner') or '(root)'}:F.batch_norm"
        yield _finding("RFX101", target,
                       f"dropout {use.label} feeds BatchNorm {target}; move the dropout after the "
                       "BatchNorm and its activation", ctx, data.get("module"))


def element_dropout_on_conv(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Element-wise dropout on a convolution's feature maps.

    Anti-pattern: ``nn.Dropout`` (or ``F.dropout``) on the output of a ``Conv2d``. Neighbouring
    activations of a feature map are strongly correlated, so dropping single elements barely
    regularizes. Fix: drop whole channels with ``nn.Dropout1d/2d/3d`` matching the conv
    (``regfx.transform`` does this by default), or use a DropBlock-style method.
    """
    for use in ctx.dropouts:
        if use.kind != "dropout" or use.variant not in ("Dropout", "dropout", "AlphaDropout",
                                                        "alpha_dropout"):
            continue
        for layer, flat in use.layers:
            mod = ctx.modules.get(layer)
            if flat or not isinstance(mod, nn.modules.conv._ConvNd):
                continue
            dims = len(mod.kernel_size)
            yield _finding("RFX102", use.label,
                           f"element-wise {use.variant} on the feature maps of {layer} "
                           f"({module_class_name(mod)}); use nn.Dropout{dims}d to drop whole "
                           "channels", ctx, use.module)


def dropout_after_output(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Dropout after the output layer.

    Anti-pattern: dropout applied to the logits (or other final output) of the model. It
    corrupts the predictions the loss sees instead of regularizing a representation. Fix:
    remove it, or move it before the output layer.
    """
    for use in ctx.dropouts:
        if use.node is None or not use.layers or use.how != "graph":
            continue
        if ctx.graph.reaches_output(use.node, _root(ctx)):
            layers = ", ".join(layer for layer, _ in use.layers)
            yield _finding("RFX103", use.label,
                           f"dropout {use.label} is applied to the output of {layers}, which is "
                           "the model output; remove it or move it before the output layer",
                           ctx, use.module)


def dropout_zero(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Dropout with p = 0 does nothing.

    Anti-pattern: a dropout module or call whose probability is 0 (often a config left at its
    default). It costs a kernel launch and suggests regularization that is not there. Fix: set a
    real probability, or remove the dropout.
    """
    for use in ctx.dropouts:
        if use.p is not None and use.p == 0.0:
            yield _finding("RFX104", use.label,
                           f"{use.variant} {use.label} has p=0 and does nothing; set p > 0 or "
                           "remove it", ctx, use.module)


def dropout_too_high(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Dropout with p >= 0.9 destroys most of the signal.

    Anti-pattern: ``nn.Dropout(0.9)`` or higher, often a keep probability (TensorFlow 1
    ``keep_prob``) written where a drop probability is expected. Fix: use the drop probability,
    ``p = 1 - keep_prob``; typical values are 0.1-0.5.
    """
    for use in ctx.dropouts:
        if use.p is not None and use.p >= 0.9:
            yield _finding("RFX105", use.label,
                           f"{use.variant} {use.label} has p={use.p:g}, dropping most of its "
                           "input; p is the drop probability (1 - keep_prob), use 0.1-0.5",
                           ctx, use.module)


# -- RFX2xx: penalties and weight decay -------------------------------------------------------


def _is_norm_or_bias(ctx: Inspection, rec: Any) -> bool:
    mod = ctx.modules.get(rec.module)
    return rec.is_bias or (mod is not None and is_norm(mod))


def decay_on_norm_or_bias(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Weight decay or a penalty on a norm parameter or a bias.

    Anti-pattern: one optimizer group with ``weight_decay`` over ``model.parameters()``, or an
    L1/L2 penalty over every parameter. Shrinking biases and the scale/shift of normalization
    layers toward zero does not reduce capacity and hurts accuracy. Fix: put biases and norm
    parameters in a group with ``weight_decay=0.0`` (and leave them out of penalties).
    """
    for rec in ctx.records:
        if not rec.trainable or not _is_norm_or_bias(ctx, rec):
            continue
        kinds = [r for r in rec.regularizers if r["kind"] in ("weight_decay", "l1", "l2")]
        if kinds:
            what = ", ".join(sorted({r["kind"] for r in kinds}))
            role = "bias" if rec.is_bias else f"{rec.module_type} parameter"
            yield _finding("RFX201", rec.name,
                           f"{what} on {role} {rec.name}; put biases and norm parameters in an "
                           "optimizer group with weight_decay=0", ctx, rec.module)


def coupled_decay_adaptive(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """L2 (coupled weight decay or an L2 penalty) with an adaptive optimizer such as Adam.

    Anti-pattern: ``Adam(params, weight_decay=...)``, or an L2 penalty with Adam. Adam divides
    the L2 gradient by the running RMS of the gradients, so weights with large gradients are
    barely decayed: this is not weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization"). Fix: use ``AdamW`` (decoupled weight decay) instead, and drop the L2
    penalty.
    """
    info = ctx.optimizer
    if info is None or not info.adaptive:
        return
    for group in info.groups:
        if group["weight_decay"] and not group["decoupled"] and group["params"]:
            yield _finding("RFX202", f"optimizer.param_groups[{group['index']}]",
                           f"{info.type} applies weight_decay={group['weight_decay']:g} as coupled "
                           "L2, which Adam-style scaling weakens; use AdamW", ctx)
    with_l2 = [r.name for r in ctx.records if any(x["kind"] == "l2" for x in r.regularizers)]
    if with_l2:
        yield _finding("RFX202", "penalty",
                       f"L2 penalty on {len(with_l2)} parameter(s) with adaptive optimizer "
                       f"{info.type}; use AdamW's weight_decay instead of l2", ctx)


def penalty_and_decay(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """A parameter gets both an L1/L2 penalty and the optimizer's weight decay.

    Anti-pattern: ``regfx.transform(model, l2=...)`` (or a hand-written penalty) and an optimizer
    with ``weight_decay`` on the same parameters: the shrinkage is applied twice and the
    effective strength is not what either setting says. Fix: keep one of them, usually the
    optimizer's (decoupled) weight decay.
    """
    for rec in ctx.records:
        kinds = rec.kinds()
        pen = sorted(kinds & {"l1", "l2"})
        if pen and "weight_decay" in kinds:
            yield _finding("RFX203", rec.name,
                           f"{rec.name} has {' and '.join(pen)} penalty and weight_decay; keep one",
                           ctx, rec.module)


def missing_from_optimizer(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """A trainable parameter is not in the optimizer.

    Anti-pattern: the optimizer was built before layers were added or replaced (for example
    before a parametrization moved the weight to ``parametrizations.weight.original``), or from
    a filtered parameter list that forgot some. The parameter never trains. Fix: build the
    optimizer after transforming the model, from ``model.parameters()``, or freeze the
    parameter (``requires_grad_(False)``) if that is intended.
    """
    for name in ctx.optimizer_missing:
        rec = ctx.record(name)
        yield _finding("RFX204", name,
                       f"trainable {name} is in no optimizer group and will not train; build the "
                       "optimizer after transforming the model, or freeze it", ctx,
                       rec.module if rec else None)


# -- RFX3xx: normalization --------------------------------------------------------------------


def two_normalizations(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Two normalizations on one weight.

    Anti-pattern: ``spectral_norm(weight_norm(layer))`` or a parametrization on top of a
    deprecated hook. The second one undoes or fights the first, and spectral norm's power
    iteration then estimates the wrong matrix. Fix: keep one normalization per weight.
    """
    for rec in ctx.records:
        norms = [r for r in rec.regularizers if r["kind"] in NORM_KINDS and "on" not in r]
        if len(norms) >= 2:
            kinds = " and ".join(r["kind"] + (" (deprecated hook)" if r.get("deprecated") else "")
                                 for r in norms)
            yield _finding("RFX301", rec.name, f"{rec.name} has {kinds}; keep one normalization",
                           ctx, rec.module)


def deprecated_norm_hook(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Hook-based ``torch.nn.utils.weight_norm``/``spectral_norm`` (deprecated).

    Anti-pattern: ``torch.nn.utils.weight_norm(layer)`` or ``torch.nn.utils.spectral_norm(layer)``.
    These forward-pre-hook versions are deprecated, break ``copy.deepcopy`` and
    ``torch.compile`` in places, and store the weight under other state-dict keys. Fix: use
    ``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm`` (or
    ``regfx.transform(model, weight_norm=...)``).
    """
    for rec in ctx.records:
        for r in rec.regularizers:
            if r.get("deprecated"):
                yield _finding("RFX302", rec.name,
                               f"{rec.name} uses the deprecated hook-based {r['kind']}; use "
                               f"torch.nn.utils.parametrizations.{r['kind']}", ctx, rec.module)


def tied_partially_normalized(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """A tied weight is normalized under one of its names only.

    Anti-pattern: an embedding tied to the output layer (``lm_head.weight is embed.weight``)
    with spectral or weight norm applied to one of the two modules. One module computes with the
    normalized weight, the other with the raw one, so the tie no longer means what it did.
    Fix: normalize both with one shared parametrization (``regfx.transform`` does), or neither.
    """
    for rec in ctx.records:
        for r in rec.regularizers:
            if r["kind"] in NORM_KINDS and "on" in r:
                others = [n for n in (rec.name, *rec.aliases) if n not in r["on"]]
                yield _finding("RFX303", rec.name,
                               f"tied weight {rec.name} has {r['kind']} under {', '.join(r['on'])} "
                               f"but not under {', '.join(others)}; normalize every alias or none",
                               ctx, rec.module)


# -- RFX4xx: coverage -------------------------------------------------------------------------


def unregularized_weight(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """A linear or convolution weight has no regularization at all.

    Anti-pattern: a trainable weight matrix with no dropout after its layer, no normalization,
    no penalty and no weight decay. Fix: add the regularization your recipe calls for
    (``regfx apply``), or exclude the layer in the policy if it is meant to be unregularized.
    """
    for rec in ctx.records:
        if rec.trainable and not rec.regularized and is_weight_of_layer(rec, ctx.modules):
            yield _finding("RFX401", rec.name,
                           f"{rec.module_type} weight {rec.name} has no regularization; add "
                           "dropout, a norm, a penalty or weight decay, or ignore it in the policy",
                           ctx, rec.module)


# -- RFX5xx: policy ---------------------------------------------------------------------------


def required_regularizer(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """A weight lacks a regularizer that the policy requires for its layer type.

    Anti-pattern: the policy's ``require`` table says, for example, that every ``linear`` weight
    needs ``weight_decay`` and one does not have it. Fix: add the regularizer (``regfx apply``,
    or the optimizer group), or narrow the policy with ``per-module-ignores``.
    """
    for word, needs in policy.require.items():
        selector = parse_types(word)
        for rec in ctx.records:
            if rec.name.rsplit(".", 1)[-1] != "weight" or not rec.trainable:
                continue
            mod = ctx.modules.get(rec.module)
            if mod is None or not matches(rec.module, mod, selector, (), ()):
                continue
            have = rec.kinds()
            for need in needs:
                options = need.split("|")
                ok = bool(have) if need == "any" else bool(have & set(options))
                if not ok:
                    yield _finding("RFX501", rec.name,
                                   f"{word} weight {rec.name} lacks required {need}; add it or "
                                   "narrow the policy", ctx, rec.module)


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


def coverage_below_minimum(ctx: Inspection, policy: PolicyView) -> Iterator[Finding]:
    """Regularized share of trainable parameters is below the policy's ``min_coverage``.

    Anti-pattern: large parts of the model train without any regularization, for example after
    a refactor dropped the regularizers of a new block. Fix: regularize the uncovered layers
    (see the report's parameter table), or lower ``min_coverage`` deliberately.
    """
    if policy.min_coverage is None:
        return
    cov = summarize(ctx.records)["coverage"]
    if cov + 1e-12 < policy.min_coverage:
        yield _finding("RFX502", "(model)",
                       f"coverage {cov:.1%} is below the policy's min_coverage "
                       f"{policy.min_coverage:.1%}; regularize more layers", ctx)


RULES: tuple[Rule, ...] = (
    Rule("RFX001", "tracing.opaque-module", "info", opaque_modules),
    Rule("RFX101", "dropout.before-batchnorm", "warning", dropout_before_batchnorm),
    Rule("RFX102", "dropout.element-wise-on-conv", "warning", element_dropout_on_conv),
    Rule("RFX103", "dropout.after-output", "error", dropout_after_output),
    Rule("RFX104", "dropout.zero", "info", dropout_zero),
    Rule("RFX105", "dropout.too-high", "warning", dropout_too_high),
    Rule("RFX201", "decay.norm-or-bias", "warning", decay_on_norm_or_bias),
    Rule("RFX202", "decay.coupled-adaptive", "warning", coupled_decay_adaptive),
    Rule("RFX203", "decay.penalty-and-decay", "warning", penalty_and_decay),
    Rule("RFX204", "optimizer.missing-parameter", "warning", missing_from_optimizer),
    Rule("RFX301", "norm.two-on-one-weight", "error", two_normalizations),
    Rule("RFX302", "norm.deprecated-hook", "warning", deprecated_norm_hook),
    Rule("RFX303", "norm.tied-partial", "warning", tied_partially_normalized),
    Rule("RFX401", "coverage.unregularized-weight", "warning", unregularized_weight),
    Rule("RFX501", "policy.required-regularizer", "error", required_regularizer),
    Rule("RFX502", "policy.min-coverage", "error", coverage_below_minimum),
)
RULES_BY_CODE = {r.code: r for r in RULES}


def _ignored(finding: Finding, policy: PolicyView) -> bool:
    for pattern, codes in policy.per_module_ignores.items():
        if fnmatch.fnmatchcase(finding.target, pattern) or \
                fnmatch.fnmatchcase(finding.target.rsplit(".", 1)[0], pattern):
            if any(finding.code.startswith(c) for c in codes):
                return True
    return False


def active_rules(policy: PolicyView) -> list[Rule]:
    """The rules ``policy``'s ``select``/``ignore`` leave on (codes or code prefixes)."""
    out = []
    for rule in RULES:
        if policy.select and not any(rule.code.startswith(s) for s in policy.select):
            continue
        if any(rule.code.startswith(i) for i in policy.ignore):
            continue
        out.append(rule)
    return out


def run_rules(inspection: Inspection, policy: PolicyView) -> list[Finding]:
    """Every finding of the active rules, minus per-module ignores, in a stable order."""
    found: set[Finding] = set()
    for rule in active_rules(policy):
        for finding in rule.check(inspection, policy):
            if not _ignored(finding, policy):
                found.add(finding)
    return sorted(found, key=Finding.sort_key)
