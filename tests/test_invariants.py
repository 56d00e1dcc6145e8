"""The seven invariants of the design contract, asserted on every fixture model."""

import copy

import pytest
import torch

import regfx

from .conftest import load_fixture
from .helpers import call, eval_out

RECIPES = {
    "dropout": dict(dropout=0.3, dropout_after="linear,conv"),
    "weight_norm": dict(weight_norm="linear,conv"),
    "everything": dict(dropout=0.2, dropout_after="all", spectral="conv", weight_norm="linear",
                       l1=1e-5, l2=1e-4),
}


def transformed(name: str, recipe: str):  # type: ignore[no-untyped-def]
    loaded = load_fixture(name)
    with _ignore():
        out = regfx.transform(loaded.model, **RECIPES[recipe],
                              example_inputs=loaded.example_inputs)
    return loaded, out


class _ignore:
    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", regfx.RegfxWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def logical_keys(model: torch.nn.Module) -> set[str]:
    out = set()
    for key in model.state_dict():
        if ".parametrizations." in f".{key}":
            head, _, tail = key.partition("parametrizations.")
            tensor, _, rest = tail.partition(".")
            if rest.startswith("original"):
                out.add(f"{head}{tensor}")
            continue
        out.add(key)
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_1_input_model_untouched(fixture_name: str, recipe: str) -> None:
    loaded = load_fixture(fixture_name)
    before = copy.deepcopy(loaded.model.state_dict())
    classes = [type(m) for m in loaded.model.modules()]
    with _ignore():
        regfx.transform(loaded.model, **RECIPES[recipe])
    assert [type(m) for m in loaded.model.modules()] == classes
    after = loaded.model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("regfx" in n for n, _ in loaded.model.named_modules())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_2_classes_kept(fixture_name: str, recipe: str) -> None:
    loaded, out = transformed(fixture_name, recipe)
    assert isinstance(out, type(loaded.model))
    assert type(out).__name__ == type(loaded.model).__name__
    original = dict(loaded.model.named_modules())
    for name, mod in out.named_modules():
        if name in original:
            assert isinstance(mod, type(original[name])), name
    for attr in vars(loaded.model):
        if not attr.startswith("_"):
            assert hasattr(out, attr)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_3_state_dict_keys(fixture_name: str, recipe: str) -> None:
    loaded, out = transformed(fixture_name, recipe)
    plain = set(loaded.model.state_dict())
    assert logical_keys(out) == plain
    if recipe == "dropout":
        assert list(out.state_dict()) == list(loaded.model.state_dict())


@pytest.mark.parametrize("recipe", ["dropout", "weight_norm"])
def test_4_eval_outputs_and_mode_toggling(fixture_name: str, recipe: str) -> None:
    loaded, out = transformed(fixture_name, recipe)
    expected = eval_out(loaded.model, loaded.example_inputs)
    got = eval_out(out, loaded.example_inputs)
    if recipe == "dropout":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out.train()
    assert all(m.training for m in out.modules())
    out.eval()
    assert not any(m.training for m in out.modules())
    assert torch.equal(eval_out(out, loaded.example_inputs), got)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_5_idempotent(fixture_name: str, recipe: str) -> None:
    loaded, once = transformed(fixture_name, recipe)
    with _ignore():
        twice = regfx.transform(once, **RECIPES[recipe], example_inputs=loaded.example_inputs)
    assert [n for n, _ in twice.named_modules()] == [n for n, _ in once.named_modules()]
    assert list(twice.state_dict()) == list(once.state_dict())
    torch.testing.assert_close(eval_out(twice, loaded.example_inputs),
                               eval_out(once, loaded.example_inputs))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_6_bake(fixture_name: str, recipe: str) -> None:
    loaded, out = transformed(fixture_name, recipe)
    baked = regfx.bake(out)
    assert list(baked.state_dict()) == list(loaded.model.state_dict())
    assert type(baked) is type(loaded.model)
    assert not any("regfx" in n for n, _ in baked.named_modules())
    torch.testing.assert_close(eval_out(baked, loaded.example_inputs),
                               eval_out(out, loaded.example_inputs), rtol=1e-5, atol=1e-5)


def test_deepcopy_of_transformed_model(fixture_name: str) -> None:
    loaded, out = transformed(fixture_name, "everything")
    clone = copy.deepcopy(out)
    torch.testing.assert_close(eval_out(clone, loaded.example_inputs),
                               eval_out(out, loaded.example_inputs))
    clone.train()
    torch.manual_seed(0)
    a = call(clone, loaded.example_inputs)
    assert a.shape == eval_out(out, loaded.example_inputs).shape


def test_a_different_recipe_replans_from_the_model_structure() -> None:
    loaded = load_fixture("mlp")
    once = regfx.transform(loaded.model, dropout=0.1)
    other = regfx.transform(once, dropout=0.3)
    drops = {n: m.p for n, m in other.named_modules() if n.endswith("regfx_dropout")}
    assert drops and set(drops.values()) == {0.3}
    assert set(drops) == {n for n, _ in once.named_modules() if n.endswith("regfx_dropout")}
    assert regfx.audit(other).param(next(iter(drops)).rsplit(".", 1)[0] + ".weight").regularizers \
        == [{"kind": "dropout", "p": 0.3, "via": next(iter(drops))}]
    # the same recipe again changes nothing, and keeps the stored sites
    again = regfx.transform(other, dropout=0.3)
    assert regfx.state.state_of(again).sites == regfx.state.state_of(other).sites
    # norms change only where the recipe changes them
    normed = regfx.transform(once, dropout=0.1, spectral="linear")
    back = regfx.transform(normed, dropout=0.1)
    assert list(back.state_dict()) == list(once.state_dict())
    torch.testing.assert_close(eval_out(back, loaded.example_inputs),
                               eval_out(normed, loaded.example_inputs))
