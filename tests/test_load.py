from pathlib import Path

import pytest
from torch import nn

from regfx.errors import LoadError
from regfx.load import load_model

from .conftest import fixture_path


def write(tmp_path: Path, body: str, name: str = "m.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_default_factory_and_extras() -> None:
    loaded = load_model(str(fixture_path("cnn")))
    assert type(loaded.model).__name__ == "SmallCNN"
    assert loaded.example_inputs is not None
    assert loaded.build_optimizer() is not None


def test_named_factory(tmp_path: Path) -> None:
    spec = write(tmp_path, "from torch import nn\ndef small():\n    return nn.Linear(2, 3)\n")
    assert isinstance(load_model(spec + ":small").model, nn.Linear)


def test_default_name_order(tmp_path: Path) -> None:
    body = ("from torch import nn\nmodel = nn.Linear(1, 1)\n"
            "def get_model():\n    return nn.Linear(2, 2)\n")
    assert load_model(write(tmp_path, body)).model.in_features == 2


def test_module_instance_named_model(tmp_path: Path) -> None:
    spec = write(tmp_path, "from torch import nn\nmodel = nn.Linear(5, 1)\n")
    assert load_model(spec).model.in_features == 5


def test_sibling_imports_work(tmp_path: Path) -> None:
    write(tmp_path, "from torch import nn\nclass Block(nn.Linear):\n    pass\n", "blocks.py")
    spec = write(tmp_path, "from blocks import Block\ndef build_model():\n    return Block(1, 1)\n")
    assert type(load_model(spec).model).__name__ == "Block"


def test_package_module_factory() -> None:
    loaded = load_model("torch.nn:Identity")
    assert isinstance(loaded.model, nn.Identity)


@pytest.mark.parametrize(
    ("body", "suffix", "pattern"),
    [
        (None, "", "does not exist"),
        ("def build_model(:\n", "", "syntax error"),
        ("x = 1\n", "", "no model found"),
        ("def build_model():\n    raise RuntimeError('boom')\n", "", "raised RuntimeError: boom"),
        ("def build_model():\n    return 42\n", "", "returned int, not an nn.Module"),
        ("model = 'a string'\n", "", "not an nn.Module or a factory"),
        ("import torch\nmodel = torch.nn.Linear(1, 1)\n", ":missing", "has no 'missing'"),
        ("raise ImportError('no such dep')\n", "", "importing"),
    ],
)
def test_failures_are_one_line_load_errors(tmp_path: Path, body: str | None, suffix: str,
                                           pattern: str) -> None:
    spec = str(tmp_path / "absent.py") if body is None else write(tmp_path, body)
    with pytest.raises(LoadError, match=pattern) as info:
        load_model(spec + suffix)
    assert "\n" not in str(info.value)


def test_unknown_package() -> None:
    with pytest.raises(LoadError, match="cannot import module"):
        load_model("no_such_package_xyz:build")


def test_not_a_file_nor_factory() -> None:
    with pytest.raises(LoadError, match="neither a .py file"):
        load_model("justaword")


def test_bad_optimizer_factory(tmp_path: Path) -> None:
    spec = write(tmp_path, "from torch import nn\nmodel = nn.Linear(1, 1)\n"
                           "def build_optimizer(m):\n    return 'sgd'\n")
    with pytest.raises(LoadError, match="not a torch.optim.Optimizer"):
        load_model(spec).build_optimizer()
