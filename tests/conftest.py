"""Shared test helpers: the fixture models under fixtures/, loaded the way the CLI loads them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

# Fixture models: file stem -> whether torch.fx traces the whole model.
MODEL_FIXTURES = {
    "mlp": True,
    "cnn": True,
    "resnet": True,
    "transformer_block": True,
    "control_flow": False,
    "tied": True,
    "functional": True,
    "head_only": True,
    "hf_bert": False,
    "hf_gpt2": False,
    "hf_llama": False,
}


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.py"


def load_fixture(name: str):  # type: ignore[no-untyped-def]
    from regfx.load import load_model

    return load_model(str(fixture_path(name)))


@pytest.fixture(params=sorted(MODEL_FIXTURES))
def fixture_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Small inputs: one intra-op thread is faster (on a busy 2-core machine, several times)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GOLDEN = ROOT / "tests" / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--refresh-golden", action="store_true", default=False,
                     help="Rewrite the golden files under tests/golden/ from the current output.")
    parser.addoption("--soak-steps", type=int, default=150,
                     help="Training steps of the soak test (1000 for the full soak).")


@pytest.fixture
def golden(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``golden(name, text)``: compare with tests/golden/<name>, or rewrite it under
    ``--refresh-golden``. Never rewritten silently."""
    refresh = bool(request.config.getoption("--refresh-golden"))

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if refresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.is_file(), f"missing golden file {path}; run pytest --refresh-golden"
        expected = path.read_text(encoding="utf-8")
        assert text == expected, f"{name} differs from the golden file; if the change is " \
                                 "intended, run pytest --refresh-golden and review the diff"

    return check
