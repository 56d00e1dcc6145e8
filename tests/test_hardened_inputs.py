"""Every input surface is validated at the boundary: a RegfxError subclass naming the field,
the value and the fix, never a raw exception from deep inside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import regfx
from regfx.audit.policy import Policy, PolicyError
from regfx.audit.report import BaselineError, load_baselines, pick_baseline, read_baseline
from regfx.errors import LoadError, SelectionError
from regfx.load import load_model
from regfx.recipe import Recipe, RecipeError
from regfx.select import parse_types

MLP = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(("word", "needle"), [
    (".", "is not a dotted class path"),
    (".x", "is not a dotted class path"),
    ("x.", "is not a dotted class path"),
    ("a..b", "is not a dotted class path"),
    ("typing.Any", "is not an nn.Module subclass"),
    ("builtins.object", "is not an nn.Module subclass"),
    ("collections.abc.Callable", "is not an nn.Module subclass"),
    ("no_such_pkg.Layer", "cannot import 'no_such_pkg'"),
])
def test_class_paths_must_name_module_classes(word: str, needle: str) -> None:
    with pytest.raises(SelectionError, match=needle):
        parse_types(word)
    with pytest.raises(RecipeError, match=needle):
        Recipe(spectral=word)
    with pytest.raises(PolicyError, match=needle):
        Policy(require={word: ("any",)}).validate()


def test_a_real_class_path_still_selects() -> None:
    assert parse_types("torch.nn.Linear")(nn.Linear(1, 1))
    assert not parse_types("torch.nn.Linear")(nn.ReLU())


@pytest.mark.parametrize(("text", "needle"), [
    ('tool = "x"\n', "tool in .* must be a table"),
    ("[tool]\nregfx = 5\n", "tool.regfx in .* must be a table"),
    ("[[tool.regfx]]\ndropout = 0.1\n", r"an array of tables \(\[\[...\]\]\)"),
    ('[tool.regfx]\nstrict = "no"\n', "strict must be true or false, got 'no'"),
    ('[tool.regfx]\ndropout-after = "linear"\ndropout_after = "conv"\n',
     "sets 'dropout_after' twice, as 'dropout-after' and 'dropout_after'; keep one"),
    ("[tool.black]\nline-length = 100\n", r"has no \[tool.regfx\] table"),
])
def test_recipe_toml_shape(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=needle):
        Recipe.from_toml(path)


@pytest.mark.parametrize("text", ['tool = "x"\n', "[tool]\nregfx = 5\n", "[[tool.regfx]]\n"])
def test_pyproject_shape_is_checked_when_found(tmp_path: Path, text: str) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(RecipeError, match="must be a table"):
        Recipe.from_pyproject(tmp_path)
    with pytest.raises(PolicyError, match="must be a table"):
        Policy.from_pyproject(tmp_path)


def test_policy_toml_shape_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('fail-on = "error"\nfail_on = "warning"\n')
    with pytest.raises(PolicyError, match="sets 'fail_on' twice"):
        Policy.from_toml(path)
    path.write_text('tool = "x"\n')
    with pytest.raises(PolicyError, match="tool in .* must be a table"):
        Policy.from_toml(path)


def test_a_utf8_bom_is_accepted_and_other_encodings_named(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(b"\xef\xbb\xbfdropout = 0.1\n")
    assert Recipe.from_toml(path).dropout == 0.1
    path.write_bytes("dropout_after = 'lin\u00e9ar'\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"is not UTF-8 text \(byte 0xe9 at offset 20\); save it as UTF-8"):
        Recipe.from_toml(path)
    with pytest.raises(PolicyError, match="is not UTF-8 text"):
        Policy.from_toml(path)


def test_deep_toml_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(RecipeError, match="nests tables or arrays too deeply"):
        Recipe.from_toml(path)


def report_dict(**changes: object) -> dict[str, object]:
    base: dict[str, object] = regfx.audit(MLP).to_dict()
    base.update(changes)
    return base


@pytest.mark.parametrize(("changes", "needle"), [
    ({"findings": [1]}, r"findings\[0\] must be an object, got 1"),
    ({"findings": [{"code": 5, "target": "x"}]}, r"findings\[0\].code must be a string"),
    ({"summary": {"coverage": "abc"}}, "summary.coverage must be a number in .0, 1., got 'abc'"),
    ({"summary": {"coverage": True}}, "summary.coverage must be a number"),
    ({"schema_version": "1"}, "schema_version must be an integer >= 1, got '1'"),
    ({"model": 3}, "model must be a string"),
    ({"schema_version": 99}, "newer than this regfx"),
])
def test_baseline_shape_is_checked_before_use(tmp_path: Path, changes: dict[str, object],
                                              needle: str) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(report_dict(**changes)))
    with pytest.raises(BaselineError, match=needle):
        read_baseline(path)


def test_deep_and_odd_json_baselines(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BaselineError, match="nests too deeply"):
        read_baseline(path)
    path.write_text("[]")
    with pytest.raises(BaselineError, match="empty list"):
        read_baseline(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(BaselineError, match="not UTF-8"):
        read_baseline(path)


def test_baselines_match_by_source_then_model(tmp_path: Path) -> None:
    a = report_dict(source="a.py", model="A")
    b = report_dict(source="b.py", model="B")
    path = tmp_path / "base.json"
    path.write_text(json.dumps([a, b]))
    reports = load_baselines(path)
    assert pick_baseline(reports, path, "B", "b.py")["source"] == "b.py"
    assert pick_baseline(reports, path, "A", "elsewhere/a.py")["source"] == "a.py"
    with pytest.raises(BaselineError, match="no report for c.py"):
        pick_baseline(reports, path, "C", "c.py")
    with pytest.raises(BaselineError, match="holds 2 reports"):
        read_baseline(path)
    one = load_baselines(path)[:1]
    assert pick_baseline(one, path, "Z", "z.py") is one[0]  # one model, one report
    with pytest.raises(BaselineError, match="no report for z.py"):
        pick_baseline(one, path, "Z", "z.py", only_model=False)


def test_policy_keyword_types() -> None:
    assert Policy(select="RFX101").validate().select == ("RFX101",)
    assert Policy(ignore=["RFX104"]).ignore == ("RFX104",)
    with pytest.raises(PolicyError, match=r"select must be a string or a list of strings, got \[1\]"):
        Policy(select=[1])  # type: ignore[list-item]
    with pytest.raises(PolicyError, match="ignore must be a string or a list of strings, got None"):
        Policy(ignore=None)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="require must be a dict"):
        Policy(require=["linear"])  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="fail_on must be one of"):
        Policy(fail_on=3).validate()  # type: ignore[arg-type]


def test_recipe_keyword_types() -> None:
    assert Recipe(include="enc*").include == ("enc*",)
    with pytest.raises(RecipeError, match="include must be a glob string or a list of glob .*None"):
        Recipe(include=None)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="strict must be true or false, got 'no'"):
        Recipe(strict="no")  # type: ignore[arg-type]
    with pytest.raises(regfx.RegfxError, match="include"):
        regfx.transform(MLP, recipe=Recipe(), include=5)


def test_audit_with_example_inputs_leaves_lazy_layers_lazy() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    regfx.audit(model, example_inputs=(torch.randn(2, 3),))
    assert model[0].has_uninitialized_params()
    assert isinstance(model[0], nn.LazyLinear)


def write(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_lazy_model_files_are_initialized_from_example_inputs_or_refused(tmp_path: Path) -> None:
    head = "import torch\nfrom torch import nn\ndef build_model():\n" \
           "    return nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))\n"
    with pytest.raises(LoadError, match="lazy layers .LazyLinear. that are not initialized; run "
                                        "one forward first"):
        load_model(write(tmp_path, "lazy.py", head))
    loaded = load_model(write(tmp_path, "lazy_in.py",
                              head + "def example_inputs():\n    return torch.randn(2, 3)\n"))
    assert loaded.model[0].weight.shape == (4, 3)
    with pytest.raises(LoadError, match=r"example_inputs\(\) do not fit Sequential.forward: "):
        load_model(write(tmp_path, "lazy_bad.py",
                         head + "def example_inputs():\n    return {'bogus': torch.randn(2, 3)}\n"))


def test_a_model_path_component_over_255_characters(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="cannot read model file .*File name too long"):
        load_model(str(tmp_path / ("m" * 300 + ".py")))
    with pytest.raises(LoadError, match="File name too long"):
        load_model(str(tmp_path / ("m" * 300)) + ":build")


def test_a_factory_returning_a_script_module(tmp_path: Path) -> None:
    path = write(tmp_path, "scripted.py", "import torch\nfrom torch import nn\ndef build_model():\n"
                 "    return torch.jit.script(nn.Linear(2, 2))\n")
    with pytest.warns() as record, pytest.raises(LoadError, match="returned a script module; "
                                                "script modules cannot be transformed"):
        import warnings
        warnings.warn("sentinel", UserWarning, stacklevel=1)
        load_model(path)
    assert [str(w.message) for w in record] == ["sentinel"]  # torch's FutureWarning dropped
