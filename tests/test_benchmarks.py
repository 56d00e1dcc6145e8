"""Every benchmark script runs in its --quick mode and prints its ratios (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPTS = {
    "penalty.py": ["regfx l1+l2", "hand-written l1+l2"],
    "spectral.py": ["regfx spectral", "torch spectral_norm", "max relative difference"],
    "spectral_compile.py": ["regfx spectral (compiled)", "graphs (torch._dynamo.explain)"],
    "dropout.py": ["regfx dropout (train step)", "regfx dropout (eval)"],
    "transform.py": ["regfx.transform + regfx.audit", "growth"],
    "meta_audit.py": ["peak VmHWM", "audit"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_quick_mode(script: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--device", "cpu"]
    if script != "meta_audit.py":
        args += ["--rounds", "2"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for needle in SCRIPTS[script]:
        assert needle in result.stdout, result.stdout
