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


def test_warnings_of_a_transform_with_the_collector_paused_point_at_the_caller() -> None:
    import warnings

    from torch import nn

    import regfx

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        regfx.transform(model, dropout=0.1, spectral="conv")  # conv matches nothing: a warning
    assert caught and {w.filename for w in caught} == {__file__}
