"""Spectral norm on every linear/conv layer: plain step vs regfx vs torch's spectral_norm.

    python benchmarks/spectral.py            # 48-layer MLP (CPU) or ResNet-50 bf16 (CUDA)
    python benchmarks/spectral.py --quick    # a smoke run

Measured side by side in one run: a plain step, regfx's spectral norm (its default path: fused
on CUDA, per layer on CPU; and the other one of the two beside it, the fused path forced on CPU),
torch's ``spectral_norm``, and two floors: a
parametrization returning ``W`` and one multiplying ``W`` by a stored scalar (what a layer costs
once sigma is known). Prints regfx's step time as a ratio to the plain step and to the
``W * scalar`` floor; the targets are <= 1.15x of that floor on CPU and <= 1.10x of a plain step
on CUDA.

Also checks that regfx's sigma equals torch's after the timed steps started from the same
``u``/``v`` and weights (same power iteration semantics).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import describe, interleaved, parser, report, setup, step_workload, train_step  # noqa: E402

import regfx  # noqa: E402
from regfx.transforms import spectral_engine  # noqa: E402


def torch_spectral(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parametrizations.spectral_norm(m)
    return model


class Identity(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor(0.5))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.s


def with_parametrization(model: nn.Module, cls: type[nn.Module]) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parametrize.register_parametrization(m, "weight", cls().to(m.weight.device))
    return model


def sigmas(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            sn = m.parametrizations.weight[0]
            w = m.parametrizations.weight.original.detach().float()
            mat = w.flatten(1)
            out.append(torch.vdot(sn._u.float(), mat @ sn._v.float()))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--check-only", action="store_true", help="skip the timing, run the correctness checks")
    args = p.parse_args()
    device = setup(args)
    model, x, y, autocast, what, rounds, warmup = step_workload(args, device)

    plain = copy.deepcopy(model)
    theirs = torch_spectral(copy.deepcopy(model))
    types = "linear,conv" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "linear"
    ours = regfx.transform(copy.deepcopy(model), spectral=types)
    # the floor: torch's parametrization machinery alone, and a parametrization that only
    # multiplies by a stored scalar (what a layer's forward costs once sigma is known)
    identity = with_parametrization(copy.deepcopy(model), Identity)
    scaled = with_parametrization(copy.deepcopy(model), Scale)
    # same starting point: copy torch's u/v (and weights) into regfx's
    ours.load_state_dict(theirs.state_dict())
    other = copy.deepcopy(ours)
    engine = spectral_engine.engine_of(other)
    if device.type == "cuda" or engine is None:
        spectral_engine.uninstall(other)  # each layer iterates in its own forward
        other_label = "regfx spectral, per-layer path"
    else:
        engine.path = spectral_engine.Path.FUSED  # the CUDA path, run eagerly here
        other_label = "regfx spectral, fused path (forced)"

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    check_theirs, check_ours = copy.deepcopy(theirs), copy.deepcopy(ours)
    variants = {
        "plain step": train_step(plain, sgd(plain), x, y, autocast=autocast),
        "regfx spectral": train_step(ours, sgd(ours), x, y, autocast=autocast),
        other_label: train_step(other, sgd(other), x, y, autocast=autocast),
        "torch spectral_norm": train_step(theirs, sgd(theirs), x, y, autocast=autocast),
        "floor: identity parametrization": train_step(identity, sgd(identity), x, y, autocast=autocast),
        "floor: W * scalar parametrization": train_step(scaled, sgd(scaled), x, y, autocast=autocast),
    }
    if not args.check_only:
        medians = interleaved(variants, rounds, warmup, device)
        report("Spectral norm on every linear/conv", f"{what}; {describe(device)}", medians,
               "plain step", {"regfx spectral": 1.10} if device.type == "cuda" else None)
        floor = "floor: W * scalar parametrization"
        ratio = medians["regfx spectral"] / medians[floor]
        mark = f"  target <= 1.15x: {'met' if ratio <= 1.15 else 'MISSED'}" if device.type == "cpu" else ""
        print(f"   regfx spectral / {floor}: {ratio:.3f}x{mark}")
    else:
        print(f"== Spectral norm correctness checks\n   {what}; {describe(device)}")
    # correctness, from the same state, in fp32 (the 1e-5 target; TF32 off) and under the
    # workload's autocast: sigma after one training forward (u/v advanced once), the weight
    # gradients of that forward, then sigma after 3 training steps. The reference beside each
    # figure is torch's spectral norm run again on the input times (1 + 1e-7 noise): how much the
    # figure moves under a perturbation at rounding level. (A BatchNorm network's gradient in
    # training mode moves by percents under it, with or without spectral norm.)
    loss_fn = nn.CrossEntropyLoss()
    noisy = x * (1 + 1e-7 * torch.randn_like(x))
    for label, dtype in [("fp32", None)] + ([(f"{autocast} autocast", autocast)] if autocast else []):
        torch.backends.cudnn.allow_tf32 = dtype is not None
        models = [copy.deepcopy(check_theirs), copy.deepcopy(check_ours), copy.deepcopy(check_theirs)]
        for m, inp in zip(models, (x, x, noisy), strict=True):
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(m(inp), y)
            loss.backward()
        report_diffs(f"one {label} forward: sigma", [sigmas(m) for m in models])
        report_diffs(f"one {label} backward: weight gradient", [grads(m) for m in models])
        steps = [train_step(m, sgd(m), inp, y, autocast=dtype) for m, inp in zip(models, (x, x, noisy))]
        for _ in range(3):
            for step in steps:
                step()
        report_diffs(f"3 {label} steps: sigma", [sigmas(m) for m in models])

def grads(model: nn.Module) -> list[torch.Tensor]:
    return [m.parametrizations.weight.original.grad for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def report_diffs(what: str, values: list[list[torch.Tensor]]) -> None:
    """Largest relative difference over layers (norms for tensors): regfx vs torch, and torch vs
    torch on a perturbed input."""
    def diff(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
        return max(float((a.float() - b.float()).norm() / b.float().norm())
                   for a, b in zip(xs, ys, strict=True))

    theirs, ours, again = values
    print(f"   after {what}, max relative difference: regfx vs torch {diff(ours, theirs):.1e}, "
          f"torch vs torch on input x(1+1e-7 noise) {diff(again, theirs):.1e}")


if __name__ == "__main__":
    main()
