"""A generated-input campaign against the input contract.

CLI flags, ``-o`` targets, recipe and policy TOML, baseline JSON and library arguments are drawn
by hypothesis, and every run must keep the contract:

- the command exits 0, 1 or 2; exit 2 prints exactly one stderr line ``regfx: error: ...``, with
  no traceback and no "unexpected";
- on exit 2 no file is created, replaced or modified (the folder lists the same bytes and modes);
- the model file is never changed; the library raises nothing but RegfxError and leaves the
  model it was given unchanged.

A small derandomized run is part of the suite. ``REGFX_HYPOTHESIS_PROFILE=explore`` runs 10,000
examples in all (2,500 per campaign; 100 each by default), with fresh randomness::

    REGFX_HYPOTHESIS_PROFILE=explore python -m pytest -q -p no:cacheprovider tests/cli/test_campaign.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import regfx
from regfx.audit.policy import Policy
from regfx.cli import main
from regfx.recipe import Recipe

EXPLORE = os.environ.get("REGFX_HYPOTHESIS_PROFILE") == "explore"
CAMPAIGN = settings(
    max_examples=2500 if EXPLORE else 100,
    derandomize=not EXPLORE,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

MODEL = ("import torch\nfrom torch import nn\n"
         "def build_model():\n"
         "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))\n"
         "def example_inputs():\n    return (torch.randn(1, 3, 4, 4),)\n")

WORDS = ["linear", "conv", "conv1d", "conv2d", "conv3d", "embedding", "attention", "norm", "rnn",
         "all", "torch.nn.Linear"]
ODD_WORDS = [".", ".x", "x.", "typing.Any", "builtins.object", "collections.abc.Callable",
             "lineer", "", ",", "torch.nn.functional.linear", "os.path", "no_such.Mod", "LINEAR",
             "torch.nn.Module", "a..b", " linear ", "é.x", "linear,,conv"]

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
types_arg = st.one_of(st.sampled_from(WORDS + ODD_WORDS),
                      st.lists(st.sampled_from(WORDS + ODD_WORDS), min_size=1, max_size=3)
                      .map(",".join), text)
number_arg = st.one_of(st.sampled_from(["0", "0.1", "0.5", "0.99", "1", "-0.1", "nan", "inf",
                                        "1e-4", "abc", "", "1e400"]),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))


def listing(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        st_ = os.lstat(p)
        out[str(p.relative_to(folder))] = (
            st_.st_mode, p.read_bytes() if stat.S_ISREG(st_.st_mode) else None)
    return out


@contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="regfx-campaign-") as name:
        folder = Path(name)
        (folder / "model.py").write_text(MODEL)
        (folder / "existing.txt").write_text("keep me")
        (folder / "sub").mkdir()
        (folder / "link.txt").symlink_to("existing.txt")
        yield folder


def output_arg(folder: Path, choice: str) -> str:
    return {
        "new": str(folder / "out.file"),
        "existing": str(folder / "existing.txt"),
        "link": str(folder / "link.txt"),
        "empty": "",
        "folder": str(folder / "sub"),
        "trailing": str(folder / "newdir") + "/",
        "missing-folder": str(folder / "no" / "such" / "out.file"),
        "model": str(folder / "model.py"),
        "devnull": "/dev/null",
        "recipe": str(folder / "recipe.toml"),
        "policy": str(folder / "policy.toml"),
        "baseline": str(folder / "base.json"),
    }[choice]


OUTPUTS = st.sampled_from(["new", "existing", "link", "empty", "folder", "trailing",
                           "missing-folder", "model", "devnull", "recipe", "policy", "baseline"])


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 1 if code else 0), out.out, out.err


def check_contract(folder: Path, before: dict[str, Any], argv: list[str], code: int, out: str,
                   err: str) -> None:
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "unexpected" not in err, (argv, err)
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("regfx: error: "), (argv, err)
        assert listing(folder) == before, argv
    assert (folder / "model.py").read_text() == MODEL, argv


# -- TOML ----------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


scalar = st.one_of(st.booleans(), st.integers(-3, 10**20), st.floats(), text,
                   st.sampled_from(WORDS + ODD_WORDS + ["RFX101", "RFX4", "RFX999", "error",
                                                        "warning", "block", "element", "any",
                                                        "weight_decay", "no", "yes"]))
toml_values = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=2)), max_leaves=5)

RECIPE_KEYS = ["dropout", "dropout_after", "dropout-after", "dropout_position", "dropout_kind",
               "spectral", "weight_norm", "weight-norm", "n_power_iterations", "l1", "l2",
               "penalty_on", "include", "exclude", "strict", "audit", "dropuot"]
POLICY_KEYS = ["fail_on", "fail-on", "min_coverage", "select", "ignore", "require",
               "per_module_ignores", "per-module-ignores", "min_coverag"]


def toml_document(keys: list[str]) -> st.SearchStrategy[str]:
    body = st.dictionaries(st.one_of(st.sampled_from(keys), text), toml_values, max_size=4)

    def render(table: dict[str, Any], header: str) -> str:
        lines = [header] if header else []
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"

    shaped = st.tuples(body, st.sampled_from(["", "[tool.regfx]", "[tool.regfx.audit]",
                                              "[tool.black]", "[[tool.regfx]]", "[tool]"]))
    odd = st.sampled_from([
        'tool = "x"\n', "[tool]\nregfx = 5\n", "[tool.regfx]\naudit = 5\n",
        "\ufeffdropout = 0.1\n", "x = " + "[" * 3000 + "]" * 3000 + "\n", "dropout = [\n",
        '[tool.regfx]\ndropout-after = "linear"\ndropout_after = "conv"\n',
    ])
    return st.one_of(shaped.map(lambda t: render(*t, )), odd)


def toml_bytes(keys: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(toml_document(keys).map(lambda s: s.encode("utf-8")),
                     st.sampled_from([b"dropout_after = 'lin\xe9ar'\n", b"\xff\xfe\x00d",
                                      b"\xef\xbb\xbf[tool.regfx]\ndropout = 0.2\n"]))


# -- baselines -----------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6)


@st.composite
def baseline_bytes(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "list", "junk", "deep", "raw"]))
    if kind == "junk":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    if kind == "raw":
        return draw(st.sampled_from([b"{broken", b"", b"\xff\xfe{}", b"[]", b"null", b"1"]))
    report = copy.deepcopy(valid)
    if kind in ("mutated", "list"):
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from([("schema_version",), ("model",), ("source",),
                                         ("summary",), ("summary", "coverage"), ("findings",),
                                         ("findings", 0), ("findings", 0, "code")]))
            value = draw(json_values)
            target: Any = report
            for part in path[:-1]:
                if isinstance(target, dict) and isinstance(part, str) and part in target:
                    target = target[part]
                elif isinstance(target, list) and isinstance(part, int) and len(target) > part:
                    target = target[part]
                else:
                    break
            else:
                last = path[-1]
                if isinstance(target, dict) and isinstance(last, str):
                    target[last] = value
                elif isinstance(target, list) and isinstance(last, int) and target:
                    target[0] = value
    if kind == "list":
        other = copy.deepcopy(valid)
        other["source"] = draw(st.sampled_from([valid.get("source"), "elsewhere.py", None]))
        return json.dumps(draw(st.permutations([report, other]))).encode()
    return json.dumps(report).encode()


# -- the campaigns -------------------------------------------------------------------------

@given(data=st.data())
@CAMPAIGN
def test_apply_flags_keep_the_contract(data: st.DataObject,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with workspace() as folder:
        argv = ["apply", str(folder / "model.py")]
        for flag, strategy in (("--dropout", number_arg), ("--dropout-after", types_arg),
                               ("--spectral", types_arg), ("--weight-norm", types_arg),
                               ("--l1", number_arg), ("--l2", number_arg),
                               ("--penalty-on", types_arg), ("--include", text),
                               ("--exclude", text),
                               ("--dropout-position", st.sampled_from(["block", "output", "x"])),
                               ("--n-power-iterations", st.sampled_from(["1", "0", "-1", "x"])),
                               ("--timeout", st.sampled_from(["30", "0", "-1", "x"]))):
            if data.draw(st.booleans(), label=f"use {flag}"):
                argv += [flag, data.draw(strategy, label=flag)]
        for flag in ("--strict", "--dry-run"):
            if data.draw(st.booleans(), label=flag):
                argv.append(flag)
        if data.draw(st.booleans(), label="recipe"):
            (folder / "recipe.toml").write_bytes(data.draw(toml_bytes(RECIPE_KEYS), label="toml"))
            argv += ["--recipe", str(folder / "recipe.toml")]
        if data.draw(st.booleans(), label="pyproject"):
            (folder / "pyproject.toml").write_bytes(data.draw(toml_bytes(RECIPE_KEYS),
                                                              label="pyproject"))
        if data.draw(st.booleans(), label="-o"):
            argv += ["-o", output_arg(folder, data.draw(OUTPUTS, label="output"))]
        argv += ["--format", data.draw(st.sampled_from(["text", "json"]), label="format")]
        before = listing(folder)
        code, out, err = run_cli(argv, capsys)
        check_contract(folder, before, argv, code, out, err)
        if code == 0 and "json" in argv:
            json.loads(out)


@given(data=st.data())
@CAMPAIGN
def test_audit_inputs_keep_the_contract(data: st.DataObject,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with workspace() as folder:
        model = str(folder / "model.py")
        valid = regfx.audit(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(16, 2))).to_dict()
        valid["source"] = model
        argv = ["audit", model]
        if data.draw(st.booleans(), label="two models"):
            argv.append(model)
        if data.draw(st.booleans(), label="policy"):
            (folder / "policy.toml").write_bytes(data.draw(toml_bytes(POLICY_KEYS), label="toml"))
            argv += ["--policy", str(folder / "policy.toml")]
        if data.draw(st.booleans(), label="pyproject"):
            (folder / "pyproject.toml").write_bytes(data.draw(toml_bytes(POLICY_KEYS),
                                                              label="pyproject"))
        if data.draw(st.booleans(), label="baseline"):
            (folder / "base.json").write_bytes(data.draw(baseline_bytes(valid), label="json"))
            argv += ["--baseline", str(folder / "base.json")]
        if data.draw(st.booleans(), label="fail-on"):
            argv += ["--fail-on", data.draw(st.sampled_from(["error", "warning", "info"]))]
        if data.draw(st.booleans(), label="-o"):
            argv += ["-o", output_arg(folder, data.draw(OUTPUTS, label="output"))]
        fmt = data.draw(st.sampled_from(["text", "json", "markdown", "github", "junit"]))
        argv += ["--format", fmt]
        before = listing(folder)
        code, out, err = run_cli(argv, capsys)
        if argv.count(model) == 2 and code == 2:
            # several MODELs: each failing one prints its own line, the others still report
            lines = err.splitlines()
            assert all(line.startswith("regfx: error: ") for line in lines), (argv, err)
            assert "Traceback" not in err and "unexpected" not in err, (argv, err)
            assert (folder / "model.py").read_text() == MODEL
            return
        check_contract(folder, before, argv, code, out, err)
        if code in (0, 1) and fmt == "json" and "-o" not in argv:
            json.loads(out)


def fingerprint(model: nn.Module) -> tuple[str, list[tuple[str, bytes]], bool]:
    return (repr(model), [(k, v.detach().numpy().tobytes()) for k, v in
                          model.state_dict().items()], model.training)


library_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(), text,
                           st.sampled_from(WORDS + ODD_WORDS + ["RFX101", "error"]),
                           st.lists(st.one_of(text, st.integers(), st.sampled_from(WORDS)),
                                    max_size=2),
                           st.dictionaries(text, st.one_of(text, st.integers()), max_size=2),
                           st.just(object()), st.just(nn.Linear(2, 2)))
TRANSFORM_KEYS = ["dropout", "dropout_after", "spectral", "weight_norm", "l1", "l2", "penalty_on",
                  "include", "exclude", "inplace", "strict", "dropout_position", "dropout_kind",
                  "n_power_iterations", "example_inputs"]
POLICY_FIELDS = ["fail_on", "min_coverage", "select", "ignore", "require", "per_module_ignores"]


@given(data=st.data())
@CAMPAIGN
def test_library_arguments_raise_only_regfx_errors(data: st.DataObject) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = fingerprint(model)
    call = data.draw(st.sampled_from(["transform", "plan", "Recipe", "Policy", "audit-policy",
                                      "penalty", "trace"]))
    kwargs = data.draw(st.dictionaries(
        st.sampled_from(POLICY_FIELDS if call in ("Policy", "audit-policy") else TRANSFORM_KEYS),
        library_values, max_size=3))
    if call in ("transform", "plan"):
        kwargs.pop("inplace", None)
    try:
        if call == "transform":
            regfx.transform(model, **kwargs)
        elif call == "plan":
            kwargs.pop("example_inputs", None)
            regfx.plan(model, **kwargs)
        elif call == "Recipe":
            kwargs.pop("inplace", None)
            kwargs.pop("example_inputs", None)
            Recipe(**kwargs)
        elif call == "Policy":
            Policy(**kwargs).validate()
        elif call == "audit-policy":
            regfx.audit(model, policy=kwargs)
        elif call == "penalty":
            regfx.penalty(kwargs.get("l1", model))
        else:
            regfx.trace(model, example_inputs=kwargs.get("example_inputs"))
    except regfx.RegfxError as exc:
        assert "\n" not in str(exc), str(exc)
    assert fingerprint(model) == before


@given(text=toml_bytes(RECIPE_KEYS + POLICY_KEYS))
@CAMPAIGN
def test_toml_files_raise_only_regfx_errors(text: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="regfx-campaign-") as name:
        path = Path(name) / "pyproject.toml"
        path.write_bytes(text)
        for read in (Recipe.from_toml, Policy.from_toml, Recipe.from_pyproject,
                     Policy.from_pyproject):
            try:
                read(path if "toml" in read.__name__ else Path(name))
            except regfx.RegfxError as exc:
                assert "\n" not in str(exc), str(exc)
