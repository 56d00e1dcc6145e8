"""What regfx needs to know about distributed training: sharded (FSDP2) models and their DTensor
parameters, and keeping spectral norm's vectors identical on every rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces a module's parameters by ``DTensor``
parameters, each rank holding one shard along dim 0; their ``shape`` is the global (logical)
shape, and ``to_local()`` is the rank's shard (possibly empty). Anything that holds on to a
parameter from before ``fully_shard`` holds a tensor the optimizer no longer updates, so regfx
resolves parameters by module and name when it needs them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_dtensor", "local_tensor", "logical_shape", "is_sharded", "fsdp_base_class",
           "process_group_size",
           "broadcast_power_iteration_vectors", "all_reduce_sum"]

try:  # missing where torch is built without distributed support (and so without fully_shard)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    _HAS_DTENSOR = True
except ImportError:  # pragma: no cover
    _HAS_DTENSOR = False

VECTOR_BUFFERS = ("_u", "_v")
"""The buffers in which power-iteration parametrizations (torch's spectral norm, regfx's) keep
their vectors."""


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by ``fully_shard``, or its gradient)."""
    return _HAS_DTENSOR and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, the tensor itself otherwise; no copy, no autograd:
    in-place updates of the result update ``t``."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined, no-any-return]  # to_local() in no_grad
    return t.detach() if t.requires_grad else t


def logical_shape(t: torch.Tensor) -> list[int]:
    """The parameter's shape as the model sees it: the global shape of a DTensor (FSDP2 shards),
    the shape otherwise."""
    return list(t.shape)  # DTensor.shape is the global shape, never the shard's


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules (or its
    parameters are DTensors some other way)."""
    if _HAS_DTENSOR and any(isinstance(m, FSDPModule) for m in model.modules()):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def fsdp_base_class(cls: type) -> type | None:
    """The class ``fully_shard`` derived ``cls`` from (``FSDPLinear`` -> ``Linear``), or None
    where ``cls`` is not such a class."""
    if not _HAS_DTENSOR or not issubclass(cls, FSDPModule):
        return None
    bases = [b for b in cls.__bases__ if b is not FSDPModule]
    if len(bases) == 1 and cls.__name__ == f"FSDP{bases[0].__name__}":
        return bases[0]
    return None


def process_group_size() -> int:
    """The default process group's world size; 1 without an initialized process group."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _vector_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every power-iteration vector of ``model`` (``_u``/``_v`` buffers of parametrization
    modules), in module order: the same order on every rank."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for mod in model.modules():
        if not all(isinstance(mod._buffers.get(n), torch.Tensor) for n in VECTOR_BUFFERS):
            continue
        for name in VECTOR_BUFFERS:
            buf = mod._buffers[name]
            if id(buf) not in seen and buf is not None and buf.device.type != "meta":
                seen.add(id(buf))
                out.append(buf)
    return out


def _collective_device(device: torch.device) -> torch.device:
    """Where the default process group can broadcast a tensor that lives on ``device``: the
    device itself, or the current accelerator for a CPU tensor under an accelerator-only backend
    (NCCL)."""
    if device.type != "cpu":
        return device
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or "cpu" in backend:
        return device
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return device
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def broadcast_power_iteration_vectors(model: nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s spectral-norm vectors (``_u``/``_v``) to every rank, so that every
    rank iterates from the same vectors and computes the same ``sigma``. A collective: every
    rank of the default process group must call it. Does nothing (returns 0) without an
    initialized process group of more than one process, or without such vectors; meta tensors
    are left alone.

    Returns:
        The number of vectors broadcast.
    """
    if process_group_size() < 2:
        return 0
    buffers = _vector_buffers(model)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buf in buffers:
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    # one broadcast per dtype and device, of all vectors flattened together
    with torch.no_grad():
        for (_, device), bufs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]),
                                                                        str(kv[0][1]))):
            flat = torch.cat([b.reshape(-1) for b in bufs]).to(_collective_device(device))
            dist.broadcast(flat, src=src)
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
    return len(buffers)


def all_reduce_sum(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The sum of ``partial`` over the ranks that hold shards of the DTensor ``like`` (its
    mesh dimensions that shard it; replicated dimensions already hold the whole), as one
    all-reduce per such dimension (one for FSDP2's 1-D mesh). Not differentiable."""
    if not is_dtensor(like):
        return partial
    device = partial.device
    out = partial.detach().to(_collective_device(device), copy=True)
    mesh = like.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(like.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            dist.all_reduce(out, group=mesh.get_group(dim))
    return out.to(device)
