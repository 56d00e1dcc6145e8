"""One process of the FSDP2 test (tests/test_fsdp.py); also the single-process reference.

    python tests/fsdp_worker.py RANK WORLD PORT OUT [CASE,CASE...]

For each case of CASES: builds the same model on every rank (same weights), draws the random
parts of the transform (spectral norm's initial u/v) from a different seed on every rank (rank
0's seed in the reference), transforms it, shards it with ``fully_shard`` (each layer, then the
root, or the root alone; WORLD=1: no torch.distributed, no sharding) and trains STEPS steps on
a fixed global batch split evenly across ranks. Saves, per case, the full (gathered) state dict
before and after training, this rank's spectral-norm vectors, the audits and the penalty value
(or the error the case raised), and what transforming a sharded model raised, to OUT.

The layers have 7, 5 and 1 output rows: over two ranks their weights are sharded 4/3, 3/2 and
1/0 (an empty shard).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import regfx  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3

CASES: dict[str, dict[str, Any]] = {
    "dropout": {"dropout": 0.0, "dropout_after": "linear"},
    "weight_norm": {"weight_norm": "linear"},
    "spectral_norm": {"spectral": "linear"},
    "l1": {"l1": 1e-2},
    "l2": {"l2": 5e-2},
    "combined": {"dropout": 0.0, "spectral": "linear", "exclude": ["4"], "l1": 1e-3, "l2": 1e-2},
    # one FSDP unit for the whole model: its parameters are gathered before any layer runs
    "root_only": {"spectral": "linear", "l1": 1e-3, "l2": 1e-2},
}
PER_LAYER = {name for name in CASES if name != "root_only"}
"""Cases sharded layer by layer (each Linear its own FSDP unit), then the root."""


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every DTensor gathered to its full value (a collective)."""
    out = {}
    for key, value in model.state_dict().items():
        full = getattr(value, "full_tensor", None)
        out[key] = (full() if full is not None else value).detach().clone()
    return out


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers()
            if name.endswith(("._u", "._v"))}


def run_case(name: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = build()
    torch.manual_seed(100 + rank)  # u/v would differ across ranks unless regfx syncs them
    model = regfx.transform(model, **CASES[name])
    if world > 1:
        for layer in model if name in PER_LAYER else ():
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
    initial = gathered(model)
    audit_before = regfx.audit(model).to_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 6, generator=g)
        y = torch.randn(GLOBAL_BATCH, 1, generator=g)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        optimizer.step()
    return {"initial": initial, "state": gathered(model), "vectors": vectors(model),
            "audit_before": audit_before, "audit": regfx.audit(model, optimizer).to_dict(),
            "penalty": float(regfx.penalty(model).detach()),
            "sharded": any(hasattr(p, "full_tensor") for p in model.parameters())}


def transform_sharded() -> dict[str, str]:
    """What transform, plan and bake raise for a model already sharded by fully_shard."""
    from torch.distributed.fsdp import fully_shard

    errors = {}
    for name, call in (("transform", lambda m: regfx.transform(m, l2=1e-2)),
                       ("transform_inplace", lambda m: regfx.transform(m, l2=1e-2, inplace=True)),
                       ("plan", lambda m: regfx.plan(m, spectral="linear")),
                       ("bake", regfx.bake)):
        sharded = fully_shard(build())
        try:
            call(sharded)
        except Exception as exc:  # noqa: BLE001 - the test checks type and message
            errors[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        else:
            errors[name] = "no error"
    return errors


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    names = sys.argv[5].split(",") if len(sys.argv) > 5 else list(CASES)
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = run_case(name, rank, world)
        except Exception:  # noqa: BLE001 - reported by the test, case by case
            results[name] = {"error": traceback.format_exc()}
    if world > 1:
        results["transform_sharded"] = transform_sharded()
    torch.save(results, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
