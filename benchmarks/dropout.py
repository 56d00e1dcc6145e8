"""Dropout inserted by regfx vs the same dropout written by hand in the model.

    python benchmarks/dropout.py            # 48-layer MLP, dropout after every ReLU
    python benchmarks/dropout.py --quick

Both models have an ``nn.Dropout(p)`` after each activation; in one it is in the code, in the
other regfx put it there (regenerated forward, the dropout a child of the linear layer).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import deep_mlp, describe, interleaved, parser, report, setup, train_step  # noqa: E402

import regfx  # noqa: E402

P = 0.1


def hand_written(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(P)]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = setup(args)
    depth, width, batch = (8, 64, 32) if args.quick else (48, 256, 64)
    rounds, warmup = args.rounds or (5 if args.quick else 40), 2 if args.quick else 5
    hand = hand_written(depth, width).to(device)
    plain = deep_mlp(depth, width).to(device)
    ours = regfx.transform(plain, dropout=P, dropout_after="linear")
    # same weights in both
    lin_h = [m for m in hand.modules() if isinstance(m, nn.Linear)]
    lin_o = [m for m in ours.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(lin_h, lin_o, strict=True):
        b.load_state_dict(a.state_dict())
    n_drop = sum(isinstance(m, nn.Dropout) for m in ours.modules())
    assert n_drop == depth, f"expected {depth} inserted dropouts, got {n_drop}"
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    train = {
        "hand-written dropout (train step)": train_step(hand, sgd(hand), x, y),
        "regfx dropout (train step)": train_step(ours, sgd(ours), x, y),
    }
    what = f"MLP {depth}x{width}, batch {batch}, p={P}; {describe(device)}"
    report("Inserted vs hand-written dropout, training", what,
           interleaved(train, rounds, warmup, device), "hand-written dropout (train step)",
           {"regfx dropout (train step)": 1.02})
    hand_eval, ours_eval = copy.deepcopy(hand).eval(), copy.deepcopy(ours).eval()

    def infer(m: nn.Module):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    inference = {"hand-written dropout (eval)": infer(hand_eval), "regfx dropout (eval)": infer(ours_eval)}
    report("Inserted vs hand-written dropout, inference", what,
           interleaved(inference, rounds * 4, warmup, device, inner=5), "hand-written dropout (eval)",
           {"regfx dropout (eval)": 1.02})


if __name__ == "__main__":
    main()
