"""Soak: many training steps of a model with every transform. The audit is the same at the end
as after the first step, and nothing piles up: hooks, handles, registry entries, tensors, memory.

CI runs 150 steps; ``pytest tests/test_soak.py --soak-steps 1000`` is the full soak.
"""

from __future__ import annotations

import gc
import resource

import torch
from torch import nn
from torch.optim import optimizer as optim_module

import regfx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def tensor_count() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def test_soak(request) -> None:  # type: ignore[no-untyped-def]
    steps = int(request.config.getoption("--soak-steps"))
    torch.manual_seed(0)
    model = regfx.transform(Net(), dropout=0.1, dropout_after="linear,conv", spectral="conv",
                            weight_norm="linear", l1=1e-5, l2=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))

    def step(i: int) -> float:
        model.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        logged = float(regfx.penalty(model).detach())  # logging the penalty must not keep graphs alive
        if i % 10 == 0:
            model.eval()
            with torch.no_grad():
                model(x)
        return logged

    step(0)
    first = regfx.audit(model, optimizer).to_dict()
    for i in range(1, 20):  # warm up allocator caches before measuring
        step(i)
    hooks, optimizer_hooks = hook_count(model), len(optim_module._global_optimizer_pre_hooks)
    tensors, rss = tensor_count(), rss_mib()
    dict_keys = sorted(model.__dict__)
    for i in range(20, steps):
        value = step(i)
        assert torch.isfinite(torch.tensor(value))
    last = regfx.audit(model, optimizer).to_dict()
    assert last["params"] == first["params"]
    assert last["findings"] == first["findings"]
    assert last["summary"] == first["summary"]
    assert hook_count(model) == hooks
    assert len(optim_module._global_optimizer_pre_hooks) <= optimizer_hooks
    assert sorted(model.__dict__) == dict_keys
    assert tensor_count() <= tensors + 5
    assert rss_mib() - rss < 64, "memory grew during the soak"
