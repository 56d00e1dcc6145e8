"""Spectral norm under ``torch.compile``: regfx's against torch's ``spectral_norm``, both compiled.

    python benchmarks/spectral_compile.py              # 16-layer MLP, inductor
    python benchmarks/spectral_compile.py --quick      # 4 layers, aot_eager (a smoke run)

While dynamo traces, each regfx spectral-norm layer runs torch's own code, so the compiled step
should cost what torch's compiled spectral norm costs (target: no more than it; marked against
1.02x, the spread of side-by-side medians on the project's VM). Also prints an eager plain step
for scale, the graph count of each model (``torch._dynamo.explain``) and the largest difference
of ``u`` after the timed steps from the same start (u/v advance once per training forward in
both).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import deep_mlp, describe, interleaved, parser, report, setup  # noqa: E402

import regfx  # noqa: E402


def torch_spectral(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, nn.Linear):
            parametrizations.spectral_norm(m)
    return model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor, "
                   "aot_eager with --quick)")
    args = p.parse_args()
    device = setup(args)
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    depth, width, batch = (4, 32, 8) if args.quick else (16, 256, 64)
    rounds = args.rounds or (3 if args.quick else 30)
    model = deep_mlp(depth, width).to(device)
    theirs = torch_spectral(copy.deepcopy(model))
    ours = regfx.transform(copy.deepcopy(model), spectral="linear")
    ours.load_state_dict(theirs.state_dict())  # same weights, same u/v
    x = torch.randn(batch, width, device=device)

    def stepper(m: nn.Module, compiled: bool) -> object:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        run = torch.compile(m, backend=backend) if compiled else m

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            run(x).square().mean().backward()
            opt.step()
        return step

    graphs = {name: torch._dynamo.explain(m)(x).graph_count for name, m in
              (("torch spectral_norm", theirs), ("regfx spectral", ours))}
    torch._dynamo.reset()
    variants = {"plain step (eager)": stepper(copy.deepcopy(model), False),
                "torch spectral_norm (compiled)": stepper(theirs, True),
                "regfx spectral (compiled)": stepper(ours, True)}
    for name, step in variants.items():
        t0 = time.perf_counter()
        step()  # compiles
        print(f"   first step of {name}: {time.perf_counter() - t0:.1f} s")
    medians = interleaved(variants, rounds, 2, device)  # type: ignore[arg-type]
    report(f"Spectral norm under torch.compile (backend {backend})",
           f"MLP {depth}x{width}, batch {batch}, fp32; {describe(device)}", medians,
           "torch spectral_norm (compiled)", {"regfx spectral (compiled)": 1.02})
    print(f"   graphs (torch._dynamo.explain): torch {graphs['torch spectral_norm']}, "
          f"regfx {graphs['regfx spectral']}")
    diff = max(float((a.parametrizations.weight[0]._u - b.parametrizations.weight[0]._u).abs().max())
               for a, b in zip(ours.modules(), theirs.modules(), strict=True)
               if isinstance(a, nn.Linear))
    print(f"   u after the same steps, max abs difference regfx vs torch: {diff:.1e}")


if __name__ == "__main__":
    main()
