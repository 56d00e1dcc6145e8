"""regfx.audit of a 7B-parameter Llama-style model on the meta device: wall time and peak RSS.

    python benchmarks/meta_audit.py           # Llama-2-7B shape (needs transformers)
    python benchmarks/meta_audit.py --quick   # a 1B-parameter shape

No weight is allocated: the model is built under ``torch.device("meta")``. The audit traces it,
reads every parameter's shape and runs every rule. Inputs are synthesized from the config, so
tracing runs the forward once on meta tensors (observed tracing). Peak memory is the process's own
high-water mark (VmHWM in /proc/self/status; Python, torch and transformers included). Targets:
< 15 s, < 1.5 GiB.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import describe, parser  # noqa: E402

import regfx  # noqa: E402


def peak_rss_mib() -> float:
    """VmHWM of this process in MiB (ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        shape = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16)
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shape)
    before = peak_rss_mib()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = regfx.audit(model)
    t_audit = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = report.to_json()
    t_render = time.perf_counter() - t0
    n = report.summary["numel"]
    print("== regfx.audit on the meta device")
    print(f"   LlamaForCausalLM {n / 1e9:.2f}B parameters ({report.summary['parameters']} tensors, "
          f"{len(report.findings)} findings, {len(text) // 1024} KiB of JSON); "
          f"{describe(torch.device('cpu'))}")
    graph = report.graph
    print(f"   traced: {len(graph.opaque)} opaque, {len(graph.observed)} observed, "
          f"{len(graph.traced)} symbolic forwards; inputs: {graph.inputs or graph.observe_error}")
    print(f"   build on meta  {t_build:7.2f} s")
    print(f"   audit          {t_audit:7.2f} s   target < 15 s: {'met' if t_audit < 15 else 'MISSED'}")
    print(f"   render JSON    {t_render:7.2f} s")
    peak = peak_rss_mib()
    print(f"   peak VmHWM     {peak:7.0f} MiB (process; {before:.0f} MiB before building)   "
          f"target < 1536 MiB: {'met' if peak < 1536 else 'MISSED'}")


if __name__ == "__main__":
    main()
