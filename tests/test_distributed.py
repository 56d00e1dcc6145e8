"""DDP over 2 CPU processes (gloo) trains a transformed model exactly like one process on the
same global batch: dropout (p=0), spectral norm, weight norm, L1 and L2 penalties."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import ROOT

WORKER = ROOT / "tests" / "ddp_worker.py"
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(world: int, tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    outs = [tmp_path / f"w{world}_r{rank}.pt" for rank in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                               str(outs[rank]), str(STEPS)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [torch.load(o, weights_only=True) for o in outs]


def test_ddp_two_ranks_match_single_process(tmp_path: Path) -> None:
    ranks = run_workers(2, tmp_path)
    (reference,) = run_workers(1, tmp_path)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() == reference["state"].keys()
    assert any("parametrizations.weight.original0" in k for k in a)  # weight norm
    assert any(k.endswith("parametrizations.weight.0._u") for k in a)  # spectral norm
    for key in a:
        assert torch.equal(a[key], b[key]), f"ranks differ on {key}"
        torch.testing.assert_close(a[key], reference["state"][key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # training moved the weights, so the comparison is not vacuous
    from tests.ddp_worker import build

    untrained = build().state_dict()
    assert not torch.allclose(a["0.parametrizations.weight.original"],
                              untrained["0.parametrizations.weight.original"])
    # the audit sees the same regularization on every rank and in the reference
    assert ranks[0]["audit"]["params"] == ranks[1]["audit"]["params"] == reference["audit"]["params"]
