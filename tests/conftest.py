"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from replica_router import consistency


@pytest.fixture(autouse=True)
def _independent_consistency_scope() -> Iterator[None]:
    """Each test is its own unit of work, as each web request is.

    pytest runs every test on the main thread, whose context would otherwise
    keep one default scope for the whole session: a write in one test would make
    a later test's reads wait for it, and a test could pass or fail by order.
    """
    with consistency.session(inherit=False):
        yield
