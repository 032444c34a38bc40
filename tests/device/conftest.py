"""Fixtures for the device tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion


@pytest.fixture
def memory() -> Iterator[tuple[GuestMemory, BufferAllocator]]:
    """8 MiB of guest memory (a memfd) and its allocator: what a test driver shares with
    the device."""
    region = MemoryRegion.create(8 << 20, guest_phys_addr=0x100000)
    mem = GuestMemory([region])
    yield mem, BufferAllocator(region)
    mem.close()
