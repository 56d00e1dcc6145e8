"""Checkpoint safety: weights_only loading, embedded recipe, clear errors, never a crash."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

import regfx

from .conftest import load_fixture
from .helpers import eval_out


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, regfx.Recipe]:
    loaded = load_fixture("cnn")
    recipe = regfx.Recipe(dropout=0.2, dropout_after="conv,linear", spectral="conv", l2=1e-4)
    model = regfx.transform(loaded.model, recipe)
    path = tmp_path / "ckpt.pt"
    regfx.save_checkpoint(model, path)
    return path, recipe


def test_loads_weights_only_and_rebuilds_from_the_plain_model(saved: tuple[Path, regfx.Recipe]) -> None:
    path, recipe = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "regfx-checkpoint" and payload["recipe"] == recipe.to_dict()
    loaded = load_fixture("cnn")
    rebuilt = regfx.load_checkpoint(loaded.model, path)
    assert regfx.apply.recipe_of(rebuilt) == recipe
    assert not hasattr(loaded.model.fc, "regfx_dropout")  # the plain model is untouched
    for key, value in payload["state_dict"].items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    again = regfx.load_checkpoint(type(loaded.model)(), path)
    assert torch.equal(eval_out(again, loaded.example_inputs), eval_out(rebuilt, loaded.example_inputs))


def test_different_recipe_names_the_difference(saved: tuple[Path, regfx.Recipe]) -> None:
    path, _ = saved
    other = regfx.transform(load_fixture("cnn").model, dropout=0.2, dropout_after="conv,linear",
                            spectral="conv", l2=1e-3)
    with pytest.raises(regfx.CheckpointError, match=r"different recipe .*l2: 0.001 != 0.0001"):
        regfx.load_checkpoint(other, path)


@pytest.mark.parametrize("keep", [0, 1, 64, 0.5, -16])
def test_truncated_files_are_a_clear_error(saved: tuple[Path, regfx.Recipe], tmp_path: Path,
                                           keep: float) -> None:
    path, _ = saved
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[:n])
    with pytest.raises(regfx.CheckpointError, match=r"truncated or not a torch checkpoint") as info:
        regfx.load_checkpoint(load_fixture("cnn").model, broken)
    assert "\n" not in str(info.value)


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, ("raise SystemExit('code ran')",))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"format": "regfx-checkpoint", "payload": Evil()}, fh)
    with pytest.raises(regfx.CheckpointError, match="cannot read checkpoint"):
        regfx.load_checkpoint(load_fixture("cnn").model, path)


def test_missing_folder_and_foreign_files(tmp_path: Path) -> None:
    model = load_fixture("cnn").model
    with pytest.raises(regfx.CheckpointError, match="does not exist"):
        regfx.load_checkpoint(model, tmp_path / "none.pt")
    with pytest.raises(regfx.CheckpointError, match="does not exist"):
        regfx.load_checkpoint(model, tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(regfx.CheckpointError, match="not a regfx checkpoint"):
        regfx.load_checkpoint(model, plain)


def test_weights_that_do_not_fit(saved: tuple[Path, regfx.Recipe]) -> None:
    path, _ = saved
    from torch import nn

    with pytest.raises(regfx.CheckpointError, match=r"has sites on 'features.0'.* which Sequential does not"):
        regfx.load_checkpoint(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), path)
    # a model with the same layers but other weight shapes: the weights do not fit
    loaded = load_fixture("cnn")
    other = type(loaded.model)()
    other.fc = nn.Linear(other.fc.in_features, 3 * other.fc.out_features)
    with pytest.raises(regfx.CheckpointError, match=r"state dict does not match|size mismatch|shape"):
        regfx.load_checkpoint(other, path)


def test_checkpoint_carries_the_placement_apply_printed(tmp_path: Path) -> None:
    """The sites are stored: loading applies exactly them, even where planning without the
    example inputs would place dropout differently."""
    from torch import nn

    class Branchy(nn.Module):  # root forward does not trace: placement needs the example run
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            if h.sum() > -1e9:
                h = torch.relu(self.fc2(h))
            return self.out(h)

    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(3, 4)
    out = regfx.transform(model, dropout=0.2, example_inputs=(x,))
    path = tmp_path / "branchy.pt"
    regfx.save_checkpoint(out, path)
    rebuilt = regfx.load_checkpoint(Branchy(), path)
    names = sorted(n for n, _ in rebuilt.named_modules() if "regfx_dropout" in n)
    assert names == sorted(n for n, _ in out.named_modules() if "regfx_dropout" in n)
    assert names == ["fc1.regfx_dropout", "fc2.regfx_dropout"]
    torch.testing.assert_close(rebuilt.eval()(x), out.eval()(x))


def test_old_checkpoints_without_sites_still_load(tmp_path: Path) -> None:
    loaded = load_fixture("cnn")
    out = regfx.transform(loaded.model, dropout=0.2, spectral="conv")
    payload = torch.load(io.BytesIO(regfx.save_checkpoint(out)), weights_only=True)
    payload["version"] = 1
    del payload["plan"]
    path = tmp_path / "v1.pt"
    torch.save(payload, path)
    rebuilt = regfx.load_checkpoint(loaded.model, path)
    x = loaded.example_inputs[0]
    torch.testing.assert_close(rebuilt.eval()(x), out.eval()(x))


@pytest.mark.parametrize("recipe", [{"dropout": 0.1, "weight_norm": "linear"},
                                    {"dropout": 0.1, "spectral": "linear,conv"}])
def test_torch_save_of_a_baked_model_works_for_every_fixture(fixture_name: str, recipe: dict) -> None:
    loaded = load_fixture(fixture_name)
    out = regfx.transform(loaded.model, example_inputs=loaded.inputs(), **recipe)
    buf = io.BytesIO()
    torch.save(regfx.bake(out), buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert list(again.state_dict()) == list(loaded.model.state_dict())
    torch.testing.assert_close(eval_out(again, loaded.example_inputs), eval_out(out, loaded.example_inputs),
                               rtol=1e-5, atol=1e-5)
    # the transformed model itself pickles, or says what to save instead
    try:
        torch.save(out, io.BytesIO())
    except regfx.RegfxError as exc:
        assert "state_dict()" in str(exc) and "save_checkpoint" in str(exc)
    except RuntimeError as exc:  # torch's own refusal for parametrized modules
        assert "state_dict()" in str(exc)
