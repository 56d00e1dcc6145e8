"""L1/L2 penalties applied by an optimizer step pre-hook, so the training loop does not change.

Semantics: the parameter update equals the one obtained by adding
``l1 * sum|w| + (l2 / 2) * sum w**2`` to the loss once per optimizer step. The penalty gradient
``l1 * sign(w) + l2 * w`` is added to ``w.grad`` just before ``optimizer.step()`` runs, which makes
it right under gradient accumulation (added once, not per micro-batch), autocast and GradScaler
(``scaler.step`` unscales the gradients before the step, and skips the step, hook included, on
overflow), DDP (gradients are already all-reduced; the penalty gradient is the same on every
rank) and FSDP2 (``fully_shard``: each rank adds the penalty gradient of its own shard to its
shard of the reduced gradient, which is exactly the sharded gradient of the penalty, also for
uneven or empty shards). The gradient is added with foreach ops, a few calls per device and
dtype, not a Python loop of tensor ops per parameter.

``optimizer.step(closure)`` (PyTorch Lightning's automatic optimization, LBFGS): the closure
usually zeroes the gradients and runs the backward inside the step, which would erase a gradient
added before it. There the hook adds nothing itself but hands the step a wrapped closure that adds
the penalty gradient after every evaluation of the user's closure, and returns the closure's loss
plus the penalty value (detached), as an explicit loss term would: LBFGS's line search and
convergence test read that value.

State: one :class:`PenaltyState` per model, in the model's :class:`~regfx.state.RegfxState`
(``regfx.state_of(model).penalty``), owns what is penalized
and the handle of the optimizer step pre-hook it registered (removed through that handle). It
finds the parameters where they live, by module and attribute name, at every step: never by the
identity they had when the penalty was attached, which ``fully_shard`` (DTensor parameters),
``load_state_dict(assign=True)``, ``to_empty`` and ``.to()`` change. A deep copy (or an unpickled
copy) of a transformed model gets a state of its own, bound to its own modules, with a hook of
its own.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from regfx.distributed import all_reduce_sum, is_dtensor, local_tensor
from regfx.errors import RegfxError
from regfx.select import select_layers, weight_names
from regfx.state import ensure_state, state_of

__all__ = ["PenaltySpec", "PenaltyState", "plan_penalty", "apply_penalty", "remove_penalty",
           "penalty", "penalty_state", "penalized_parameters"]

@dataclass(frozen=True)
class PenaltySpec:
    """``l1``/``l2`` on the parameters named ``params`` (logical names, ``fc.weight``)."""

    params: tuple[str, ...]
    l1: float
    l2: float


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




@dataclass(eq=False)
class _Bucket:
    """Penalized parameters of one device and dtype, as the optimizer holds them (DTensors under
    FSDP2), with the CPU chunking of their local tensors and the scratch for L1's signs."""

    params: list[torch.Tensor]
    bounds: list[tuple[int, int]]
    scratch: list[list[torch.Tensor]] | None
    sharded: bool = False  # DTensors: the foreach ops run on their local shards

    def values(self) -> list[torch.Tensor]:
        if self.sharded:
            return [local_tensor(p) for p in self.params]
        return [p.detach() for p in self.params]

    def grads(self) -> list[torch.Tensor]:
        if self.sharded:
            return [local_tensor(p.grad) for p in self.params]  # type: ignore[arg-type]
        return [p.grad for p in self.params]  # type: ignore[misc]


@dataclass(eq=False)
class _OptimizerView:
    """The buckets of one optimizer, valid while its group sizes and the model's penalized
    parameters (the very tensors) stay what they were when they were built."""

    group_sizes: tuple[int, ...]
    params: list[torch.Tensor | None]
    buckets: list[_Bucket]
    frozen: list[torch.Tensor]  # penalized once they require gradients again


Slot = tuple[nn.Module, str]
"""Where a penalized leaf parameter lives: the module whose ``_parameters`` holds it (the layer,
or the ``ParametrizationList`` of a parametrized weight) and the key there."""


@dataclass(eq=False)
class PenaltyState:
    """The L1/L2 penalty attached to one model.

    Attributes:
        names: the logical names of the penalized weights (``fc.weight``).
        l1, l2: the coefficients.
        slots: where each penalized leaf parameter lives (module, key); read at every step.
        handle: the optimizer step pre-hook this state registered, or None once detached.
    """

    names: tuple[str, ...]
    l1: float
    l2: float
    slots: tuple[Slot, ...]
    handle: RemovableHandle | None = field(default=None, repr=False)
    views: weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptimizerView] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False)

    def current(self) -> list[torch.Tensor | None]:
        """The tensor in every slot now (None where it is gone)."""
        return [owner._parameters.get(key) for owner, key in self.slots]

    def parameters(self) -> list[torch.Tensor]:
        """The penalized parameters as the model holds them now, each once."""
        seen: set[int] = set()
        out = []
        for p in self.current():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def attach(self) -> None:
        """Register this state's optimizer step pre-hook (once); it goes when the state does."""
        if self.handle is None:
            self.handle = register_optimizer_step_pre_hook(_StepHook(self))
            weakref.finalize(self, self.handle.remove)

    def detach(self) -> None:
        """Remove the hook; the penalty no longer applies."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.views = weakref.WeakKeyDictionary()

    def buckets(self, optimizer: torch.optim.Optimizer) -> list[_Bucket]:
        """This model's penalized parameters that ``optimizer`` updates, bucketed; rebuilt
        when the optimizer's groups or the model's parameters change."""
        current = self.current()
        sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        view = self.views.get(optimizer)
        if (view is not None and view.group_sizes == sizes
                and all(map(operator.is_, view.params, current))
                and all(p.requires_grad for b in view.buckets for p in b.params)
                and not any(p.requires_grad for p in view.frozen)):
            return view.buckets
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        chosen: dict[int, torch.Tensor] = {}
        frozen: list[torch.Tensor] = []
        for p in current:
            if p is not None and id(p) in in_optimizer:
                if p.requires_grad:
                    chosen.setdefault(id(p), p)
                else:
                    frozen.append(p)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in chosen.values():
            by_device.setdefault((p.device, p.dtype), []).append(p)
        buckets = []
        for (device, _), same in by_device.items():
            local = [local_tensor(p) for p in same]
            # chunks pay off only when several ops touch the same data (L1's sign, then add)
            bounds = _chunk_bounds(local) if self.l1 else [(0, len(local))]
            scratch = _scratch(local, bounds) if self.l1 and device.type == "cpu" else None
            buckets.append(_Bucket(same, bounds, scratch, any(map(is_dtensor, same))))
        self.views[optimizer] = _OptimizerView(sizes, current, buckets, frozen)
        return buckets

    def __getstate__(self) -> dict[str, Any]:
        # the hook and the per-optimizer buckets belong to this state: a copy makes its own
        return {**self.__dict__, "handle": None, "views": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.views = weakref.WeakKeyDictionary()
        self.attach()


class _StepHook:
    """The global optimizer step pre-hook of one :class:`PenaltyState` (weakly referenced, so
    the hook never keeps a model alive)."""

    __slots__ = ("state",)

    def __init__(self, state: PenaltyState) -> None:
        self.state = weakref.ref(state)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        state = self.state()
        if state is None:
            return None
        return _before_step(state, optimizer, args, kwargs)


def penalty_state(model: nn.Module) -> PenaltyState | None:
    """The penalty attached to ``model`` by :func:`apply_penalty`, or None."""
    found = state_of(model)
    return found.penalty if found is not None else None


def _slots(model: nn.Module, spec: PenaltySpec) -> tuple[Slot, ...]:
    """Where the leaf parameters behind each name of ``spec`` live, seeing through
    parametrizations (``parametrizations.weight.original``, weight norm's ``original0/1``)."""
    out: list[Slot] = []
    for name in spec.params:
        layer, _, attr = name.rpartition(".")
        mod = model.get_submodule(layer) if layer else model
        if parametrize.is_parametrized(mod, attr):
            plist = cast(nn.Module, mod.parametrizations[attr])  # type: ignore[index]
            keys = [k for k, p in plist._parameters.items() if isinstance(p, nn.Parameter)]
            candidates = [(plist, k) for k in keys]
        else:
            candidates = [(mod, attr)] if isinstance(mod._parameters.get(attr), nn.Parameter) else []
        for slot in candidates:
            if not any(o is slot[0] and k == slot[1] for o, k in out):
                out.append(slot)
    return tuple(out)


def apply_penalty(model: nn.Module, spec: PenaltySpec) -> None:
    """Attach the penalty to ``model`` (mutates it; replaces a previous regfx penalty)."""
    remove_penalty(model)
    state = PenaltyState(spec.params, spec.l1, spec.l2, _slots(model, spec))
    state.attach()
    ensure_state(model).penalty = state


def remove_penalty(model: nn.Module) -> None:
    """Detach a regfx penalty from ``model`` (mutates it)."""
    found = state_of(model)
    if found is not None and found.penalty is not None:
        found.penalty.detach()
        found.penalty = None


def penalized_parameters(model: nn.Module) -> dict[str, Any]:
    """``{"params": [...], "names": [...], "l1": x, "l2": y}`` or {} when none is attached;
    ``params`` are the parameters as the model holds them now (DTensors once sharded)."""
    state = penalty_state(model)
    if state is None:
        return {}
    return {"params": state.parameters(), "names": list(state.names), "l1": state.l1,
            "l2": state.l2}


def _add_penalty_grads(l1: float, l2: float, buckets: list[_Bucket]) -> None:
    """``w.grad += l1 * sign(w) + l2 * w`` for every bucket, with foreach ops on the local
    tensors (each rank's shard under FSDP2)."""
    for bucket in buckets:
        params = bucket.params
        if any(p.grad is None for p in params):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        with torch.no_grad():
            grads, values = bucket.grads(), bucket.values()
            for i, (start, stop) in enumerate(bucket.bounds):
                g, v = grads[start:stop], values[start:stop]
                if not l1:
                    torch._foreach_add_(g, v, alpha=l2)
                elif bucket.scratch is None:
                    if l2:
                        torch._foreach_add_(g, v, alpha=l2)
                    torch._foreach_add_(g, torch._foreach_sign(v), alpha=l1)
                else:
                    # in cache: signs = sign(w) + (l2/l1) w, then g += l1 * signs
                    signs = bucket.scratch[i]
                    for w, sign in zip(v, signs, strict=True):
                        torch.sign(w, out=sign)
                    if l2:
                        torch._foreach_add_(signs, v, alpha=l2 / l1)
                    torch._foreach_add_(g, signs, alpha=l1)


def _local_value(l1: float, l2: float, tensors: list[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """``l1 * sum|w| + (l2 / 2) * sum w**2`` over plain tensors (differentiable where they
    are), as a 0-d tensor on ``device`` in at least float32 (foreach norms per device and dtype,
    low-precision ones accumulated in float32)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (_, dtype), same in groups.items():
        acc = torch.promote_types(dtype, torch.float32)
        kw: dict[str, Any] = {} if acc == dtype else {"dtype": torch.float32}
        if l1:
            norms = torch.stack(torch._foreach_norm(same, 1, **kw)).to(acc)
            total = total + (l1 * norms.sum()).to(device)
        if l2:
            norms = torch.stack(torch._foreach_norm(same, 2, **kw)).to(acc)
            total = total + ((l2 / 2) * norms.square().sum()).to(device)
    return total


def _value(l1: float, l2: float, params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The penalty over ``params``: differentiable for plain tensors; for DTensor shards the
    global value, summed over the ranks with one all-reduce per mesh (not differentiable)."""
    plain: list[torch.Tensor] = []
    sharded: dict[tuple[int, Any], list[torch.Tensor]] = {}
    for p in params:
        if is_dtensor(p):
            sharded.setdefault((id(p.device_mesh), tuple(p.placements)), []).append(p)  # type: ignore[attr-defined]
        else:
            plain.append(p)
    total = _local_value(l1, l2, plain, device)
    for group in sharded.values():
        with torch.no_grad():
            part = _local_value(l1, l2, [local_tensor(p) for p in group], device)
        total = total + all_reduce_sum(part, like=group[0])
    return total


class _PenalizedClosure:
    """The user's closure, then the penalty gradient: every evaluation (LBFGS evaluates the
    closure several times per step) sees the gradient of ``loss + penalty``, whatever the
    closure did to ``.grad`` (``zero_grad`` included). The returned loss includes the penalty
    value, as an explicit loss term would, because LBFGS's line search and its convergence test
    read it; ``None`` stays ``None``. Several penalized models wrap the closure one inside the
    other, each once."""

    __slots__ = ("closure", "state", "buckets")

    def __init__(self, closure: Any, state: PenaltyState, buckets: list[_Bucket]) -> None:
        self.closure = closure
        self.state = state
        self.buckets = buckets

    def covers(self, state: PenaltyState) -> bool:
        c: Any = self
        while isinstance(c, _PenalizedClosure):
            if c.state is state:
                return True
            c = c.closure
        return False

    def value(self, device: torch.device) -> torch.Tensor:
        params = [p for b in self.buckets for p in b.params]
        with torch.no_grad():
            return _value(self.state.l1, self.state.l2, params, device)

    def __call__(self) -> Any:
        loss = self.closure()
        _add_penalty_grads(self.state.l1, self.state.l2, self.buckets)
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            return loss + self.value(loss.device).to(loss.dtype)
        return loss + float(self.value(torch.device("cpu")))


def _wrap(closure: Any, state: PenaltyState, buckets: list[_Bucket]) -> Any:
    """``closure`` wrapped for ``state``, or None where it already is (an optimizer whose step
    calls another's with the same closure)."""
    if isinstance(closure, _PenalizedClosure) and closure.covers(state):
        return None
    return _PenalizedClosure(closure, state, buckets)


def _before_step(state: PenaltyState, optimizer: torch.optim.Optimizer, args: Any,
                 kwargs: Any) -> Any:
    """Without a closure, adds the penalty gradient now, just before the step. With one
    (``step(closure)``: Lightning, LBFGS), which typically zeroes the gradients and runs the
    backward, wraps it so the penalty gradient is added after each of its evaluations instead.
    ``args`` starts with the optimizer itself."""
    buckets = state.buckets(optimizer)
    if not buckets:
        return None
    closure = kwargs.get("closure")
    if closure is not None:
        wrapped = _wrap(closure, state, buckets)
        return None if wrapped is None else (args, {**kwargs, "closure": wrapped})
    if len(args) > 1 and callable(args[1]):
        wrapped = _wrap(args[1], state, buckets)
        return None if wrapped is None else ((args[0], wrapped, *args[2:]), kwargs)
    _add_penalty_grads(state.l1, state.l2, buckets)
    return None


def penalty(model: nn.Module) -> torch.Tensor:
    """The current value of the attached L1/L2 penalty, for logging.

    ``l1 * sum|w| + (l2 / 2) * sum w**2`` over the penalized parameters, in at least float32;
    a zero tensor when the model has no regfx penalty. Do not add it to the loss as well: the
    hook already applies it. Differentiable, except for a model sharded with ``fully_shard``:
    there each rank sums its shards and one all-reduce gives every rank the global value
    (call it on every rank).

    Example:
        >>> m = regfx.transform(model, l2=1e-4)
        >>> float(regfx.penalty(m))
    """
    if not isinstance(model, nn.Module):
        raise RegfxError(f"penalty() needs an nn.Module, got {type(model).__name__}; pass the "
                         "transformed model")
    state = penalty_state(model)
    params = state.parameters() if state is not None else []
    if not params:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else None
        return torch.zeros((), device=device)
    assert state is not None
    return _value(state.l1, state.l2, params, params[0].device)
