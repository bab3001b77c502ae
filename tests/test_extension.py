"""The compiled extension ``dp360rt._C`` builds with ``pip install .`` and works."""
import pytest

import dp360rt._C as _C  # built by `pip install .`; CI installs the package, so this must import


def test_version():
    import dp360rt
    assert _C.version() == dp360rt.__version__


def test_plan_windows():
    assert _C.plan_windows(32, 8) == [list(range(i, i + 8)) for i in range(0, 32, 8)]
    with pytest.raises(ValueError):
        _C.plan_windows(30, 8)
