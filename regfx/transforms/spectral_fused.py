"""Every spectral norm of a model as one operation per training step, replayed as CUDA graphs.

On a GPU a training step of a convolutional network is mostly kernel launches, and a spectral
norm per layer adds a dozen or more: the power iteration, sigma, the division and the backward
through all of them. Here the whole work for all layers of a model is two operations:

- before the training forward, one autograd function advances every power iteration and
  returns every normalized weight ``W / sigma``, all views of one flat buffer (each with its
  weight's strides); each layer's parametrization then just hands out its own;
- in the backward, the same function receives the gradients of all normalized weights at once,
  copies them into one flat buffer and computes every
  ``dL/dW = G / sigma - (<W, G> / sigma^2) u v^H`` (``^H``: conjugate transpose, as in torch's
  power iteration, which complex weights iterate with too).

Each of the two is a fixed sequence of kernels over tensors that stay where they are between
steps (the weights, the ``u``/``v`` buffers, and static input/output buffers), so on CUDA each is
captured once as a CUDA graph and then replayed: one launch plus a copy or two, however many
layers there are. The first call of each runs eagerly (it warms up the libraries), the second
captures; the graphs are rebuilt when a weight or vector moves (``model.to(...)``), changes
dtype or shape. The arithmetic is :func:`regfx.transforms.spectral.iterate`'s and
:class:`~regfx.transforms.spectral._DivideBySigma`'s; without CUDA graphs (on a CPU in tests, or
while compiling or capturing) the same bodies run eagerly.

Semantics are torch's: each layer gets a :class:`~regfx.transforms.spectral.Prepared` record
with its new ``u``/``v``, which it copies into its buffers when it runs (so ``u``/``v`` advance
once per training forward of a layer that runs, and not at all for one that does not), a layer
used twice in one forward iterates again for its second use, a layer not called gets no gradient (``None``),
changing a weight in place between forward and backward raises autograd's usual error, and a
backward that is itself differentiated (``create_graph=True``) runs each layer's gradient as
differentiable torch ops (:func:`regfx.transforms.spectral.differentiable_grad`), so that
second-order gradients are torch's; that backward runs eagerly, never as a graph.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from regfx.errors import RegfxWarning
from regfx.transforms.spectral import (
    Prepared,
    SpectralNorm,
    _from_matrix,
    _to_matrix,
    differentiable_grad,
    iterate,
    set_plain,
)

__all__ = ["FusedSpectral", "eligible"]

Members = list[tuple[SpectralNorm, torch.Tensor]]


def _dense_order(t: torch.Tensor) -> list[int] | None:
    """Dimensions of ``t`` ordered so that ``t.permute(order)`` is contiguous, if ``t`` is dense."""
    strides = t.stride()
    order = sorted(range(t.ndim), key=lambda d: (-strides[d], d))
    return order if t.permute(order).is_contiguous() else None


def eligible(members: Members) -> bool:
    """Whether ``members`` can share one fused step: two or more, in training mode, on one
    device with one dtype, one ``eps`` and one number of power iterations, and dense weights."""
    if len(members) < 2:
        return False
    sn0, w0 = members[0]
    for sn, w in members:
        if (w.ndim < 2 or not sn.training or w.device != w0.device or w.dtype != w0.dtype
                or sn.eps != sn0.eps or sn.n_power_iterations != sn0.n_power_iterations
                or _dense_order(w) is None):
            return False
    return True


class FusedSpectral:
    """The fused step of one model's spectral norms: layout, buffers and, on CUDA, its graphs."""

    def __init__(self, members: Members, use_graphs: bool) -> None:
        self.members = members
        self.weights = [w for _, w in members]
        self.key = _key(members)
        # weights without an autograd history: a step for others (functional_call's fast
        # weights in meta-learning) is not kept beyond its forward
        self.leaf_weights = all(w.grad_fn is None for w in self.weights)
        self.use_graphs = self.graphs_requested = use_graphs
        self.n = members[0][0].n_power_iterations
        self.eps = members[0][0].eps
        self.orders = [_dense_order(w) or [] for w in self.weights]
        self.numels = [w.numel() for w in self.weights]
        # a dense weight's elements fill numel consecutive places: its strides work from any
        # offset of a flat buffer
        offsets = [0]
        for n in self.numels[:-1]:
            offsets.append(offsets[-1] + n)
        self.layout = [(tuple(w.shape), tuple(w.stride()), off)
                       for w, off in zip(self.weights, offsets, strict=True)]
        # scalars per layer in one flat buffer: 1/sigma, u and -u/sigma^2 (h values each),
        # v (w values)
        self.scalar_sizes = []
        for sn, _ in members:
            self.scalar_sizes += [1, sn._u.numel(), sn._u.numel(), sn._v.numel()]
        self.forward_calls = 0
        self.backward_calls = 0
        self.fwd_graph: Any = None
        self.bwd_graph: Any = None
        self.stream: Any = None

    def current(self, members: Members) -> bool:
        """Whether ``members`` are this step's layers, with the same weight and vector tensors
        still where the buffers and graphs expect them."""
        return len(members) == len(self.members) and self.matches(members)

    def matches(self, members: Members) -> bool:
        """Whether ``members`` are this step's first layers (or all of them) with the tensors
        it was built for, where it expects them."""
        n = len(members)
        return (all(sn is sn0 and w is w0 for (sn, w), (sn0, w0)
                    in zip(members, self.members[:n], strict=True))
                and _key(members) == self.key[:n])

    def run(self) -> None:
        """Compute every normalized weight for the next forward in one operation and leave each
        layer its :class:`~regfx.transforms.spectral.Prepared` record."""
        us, vs = self._vectors()
        versions = [(w._version, u._version, v._version, w.data_ptr())
                    for w, u, v in zip(self.weights, us, vs, strict=True)]
        scalars, *normalized = _NormalizeAll.apply(self, *self.weights)
        parts = scalars.detach().split(self.scalar_sizes)
        new_u, new_v = parts[1::4], parts[3::4]  # see scalar_views
        for i, (sn, w) in enumerate(self.members):
            w_version, u_version, v_version, w_ptr = versions[i]
            set_plain(sn, "prepared", Prepared(w, w_version, w_ptr, us[i], u_version, vs[i],
                                               v_version, new_u[i], new_v[i], normalized[i]))

    # -- views into flat buffers --------------------------------------------------------------

    def weight_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views of a flat buffer, each with the shape and strides of its weight."""
        base = flat.storage_offset()
        return [flat.as_strided(shape, stride, base + off) for shape, stride, off in self.layout]

    def scalar_views(self, flat: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """Per-layer views of a scalars buffer: ``1/sigma``, ``u``, ``-u/sigma^2``, ``v``."""
        parts = flat.split(self.scalar_sizes)
        return ([p.view(()) for p in parts[0::4]], list(parts[1::4]), list(parts[2::4]),
                list(parts[3::4]))

    def new_weights(self) -> torch.Tensor:
        w = self.weights[0]
        return torch.empty(sum(self.numels), dtype=w.dtype, device=w.device)

    def new_scalars(self) -> torch.Tensor:
        w = self.weights[0]
        return torch.empty(sum(self.scalar_sizes), dtype=w.dtype, device=w.device)

    # -- the two bodies (eager, or captured) ----------------------------------------------------

    def forward_body(self, us: list[torch.Tensor], vs: list[torch.Tensor], out_w: torch.Tensor,
                     out_s: torch.Tensor) -> None:
        """Run the power iterations from ``us``/``vs`` (left as they are); write ``W / sigma``
        into ``out_w`` and ``1/sigma``, the new ``u``, ``-u/sigma^2``, the new ``v`` into
        ``out_s``."""
        # in fp32 (or the weights' dtype) under autocast too, like the per-layer path
        with torch.no_grad(), torch.autocast(self.weights[0].device.type, enabled=False):
            mats = [_to_matrix(w, sn.dim) for sn, w in self.members]
            inv, new_u, u_scaled, new_v = iterate(mats, us, vs, self.n, self.eps)
            inv_out, u_out, u_scaled_out, v_out = self.scalar_views(out_s)
            torch._foreach_copy_(inv_out, inv)
            torch._foreach_copy_(u_out, new_u)
            torch._foreach_copy_(u_scaled_out, u_scaled)
            torch._foreach_copy_(v_out, new_v)
            for w, i, o in zip(self.weights, inv, self.weight_views(out_w), strict=True):
                torch.mul(w, i, out=o)

    def backward_body(self, grad: torch.Tensor, scalars: torch.Tensor, out: torch.Tensor) -> None:
        """``dL/dW = G / sigma - (<W, G> / sigma^2) u v^H`` for every layer, into ``out``
        (which may be ``grad`` itself)."""
        with torch.no_grad():
            inv, _, u_scaled, v = self.scalar_views(scalars)
            grads = self.weight_views(grad)
            outs = self.weight_views(out)
            flat_g = grad.split(self.numels)
            for (sn, w), g, g_flat, o, order, i, u_i, v_i in zip(
                    self.members, grads, flat_g, outs, self.orders, inv, u_scaled, v, strict=True):
                dot = torch.vdot(w.permute(order).reshape(-1), g_flat)  # same element order
                torch.mul(g, i, out=o)
                # conj() is free on real tensors (returns them as they are)
                if sn.dim == 0 and o.ndim == 2:
                    o.addr_(u_i * dot, v_i.conj())
                else:
                    o.add_(_from_matrix(torch.outer(u_i * dot, v_i.conj()), sn.dim, w.shape))

    # -- running them -----------------------------------------------------------------------------

    def _side_stream(self) -> Any:
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.weights[0].device)
        self.stream.wait_stream(torch.cuda.current_stream())
        return self.stream

    def _warm_up(self, body: Any, *args: Any) -> None:
        """Run ``body`` once on the capture stream (libraries initialize outside the capture)."""
        with torch.cuda.stream(self._side_stream()):
            body(*args)
        torch.cuda.current_stream().wait_stream(self.stream)

    def _capture(self, body: Any, *args: Any) -> Any:
        """Capture ``body`` (nothing runs) and return its CUDA graph."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
            body(*args)
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph

    def _graph_failed(self, error: Exception) -> None:

        self.use_graphs = False
        warnings.warn(f"regfx: spectral norm runs without CUDA graphs, capture failed: {error}",
                      RegfxWarning, stacklevel=2)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the forward body; returns fresh ``(normalized weights, scalars)`` buffers."""
        self.forward_calls += 1
        graphs = self.use_graphs and _can_capture()
        if graphs and self.fwd_graph is None and self.forward_calls > 1:
            us, vs = self._vectors()
            try:
                self.static_w, self.static_s = self.new_weights(), self.new_scalars()
                self._warm_up(self.forward_body, us, vs, self.static_w, self.static_s)
                self.fwd_graph = self._capture(self.forward_body, us, vs, self.static_w, self.static_s)
            except RuntimeError as error:
                self._graph_failed(error)
        if not (graphs and self.use_graphs and self.fwd_graph is not None):
            out_w, out_s = self.new_weights(), self.new_scalars()
            self.forward_body(*self._vectors(), out_w, out_s)
            return out_w, out_s
        self.fwd_graph.replay()
        return self.static_w.clone(), self.static_s.clone()

    def _vectors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        buffers = [sn._buffers for sn, _ in self.members]
        return [b["_u"] for b in buffers], [b["_v"] for b in buffers]  # type: ignore[misc]

    def _pack(self, flat: torch.Tensor, grads: tuple[torch.Tensor | None, ...]) -> None:
        """Copy the per-layer gradients into ``flat`` (zeros for layers without one)."""
        views = self.weight_views(flat)
        if all(g is not None for g in grads):
            torch._foreach_copy_(views, list(grads))  # type: ignore[arg-type]
            return
        present = [(v, g) for v, g in zip(views, grads, strict=True) if g is not None]
        if present:
            torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
        torch._foreach_zero_([v for v, g in zip(views, grads, strict=True) if g is None])

    def backward(self, grads: tuple[torch.Tensor | None, ...], scalars: torch.Tensor) -> torch.Tensor:
        """Run the backward body on the layers' gradients; returns a fresh flat weight gradient.

        The body works in place (each layer's dot product is taken before its slice is
        overwritten), so one flat buffer holds the incoming and the outgoing gradients."""
        self.backward_calls += 1
        graphs = self.use_graphs and _can_capture()
        if graphs and self.bwd_graph is None and self.backward_calls > 1:
            try:
                self.static_g, self.static_sb = self.new_weights(), torch.empty_like(scalars)
                self._pack(self.static_g, grads)
                self.static_sb.copy_(scalars)
                self._warm_up(self.backward_body, self.static_g, self.static_sb, self.static_g)
                self.bwd_graph = self._capture(self.backward_body, self.static_g, self.static_sb,
                                               self.static_g)
            except RuntimeError as error:
                self._graph_failed(error)
        if not (graphs and self.use_graphs and self.bwd_graph is not None):
            flat = self.new_weights()
            self._pack(flat, grads)
            self.backward_body(flat, scalars, flat)
            return flat
        self._pack(self.static_g, grads)
        self.static_sb.copy_(scalars)
        self.bwd_graph.replay()
        return self.static_g.clone()


def _can_capture() -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return not compiling and not torch.cuda.is_current_stream_capturing()


class _NormalizeAll(torch.autograd.Function):
    """``(scalars, W_1 / sigma_1, ..., W_n / sigma_n)``, the normalized weights views of one
    flat buffer and ``scalars`` the flat buffer of :meth:`FusedSpectral.scalar_views` (no
    gradient); see the module doc."""

    @staticmethod
    def forward(ctx: Any, fused: FusedSpectral, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out_w, out_s = fused.forward()
        ctx.fused = fused
        # the weights are kept with their versions, not saved for backward: autograd would then
        # check every weight in any backward through the step, also the weight of a layer that
        # did not use its record (changed in place in the forward before that layer ran, say, or
        # stepped between two backwards of one forward); the backward checks the layers that did
        ctx.weights = weights
        ctx.versions = [w._version for w in weights]
        ctx.save_for_backward(out_s)
        ctx.set_materialize_grads(False)  # a layer not called gets None, not zeros
        ctx.mark_non_differentiable(out_s)
        return (out_s, *fused.weight_views(out_w))

    @staticmethod
    def backward(ctx: Any, _scalars_grad: Any,
                 *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        fused: FusedSpectral = ctx.fused
        scalars = ctx.saved_tensors[0]
        weights = ctx.weights
        for i, (g, w, version) in enumerate(zip(grads, weights, ctx.versions, strict=True)):
            if g is not None and w._version != version:
                if _gradient_wanted(w):
                    raise RuntimeError(  # autograd's own error for a saved tensor changed in place
                        "one of the variables needed for gradient computation has been modified "
                        f"by an inplace operation: [{w.type()} {list(w.shape)}] is at version "
                        f"{w._version}; expected version {version} instead.")
                grads = (*grads[:i], None, *grads[i + 1:])  # not asked for: left out, as torch's
        if all(g is None for g in grads):
            return (None,) * (len(grads) + 1)
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated
            _, us, _, vs = fused.scalar_views(scalars)
            return (None, *(None if g is None else differentiable_grad(g, w, u, v, sn.dim)
                            for g, w, u, v, (sn, _) in zip(grads, weights, us, vs, fused.members,
                                                           strict=True)))
        if _key(fused.members) != fused.key:  # a weight moved since the forward (model.to): eagerly
            fused = FusedSpectral(fused.members, use_graphs=False)
        views = fused.weight_views(fused.backward(grads, scalars))
        return (None, *(v if g is not None else None for v, g in zip(views, grads, strict=True)))


def _gradient_wanted(w: torch.Tensor) -> bool:
    """Whether the running backward computes a gradient for ``w``: ``backward(inputs=...)`` can
    leave it out (one loss for the discriminator's parameters, another for the generator's).
    True where autograd cannot tell (``torch.autograd.grad`` with leaf inputs)."""
    try:
        node = torch.autograd.graph.get_gradient_edge(w).node
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


def _key(members: Members) -> tuple[Any, ...]:
    """Where every weight and vector is (their storage moves with ``.to()``, ``.half()``...),
    the weights' layouts and each norm's settings."""
    return tuple((w.data_ptr(), w.shape, w.stride(), sn._buffers["_u"].data_ptr(),  # type: ignore[union-attr]
                  sn._buffers["_v"].data_ptr(), sn.training, sn.eps,  # type: ignore[union-attr]
                  sn.n_power_iterations) for sn, w in members)
