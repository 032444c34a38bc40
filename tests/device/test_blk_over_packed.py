"""The virtio-blk device model serves a packed ring unchanged: ``execute_batch`` takes
``PackedDeviceVirtqueue.pop_batch``'s items as it takes the split ring's, and its answers
go back by buffer id (the packed ring is not wired into the server yet; this is what the
wiring relies on)."""

from __future__ import annotations

import struct

import pytest

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestType, Status
from virtblk.virtio import packed_layout
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.split_device import ChainError, DescriptorChain, Triple
from virtio.virtq_helpers import Guest

HEADER = struct.Struct("<IIQ")


@pytest.mark.parametrize("indirect", [True, False])
def test_writes_and_reads_over_a_packed_ring(indirect: bool) -> None:
    device = BlkDevice(MemoryBackend(1 << 20))
    with Guest() as g:
        addrs = packed_layout.allocate(g.allocator, 5)  # not a power of two
        driver = PackedDriverVirtqueue(g.memory, addrs, event_idx=True, indirect=indirect,
                                       allocator=g.allocator, max_chain=4, max_tokens=4)
        ring = PackedDeviceVirtqueue(g.memory, addrs, event_idx=True)
        mem = g.memory
        headers = [g.allocator.alloc(16) for _ in range(4)]
        data = [g.allocator.alloc(4096) for _ in range(4)]
        status = [g.allocator.alloc(1) for _ in range(4)]
        tokens = range(4) if indirect else range(1)  # three descriptors each when direct

        def serve(kinds: type | tuple[type, ...]) -> list[tuple[int, int]]:
            driver.kick_prepare()
            view, items = ring.pop_batch(8)
            assert all(isinstance(item, kinds) for item in items)
            ring.add_used_batch(device.execute_batch(view, items, 0))
            ring.flush_used()
            return sorted(driver.get_used())

        shape = Triple if indirect else DescriptorChain
        for t in tokens:
            HEADER.pack_into(mem.view(headers[t], 16), 0, RequestType.OUT, 0, 8 * t)
            mem.view(data[t], 4096)[:] = bytes([t + 1]) * 4096
            mem.view(status[t], 1)[0] = 0xFF
            driver.add([(headers[t], 16), (data[t], 4096)], [(status[t], 1)], t)
        assert serve(shape) == [(t, 1) for t in tokens]
        assert all(mem.view(status[t], 1)[0] == Status.OK for t in tokens)
        for t in tokens:
            HEADER.pack_into(mem.view(headers[t], 16), 0, RequestType.IN, 0, 8 * t)
            mem.view(data[t], 4096)[:] = bytes(4096)
            driver.add([(headers[t], 16)], [(data[t], 4096), (status[t], 1)], t)
        assert serve(shape) == [(t, 4097) for t in tokens]
        assert all(bytes(mem.view(data[t], 4096)) == bytes([t + 1]) * 4096 for t in tokens)
        # A malformed chain costs its request, answered with used length 0, and no other.
        driver.add([(1 << 40, 16)], [(status[0], 1)], 0)
        assert serve(ChainError) == [(0, 0)]
        driver.close()
    device.close()
