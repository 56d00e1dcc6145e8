"""Shared helpers for the benchmarks: interleaved timing, devices, models, printing.

Every benchmark measures its variants side by side in one process: each round runs every
variant once, in a rotating order, and the reported figure is the ratio of medians. Nothing here
asserts on absolute times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="few rounds, small sizes (CI smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--workload", choices=["auto", "mlp", "resnet50"], default="auto",
                   help="step-overhead model: auto is ResNet-50 on CUDA, the deep MLP on CPU")
    p.add_argument("--batch", type=int, default=None, help="batch size of the workload")
    p.add_argument("--size", type=int, default=224, help="image size for resnet50")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                device: torch.device, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant, measured in interleaved rounds."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                variants[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(v) for n, v in times.items()}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {device.type} ({name}), python {platform.python_version()}"


def report(title: str, config: str, medians: dict[str, float], baseline: str,
           targets: dict[str, float] | None = None) -> None:
    """Print medians and ratios to ``baseline``; mark targets met or missed."""
    print(f"== {title}")
    print(f"   {config}")
    base = medians[baseline]
    width = max(len(n) for n in medians)
    for name, t in medians.items():
        ratio = t / base
        mark = ""
        if targets and name in targets:
            mark = f"  target <= {targets[name]:.2f}x: {'met' if ratio <= targets[name] else 'MISSED'}"
        print(f"   {name:<{width}}  {t * 1e3:9.3f} ms  {ratio:6.3f}x{mark}")


def deep_mlp(depth: int, width: int) -> nn.Module:
    """The model where per-layer overhead matters most: many small linear layers."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (3-4-6-3 bottlenecks), written out to avoid the dependency;
    ``width`` scales every channel count (64 is ResNet-50)."""

    def __init__(self, width: int = 64, n_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        cin = width
        for i, n in enumerate((3, 4, 6, 3)):
            mid = width * 2 ** i
            for j in range(n):
                blocks.append(Bottleneck(cin, mid, 2 if (j == 0 and i > 0) else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.layers(x)).flatten(1))


def step_workload(args: argparse.Namespace, device: torch.device
                  ) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.dtype | None, str, int, int]:
    """The model where step overhead matters most on ``device``: ResNet-50 at batch 64 under
    bf16 autocast on a GPU, the 48-layer MLP on a CPU (small ones with ``--quick``).

    Returns ``(model, x, y, autocast dtype, description, rounds, warmup)``.
    """
    workload = args.workload
    if workload == "auto":
        workload = "resnet50" if device.type == "cuda" and not args.quick else "mlp"
    if workload == "resnet50":
        batch, size = args.batch or 64, args.size
        model = ResNet50().to(device).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        what = f"ResNet-50, batch {batch}, {size}px, {'bf16 autocast' if autocast else 'fp32'}"
        return model, x, y, autocast, what, args.rounds or 30, 5
    depth, width, batch = (8, 64, 32) if args.quick else (48, 256, 64)
    batch = args.batch or batch
    model = deep_mlp(depth, width).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rounds = args.rounds or (5 if args.quick else 40)
    return model, x, y, None, f"MLP {depth}x{width}, batch {batch}, fp32", rounds, 2 if args.quick else 5


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, extra_loss: Callable[[], torch.Tensor] | None = None,
               autocast: torch.dtype | None = None) -> Callable[[], None]:
    """A closure running one plain training step (forward, loss, backward, step)."""
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if autocast is not None:
            with torch.autocast(x.device.type, dtype=autocast):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        optimizer.step()

    return step
