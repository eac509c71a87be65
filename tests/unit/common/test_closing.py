"""strata_common.closing: ``with`` closes, also when the body raises."""

from __future__ import annotations

import pytest

from strata_common.closing import Closeable


class Resource(Closeable):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_with_returns_the_object_and_closes_it() -> None:
    with Resource() as resource:
        assert resource.closed == 0
    assert resource.closed == 1


def test_closes_when_the_body_raises() -> None:
    resource = Resource()
    with pytest.raises(KeyError), resource:
        raise KeyError("boom")
    assert resource.closed == 1
