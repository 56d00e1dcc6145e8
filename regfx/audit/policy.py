"""Audit policy: ``[tool.regfx.audit]`` in pyproject.toml or a policy TOML file.

Keys (``-`` and ``_`` are interchangeable)::

    [tool.regfx.audit]
    fail_on = "error"            # or "warning": the lowest severity that fails the audit
    min_coverage = 0.9           # regularized share of trainable parameters (numel)
    select = ["RFX1", "RFX2"]    # only these rule codes (or code prefixes)
    ignore = ["RFX104"]          # never these
    [tool.regfx.audit.require]   # layer-type word -> regularizer kinds every weight must have
    linear = ["weight_decay"]    # "a|b" accepts either; "any" accepts any regularizer
    conv = ["any"]
    [tool.regfx.audit.per-module-ignores]
    "encoder.*" = ["RFX401"]     # glob on the finding's target -> codes
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regfx.audit.inspect import KINDS
from regfx.audit.rules import RULES
from regfx.errors import PolicyError, RegfxError
from regfx.recipe import find_pyproject, read_toml, regfx_table, table_key
from regfx.select import parse_types

__all__ = ["Policy", "PolicyError", "FAIL_ON"]

FAIL_ON = ("error", "warning")
_KEYS = ("fail_on", "min_coverage", "select", "ignore", "require", "per_module_ignores")
_CODE = re.compile(r"^RFX\d{0,3}$")


@dataclass(frozen=True)
class Policy:
    """What the audit requires. The default policy fails only on error-severity findings.

    Attributes:
        fail_on: ``"error"`` or ``"warning"``: the lowest severity that fails the audit.
        min_coverage: minimum regularized share (0-1) of trainable parameter numel, or None.
        select: rule codes or prefixes to run (empty: all).
        ignore: rule codes or prefixes never to run.
        require: layer-type word -> regularizer kinds each weight of that type must have.
        per_module_ignores: glob on the finding target -> codes ignored there.

    Example:
        >>> Policy(min_coverage=0.9, require={"linear": ("weight_decay",)}).validate()
    """

    fail_on: str = "error"
    min_coverage: float | None = None
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    require: dict[str, tuple[str, ...]] = field(default_factory=dict)
    per_module_ignores: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A string is one code; a list is a tuple. Anything else is refused here, by name.
        for name in ("select", "ignore"):
            object.__setattr__(self, name, _str_tuple(getattr(self, name), name))
        for name in ("require", "per_module_ignores"):
            table = getattr(self, name)
            if not isinstance(table, dict):
                raise PolicyError(f"{name} must be a dict of string -> list of strings, got "
                                  f"{table!r}")
            for key in table:
                if not isinstance(key, str):
                    raise PolicyError(f"{name} keys must be strings, got {key!r}")
            object.__setattr__(self, name, {k: _str_tuple(v, f"{name}.{k}")
                                            for k, v in table.items()})

    def validate(self, source: str = "policy") -> Policy:
        """Check every field; return self. Raises PolicyError naming the key and the value."""
        if not isinstance(self.fail_on, str) or self.fail_on not in FAIL_ON:
            raise PolicyError(f"{source}: fail_on must be one of {', '.join(FAIL_ON)}, "
                              f"got {self.fail_on!r}")
        mc = self.min_coverage
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, (int, float))
                               or math.isnan(mc) or not 0.0 <= mc <= 1.0):
            raise PolicyError(f"{source}: min_coverage must be a fraction in [0, 1], got {mc!r}; "
                              "e.g. min_coverage = 0.9")
        codes = [*self.select, *self.ignore]
        for codes_for in self.per_module_ignores.values():
            codes.extend(codes_for)
        for code in codes:
            _check_code(code, source)
        for word, kinds in self.require.items():
            try:
                parse_types(word)
            except RegfxError as exc:
                raise PolicyError(f"{source}: require: {exc}") from None
            for need in kinds:
                for kind in str(need).split("|"):
                    if kind != "any" and kind not in KINDS:
                        close = difflib.get_close_matches(kind, KINDS, n=1)
                        hint = f" (did you mean {close[0]!r}?)" if close else ""
                        raise PolicyError(f"{source}: require.{word}: unknown regularizer "
                                          f"{kind!r}{hint}; expected any, {', '.join(KINDS)}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "policy") -> Policy:
        """Build and validate a policy from plain data (a TOML table)."""
        if not isinstance(data, dict):
            raise PolicyError(f"{source} must be a table, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        spelled: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = table_key(raw_key, _KEYS, source, PolicyError)
            if key in spelled:
                raise PolicyError(f"{source} sets {key!r} twice, as {spelled[key]!r} and "
                                  f"{raw_key!r}; keep one of them")
            spelled[key] = raw_key
            if key in ("select", "ignore"):
                value = _str_tuple(value, f"{source}: {key}")
            elif key == "require":
                if not isinstance(value, dict):
                    raise PolicyError(f"{source}: require must be a table of layer type -> "
                                      f"regularizer kinds, got {value!r}")
                value = {str(k): _str_tuple(v, f"{source}: require.{k}") for k, v in value.items()}
            elif key == "per_module_ignores":
                if not isinstance(value, dict):
                    raise PolicyError(f"{source}: per-module-ignores must be a table of glob -> "
                                      f"rule codes, got {value!r}")
                value = {str(k): _str_tuple(v, f"{source}: per-module-ignores.{k}")
                         for k, v in value.items()}
            elif key == "min_coverage" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[key] = value
        try:
            policy = cls(**kwargs)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        return policy.validate(source)

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Read a policy file: its ``[tool.regfx.audit]`` table if present, else the top level."""
        p = Path(path)
        top = _read(p)
        regfx = regfx_table(top, p, PolicyError)
        if regfx is not None or "tool" in top:
            audit = regfx.get("audit") if regfx is not None else None
            if audit is None:
                raise PolicyError(f"{p} has no [tool.regfx.audit] table; add one or pass a file "
                                  "with the policy keys at the top level")
            return cls.from_dict(audit, f"[tool.regfx.audit] of {p}")
        return cls.from_dict(top, str(p))

    @classmethod
    def from_pyproject(cls, start: str | Path = ".") -> Policy | None:
        """The policy in ``[tool.regfx.audit]`` of the nearest pyproject.toml, or None."""
        found = find_pyproject(start)
        if found is None:
            return None
        regfx = regfx_table(_read(found), found, PolicyError)
        audit = regfx.get("audit") if regfx is not None else None
        if audit is None:
            return None
        return cls.from_dict(audit, f"[tool.regfx.audit] of {found}")

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data (the ``policy`` block of the JSON report)."""
        return {"fail_on": self.fail_on, "min_coverage": self.min_coverage,
                "select": list(self.select), "ignore": list(self.ignore),
                "require": {k: list(v) for k, v in self.require.items()},
                "per_module_ignores": {k: list(v) for k, v in self.per_module_ignores.items()}}


def as_policy(policy: Policy | dict[str, Any] | str | Path | None) -> Policy:
    """A :class:`Policy` from a Policy, a dict (TOML table), a file path, or None (defaults)."""
    if policy is None:
        return Policy()
    if isinstance(policy, Policy):
        return policy.validate()
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if isinstance(policy, (str, Path)):
        return Policy.from_toml(policy)
    raise PolicyError(f"policy must be a Policy, a dict or a TOML path, got {type(policy).__name__}")


def _check_code(code: str, source: str) -> None:
    codes = [r.code for r in RULES]
    if not _CODE.match(code) or not any(c.startswith(code) for c in codes):
        close = difflib.get_close_matches(code, codes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyError(f"{source}: unknown rule code {code!r}{hint}; run `regfx rules` "
                          "for the list")


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise PolicyError(f"{where} must be a string or a list of strings, got {shown}; "
                      "e.g. [\"RFX101\", \"RFX2\"]" if "require" not in where else
                      f"{where} must be a string or a list of strings, got {shown}; "
                      "e.g. [\"weight_decay\"]")


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, PolicyError, "policy")
