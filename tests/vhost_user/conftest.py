"""Fixtures the backend tests share: one guest memory region and a recording device, and
no garbage collection while a test runs."""

from __future__ import annotations

import gc
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


@pytest.fixture(autouse=True)
def _no_collection_midway() -> Iterator[None]:
    """Many of these tests count this process's fds before and after (``open_fds``): an
    earlier test's objects in a reference cycle (a socket, a memfd) would close theirs
    whenever the collector ran, between the two counts (seen: 74 against 76).  Collected
    once before the test, then held off until it ends (collecting before every count made
    the fuzz tests take a minute each)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
