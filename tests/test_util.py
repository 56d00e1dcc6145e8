import gc

import pytest

from regfx.util import gc_paused


def test_gc_is_paused_inside_and_resumes_after_errors_and_nesting() -> None:
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner block does not resume it early
            raise KeyError("x")
    assert gc.isenabled()


def test_gc_left_off_by_the_caller_stays_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
