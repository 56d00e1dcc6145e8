"""regfx.transform + regfx.audit vs copy.deepcopy + torch.fx.symbolic_trace, by model depth.

    python benchmarks/transform.py            # 1k, 2k, 5k, 10k layers; ResNet-50 and MaxViT-T
    python benchmarks/transform.py --quick    # 200, 400, 1000 layers

The model is a residual MLP: ``depth`` blocks of Linear -> LayerNorm -> ReLU with a skip
connection, so tracing, placement (dropout after each linear, after its norm/activation chain)
and the audit all see real structure. Ratios are against deepcopy + symbolic_trace of the same
model; growth is each depth's regfx time against the smallest depth's. ``regfx.trace`` alone
(symbolic per call site plus the observed forward on synthesized inputs) is timed too, with its
own growth.

Then, where torchvision is installed, real models: transform (dropout after linear,conv and
spectral norm on conv) + audit of torchvision's ResNet-50 and MaxViT-T against deepcopy +
symbolic_trace + torch's own ``spectral_norm`` on the same convs (target: at most 2x).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import describe, setup  # noqa: E402
from _harness import parser as make_parser  # noqa: E402

import regfx  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.fc(x)))


class Deep(nn.Module):
    def __init__(self, depth: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = make_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = setup(args)
    depths = (200, 400, 1000) if args.quick else (1000, 2000, 5000, 10000)
    repeats = args.rounds or (2 if args.quick else 3)
    print("== regfx.transform + regfx.audit vs deepcopy + symbolic_trace")
    print(f"   residual MLP blocks (Linear, LayerNorm, ReLU, add); best of {repeats} interleaved "
          f"rounds; {describe(device)}")
    print(f"   {'layers':>7}  {'regfx':>9}  {'baseline':>9}  {'ratio':>6}  {'growth':>7}  "
          f"{'trace':>8}  {'growth':>7}  (transform / audit)")
    first = None
    first_trace = None
    for depth in depths:
        model = Deep(depth)
        transformed = regfx.transform(model, dropout=0.1, dropout_after="linear")
        # interleaved: each round times all three, so machine drift hits them alike
        t_transform = t_audit = base = t_trace = float("inf")
        for _ in range(repeats):
            t_trace = min(t_trace, timed(lambda m=model: regfx.trace(m), 1))
            t_transform = min(t_transform, timed(
                lambda m=model: regfx.transform(m, dropout=0.1, dropout_after="linear"), 1))
            t_audit = min(t_audit, timed(lambda m=transformed: regfx.audit(m), 1))
            base = min(base, timed(lambda m=model: fx.symbolic_trace(copy.deepcopy(m)), 1))
        ours = t_transform + t_audit
        first = first or (depth, ours)
        first_trace = first_trace or t_trace
        growth = ours / first[1]
        print(f"   {depth:>7}  {ours:8.2f}s  {base:8.2f}s  {ours / base:5.2f}x  {growth:6.2f}x  "
              f"{t_trace:7.2f}s  {t_trace / first_trace:6.2f}x  ({t_transform:.2f}s / {t_audit:.2f}s)")
    print(f"   targets: ratio <= 2.00x; growth (regfx and trace) from {first[0]} to {depths[-1]} "
          f"layers <= {1.2 * depths[-1] / first[0]:.0f}x (linear)")
    if not args.quick:
        vision(repeats)


def torch_baseline(model: nn.Module) -> None:
    """deepcopy + symbolic_trace + torch's spectral_norm on every conv: what regfx replaces."""
    from torch.nn.utils.parametrizations import spectral_norm

    copied = copy.deepcopy(model)
    fx.symbolic_trace(copied)
    for mod in copied.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            spectral_norm(mod)


def vision(repeats: int) -> None:
    try:
        import torchvision
    except ImportError:
        print("== torchvision not installed: ResNet-50 / MaxViT-T skipped")
        return
    import warnings

    print("== torchvision models: regfx.transform (dropout after linear,conv; spectral conv) + audit")
    print("   vs deepcopy + symbolic_trace + torch spectral_norm on the same convs; best of "
          f"{max(repeats, 3)} interleaved rounds")
    for name in ("resnet50", "maxvit_t"):
        model = getattr(torchvision.models, name)()
        ours = base = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(max(repeats, 3)):
                def run(m: nn.Module = model) -> None:
                    regfx.audit(regfx.transform(m, dropout=0.1, dropout_after="linear,conv",
                                                spectral="conv"))
                ours = min(ours, timed(run, 1))
                base = min(base, timed(lambda m=model: torch_baseline(m), 1))
        print(f"   {name:>9}  regfx {ours:6.2f}s  baseline {base:6.2f}s  ratio {ours / base:5.2f}x   "
              "target <= 2.00x")


if __name__ == "__main__":
    main()
