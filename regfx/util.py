"""Small helpers shared by regfx's modules."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (nested blocks are fine).

    Tracing and transforming a model creates many small objects at once (graph nodes, keys,
    copies of module dicts); each full collection on the way then walks the whole heap.
    Collection resumes on exit, also after an exception; reference counting frees memory
    meanwhile as always.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
