"""The JSON Schema shipped in the package: ``regfx audit --format json`` output validates against it."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator
from torch import nn

import regfx
from regfx.audit import report as report_module
from regfx.audit.inspect import KINDS
from regfx.audit.report import SCHEMA_VERSION, json_schema
from regfx.audit.rules import SEVERITIES

from ..cli.runner import run
from ..conftest import MODEL_FIXTURES, ROOT, fixture_path

SPECS = [str(fixture_path(name)) for name in sorted(MODEL_FIXTURES)] + [
    "fixtures/cnn.py:build_regularized",
    "fixtures/bad_practice.py",
    "fixtures/legacy_norms.py",       # deprecated hook-based norms
    "fixtures/regularized_mlp.py",
]


@pytest.fixture(scope="module")
def validator() -> Any:
    return Draft202012Validator(json_schema())


@pytest.fixture(autouse=True)
def _in_root() -> Iterator[None]:
    """Relative fixture specs (and relative ``location`` files) resolve against the repository."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


def errors(validator: Any, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def audit_json(*specs: str) -> Any:
    code, out, err = run("audit", *specs, "--format", "json")
    assert code in (0, 1), err
    return json.loads(out)


def test_schema_is_valid_draft_2020_12() -> None:
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]
    report = schema["$defs"]["report"]
    assert report["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert schema["$defs"]["regularizer"]["properties"]["kind"]["enum"] == list(KINDS)
    assert set(schema["$defs"]["finding"]["properties"]["severity"]["enum"]) == set(SEVERITIES)
    assert json_schema() is not json_schema()  # a new dict each call: callers may change it


def test_schema_ships_next_to_the_module() -> None:
    path = Path(report_module.__file__).with_name("report.schema.json")
    assert json.loads(path.read_text(encoding="utf-8")) == json_schema()


@pytest.mark.parametrize("spec", SPECS)
def test_cli_json_validates(validator: Any, spec: str) -> None:
    doc = audit_json(spec)
    assert isinstance(doc, dict)
    assert errors(validator, doc) == []
    assert _report_errors(doc) == []  # $defs/report alone accepts it too
    assert untyped(doc) == set()


def untyped(doc: dict[str, Any]) -> set[str]:
    """Fields of a report that the schema does not name (open objects accept them untyped)."""
    defs = json_schema()["$defs"]

    def missing(obj: dict[str, Any], name: str) -> set[str]:
        return {f"{name}.{k}" for k in obj if k not in defs[name]["properties"]}

    out = missing(doc, "report") | missing(doc["summary"], "summary")
    for p in doc["params"]:
        out |= missing(p, "param")
        for r in p["regularizers"]:
            out |= missing(r, "regularizer")
    for f in doc["findings"]:
        out |= missing(f, "finding")
    return out


def test_bad_practice_exercises_findings_and_locations(validator: Any) -> None:
    doc = audit_json("fixtures/bad_practice.py")
    assert doc["findings"] and any("location" in f for f in doc["findings"])
    assert doc["optimizer"] is not None and doc["gate"]["passed"] is False
    assert errors(validator, doc) == []


def test_multi_model_list_validates(validator: Any) -> None:
    doc = audit_json("fixtures/mlp.py", "fixtures/cnn.py:build_regularized")
    assert isinstance(doc, list) and len(doc) == 2
    assert [r["source"] for r in doc] == ["fixtures/mlp.py", "fixtures/cnn.py:build_regularized"]
    assert errors(validator, doc) == [] and all(untyped(r) == set() for r in doc)
    assert errors(validator, []) != []  # a list holds at least one report
    assert errors(validator, [doc[0], {"model": "x"}]) != []


def test_python_api_to_dict_validates(validator: Any) -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10)
    head.weight = embed.weight  # tied: one record with an alias
    model = nn.Sequential(embed, nn.Linear(4, 4), nn.Dropout(0.1), head, nn.LazyLinear(3))
    nn.utils.parametrizations.weight_norm(model[1])
    nn.utils.parametrizations.spectral_norm(head)
    optimizer = torch.optim.AdamW([{"params": list(model[1].parameters()), "weight_decay": 0.01},
                                   {"params": list(embed.parameters()), "weight_decay": 0.0}])
    report = regfx.audit(model, optimizer, policy={"min_coverage": 0.5, "ignore": ["RFX1"]},
                         example_inputs=(torch.zeros(2, 3, dtype=torch.long),))
    doc = report.to_dict()
    assert errors(validator, doc) == [] and untyped(doc) == set()
    assert errors(validator, json.loads(report.to_json())) == []
    assert doc["optimizer"]["type"] == "AdamW" and doc["policy"]["min_coverage"] == 0.5
    kinds = {r["kind"] for p in doc["params"] for r in p["regularizers"]}
    assert {"dropout", "weight_norm", "spectral_norm", "weight_decay"} <= kinds, kinds
    assert any(p["aliases"] for p in doc["params"])


def test_python_api_lazy_and_transformed_validate(validator: Any) -> None:
    torch.manual_seed(0)
    lazy = regfx.audit(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))).to_dict()
    assert any(p.get("initialized") is False and p["shape"] == [] for p in lazy["params"])
    assert errors(validator, lazy) == []
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = regfx.transform(plain, dropout=0.2, l1=1e-5, l2=1e-4, spectral="linear")
    doc = regfx.audit(model).to_dict()
    kinds = {r["kind"] for p in doc["params"] for r in p["regularizers"]}
    assert {"dropout", "l1", "l2", "spectral_norm"} <= kinds, kinds
    assert errors(validator, doc) == []


class DropPath(nn.Module):
    """A drop-path module exposing no probability attribute: ``p`` is null in the report."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_python_api_other_kinds_validate(validator: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), DropPath(), nn.Linear(4, 4), nn.Linear(4, 2))
    nn.utils.parametrize.register_parametrization(model[2], "weight", Scale())
    nn.utils.parametrizations.orthogonal(model[3])
    doc = regfx.audit(model, example_inputs=(torch.zeros(1, 4),)).to_dict()
    assert untyped(doc) == set()
    regs = [r for p in doc["params"] for r in p["regularizers"]]
    assert {"drop_path", "parametrization", "orthogonal"} <= {r["kind"] for r in regs}, regs
    assert any(r["kind"] == "drop_path" and r["p"] is None for r in regs)
    assert errors(validator, doc) == []


@pytest.fixture(scope="module")
def good() -> dict[str, Any]:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return dict(audit_json("fixtures/bad_practice.py"))
    finally:
        os.chdir(cwd)


def broken(doc: dict[str, Any], path: str, value: Any = None, delete: bool = False) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    *parents, last = path.split("/")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if delete:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("path,value,delete,why", [
    ("summary", None, True, "'summary' is a required property"),
    ("findings/0/code", "RFX12", False, "does not match"),
    ("findings/0/code", "rfx101", False, "does not match"),
    ("findings/0/severity", "fatal", False, "is not one of"),
    ("summary/coverage", 1.5, False, "greater than the maximum"),
    ("summary/coverage", -0.1, False, "less than the minimum"),
    ("schema_version", 2, False, "was expected"),
    ("model", None, True, "'model' is a required property"),
    ("params/0/regularizers/0/kind", "dropconnect", False, "is not one of"),
    ("params/0/shape", [16, -3], False, "less than the minimum"),
    ("params/0/trainable", "yes", False, "is not of type 'boolean'"),
    ("params/0/name", None, True, "'name' is a required property"),
    ("findings/0/location/line", "12", False, "is not of type 'integer'"),
    ("optimizer/groups/0/weight_decay", "1e-4", False, "is not of type 'number'"),
    ("policy/fail_on", "info", False, "is not one of"),
    ("gate/passed", None, True, "'passed' is a required property"),
    ("opaque", {"encoder": 1}, False, "is not of type 'string'"),
    ("summary/extra", 1, False, "Additional properties are not allowed"),
])
def test_schema_rejects(validator: Any, good: dict[str, Any], path: str, value: Any, delete: bool,
                        why: str) -> None:
    assert errors(validator, good) == []
    found = errors(validator, broken(good, path, value, delete))
    assert found, f"accepted a report with {path} = {value!r}"
    # the report is an object, so the error for the array branch is not the one that matters;
    # anyOf/oneOf errors (optimizer: object or null) carry the real ones in their context
    detail = "\n".join(_messages(_report_errors(broken(good, path, value, delete))))
    assert why in detail, detail


def test_schema_rejects_bad_report_inside_a_list(validator: Any, good: dict[str, Any]) -> None:
    assert errors(validator, [good, good]) == []
    assert errors(validator, [good, broken(good, "summary/coverage", 1.5)]) != []


def test_open_where_the_design_says_add_more_freely(validator: Any, good: dict[str, Any]) -> None:
    doc = copy.deepcopy(good)
    doc["new_top_level_field"] = {"any": "thing"}
    doc["params"][0]["new_record_field"] = 1
    doc["params"][0]["regularizers"][0]["new_regularizer_field"] = [1]
    doc["findings"][0]["new_finding_field"] = True
    assert errors(validator, doc) == []
    # known fields stay typed where extra fields are allowed
    assert errors(validator, broken(good, "source", 3)) != []
    assert errors(validator, broken(good, "rules/0", "R1")) != []


def _messages(errs: list[Any]) -> Iterator[str]:
    for e in errs:
        yield e.message
        yield from _messages(list(e.context))


def _report_errors(doc: Any) -> list[Any]:
    report = Draft202012Validator({"$ref": "#/$defs/report", "$defs": json_schema()["$defs"]})
    return list(report.iter_errors(doc))
