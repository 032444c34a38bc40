"""The device model on a packed ring started on an in-flight journal a killed device left
behind: the writes it held are executed first, each answered once to our packed driver,
and the queue goes on lapping the ring; on a queue worker thread or process too."""

from __future__ import annotations

import os
import select
import struct
import time

import pytest

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestType, Status
from virtblk.virtio import packed_layout
from virtblk.virtio.inflight_packed import PackedInflightJournal, packed_queue_region_size
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
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


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_a_queue_worker_serves_the_recovered_chains_first(workers: str) -> None:
    """A device popped three writes from a packed ring, recorded them in a buffer another
    process can map, and died.  The next device recovers from the buffer and starts the
    queue on a worker: a thread, or a process handed the recovered chains, the journal's
    offset and counter (it takes the journal over).  Never kicked, the worker serves the
    three first, each answered once; stopped, the journal owes nothing."""
    buffer = MemoryRegion.create(2 * packed_queue_region_size(NUM))
    at = packed_queue_region_size(NUM)  # queue 1's region: the offset must travel too
    region = MemoryRegion.create(1 * MiB, guest_phys_addr=0)
    mem = GuestMemory([region])
    alloc = BufferAllocator(region)
    backend = MemoryBackend(MiB)
    device = BlkDevice(backend, workers=workers, num_queues=2)  # type: ignore[arg-type]
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        addrs = packed_layout.allocate(alloc, NUM)
        driver = PackedDriverVirtqueue(mem, addrs, event_idx=False, indirect=True,
                                       allocator=alloc, max_chain=3, max_tokens=NUM)
        ring = mem.view(addrs.desc, 16 * NUM)
        statuses = []
        for token in range(3):
            header, data, status = alloc.alloc(16), alloc.alloc(4096), alloc.alloc(1)
            HEADER.pack_into(mem.view(header, 16), 0, RequestType.OUT, 0, 8 * token)
            mem.view(data, 4096)[:] = bytes([0x40 + token]) * 4096
            mem.view(status, 1)[0] = 0xFF
            driver.add([(header, 16), (data, 4096)], [(status, 1)], token)
            statuses.append(status)
        driver.kick_prepare()
        fresh = packed_layout.decode_vring_base(0x80008000)
        journal = PackedInflightJournal.in_region(buffer, at, NUM)
        assert journal.recover(ring, fresh).fresh
        dead = PackedDeviceVirtqueue(mem, addrs, event_idx=False, inflight=journal)
        assert len(dead.pop_batch(NUM)[1]) == 3
        del dead

        journal = PackedInflightJournal.in_region(buffer, at, NUM)
        recovery = journal.recover(ring, fresh)
        assert recovery.base is not None and len(recovery.resubmit) == 3
        vq = PackedDeviceVirtqueue(mem, addrs, event_idx=False, inflight=journal,
                                   resubmit=recovery.resubmit, **recovery.base._asdict())
        device.start_queue(1, vq, kick, call)
        answered: list[tuple[int, int]] = []
        deadline = time.monotonic() + 30
        while len(answered) < 3 and time.monotonic() < deadline:
            select.select([call], [], [], 0.5)
            answered += driver.get_used()
        assert sorted(answered) == [(0, 1), (1, 1), (2, 1)]
        assert [mem.view(s, 1)[0] for s in statuses] == [Status.OK] * 3
        for token in range(3):
            start = 8 * token * 512
            assert bytes(backend._view[start : start + 4096]) == bytes([0x40 + token]) * 4096
        assert device.stats()["resubmitted"] == 3
        device.stop_queue(1)
        again = PackedInflightJournal.in_region(buffer, at, NUM).recover(ring, fresh)
        assert again.resubmit == () and driver.get_used() == []
        ring.release()
        driver.close()
    finally:
        device.close()
        os.close(kick)
        os.close(call)
        mem.close()
        buffer.close()
