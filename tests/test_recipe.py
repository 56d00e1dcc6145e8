from pathlib import Path

import pytest

import regfx
from regfx.recipe import Recipe, RecipeError


def test_defaults_validate() -> None:
    assert Recipe().validate() == Recipe()


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("dropout", 1.0, "dropout must be a probability"),
        ("dropout", -0.2, "dropout must be a probability"),
        ("l1", -1.0, "l1 must be a finite number >= 0"),
        ("l2", float("inf"), "l2 must be a finite number >= 0"),
        ("dropout_position", "middle", "dropout_position must be one of"),
        ("dropout_kind", "spatial", "dropout_kind must be one of"),
        ("n_power_iterations", 0, "n_power_iterations must be an integer"),
        ("spectral", "convv", "did you mean 'conv'"),
    ],
)
def test_bad_values_name_field_and_value(field: str, value: object, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        Recipe(**{field: value}).validate()


def test_from_toml_tool_table_and_dashes(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.regfx]\ndropout = 0.2\ndropout-after = ["linear", "conv"]\n'
                    'l2 = 1\nexclude = "head"\n[tool.regfx.audit]\nmin_coverage = 0.5\n')
    recipe = Recipe.from_toml(path)
    assert recipe.dropout == 0.2 and recipe.dropout_after == "linear,conv"
    assert recipe.l2 == 1.0 and recipe.exclude == ("head",)
    sub = tmp_path / "sub"
    sub.mkdir()
    assert Recipe.from_pyproject(sub) == recipe  # found in a folder above


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("dropuot = 0.1\n")
    with pytest.raises(RecipeError, match="unknown key 'dropuot'.*did you mean 'dropout'"):
        Recipe.from_toml(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("dropout = = 1\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml(path)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_toml(tmp_path / "absent.toml")


def test_round_trip_and_diff() -> None:
    recipe = Recipe(dropout=0.1, spectral="conv", include=("a*",))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.diff(recipe.replace(dropout=0.2)) == ["dropout: 0.1 != 0.2"]


def test_explicit_keywords_override_the_recipe_even_with_default_values() -> None:
    from torch import nn

    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2))
    plan = regfx.plan(model, regfx.Recipe(dropout=0.1, dropout_after="conv"), dropout_after="linear")
    assert plan.recipe.dropout_after == "linear"
    assert [s.layer for s in plan.dropout] == ["3"]
    off = regfx.plan(model, regfx.Recipe(l2=1e-3, dropout=0.2), l2=0.0, dropout=None)
    assert off.recipe.l2 == 0.0 and off.penalty is None
    assert off.recipe.dropout is None and off.dropout == []
    kept = regfx.plan(model, regfx.Recipe(l2=1e-3, include=("3",)))
    assert kept.recipe.l2 == 1e-3 and kept.recipe.include == ("3",)
    assert regfx.plan(model, kept.recipe, include=()).recipe.include == ()
    assert regfx.plan(model, include="3").recipe.include == ("3",)


def test_resolve_recipe_layers_and_errors() -> None:
    from regfx.recipe import NOT_GIVEN, resolve_recipe

    base = regfx.Recipe(l2=1e-3, dropout=0.1)
    mid = regfx.Recipe(dropout=0.3)
    assert resolve_recipe(mid, base).dropout == 0.3
    assert resolve_recipe(None, base).l2 == 1e-3
    assert resolve_recipe(None, base, l2=NOT_GIVEN).l2 == 1e-3
    assert resolve_recipe(None, base, l2=0.0).l2 == 0.0
    assert repr(NOT_GIVEN) == "NOT_GIVEN"
    with pytest.raises(regfx.RegfxError, match="unknown key 'dropot'.*did you mean 'dropout'"):
        resolve_recipe(None, dropot=0.1)
    with pytest.raises(regfx.RegfxError, match="recipe must be a regfx.Recipe"):
        resolve_recipe({"dropout": 0.1})  # type: ignore[arg-type]
