"""Spectral normalization with torch's semantics and a cheaper training step.

:class:`SpectralNorm` is a subclass of torch's own ``_SpectralNorm`` parametrization, registered
with ``torch.nn.utils.parametrize`` exactly like ``parametrizations.spectral_norm`` does: the same
state-dict keys (``parametrizations.weight.original``, ``parametrizations.weight.0._u``/``_v``),
the same initialization (15 power iterations from the same random draws), the same power
iteration (``u`` then ``v``, updated in place, only in training mode), the same ``eps``, the same
value ``W / sigma`` and the same gradient. What differs is the cost of a training step:

- ``sigma = u^H W v`` is not computed with a third matrix-vector product: after the last
  iteration ``v = W^H u / max(|W^H u|, eps)``, so ``u^H W v = |W^H u|^2 / max(|W^H u|, eps)``,
  read off the vector just computed (real, also for complex weights). ``^H`` is the conjugate
  transpose, as in torch's; for real weights it is the transpose.
- The backward is one fused function instead of autograd through ``mv``, ``vdot`` and ``div``:
  ``dL/dW = G / sigma - (<W, G> / sigma^2) u v^H`` as one scaling, one dot product and one
  in-place rank-1 update (``addr_``). When the backward itself is differentiated
  (``create_graph=True``: gradient penalties, Hessian-vector products) it runs as
  differentiable torch ops instead, recomputing ``sigma = u^H W v`` from the weight, so that
  second-order gradients are torch's.
- A model's spectral norms can be prepared together before its training forward
  (:mod:`regfx.transforms.spectral_engine`, on CUDA), which leaves each layer a
  :class:`Prepared` record. A layer's
  forward uses its record only if it was computed from the very tensors the layer holds now
  (the weight, ``_u`` and ``_v`` objects, at the versions and data pointers they had then);
  it then copies the new ``u``/``v`` into its buffers, so ``u``/``v`` advance exactly when and
  as often as the layer runs, as torch's do. Otherwise (tensors swapped by ``functional_call``,
  ``load_state_dict(assign=True)``, ``to_empty``, a replica, a weight changed in place, a
  second call in one forward, and inside a non-reentrant ``checkpoint``, whose recomputation
  in the backward must save the same tensors as the forward) the layer iterates on its own.

torch's own code runs unchanged in eval mode, for 1-d weights, while ``torch.compile`` traces
(``torch.compiler.is_compiling()``: a path dynamo traces without graph breaks) and under
``torch.func`` transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

__all__ = ["Member", "Prepared", "SpectralNorm", "collect", "iterate", "set_plain",
           "spectral_norm"]


def _to_matrix(t: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == 0 and t.ndim == 2:
        return t  # a Linear weight already is the matrix
    if dim != 0:
        t = t.movedim(dim, 0)
    return t.flatten(1)


def _from_matrix(mat: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_to_matrix` for a ``(h, w)`` matrix and a weight of ``shape``."""
    if dim == 0:
        return mat if mat.shape == shape else mat.reshape(shape)  # a view where it can be
    moved = list(shape)
    moved.insert(0, moved.pop(dim))
    return mat.reshape(moved).movedim(0, dim)


def differentiable_grad(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                        dim: int) -> torch.Tensor:
    """The gradient of ``weight / sigma``, ``sigma = u^H W_mat v`` (``u``, ``v`` constant, as in
    torch's), with respect to ``weight`` for the incoming ``grad``, written in differentiable
    torch ops: what the backward computes when it is itself differentiated (``create_graph``).

    ``sigma`` is recomputed from ``weight`` so that its dependence on the weight is in the graph;
    with ``s = 1 / conj(sigma)``: ``dL/dW = G s - <W, G> s^2 u v^H`` (torch's convention for
    complex gradients, which for real weights is the usual one)."""
    w_mat = _to_matrix(weight, dim)
    g_mat = _to_matrix(grad, dim)
    s = torch.vdot(u, torch.mv(w_mat, v)).reciprocal().conj()
    dot = torch.vdot(w_mat.reshape(-1), g_mat.reshape(-1))
    out = g_mat * s - torch.outer(u * (dot * s * s), v.conj())
    return _from_matrix(out, dim, weight.shape)


class _DivideBySigma(torch.autograd.Function):
    """``weight / sigma`` where ``sigma = u^H W_mat v`` with ``u``, ``v`` held constant.

    Takes ``inv_sigma = 1 / sigma`` and ``u_scaled = -u / conj(sigma)^2`` precomputed (``sigma``
    is real after a power iteration step, but need not be), so the backward
    ``G / conj(sigma) - (<W, G> / conj(sigma)^2) u v^H`` is a dot product, a scale and one
    ``addr_``. Differentiated again (``create_graph=True``), the backward is
    :func:`differentiable_grad` instead.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, inv_sigma: torch.Tensor, u: torch.Tensor,
                u_scaled: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
        out = weight * inv_sigma
        ctx.save_for_backward(weight, out, inv_sigma, u, u_scaled, v)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, normalized, inv_sigma, u, u_scaled, v = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated
            return differentiable_grad(grad, weight, u, v, dim), None, None, None, None, None
        g_mat = _to_matrix(grad, dim)
        # <W, G> = <W / sigma, G> * conj(sigma): the normalized weight, which the layer's own
        # backward has just read, is still in cache where the weight itself is not
        wn_mat = _to_matrix(normalized, dim)
        s = inv_sigma.conj()  # conj: free on real tensors
        dot = torch.vdot(wn_mat.reshape(-1), g_mat.reshape(-1)) / s
        out = g_mat * s  # a fresh tensor in matrix layout
        out.addr_(u_scaled * dot, v.conj())
        return _from_matrix(out, dim, grad.shape), None, None, None, None, None



@dataclass(eq=False, slots=True)
class Prepared:
    """One layer's power iteration and normalized weight, computed before the model's forward
    from the tensors named here at the versions named here; see :meth:`SpectralNorm.forward`."""

    weight: torch.Tensor
    weight_version: int
    weight_ptr: int  # where its data was: ``weight.data = other`` keeps identity and version
    u: torch.Tensor
    u_version: int
    v: torch.Tensor
    v_version: int
    new_u: torch.Tensor
    new_v: torch.Tensor
    normalized: torch.Tensor  # W / sigma, part of the prepared step's autograd graph

    def fits(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether this was computed from exactly these tensors in their current state."""
        return (weight is self.weight and u is self.u and v is self.v
                and weight._version == self.weight_version and u._version == self.u_version
                and v._version == self.v_version and weight.data_ptr() == self.weight_ptr)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``...) is running."""
    return bool(torch._C._are_functorch_transforms_active())


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active: inside a non-reentrant ``checkpoint`` (or
    ``save_on_cpu``). A layer there iterates on its own, in the forward as in its recomputation
    in the backward, which must save the same tensors."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def set_plain(module: nn.Module, name: str, value: Any) -> None:
    """Set a plain (non-tensor, non-module) attribute of ``module`` without
    ``nn.Module.__setattr__``'s checks, which cost microseconds per call on a per-layer path."""
    object.__setattr__(module, name, value)


class SpectralNorm(_SpectralNorm):
    """torch's spectral norm parametrization with a cheaper training step (see module doc)."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__(weight, n_power_iterations, dim, eps)
        self.prepared: Prepared | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a prepared record is part of one forward's autograd graph: never copied or pickled
        return {**super().__getstate__(), "prepared": None}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight / sigma``; in training mode the power iteration advances first."""
        if (weight.ndim == 1 or not self.training or torch.compiler.is_compiling()
                or functorch_active()):
            return super().forward(weight)
        buffers = self._buffers
        u_buf: torch.Tensor = buffers["_u"]  # type: ignore[assignment]
        v_buf: torch.Tensor = buffers["_v"]  # type: ignore[assignment]
        prepared = self.prepared
        if prepared is not None:
            set_plain(self, "prepared", None)
            if prepared.fits(weight, u_buf, v_buf) and not saved_tensor_hooks_active():
                with torch.no_grad():
                    torch._foreach_copy_([u_buf, v_buf], [prepared.new_u, prepared.new_v])
                return prepared.normalized
        weight_mat = self._reshape_weight_to_matrix(weight)
        eps = self.eps
        with torch.no_grad():
            for i in range(self.n_power_iterations):
                w_v = torch.mv(weight_mat, v_buf)
                if i + 1 < self.n_power_iterations:
                    torch.div(w_v, torch.linalg.vector_norm(w_v).clamp_min_(eps), out=u_buf)
                    u = u_buf
                else:  # a fresh tensor: saved for backward, then the new _u
                    u = w_v.div_(torch.linalg.vector_norm(w_v).clamp_min_(eps))
                    u_buf.copy_(u)
                w_t_u = torch.mv(weight_mat.mH, u)  # the conjugate transpose, as torch's
                norm = torch.linalg.vector_norm(w_t_u)
                clamped = norm.clamp_min(eps)
                if i + 1 < self.n_power_iterations:
                    torch.div(w_t_u, clamped, out=v_buf)
            v = w_t_u.div_(clamped)  # a fresh tensor: saved for backward, then the new _v
            v_buf.copy_(v)
            # sigma = u^H W v = |W^H u|^2 / max(|W^H u|, eps); keep 1/sigma and -u/sigma^2
            inv_sigma = clamped.div_(norm * norm)
            u_scaled = u * inv_sigma.square().neg_()
        return _DivideBySigma.apply(weight, inv_sigma.to(weight.dtype), u, u_scaled, v, self.dim)  # type: ignore[no-any-return]


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: int | None = None) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>``; the drop-in equivalent of
    ``torch.nn.utils.parametrizations.spectral_norm`` (same arguments, same defaults)."""
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations, dim, eps))
    return module


@dataclass(frozen=True, eq=False)
class Member:
    """A :class:`SpectralNorm` and the parametrization list holding it; :attr:`weight` reads the
    list's stored weight afresh each time (it is swapped by ``functional_call``, assigned by
    ``load_state_dict(assign=True)``, replaced by ``to_empty``)."""

    plist: nn.Module
    norm: SpectralNorm

    @property
    def weight(self) -> torch.Tensor:
        return self.plist.original  # type: ignore[return-value]


def collect(model: nn.Module) -> list[Member]:
    """Every regfx :class:`SpectralNorm` of ``model`` with its parametrization list, tied ones
    once (in module order)."""
    out: list[Member] = []
    seen: set[SpectralNorm] = set()
    for mod in model.modules():
        if not parametrize.is_parametrized(mod):
            continue
        for plist in mod.parametrizations.values():  # type: ignore[union-attr, operator]
            for p in plist:
                if isinstance(p, SpectralNorm) and p not in seen:
                    seen.add(p)
                    out.append(Member(plist, p))
    return out


def iterate(mats: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor], n: int,
            eps: float) -> tuple[list[torch.Tensor], ...]:
    """``n`` power iterations of every matrix in ``mats`` from ``us``/``vs`` (left as they are):
    one ``mv`` per matrix and half-step, both of a matrix back to back, every vector operation
    one foreach op over all.
    Returns ``1/sigma`` (real), the new ``u``, ``-u/sigma^2`` and the new ``v`` of each, all
    fresh tensors. Complex matrices iterate with the conjugate transpose, as torch's."""
    new_u, new_v = list(us), list(vs)
    with torch.no_grad():
        for _ in range(n):
            # W v and W^H (W v) back to back, while W is in cache; then, with c = max(|W v|, eps),
            # u = W v / c and W^H u = W^H (W v) / c
            w_v, w_t_w_v = [], []
            for m, v in zip(mats, new_v, strict=True):
                w_v.append(torch.mv(m, v))
                w_t_w_v.append(torch.mv(m.mH, w_v[-1]))
            clamped_u = torch._foreach_clamp_min(torch._foreach_norm(w_v), eps)
            new_u = list(torch._foreach_div(w_v, clamped_u))
            w_t_u = torch._foreach_div(w_t_w_v, clamped_u)
            norms_v = torch._foreach_norm(w_t_u)
            clamped = torch._foreach_clamp_min(norms_v, eps)
            new_v = list(torch._foreach_div(w_t_u, clamped))
        # sigma = |W^H u|^2 / max(|W^H u|, eps); keep 1/sigma and -u/sigma^2
        inv = torch._foreach_div(clamped, torch._foreach_mul(norms_v, norms_v))
        neg_inv2 = torch._foreach_neg(torch._foreach_mul(inv, inv))
        u_scaled = torch._foreach_mul(new_u, neg_inv2)
    return list(inv), new_u, list(u_scaled), new_v
