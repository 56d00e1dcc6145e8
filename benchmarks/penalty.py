"""L1+L2 penalties: plain step vs regfx's step hook vs the hand-written loss term.

    python benchmarks/penalty.py            # 48-layer MLP (CPU) or ResNet-50 bf16 (CUDA)
    python benchmarks/penalty.py --quick    # a smoke run

The hand-written version is what blog posts write:
``loss + l1 * sum(p.abs().sum() ...) + l2 / 2 * sum(p.pow(2).sum() ...)`` over the same weights.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import describe, interleaved, parser, report, setup, step_workload, train_step  # noqa: E402

import regfx  # noqa: E402

L1, L2 = 1e-5, 1e-4


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    model, x, y, autocast, what, rounds, warmup = step_workload(args, device)

    plain = copy.deepcopy(model)
    hand = copy.deepcopy(model)
    ours = regfx.transform(copy.deepcopy(model), l1=L1, l2=L2)
    ours_l2 = regfx.transform(copy.deepcopy(model), l2=L2)
    decayed = copy.deepcopy(model)
    weights = [m.weight for m in hand.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def hand_penalty() -> torch.Tensor:
        return L1 * sum(p.abs().sum() for p in weights) + L2 / 2 * sum(p.pow(2).sum() for p in weights)

    def sgd(m: nn.Module, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=weight_decay)

    variants = {
        "plain step": train_step(plain, sgd(plain), x, y, autocast=autocast),
        "regfx l1+l2": train_step(ours, sgd(ours), x, y, autocast=autocast),
        "regfx l2": train_step(ours_l2, sgd(ours_l2), x, y, autocast=autocast),
        # the same L2 gradient computed by torch's own optimizer: the floor for one pass
        "SGD weight_decay (torch)": train_step(decayed, sgd(decayed, L2), x, y, autocast=autocast),
        "hand-written l1+l2": train_step(hand, sgd(hand), x, y, hand_penalty, autocast=autocast),
    }
    medians = interleaved(variants, rounds, warmup, device)
    target = 1.03 if device.type == "cuda" else 1.05
    report("L1+L2 penalty step overhead", f"{what}; {describe(device)}", medians, "plain step",
           {"regfx l1+l2": target, "regfx l2": target})


if __name__ == "__main__":
    main()
