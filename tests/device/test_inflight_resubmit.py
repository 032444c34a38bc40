"""A device started on an in-flight journal that a killed device left behind serves the
requests it holds before anything new, on a thread worker and on a process worker (which
maps the same buffer)."""

from __future__ import annotations

import pytest
from device_helpers import NUM, Driver

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestType, Status
from virtblk.virtio.inflight import InflightJournal, queue_region_size
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.split_device import DeviceVirtqueue

MiB = 1 << 20


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_requests_a_killed_device_held_are_served_first(
    memory: tuple[GuestMemory, BufferAllocator], workers: str
) -> None:
    buffer = MemoryRegion.create(queue_region_size(NUM))
    drv = Driver(*memory, event_idx=True)
    backend = MemoryBackend(MiB)
    dev = BlkDevice(backend, workers=workers)  # type: ignore[arg-type]
    try:
        # The device before: popped three writes, recorded them, died before answering.
        for token in range(3):
            drv.submit(token, RequestType.OUT, 8 * token, out=bytes([0x40 + token]) * 4096)
        drv.vq.kick_prepare()
        journal = InflightJournal.in_region(buffer, 0, NUM)
        assert journal.recover(0, 0).fresh
        dead = DeviceVirtqueue(drv.memory, drv.addrs, event_idx=True, inflight=journal)
        _, items = dead.pop_batch(NUM)
        assert len(items) == 3 and len(journal.in_flight()) == 3
        del dead

        # The device after: recovers from the buffer, never kicked.
        journal = InflightJournal.in_region(buffer, 0, NUM)
        recovery = journal.recover(used_idx=0, avail_idx=3)
        assert len(recovery.resubmit) == 3 and recovery.last_avail == 3
        vq = DeviceVirtqueue(drv.memory, drv.addrs, event_idx=True, last_avail_idx=3,
                             inflight=journal, resubmit=recovery.resubmit)
        dev.start_queue(0, vq, drv.kick, drv.call)
        assert drv.wait(3) == {0: 1, 1: 1, 2: 1}
        assert all(drv.status_of(token) == Status.OK for token in range(3))
        for token in range(3):
            start = 8 * token * 512
            assert bytes(backend._view[start : start + 4096]) == bytes([0x40 + token]) * 4096
        assert dev.stats()["resubmitted"] == 3
        dev.stop_queue(0)
        assert journal.in_flight() == []
        assert journal.recover(used_idx=3, avail_idx=3).resubmit == ()
    finally:
        dev.close()
        drv.close()
        buffer.close()
