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
  in-place rank-1 update (``addr_``): three passes over the weight instead of about five. When
  the backward itself is differentiated (``create_graph=True``: gradient penalties, Hessian-
  vector products) it runs as differentiable torch ops instead, recomputing ``sigma = u^H W v``
  from the weight, so that second-order gradients are torch's.
- Before each training forward of the transformed model (a forward pre-hook installed by
  :func:`install`), the power iterations of all its spectral norms advance together. On CPUs
  (:func:`foreach_step`): one matrix-vector product per layer and per half-step, and every
  vector operation (norms, divisions, the scalars for the backward) as one foreach op over all
  layers, so a layer's own forward is one multiplication. On GPUs
  (:mod:`regfx.transforms.spectral_fused`): all layers' power iterations, normalized weights
  and weight gradients as one fused step, replayed as CUDA graphs. Where that cannot be used
  (mixed dtypes or settings, non-dense weights), :func:`batched_step`: same-shaped weights are
  stacked once and each half-step is one batched product; each layer's forward is one
  multiplication by ``1/sigma``, and autograd differentiates the batched ``sigma = u^T W v``.
  On a CPU neither pays: a batched matrix-vector product is slower than one per layer, and the
  fused step's copies cost more than they save (both measured), hence the paths.
  A layer called outside that forward, or a second time in it, iterates on its own, as torch's
  does.

In eval mode it runs torch's code unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

__all__ = ["SpectralNorm", "spectral_norm"]


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
        ctx.save_for_backward(weight, inv_sigma, u, u_scaled, v)
        ctx.dim = dim
        return weight * inv_sigma

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, inv_sigma, u, u_scaled, v = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated
            return differentiable_grad(grad, weight, u, v, dim), None, None, None, None, None
        g_mat = _to_matrix(grad, dim)
        w_mat = _to_matrix(weight, dim)
        out = g_mat * inv_sigma.conj()  # a fresh tensor in matrix layout (conj: free if real)
        out.addr_(u_scaled * torch.vdot(w_mat.reshape(-1), g_mat.reshape(-1)), v.conj())
        return _from_matrix(out, dim, grad.shape), None, None, None, None, None


def power_iteration_batched(mats: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` power iterations on a stack of matrices ``(B, h, w)`` at once, as torch's
    ``_SpectralNorm._power_method`` does on each (``u`` first, then ``v``); returns the new
    ``u`` (B, h) and ``v`` (B, w)."""
    for _ in range(n):
        u = F.normalize(torch.bmm(mats, v.unsqueeze(-1)).squeeze(-1), dim=1, eps=eps)
        # W^H u as the row (u^H W)^*; conj() is free on real tensors (returns them as they are)
        v = F.normalize(torch.bmm(u.conj().unsqueeze(1), mats).squeeze(1).conj(), dim=1, eps=eps)
    return u, v


class SpectralNorm(_SpectralNorm):
    """torch's spectral norm parametrization with a cheaper training step (see module doc)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight / sigma``; in training mode the power iteration advances first."""
        if weight.ndim == 1 or not self.training:
            return super().forward(weight)
        pending = self.__dict__.pop("_regfx_pending", None)
        if pending is not None and pending[1] == weight._version:
            # u/v already advanced for this forward by the model's pre-hook
            kind = pending[0]
            if kind == "ready":  # spectral_fused: the normalized weight itself
                return pending[2]  # type: ignore[no-any-return]
            if kind == "scale":  # batched_step: 1/sigma, differentiable
                return weight * pending[2]
            return _DivideBySigma.apply(weight, *pending[2:], self.dim)  # type: ignore[no-any-return]
        weight_mat = self._reshape_weight_to_matrix(weight)
        eps = self.eps
        with torch.no_grad():
            for i in range(self.n_power_iterations):
                w_v = torch.mv(weight_mat, self._v)
                if i + 1 < self.n_power_iterations:
                    torch.div(w_v, torch.linalg.vector_norm(w_v).clamp_min_(eps), out=self._u)
                    u = self._u
                else:  # a fresh tensor: saved for backward, then the new _u
                    u = w_v.div_(torch.linalg.vector_norm(w_v).clamp_min_(eps))
                    self._u.copy_(u)
                w_t_u = torch.mv(weight_mat.mH, u)  # the conjugate transpose, as torch's
                norm = torch.linalg.vector_norm(w_t_u)
                clamped = norm.clamp_min(eps)
                if i + 1 < self.n_power_iterations:
                    torch.div(w_t_u, clamped, out=self._v)
            v = w_t_u.div_(clamped)  # a fresh tensor: saved for backward, then the new _v
            self._v.copy_(v)
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


def batched_step(norms: list[tuple[SpectralNorm, torch.Tensor]]) -> None:
    """Advance the power iteration of many spectral norms at once and compute their ``sigma``.

    For each group of same-shaped weights: one stacked copy of the weights, one batched product
    per power-iteration half-step, and ``sigma = u^H W v`` as one batched product that autograd
    differentiates (so the gradient through ``sigma`` is torch's, to any order). Each
    parametrization gets its ``1 / sigma`` for its next forward, which is then one
    multiplication. ``norms`` pairs each parametrization with its stored weight. Called before a
    training forward of the model.
    """
    groups: dict[tuple[Any, ...], list[tuple[SpectralNorm, torch.Tensor]]] = {}
    for sn, weight in norms:
        if weight.ndim < 2 or not sn.training:
            continue
        key = (sn._u.shape[0], sn._v.shape[0], weight.dtype, weight.device, sn.n_power_iterations,
               sn.eps, sn.dim)
        groups.setdefault(key, []).append((sn, weight))
    for (_h, _w, _dtype, device, n, eps, dim), members in groups.items():
        if len(members) == 1:
            continue  # a lone weight: its own forward does the iteration, as torch's does
        with torch.autocast(device.type, enabled=False):
            mats = torch.stack([_to_matrix(weight, dim) for _, weight in members])
            with torch.no_grad():
                u0 = torch.stack([sn._u for sn, _ in members])
                v0 = torch.stack([sn._v for sn, _ in members])
                u, v = power_iteration_batched(mats.detach(), u0, v0, n, eps)
                torch._foreach_copy_([sn._u for sn, _ in members], list(u.unbind(0)))
                torch._foreach_copy_([sn._v for sn, _ in members], list(v.unbind(0)))
            sigma = torch.bmm(mats, v.unsqueeze(-1)).squeeze(-1).mul(u.conj()).sum(1)  # u^H W v
            inv = sigma.reciprocal()
        for (sn, weight), inv_i in zip(members, inv.unbind(0), strict=True):
            sn.__dict__["_regfx_pending"] = ("scale", weight._version, inv_i)


def foreach_step(norms: list[tuple[SpectralNorm, torch.Tensor]]) -> None:
    """Advance the power iteration of many spectral norms with one matrix-vector product per
    layer and everything else as a handful of foreach ops over all layers, then leave each its
    ``1/sigma``, ``u``, ``-u/sigma^2`` and ``v`` for its next forward (the CPU counterpart of
    :func:`batched_step`, for which stacking costs more than it saves)."""
    members = [(sn, w) for sn, w in norms if w.ndim >= 2 and sn.training]
    if len(members) < 2:
        return
    eps = members[0][0].eps
    if any(sn.eps != eps or sn.n_power_iterations != members[0][0].n_power_iterations
           for sn, _ in members):
        return  # mixed settings: each layer iterates on its own
    mats = [sn._reshape_weight_to_matrix(w) for sn, w in members]
    inv, new_u, u_scaled, new_v = _iterate(mats, [sn._u for sn, _ in members],
                                           [sn._v for sn, _ in members],
                                           members[0][0].n_power_iterations, eps)
    for (sn, weight), *scalars in zip(members, inv, new_u, u_scaled, new_v, strict=True):
        sn.__dict__["_regfx_pending"] = ("divide", weight._version, *scalars)


def _iterate(mats: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor], n: int,
             eps: float) -> tuple[list[torch.Tensor], ...]:
    """``n`` power iterations of every matrix in ``mats``, updating ``us``/``vs`` in place:
    one ``mv`` per matrix and half-step, every vector operation one foreach op over all.
    Returns ``1/sigma`` (real), fresh copies of the new ``u``, ``-u/sigma^2`` and a fresh copy
    of the new ``v`` for each. Complex matrices iterate with the conjugate transpose, as torch's."""
    with torch.no_grad():
        for _ in range(n):
            w_v = [torch.mv(m, v) for m, v in zip(mats, vs, strict=True)]
            new_u = torch._foreach_div(w_v, torch._foreach_clamp_min(torch._foreach_norm(w_v), eps))
            torch._foreach_copy_(us, new_u)
            w_t_u = [torch.mv(m.mH, u) for m, u in zip(mats, us, strict=True)]
            norms_v = torch._foreach_norm(w_t_u)
            clamped = torch._foreach_clamp_min(norms_v, eps)
            new_v = torch._foreach_div(w_t_u, clamped)
            torch._foreach_copy_(vs, new_v)
        # sigma = |W^H u|^2 / max(|W^H u|, eps); keep 1/sigma and -u/sigma^2
        inv = torch._foreach_div(clamped, torch._foreach_mul(norms_v, norms_v))
        neg_inv2 = torch._foreach_neg(torch._foreach_mul(inv, inv))
        u_scaled = torch._foreach_mul(new_u, neg_inv2)
    return list(inv), list(new_u), list(u_scaled), list(new_v)


def collect(model: nn.Module) -> list[tuple[SpectralNorm, torch.Tensor]]:
    """Every regfx :class:`SpectralNorm` of ``model`` with its stored weight, tied ones once."""
    out: list[tuple[SpectralNorm, torch.Tensor]] = []
    seen: set[int] = set()
    for mod in model.modules():
        plists = getattr(mod, "parametrizations", None)
        if plists is None or not parametrize.is_parametrized(mod):
            continue
        for plist in plists.values():
            for p in plist:
                if isinstance(p, SpectralNorm) and id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, plist.original))
    return out


def _pre_hook(model: nn.Module, args: Any) -> None:
    if not model.training:
        return
    norms = model.__dict__.get("_regfx_spectral")
    if norms is None:
        norms = model.__dict__["_regfx_spectral"] = collect(model)
    if len(norms) < 2 or not _owns(model, norms):
        return
    # Where kernel launches dominate (GPUs) all layers go as one fused step replayed as CUDA
    # graphs, or failing that as batched products; on CPUs a batched matrix-vector product is
    # slower than one mv per layer (measured), so each layer has its mv and the rest is foreach.
    path = model.__dict__.get("_regfx_path") or ("foreach" if norms[0][1].device.type == "cpu" else "fused")
    if path == "fused":
        from . import spectral_fused

        if spectral_fused.fused_step(model, norms, use_graphs=norms[0][1].is_cuda):
            return
        path = "batched"
    if path == "batched":
        batched_step(norms)
    else:
        foreach_step(norms)


def _post_hook(model: nn.Module, args: Any, output: Any) -> None:
    # A layer the forward did not call leaves its 1/sigma behind, part of an autograd graph:
    # drop it, so that nothing stale is used later and copy.deepcopy(model) keeps working.
    for sn, _ in model.__dict__.get("_regfx_spectral") or ():
        sn.__dict__.pop("_regfx_pending", None)


def _owns(model: nn.Module, norms: list[tuple[SpectralNorm, torch.Tensor]]) -> bool:
    """Whether ``norms`` are ``model``'s own. Not for a replica made by ``nn.DataParallel``,
    which shares its original's ``__dict__`` entries (this list among them) but has copies of its
    submodules: there each layer iterates on its own, on the replica's vectors, as torch's does."""
    site = model.__dict__.get("_regfx_spectral_first")
    if site is None:
        return True
    try:
        plists = cast(nn.ModuleDict, model.get_submodule(site[0]).parametrizations)
        plist = cast(nn.ModuleList, plists[site[1]])
    except (AttributeError, KeyError):
        return False
    return any(p is norms[0][0] for p in plist)


def install(model: nn.Module) -> None:
    """Batch the power iterations of ``model``'s spectral norms before each training forward."""
    uninstall(model)
    norms = collect(model)
    if len(norms) > 1:
        model.__dict__["_regfx_spectral"] = norms
        first = norms[0][0]
        model.__dict__["_regfx_spectral_first"] = next(
            (path, key) for path, mod in model.named_modules()
            if isinstance(getattr(mod, "parametrizations", None), nn.ModuleDict)
            for key, plist in mod.parametrizations.items() if any(p is first for p in plist))
        model.register_forward_pre_hook(_pre_hook)
        model.register_forward_hook(_post_hook)


def uninstall(model: nn.Module) -> None:
    """Remove what :func:`install` added (the hook and the cached list)."""
    model.__dict__.pop("_regfx_spectral", None)
    model.__dict__.pop("_regfx_spectral_first", None)
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _pre_hook]:
        del model._forward_pre_hooks[key]
    for key in [k for k, h in model._forward_hooks.items() if h is _post_hook]:
        del model._forward_hooks[key]
    for mod in model.modules():
        mod.__dict__.pop("_regfx_pending", None)
    from . import spectral_fused

    spectral_fused.forget(model)
