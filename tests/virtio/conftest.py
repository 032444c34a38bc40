"""Fixtures for the virtqueue tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from virtq_helpers import Guest


@pytest.fixture
def guest() -> Iterator[Guest]:
    """A fresh 1 MiB guest memory (memfd) with an allocator."""
    with Guest() as g:
        yield g
