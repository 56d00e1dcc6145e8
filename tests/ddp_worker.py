"""One process of the DDP test (tests/test_distributed.py); also the single-process reference.

    python tests/ddp_worker.py RANK WORLD PORT OUT [STEPS]

Trains a transformed model (dropout p=0, spectral norm on conv, weight norm on linear, L1 and L2
penalties) on a fixed global batch split evenly across ranks, and saves the final state dict
(and the rank's audit) to OUT. WORLD=1 runs without torch.distributed: the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import regfx  # noqa: E402

GLOBAL_BATCH = 8


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 16),
                          nn.ReLU(), nn.Linear(16, 4))
    return regfx.transform(model, dropout=0.0, dropout_after="linear,conv", spectral="conv",
                           weight_norm="linear", l1=1e-4, l2=1e-3)


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    torch.set_num_threads(1)
    model = build()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        # broadcast_buffers (the default) keeps spectral norm's u/v identical on every rank
        trained: nn.Module = nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
    else:
        trained = model
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    per_rank = GLOBAL_BATCH // world
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 3, 8, generator=g)
        y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(trained(xs), ys)
        loss.backward()
        optimizer.step()
    torch.save({"state": model.state_dict(), "audit": regfx.audit(model, optimizer).to_dict()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
