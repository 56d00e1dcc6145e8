"""Errors regfx raises on purpose. Every one of them derives from :class:`RegfxError`."""

from __future__ import annotations


class RegfxError(Exception):
    """Root of every error regfx raises on purpose.

    The message is always one line that says what went wrong and how to fix it.
    """


class LoadError(RegfxError):
    """A MODEL argument could not be turned into an ``nn.Module``, or its code failed, exited
    or ran past ``--timeout``."""


class SelectionError(RegfxError):
    """A layer-type word, class path or glob is invalid, or (strict mode) matches nothing."""


class TraceError(RegfxError):
    """Tracing could not proceed (raised only for misuse, never for untraceable code)."""


class RecipeError(RegfxError):
    """A recipe field has an invalid value, or a recipe file is unreadable or has unknown keys."""


class PolicyError(RegfxError):
    """A policy file or table is unreadable, has unknown keys or invalid values."""


class BaselineError(RegfxError):
    """A baseline report is unreadable, not JSON, or not a regfx audit report."""


class NormError(RegfxError):
    """A normalization cannot be applied as asked (two on one weight, deprecated hooks...)."""


class CheckpointError(RegfxError):
    """A checkpoint is unreadable, truncated, not a regfx checkpoint, or does not match."""


class OutputError(RegfxError):
    """An output path (``-o``) is refused: empty, a folder, an input file, or not writable."""


class RegfxWarning(UserWarning):
    """Something regfx did is probably not what was meant (a type word matching nothing...)."""
