"""FSDP2 (``fully_shard``) over 2 CPU processes (gloo) trains a transformed model exactly like one
process on the same global batch: dropout (p=0), weight norm, spectral norm, L1 and L2, on a model
whose shards are uneven (7 and 5 rows over 2 ranks) and empty (1 row). Spectral norm's vectors are
identical on every rank, the audit of the sharded model is the unsharded model's, and a model
already sharded is refused with the fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist

from .conftest import ROOT

WORKER = ROOT / "tests" / "fsdp_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
from fsdp_worker import CASES, build  # noqa: E402

import regfx  # noqa: E402

SPECTRAL_CASES = ("spectral_norm", "combined", "root_only")
PENALTY_CASES = ("l1", "l2", "combined", "root_only")


def case_params(names: Any) -> list[Any]:
    return list(names)


def unavailable() -> str | None:
    """Why FSDP2 over gloo cannot run with this torch build, or None."""
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch.distributed.fsdp.fully_shard cannot be imported ({exc})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Both ranks' results and the single-process reference's, run side by side."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FSDP2 tests cannot run on CI: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = free_port()
    jobs = [(rank, 2, tmp / f"rank{rank}.pt") for rank in range(2)] + [(0, 1, tmp / "single.pt")]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                               str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank, world, out in jobs]
    try:
        for p in procs:
            _, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rank0, rank1, single = (torch.load(out, weights_only=False) for _, _, out in jobs)
    return [rank0, rank1], single


def results(runs: tuple[list[dict[str, Any]], dict[str, Any]], case: str) -> tuple[Any, Any, Any]:
    (rank0, rank1), single = runs
    for where, r in (("rank 0", rank0), ("rank 1", rank1), ("single process", single)):
        assert "error" not in r[case], f"{case} failed on {where}:\n{r[case]['error']}"
    assert rank0[case]["sharded"] and rank1[case]["sharded"] and not single[case]["sharded"]
    return rank0[case], rank1[case], single[case]


@pytest.mark.parametrize("case", case_params(CASES))
def test_sharded_training_equals_one_process(runs: Any, case: str) -> None:
    a, b, single = results(runs, case)
    assert a["state"].keys() == b["state"].keys() == single["state"].keys()
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), f"ranks differ on {key}"
        torch.testing.assert_close(value, single["state"][key], rtol=0, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # training moved every weight, so the comparison is not vacuous
    for key, value in a["state"].items():
        if not key.endswith(("._u", "._v")):
            assert not torch.allclose(value, a["initial"][key], rtol=0, atol=1e-4), key


@pytest.mark.parametrize("case", case_params(PENALTY_CASES))
def test_penalties_apply_under_fsdp_and_report_the_global_value(runs: Any, case: str) -> None:
    a, b, single = results(runs, case)
    # the global value (all shards), the same on every rank and as one process computes it
    assert a["penalty"] == b["penalty"] > 0
    assert a["penalty"] == pytest.approx(single["penalty"], rel=1e-6)
    if case in ("l1", "l2"):
        # the penalty changed training: against the unpenalized run of the same model and data
        plain = results(runs, "dropout")[0]["state"]
        assert not torch.allclose(a["state"]["0.weight"], plain["0.weight"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", case_params(SPECTRAL_CASES))
def test_spectral_vectors_are_identical_on_every_rank(runs: Any, case: str) -> None:
    a, b, single = results(runs, case)
    assert a["vectors"] and a["vectors"].keys() == b["vectors"].keys()
    for key, value in a["vectors"].items():
        assert torch.equal(value, b["vectors"][key]), f"ranks differ on {key}"
        torch.testing.assert_close(value, single["vectors"][key], rtol=0, atol=1e-5)


def test_ranks_draw_different_vectors_before_they_are_synchronized() -> None:
    """The workers seed each rank differently before transforming: without regfx's broadcast
    their spectral-norm vectors would differ, so the test above means something."""
    drawn = []
    for rank in range(2):
        model = build()
        torch.manual_seed(100 + rank)
        drawn.append(dict(regfx.transform(model, spectral="linear").named_buffers()))
    assert not torch.allclose(drawn[0]["0.parametrizations.weight.0._u"],
                              drawn[1]["0.parametrizations.weight.0._u"])


@pytest.mark.parametrize("case", case_params(CASES))
def test_audit_of_the_sharded_model_is_the_unsharded_models(runs: Any, case: str) -> None:
    a, b, single = results(runs, case)
    for key in ("audit_before", "audit"):
        for part in ("params", "findings", "summary"):
            assert a[key][part] == b[key][part] == single[key][part], (key, part)
    names = [p["name"] for p in a["audit"]["params"]]
    assert len(names) == len(set(names)) == 6  # 3 weights, 3 biases, each once
    shapes = {p["name"]: p["shape"] for p in a["audit"]["params"]}
    assert shapes["0.weight"] == [7, 6] and shapes["4.weight"] == [1, 5]  # logical, not shards


def test_transforming_a_sharded_model_says_to_transform_first(runs: Any) -> None:
    (rank0, rank1), _ = runs
    for errors in (rank0["transform_sharded"], rank1["transform_sharded"]):
        assert set(errors) == {"transform", "transform_inplace", "plan", "bake"}
        for call, error in errors.items():
            assert error.startswith("regfx.errors.RegfxError: "), (call, error)
            assert "apply regfx before fully_shard" in error, (call, error)
