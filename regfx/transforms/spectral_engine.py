"""The spectral-norm engine of a transformed model: one object, held by the model, that prepares
all of its spectral norms before each training forward.

Two training paths, chosen in one place (:meth:`SpectralEngine.choose`):

- per layer: each :class:`~regfx.transforms.spectral.SpectralNorm` iterates in its own forward
  (CPUs and any other device; also every case the fast path does not cover);
- on CUDA, the fast path :class:`~regfx.transforms.spectral_fused.FusedSpectral` (every layer's
  power iteration, normalized weight and weight gradient as one step replayed as CUDA graphs).

A CPU fast path (the vector work of all layers as foreach ops) measured no faster than the
per-layer path on CPUs (docs/performance.md), so there is none. The fused path runs on any device
when forced (``engine.path``), as the tests do on CPU.

The engine caches which spectral norms the model has (their parametrization lists) and the
fused steps it built (for up to two sets of layers, each kept while its layers hold the same
tensors). Every step it reads the weights and ``u``/``v`` afresh; weights that need no gradient
are left to their layers (a momentum copy updated in the forward through ``.data``, which
leaves no trace, iterates on the updated weight). Each prepared record names the tensors it
was computed from, which a layer checks before using it (see
:meth:`~regfx.transforms.spectral.SpectralNorm.forward`): nothing cached can outlive or stand
in for the tensors it was built from. It runs only for the model it was installed on (not for a
``DataParallel`` replica, which shares its original's attributes but has its own tensors: there
each layer iterates on its own, as torch's does), never while ``torch.compile`` traces (each
layer then runs torch's own code) and never in eval mode.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from regfx.distributed import is_dtensor
from regfx.state import ensure_state, state_of
from regfx.transforms.spectral import (
    Member,
    SpectralNorm,
    collect,
    functorch_active,
    set_plain,
)
from regfx.transforms.spectral_fused import FusedSpectral, eligible

__all__ = ["Path", "SpectralEngine", "engine_of", "install", "uninstall"]


_STEPS_KEPT = 2  # a GAN's two sets of layers; each holds two weight-sized buffers


class Path(enum.Enum):
    """A spectral-norm training path."""

    PER_LAYER = "per-layer"
    FUSED = "fused"  # the CUDA fast path


class SpectralEngine:
    """Prepares the spectral norms of ``root`` before each of its training forwards.

    Attributes:
        root: the model it serves.
        members: its spectral norms, each with the parametrization list holding it.
        path: a path forced for every step (tests, benchmarks), or None to choose by device.
        cuda_graphs: whether the fused path replays CUDA graphs; None: where the weights are
            on CUDA.
        fused: the fused step used last (its buffers and graphs).
        steps: the fused steps built, by the layers they cover (two at most: in a GAN, the
            generator's and discriminator's layers in one step, the generator's alone while the
            discriminator's weights need no gradient), each reused while its layers hold the
            same tensors; dropped when the model leaves CUDA.
        handles: the forward hooks it registered on ``root``.
    """

    def __init__(self, root: nn.Module, members: list[Member]) -> None:
        self.root = root
        self.members = members
        self.path: Path | None = None
        self.cuda_graphs: bool | None = None
        self.fused: FusedSpectral | None = None
        self.steps: dict[tuple[SpectralNorm, ...], FusedSpectral] = {}
        self.by_norm = {member.norm: member for member in members}
        self.handles: list[RemovableHandle] = []

    def __getstate__(self) -> dict[str, Any]:
        # buffers and CUDA graphs are rebuilt where they are needed (a deep copy, an unpickled
        # model) rather than copied
        return {**self.__dict__, "fused": None, "steps": {}}

    def choose(self, current: list[tuple[SpectralNorm, torch.Tensor]]) -> Path:
        """The path for this step's ``(norm, weight)`` pairs: the device's fast path where they
        can share one (two or more, dense where fused, one device, one ``eps`` and number of
        power iterations), else per layer."""
        if len(current) < 2:
            return Path.PER_LAYER
        sn0, w0 = current[0]
        if any(w.device != w0.device or sn.eps != sn0.eps
               or sn.n_power_iterations != sn0.n_power_iterations for sn, w in current):
            return Path.PER_LAYER
        if self.path is not None:
            path = self.path
        elif w0.device.type == "cuda":
            path = Path.FUSED
        else:
            return Path.PER_LAYER
        if path is Path.FUSED and not eligible(current):
            return Path.PER_LAYER
        return path

    def before_forward(self, model: nn.Module) -> None:
        """Prepare every spectral norm for ``model``'s training forward."""
        if model is not self.root:
            return
        if self.steps:  # also in eval mode: a model moved to the CPU for inference, say
            self._drop_steps(quick=True)
        if not model.training:
            return
        if self.path is None and self.members[0].weight.device.type != "cuda":
            return  # per layer: no fast path off CUDA (mixed devices are per layer too)
        current = []
        for member in self.members:
            weight = member.weight
            # a weight fully_shard keeps sharded until the layer's own pre-forward gathers it
            # is left to that layer, which then iterates on the gathered weight itself
            # a weight that needs no gradient (a momentum or EMA copy, a frozen layer) is often
            # updated by other code in place, also inside the forward (MoCo's key encoder,
            # through .data, which leaves no trace): its layer iterates when it runs
            if member.norm.training and weight.requires_grad and weight.ndim >= 2 \
                    and not weight.is_meta and not is_dtensor(weight):
                current.append((member.norm, weight))
        if not current:
            return
        key = tuple(norm for norm, _ in current)
        fused = self.steps.get(key)
        reusable = (fused is not None and fused.graphs_requested == self._graphs(current)
                    and fused.current(current))
        if reusable and self.path is not Path.PER_LAYER:
            self.fused = fused  # the same layers and tensors as before: the same choice
            self.steps[key] = self.steps.pop(key)  # the most recently used goes last
            fused.run()  # type: ignore[union-attr]
            return
        if self.choose(current) is not Path.FUSED:
            return  # per layer this step; fused steps built before stay for steps they fit
        if fused is None or not reusable:
            fused = FusedSpectral(current, use_graphs=self._graphs(current))
            self.steps.pop(key, None)
            self._drop_steps(quick=False)  # something changed: steps of other layers may be stale
            self.steps[key] = fused
            while len(self.steps) > _STEPS_KEPT:  # the least recently used goes
                del self.steps[next(iter(self.steps))]
        self.fused = fused
        fused.run()

    def _graphs(self, current: list[tuple[SpectralNorm, torch.Tensor]]) -> bool:
        return current[0][1].is_cuda if self.cuda_graphs is None else self.cuda_graphs

    def _drop_steps(self, quick: bool) -> None:
        """Drop the fused steps whose layers hold other weights now (``load_state_dict(
        assign=True)``, ``to_empty``, ``.to()``): they would keep the old weights, and on CUDA
        their buffers and graphs, alive. ``quick`` looks at each step's first layer only."""
        for key, step in list(self.steps.items()):
            pairs = step.members[:1] if quick else step.members
            if not step.matches([(sn, self.by_norm[sn].weight) for sn, _ in pairs]):
                del self.steps[key]
                if self.fused is step:
                    self.fused = None

    def after_forward(self, model: nn.Module) -> None:
        """Drop what a layer the forward did not call left unused (part of an autograd graph),
        and a fused step built for weights with an autograd history (substituted by
        ``functional_call`` in a meta-learning loop): it would keep them and their graph
        alive."""
        if model is not self.root:
            return
        for member in self.members:
            if member.norm.prepared is not None:
                set_plain(member.norm, "prepared", None)
        fused = self.fused
        if fused is not None and not fused.leaf_weights:
            self.steps = {k: v for k, v in self.steps.items() if v is not fused}
            self.fused = None

    def remove(self) -> None:
        """Remove the hooks and everything prepared."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for member in self.members:
            set_plain(member.norm, "prepared", None)
        self.fused = None
        self.steps.clear()


def _before_forward(model: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling() or functorch_active():
        # each layer runs torch's own code: dynamo traces it into the model's graph, and under
        # torch.func the tensors are functorch wrappers (no storage to prepare from)
        return
    engine = engine_of(model)
    if engine is not None:
        engine.before_forward(model)


def _after_forward(model: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():
        return
    engine = engine_of(model)
    if engine is not None:
        engine.after_forward(model)


def engine_of(model: nn.Module) -> SpectralEngine | None:
    """The :class:`SpectralEngine` installed on ``model`` (held by its
    :class:`~regfx.state.RegfxState`), if any."""
    state = state_of(model)
    return state.spectral if state is not None else None


def install(model: nn.Module) -> SpectralEngine | None:
    """Give ``model`` a :class:`SpectralEngine` for its spectral norms (replacing any it had);
    None, installing nothing, where it has fewer than two."""
    uninstall(model)
    members = collect(model)
    if len(members) < 2:
        return None
    engine = SpectralEngine(model, members)
    engine.handles = [model.register_forward_pre_hook(_before_forward),
                      # also when the forward raises: no record outlives its forward
                      model.register_forward_hook(_after_forward, always_call=True)]
    ensure_state(model).spectral = engine
    return engine


def uninstall(model: nn.Module) -> None:
    """Remove ``model``'s :class:`SpectralEngine` and its hooks, if it has one."""
    state = state_of(model)
    if state is not None and state.spectral is not None:
        state.spectral.remove()
        state.spectral = None
