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
