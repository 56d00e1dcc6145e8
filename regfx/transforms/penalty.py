"""L1/L2 penalties applied by an optimizer step pre-hook, so the training loop does not change.

Semantics: the parameter update equals the one obtained by adding
``l1 * sum|w| + (l2 / 2) * sum w**2`` to the loss once per optimizer step. The penalty gradient
``l1 * sign(w) + l2 * w`` is added to ``w.grad`` just before ``optimizer.step()`` runs, which makes
it right under gradient accumulation (added once, not per micro-batch), autocast and GradScaler
(``scaler.step`` unscales the gradients before the step, and skips the step, hook included, on
overflow), and DDP (gradients are already all-reduced; the penalty gradient is the same on every
rank). The gradient is added with foreach ops, one call per coefficient pair, not a Python loop of
tensor ops per parameter.

``optimizer.step(closure)`` (PyTorch Lightning's automatic optimization, LBFGS): the closure
usually zeroes the gradients and runs the backward inside the step, which would erase a gradient
added before it. There the hook adds nothing itself but hands the step a wrapped closure that adds
the penalty gradient after every evaluation of the user's closure, and returns the closure's loss
plus the penalty value (detached), as an explicit loss term would: LBFGS's line search and
convergence test read that value.

Which parameters are penalized is recorded on the model (``model._regfx_penalty``), so a deep copy
of a transformed model carries its penalties; a process-wide registry (weak references, never
keeping a model alive) lets the one global optimizer hook find them.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from regfx.errors import RegfxError
from regfx.select import select_layers, weight_names

__all__ = ["PenaltySpec", "plan_penalty", "apply_penalty", "remove_penalty", "penalty",
           "penalized_parameters"]


@dataclass(frozen=True)
class PenaltySpec:
    """``l1``/``l2`` on the parameters named ``params`` (logical names, ``fc.weight``)."""

    params: tuple[str, ...]
    l1: float
    l2: float


class _Registry:
    """Parameters with penalties, weakly referenced, and a version bumped on every change."""

    def __init__(self) -> None:
        # id(param) -> (weak reference, coefficients); tensors compare element-wise, so they
        # cannot be dictionary keys themselves.
        self.entries: dict[int, tuple[weakref.ref[torch.Tensor], tuple[float, float]]] = {}
        self.version = itertools.count(1)
        self.current = 0
        self.hook: Any = None

    def bump(self) -> None:
        self.current = next(self.version)

    def get(self, p: torch.Tensor) -> tuple[float, float] | None:
        entry = self.entries.get(id(p))
        if entry is None or entry[0]() is not p:
            return None
        return entry[1]

    def add(self, p: torch.Tensor, coeffs: tuple[float, float]) -> None:
        key = id(p)

        def forget(_ref: object, key: int = key) -> None:
            entry = self.entries.get(key)
            if entry is not None and entry[0] is _ref:
                del self.entries[key]

        self.entries[key] = (weakref.ref(p, forget), coeffs)

    def discard(self, p: torch.Tensor) -> None:
        if self.get(p) is not None:
            del self.entries[id(p)]


_REGISTRY = _Registry()


def _tensors_of(module: nn.Module, name: str) -> list[nn.Parameter]:
    """The leaf parameters behind ``module.<name>``, seeing through parametrizations."""
    if parametrize.is_parametrized(module, name):
        plist = cast(nn.Module, module.parametrizations[name])  # type: ignore[index]
        return [p for p in plist._parameters.values() if isinstance(p, nn.Parameter)]
    p = module._parameters.get(name)
    return [p] if isinstance(p, nn.Parameter) else []


def plan_penalty(model: nn.Module, l1: float, l2: float, penalty_on: str,
                 include: tuple[str, ...], exclude: tuple[str, ...]) -> PenaltySpec | None:
    """Every weight-like parameter of the ``penalty_on`` layers (``weight``, ``weight_ih_l0``,
    ``in_proj_weight``, ...; never biases, and norm scales only when a norm word is in
    ``penalty_on``). Pure."""
    if not l1 and not l2:
        return None
    names: list[str] = []
    for layer, mod in select_layers(model, penalty_on, include, exclude):
        for name in weight_names(mod, layer):
            if name not in names:
                names.append(name)
    return PenaltySpec(tuple(names), float(l1), float(l2))


def _resolve(model: nn.Module, spec: PenaltySpec) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for name in spec.params:
        layer, _, attr = name.rpartition(".")
        mod = model.get_submodule(layer) if layer else model
        for p in _tensors_of(mod, attr):
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out


def _ensure_registered(model: nn.Module, *_: Any) -> None:
    state = model.__dict__.get("_regfx_penalty")
    if not state or not state["params"]:
        return
    if _REGISTRY.get(state["params"][0]) is not None:
        return
    for p in state["params"]:
        _REGISTRY.add(p, (state["l1"], state["l2"]))
    _REGISTRY.bump()


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    _ensure_registered(module)


def apply_penalty(model: nn.Module, spec: PenaltySpec) -> None:
    """Attach the penalty to ``model`` (mutates it; replaces a previous regfx penalty)."""
    remove_penalty(model)
    params = _resolve(model, spec)
    model.__dict__["_regfx_penalty"] = {"params": params, "l1": spec.l1, "l2": spec.l2,
                                        "names": list(spec.params)}
    model.register_forward_pre_hook(_forward_pre_hook)
    _ensure_registered(model)
    if _REGISTRY.hook is None:
        _REGISTRY.hook = register_optimizer_step_pre_hook(_step_pre_hook)


def remove_penalty(model: nn.Module) -> None:
    """Detach a regfx penalty from ``model`` (mutates it)."""
    state = model.__dict__.pop("_regfx_penalty", None)
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _forward_pre_hook]:
        del model._forward_pre_hooks[key]
    if state:
        for p in state["params"]:
            _REGISTRY.discard(p)
        _REGISTRY.bump()


def penalized_parameters(model: nn.Module) -> dict[str, Any]:
    """``{"params": [...], "names": [...], "l1": x, "l2": y}`` or {} when none is attached."""
    return dict(model.__dict__.get("_regfx_penalty") or {})


# On CPU the penalty is applied in chunks of about this many bytes of weights, so that the
# weights, gradients and the sign scratch of one chunk stay in cache between the ops (64 KiB,
# 1 MiB, 4 MiB and whole buckets measured slower on a 2-core Xeon), and the signs go to a scratch
# buffer allocated once (allocating them every step costs page faults: measured ~2x slower). On
# GPUs whole-bucket foreach ops are best: they launch a few multi-tensor kernels, and the caching
# allocator makes temporaries cheap.
CPU_CHUNK_BYTES = 1 << 18


def _chunk_bounds(params: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, stop)`` index ranges splitting ``params`` into chunks (one range on GPUs)."""
    if not params or params[0].device.type != "cpu":
        return [(0, len(params))]
    bounds: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if i > start and size + nbytes > CPU_CHUNK_BYTES:
            bounds.append((start, i))
            start, size = i, 0
        size += nbytes
    bounds.append((start, len(params)))
    return bounds


def _scratch(params: list[torch.Tensor], bounds: list[tuple[int, int]]) -> list[list[torch.Tensor]]:
    """Per chunk, views shaped like its tensors into one flat buffer as large as the largest
    chunk (CPU only): where the signs for L1 are written, step after step."""
    sizes = [sum(p.numel() for p in params[a:b]) for a, b in bounds]
    flat = torch.empty(max(sizes, default=0), dtype=params[0].dtype, device=params[0].device)
    views = []
    for a, b in bounds:
        offset, chunk = 0, []
        for p in params[a:b]:
            chunk.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        views.append(chunk)
    return views


# (l1, l2, params, chunk bounds, sign scratch): one device and dtype
_Bucket = tuple[float, float, list[torch.Tensor], list[tuple[int, int]],
                list[list[torch.Tensor]] | None]


def _buckets(optimizer: torch.optim.Optimizer) -> list[_Bucket]:
    """``(l1, l2, params, chunk bounds, sign scratch)`` for the penalized parameters of
    ``optimizer``, grouped by coefficients; cached until the registry or the groups change."""
    signature = (_REGISTRY.current, tuple(len(g["params"]) for g in optimizer.param_groups))
    cache = optimizer.__dict__.get("_regfx_penalty_cache")
    if cache is not None and cache[0] == signature:
        return cache[1]  # type: ignore[no-any-return]
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            coeffs = _REGISTRY.get(p)
            if coeffs is not None:
                groups.setdefault(coeffs, []).append(p)
    buckets = []
    for (l1, l2), ps in groups.items():
        by_device: dict[tuple[torch.device, Any], list[torch.Tensor]] = {}
        for p in ps:
            by_device.setdefault((p.device, p.dtype), []).append(p)
        for (device, _), same in by_device.items():
            # chunks pay off only when several ops touch the same data (L1's sign, then add)
            bounds = _chunk_bounds(same) if l1 else [(0, len(same))]
            scratch = _scratch(same, bounds) if l1 and device.type == "cpu" else None
            buckets.append((l1, l2, same, bounds, scratch))
    optimizer.__dict__["_regfx_penalty_cache"] = (signature, buckets)
    return buckets


def _add_penalty_grads(buckets: list[_Bucket]) -> None:
    """``w.grad += l1 * sign(w) + l2 * w`` for every bucket, with foreach ops."""
    for l1, l2, params, bounds, scratch in buckets:
        if any(p.grad is None for p in params):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = cast(list[torch.Tensor], [p.grad for p in params])
        values = [p.detach() for p in params]
        with torch.no_grad():
            for i, (start, stop) in enumerate(bounds):
                g, v = grads[start:stop], values[start:stop]
                if not l1:
                    torch._foreach_add_(g, v, alpha=l2)
                elif scratch is None:
                    if l2:
                        torch._foreach_add_(g, v, alpha=l2)
                    torch._foreach_add_(g, torch._foreach_sign(v), alpha=l1)
                else:
                    # in cache: signs = sign(w) + (l2/l1) w, then g += l1 * signs
                    signs = scratch[i]
                    for w, sign in zip(v, signs, strict=True):
                        torch.sign(w, out=sign)
                    if l2:
                        torch._foreach_add_(signs, v, alpha=l2 / l1)
                    torch._foreach_add_(g, signs, alpha=l1)


def _penalty_value(buckets: list[_Bucket], like: torch.Tensor) -> torch.Tensor:
    """``l1 * sum|w| + (l2 / 2) * sum w**2`` over ``buckets``, detached, as a 0-d tensor with
    the dtype and device of ``like`` (foreach norms, accumulated in at least float32)."""
    acc = torch.promote_types(like.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=like.device)
    with torch.no_grad():
        for l1, l2, params, _, _ in buckets:
            values = [p.detach() for p in params]
            # low-precision weights: norms accumulated and returned in float32 (DTensor's
            # foreach_norm takes no dtype: there they come back in the weights' dtype)
            dtensor = hasattr(values[0], "full_tensor")
            low = values[0].dtype not in (torch.float32, torch.float64)
            kw: dict[str, Any] = {"dtype": torch.float32} if low and not dtensor else {}
            part: Any = 0.0
            if l1:
                part = l1 * torch.stack(torch._foreach_norm(values, 1, **kw)).to(acc).sum()
            if l2:
                norms = torch.stack(torch._foreach_norm(values, 2, **kw)).to(acc)
                part = part + (l2 / 2) * norms.square().sum()
            if hasattr(part, "full_tensor"):  # DTensor shards (FSDP2): the global value
                part = part.full_tensor()
            total = total + part.to(device=like.device, dtype=acc)
    return total.to(like.dtype)


class _PenalizedClosure:
    """The user's closure, then the penalty gradient: every evaluation (LBFGS evaluates the
    closure several times per step) sees the gradient of ``loss + penalty``, whatever the
    closure did to ``.grad`` (``zero_grad`` included). The returned loss includes the penalty
    value, as an explicit loss term would, because LBFGS's line search and its convergence test
    read it; ``None`` stays ``None``."""

    __slots__ = ("closure", "buckets")

    def __init__(self, closure: Any, buckets: list[_Bucket]) -> None:
        self.closure = closure
        self.buckets = buckets

    def __call__(self) -> Any:
        loss = self.closure()
        _add_penalty_grads(self.buckets)
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            return loss + _penalty_value(self.buckets, loss)
        return loss + float(_penalty_value(self.buckets, torch.zeros((), dtype=torch.float64)))


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
    """Without a closure, adds the penalty gradient now, just before the step. With one
    (``step(closure)``: Lightning, LBFGS), which typically zeroes the gradients and runs the
    backward, wraps it so the penalty gradient is added after each of its evaluations instead.
    ``args`` starts with the optimizer itself."""
    if not _REGISTRY.current:
        return None
    buckets = _buckets(optimizer)
    if not buckets:
        return None
    # a closure already wrapped (an optimizer whose step calls another's) is not wrapped twice
    closure = kwargs.get("closure")
    if closure is not None:
        if isinstance(closure, _PenalizedClosure):
            return None
        return args, {**kwargs, "closure": _PenalizedClosure(closure, buckets)}
    if len(args) > 1 and callable(args[1]):
        if isinstance(args[1], _PenalizedClosure):
            return None
        return (args[0], _PenalizedClosure(args[1], buckets), *args[2:]), kwargs
    _add_penalty_grads(buckets)
    return None


def penalty(model: nn.Module) -> torch.Tensor:
    """The current value of the attached L1/L2 penalty, differentiable, for logging.

    ``l1 * sum|w| + (l2 / 2) * sum w**2`` over the penalized parameters; a zero tensor when the
    model has no regfx penalty. Do not add it to the loss as well: the hook already applies it.

    Example:
        >>> m = regfx.transform(model, l2=1e-4)
        >>> float(regfx.penalty(m))
    """
    if not isinstance(model, nn.Module):
        raise RegfxError(f"penalty() needs an nn.Module, got {type(model).__name__}; pass the "
                         "transformed model")
    state = model.__dict__.get("_regfx_penalty")
    if not state or not state["params"]:
        first = next(iter(model.parameters()), None)
        return torch.zeros((), device=first.device if first is not None else None)
    params = state["params"]
    total = torch.zeros((), device=params[0].device, dtype=torch.float32)
    if state["l1"]:
        total = total + state["l1"] * torch.stack(
            [n.float() for n in torch._foreach_norm(params, 1)]).sum()
    if state["l2"]:
        total = total + (state["l2"] / 2) * torch.stack(
            [n.float() ** 2 for n in torch._foreach_norm(params, 2)]).sum()
    return total
