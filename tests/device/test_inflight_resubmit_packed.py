"""The device model on a packed ring started on an in-flight journal a killed device left
behind: the writes it held are executed first, each answered once to our packed driver,
and the queue goes on lapping the ring."""

from __future__ import annotations

import struct

import pytest

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestType, Status
from virtblk.virtio import packed_layout
from virtblk.virtio.inflight_packed import PackedInflightJournal, packed_queue_region_size
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtio.virtq_helpers import Guest

HEADER = struct.Struct("<IIQ")
NUM = 5  # not a power of two: a packed ring need not be
MiB = 1 << 20


@pytest.mark.parametrize("indirect", [True, False])
def test_writes_a_killed_device_held_are_executed_first_and_answered_once(
    indirect: bool,
) -> None:
    backend = MemoryBackend(MiB)
    device = BlkDevice(backend)
    buffer = bytearray(packed_queue_region_size(NUM))
    with Guest() as g:
        addrs = packed_layout.allocate(g.allocator, NUM)
        driver = PackedDriverVirtqueue(g.memory, addrs, event_idx=True, indirect=indirect,
                                       allocator=g.allocator, max_chain=3, max_tokens=NUM)
        mem = g.memory
        slots = [(g.allocator.alloc(16), g.allocator.alloc(4096), g.allocator.alloc(1))
                 for _ in range(NUM)]
        ring = mem.view(addrs.desc, 16 * NUM)

        def write(token: int, sector: int, fill: int) -> None:
            header, data, status = slots[token]
            HEADER.pack_into(mem.view(header, 16), 0, RequestType.OUT, 0, sector)
            mem.view(data, 4096)[:] = bytes([fill]) * 4096
            mem.view(status, 1)[0] = 0xFF
            driver.add([(header, 16), (data, 4096)], [(status, 1)], token)

        def recovered() -> PackedDeviceVirtqueue:
            journal = PackedInflightJournal(memoryview(buffer), NUM)
            recovery = journal.recover(ring, packed_layout.decode_vring_base(0x80008000))
            base = recovery.base or packed_layout.PackedRingBase(0, True, 0, True)
            return PackedDeviceVirtqueue(mem, addrs, event_idx=True, **base._asdict(),
                                         inflight=journal, resubmit=recovery.resubmit)

        def serve(vq: PackedDeviceVirtqueue, limit: int) -> None:
            view, items = vq.pop_batch(limit)
            vq.add_used_batch(device.execute_batch(view, items, 0))
            vq.flush_used()

        # The device before: took every write, was killed before answering any.
        tokens = range(3) if indirect else range(1)
        for t in tokens:
            write(t, 8 * t, 0x40 + t)
        driver.kick_prepare()
        dead = recovered()
        _, items = dead.pop_batch(NUM)
        assert [item.head for item in items] == list(range(len(tokens)))
        del dead

        # The device after: resubmits what the journal holds, oldest first, then goes on.
        vq = recovered()
        assert vq.resubmit_pending == list(range(len(tokens)))
        serve(vq, NUM)
        assert sorted(driver.get_used()) == [(t, 1) for t in tokens]
        for t in tokens:
            assert mem.view(slots[t][2], 1)[0] == Status.OK
            start = 8 * t * 512
            assert bytes(backend._view[start : start + 4096]) == bytes([0x40 + t]) * 4096
        # Round after round, killed between every round, lapping the ring of 5 many times.
        for round_ in range(12):
            for t in tokens:
                write(t, 8 * t, round_)
            driver.kick_prepare()
            view, items = vq.pop_batch(NUM)  # all taken, the last answered, then killed
            vq.add_used_batch(device.execute_batch(view, items[-1:], 0))
            vq.flush_used()
            vq = recovered()
            assert vq.resubmit_pending == [item.head for item in items[:-1]]
            serve(vq, NUM)
            assert sorted(driver.get_used()) == [(t, 1) for t in tokens]
            assert all(bytes(backend._view[8 * t * 512 : 8 * t * 512 + 4096])
                       == bytes([round_]) * 4096 for t in tokens)
        assert recovered().resubmit_pending == []
        driver.close()
        ring.release()
    device.close()
