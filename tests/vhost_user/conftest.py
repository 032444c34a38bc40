"""Fixtures the backend tests share: one guest memory region and a recording device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vhost_user_helpers import RecordingDevice, guest_region

from virtblk.virtio.memory import MemoryRegion


@pytest.fixture
def region() -> Iterator[MemoryRegion]:
    """A guest memory region (a sealed memfd) at guest-physical 0, closed after the test."""
    r = guest_region()
    yield r
    r.close()


@pytest.fixture
def device() -> RecordingDevice:
    """A device that records what the backend hands it."""
    return RecordingDevice()
