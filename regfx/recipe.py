"""Recipe: what to regularize, as a validated dataclass loadable from TOML or pyproject.toml."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from regfx.errors import RecipeError, RegfxError
from regfx.select import parse_types

__all__ = ["Recipe", "RecipeError", "find_pyproject", "read_toml", "regfx_table", "table_key"]


POSITIONS = ("block", "output")
KINDS = ("auto", "element", "channel")


class _NotGiven:
    """The value of a keyword the caller did not pass (``None`` and ``0.0`` are real values)."""

    _instance: _NotGiven | None = None

    def __new__(cls) -> _NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __reduce__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()
"""Sentinel default of ``transform``/``plan`` keywords and CLI flags: "not given", so that an
explicit value, even ``None`` or ``0.0``, always overrides the recipe."""


@dataclass(frozen=True)
class Recipe:
    """What :func:`regfx.transform` applies. Fields mirror ``transform()``'s keywords.

    Attributes:
        dropout: dropout probability ``p`` in [0, 1), or None for no dropout.
        dropout_after: layer types that get dropout after them (``"linear"``).
        dropout_position: ``"block"`` (after the norm/activation chain that solely consumes the
            layer's output) or ``"output"`` (directly on the layer's output).
        dropout_kind: ``"auto"`` (channel dropout after conv, element-wise elsewhere),
            ``"element"`` or ``"channel"``.
        spectral: layer types to spectrally normalize, or None.
        weight_norm: layer types to weight-normalize, or None.
        n_power_iterations: power iterations per training forward for spectral norm.
        l1, l2: penalty coefficients: ``l1*sum|w| + (l2/2)*sum w^2`` per optimizer step.
        penalty_on: layer types whose weights get the penalties.
        include, exclude: globs on qualified module names limiting every regularizer.
        strict: a layer-type word that matches no layer is an error instead of a warning.

    Example:
        >>> Recipe(dropout=0.1, spectral="conv").validate()
    """

    dropout: float | None = None
    dropout_after: str = "linear"
    dropout_position: str = "block"
    dropout_kind: str = "auto"
    spectral: str | None = None
    weight_norm: str | None = None
    n_power_iterations: int = 1
    l1: float = 0.0
    l2: float = 0.0
    penalty_on: str = "linear,conv"
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    strict: bool = False

    def __post_init__(self) -> None:
        # A glob string is one glob; a list is a tuple (the dataclass is frozen and hashable).
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> Recipe:
        """Check every field; return self. Raises RecipeError naming the field and value."""
        if not isinstance(self.strict, bool):
            raise RecipeError(f"strict must be true or false, got {self.strict!r}; "
                              "use strict = true")
        for name in ("dropout_position", "dropout_kind"):
            if not isinstance(getattr(self, name), str):
                raise RecipeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.dropout is not None:
            p = self.dropout
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) \
                    or math.isnan(p):
                raise RecipeError(f"dropout must be a probability in [0, 1), got {p!r}; "
                                  "use e.g. --dropout 0.1")
        for name in ("l1", "l2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise RecipeError(f"{name} must be a finite number >= 0, got {v!r}; "
                                  f"use e.g. {name} = 1e-4")
        if self.dropout_position not in POSITIONS:
            raise RecipeError(f"dropout_position must be one of {', '.join(POSITIONS)}, "
                              f"got {self.dropout_position!r}")
        if self.dropout_kind not in KINDS:
            raise RecipeError(f"dropout_kind must be one of {', '.join(KINDS)}, "
                              f"got {self.dropout_kind!r}")
        n = self.n_power_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecipeError(f"n_power_iterations must be an integer >= 1, got {n!r}")
        for name in ("dropout_after", "spectral", "weight_norm", "penalty_on"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise RecipeError(f"{name} must be comma-separated layer types, got {value!r}")
            try:
                parse_types(value)
            except RegfxError as exc:
                raise RecipeError(f"{name}: {exc}") from None
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise RecipeError(f"{name} must be a glob string or a list of glob strings, got "
                                  f"{value!r}; e.g. {name} = ['encoder.*']")
        return self

    # -- conversions ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str/float/int/bool/None/list) for TOML, JSON and checkpoints."""
        out = dataclasses.asdict(self)
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build and validate a recipe from plain data; keys may use ``-`` or ``_``.

        Raises:
            RecipeError: for an unknown key (naming the closest valid one) or a bad value.
        """
        if not isinstance(data, dict):
            raise RecipeError(f"{source} must be a table of settings, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        spelled: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = table_key(raw_key, names, source, RecipeError)
            if key in spelled:
                raise RecipeError(f"{source} sets {key!r} twice, as {spelled[key]!r} and "
                                  f"{raw_key!r}; keep one of them")
            spelled[key] = raw_key
            if key in ("include", "exclude"):
                if isinstance(value, str):
                    value = (value,)
                elif isinstance(value, list):
                    value = tuple(value)
            if key in ("dropout_after", "spectral", "weight_norm", "penalty_on") \
                    and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            if key in ("l1", "l2", "dropout") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        """Read a recipe file: its ``[tool.regfx]`` table if it has one, else its top level.

        The ``[tool.regfx.audit]`` sub-table (the audit policy) is not part of the recipe.

        Raises:
            RecipeError: the file is missing, is not valid TOML, or holds unknown keys or bad
                values (the message names the file, the key and the closest valid key).
        """
        p = Path(path)
        top = read_toml(p)
        table = regfx_table(top, p, RecipeError)
        if table is not None:
            where = f"[tool.regfx] of {p}"
        elif "tool" in top:
            raise RecipeError(f"{p} has no [tool.regfx] table (only [tool] tables of other "
                              "tools); add [tool.regfx] or pass a file with the recipe keys at "
                              "the top level")
        else:
            table, where = top, str(p)
        table = {k: v for k, v in table.items() if k != "audit"}
        return cls.from_dict(table, where)

    @classmethod
    def from_pyproject(cls, start: str | Path = ".") -> Recipe | None:
        """The recipe in ``[tool.regfx]`` of the nearest pyproject.toml above ``start``."""
        found = find_pyproject(start)
        if found is None:
            return None
        table = regfx_table(read_toml(found), found, RecipeError)
        if table is None:
            return None
        table = {k: v for k, v in table.items() if k != "audit"}
        return cls.from_dict(table, f"[tool.regfx] of {found}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes).validate()

    def diff(self, other: Recipe) -> list[str]:
        """``field: mine != theirs`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def table_key(raw_key: Any, valid: Sequence[str], source: str,
              error: type[RegfxError] = RecipeError) -> str:
    """``raw_key`` with ``-`` read as ``_``; an unknown key is an ``error`` that names the
    closest valid one and lists them all."""
    key = str(raw_key).replace("-", "_")
    if key not in valid:
        close = difflib.get_close_matches(key, list(valid), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise error(f"unknown key {raw_key!r} in {source}{hint}; valid keys: {', '.join(valid)}")
    return key


def read_toml(path: Path, error: type[RegfxError] = RecipeError, what: str = "recipe") -> dict[str, Any]:
    """Parse a TOML file; every failure is one ``error`` naming the file and the fix.

    A UTF-8 byte order mark is accepted; other encodings, and nesting too deep to parse, are
    errors.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise error(f"{what} file {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} path {str(path)!r} is a directory; give a TOML file") from None
    except OSError as exc:
        raise error(f"cannot read {what} file {str(path)!r}: {exc.strerror}; check the path") \
            from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                    f"{exc.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    except RecursionError:
        raise error(f"{path} nests tables or arrays too deeply to read; flatten it") from None


def regfx_table(top: dict[str, Any], path: Path, error: type[RegfxError] = RecipeError
                ) -> dict[str, Any] | None:
    """The ``[tool.regfx]`` table of a parsed TOML file, or None when it has none.

    Raises ``error`` when ``tool`` or ``tool.regfx`` is not a table (``tool = "x"``,
    ``[tool] regfx = 5``, ``[[tool.regfx]]``).
    """
    if "tool" not in top:
        return None
    tool = top["tool"]
    if not isinstance(tool, dict):
        raise error(f"tool in {path} must be a table ([tool.regfx]), got {_kind(tool)}; "
                    "write the settings under [tool.regfx]")
    if "regfx" not in tool:
        return None
    table = tool["regfx"]
    if not isinstance(table, dict):
        raise error(f"tool.regfx in {path} must be a table ([tool.regfx]), got {_kind(table)}; "
                    "write the settings under [tool.regfx]")
    return table


def _kind(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "an array of tables ([[...]])"
    return f"{type(value).__name__} {value!r}"[:80]


def find_pyproject(start: str | Path = ".") -> Path | None:
    """The nearest ``pyproject.toml`` in ``start`` or a folder above it."""
    here = Path(start).resolve()
    if here.is_file():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def resolve_recipe(recipe: Recipe | None = None, base: Recipe | None = None,
                   **overrides: Any) -> Recipe:
    """The one place settings are merged: explicit keywords override ``recipe``, which
    overrides ``base`` (the ``[tool.regfx]`` table of pyproject.toml, for the CLI).

    Args:
        recipe: a :class:`Recipe`, or None.
        base: the lowest layer (pyproject), or None.
        **overrides: :class:`Recipe` fields; a value of :data:`NOT_GIVEN` is skipped, any other
            value (``None``, ``0.0``, ``()``) is applied. ``include``/``exclude`` accept a string
            or a sequence of strings.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: ``recipe`` is not a Recipe, an unknown field, or an invalid value.

    Example:
        >>> resolve_recipe(Recipe(dropout=0.1, l2=1e-4), l2=0.0).l2
        0.0
    """
    layers = [r for r in (base, recipe) if r is not None]
    for layer in layers:
        if not isinstance(layer, Recipe):
            raise RecipeError(f"recipe must be a regfx.Recipe, got {type(layer).__name__}; "
                              "use regfx.Recipe(...) or Recipe.from_toml(path)")
    merged = layers[-1] if layers else Recipe()
    valid = [f.name for f in dataclasses.fields(Recipe)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is NOT_GIVEN:
            continue
        if key not in valid:
            table_key(key, valid, "transform() keywords")
        if key in ("include", "exclude") and not isinstance(value, tuple):
            if not isinstance(value, (str, list)):
                raise RecipeError(f"{key} must be a glob string or a list of glob strings, got "
                                  f"{value!r}; pass e.g. {key}=['encoder.*']")
            value = (value,) if isinstance(value, str) else tuple(value)
        changes[key] = value
    return dataclasses.replace(merged, **changes).validate()
