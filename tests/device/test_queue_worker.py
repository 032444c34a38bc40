"""The queue loop's parts: adaptive polling, rounds of a quarter of the backlog, and the
pool that keeps a blocking backend's reads and writes in flight together."""

from __future__ import annotations

import errno
import os
import select
import threading

import pytest
from device_helpers import Driver, start

from virtblk.device.backends import MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.queue_worker import POLL_START_NS, RESTART_AFTER, AdaptivePoll, IoPool
from virtblk.spec import RequestType, Status
from virtblk.virtio.memory import BufferAllocator, GuestMemory

MiB = 1 << 20




def test_polling_grows_while_waits_fit_and_stops_when_they_do_not() -> None:
    poll = AdaptivePoll(100_000)
    grown = []
    for _ in range(7):
        poll.adjust(99_000)  # a wait longer than the polling time, shorter than the max
        grown.append(poll.ns)
    assert grown == [POLL_START_NS, 8000, 16000, 32000, 64000, 100_000, 100_000]
    poll.adjust(90_000)  # caught by polling: the sweet spot, nothing changes
    assert poll.ns == 100_000
    poll.adjust(150_000)  # would have had to spin too long
    assert poll.ns == 0
    for _ in range(RESTART_AFTER - 1):  # a short wait here and there restarts nothing
        poll.adjust(10_000)
        assert poll.ns == 0
    poll.adjust(10_000)
    assert poll.ns == POLL_START_NS
    poll.adjust(150_000)
    poll.adjust(10_000)
    assert poll.ns == 0, "the count of short waits starts again after a long one"


def test_no_polling_time_never_polls() -> None:
    poll = AdaptivePoll(0)
    for wait in (0, 1, 10_000):
        poll.adjust(wait)
        assert poll.ns == 0
    with pytest.raises(ValueError, match=">= 0"):
        AdaptivePoll(-1)


def test_the_io_pool_has_its_calls_in_flight_together_and_returns_their_errors() -> None:
    together = threading.Barrier(8, timeout=10)

    def call(buf: memoryview, offset: int) -> None:
        together.wait()  # passes only if eight calls are in flight at once
        if offset == 3:
            raise OSError(errno.EIO, "bad sector")

    pool = IoPool(8, "test", call, call)
    try:
        token_buf = memoryview(bytearray(1))
        for offset in range(8):
            pool.submit(offset % 2 == 1, token_buf, offset, (offset, token_buf))  # type: ignore[arg-type]
        assert pool.in_flight == 8
        done: list[object] = []
        waiter = select.poll()
        waiter.register(pool.event_fd, select.POLLIN)
        while len(done) < 8:
            assert waiter.poll(10_000), f"only {len(done)} of 8 calls returned"
            os.eventfd_read(pool.event_fd)
            done += pool.take()
        assert pool.in_flight == 0
        errors = {token[0]: exc for token, exc in done}  # type: ignore[index]
        assert set(errors) == set(range(8))
        assert isinstance(errors.pop(3), OSError)
        assert set(errors.values()) == {None}
    finally:
        pool.close()


class _BlockingMemory(MemoryBackend):
    """A RAM disk that says it blocks, whose reads meet eight at a time: they complete only
    if the device has eight of them in flight at once."""

    blocking = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.together = threading.Barrier(8, timeout=10)

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.together.wait()
        super().read_into(buf, offset)


def test_a_blocking_backend_has_many_reads_in_flight(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    backend = _BlockingMemory(MiB)
    backend.write_from(memoryview(b"\x5a" * 4096), 4096)
    dev = BlkDevice(backend, io_threads=8)
    drv = Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        for t in range(16):
            drv.submit(t, RequestType.IN, 8, in_len=4096)
        drv.kick_device()
        done = drv.wait(16, timeout=20)
        assert done == {t: 4097 for t in range(16)}
        assert all(drv.status_of(t) == Status.OK for t in range(16))
        assert all(drv.data_of(t, 4096) == b"\x5a" * 4096 for t in range(16))
        assert not backend.together.broken
        assert dev.stats()["requests"] == {"IN": 16}
        # Writes go the same way; stopping the queue waits for what is in flight.
        for t in range(8):
            drv.submit(t, RequestType.OUT, 64 + 8 * t, out=bytes([t]) * 4096)
        drv.kick_device()
        assert drv.wait(8, timeout=20) == {t: 1 for t in range(8)}
        assert dev.stop_queue(0) == 24
    finally:
        dev.reset()
        drv.close()
        backend.close()


def test_a_backlog_is_answered_a_quarter_at_a_time(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    """64 requests waiting when the queue starts: rounds of max(8, backlog / 4), each
    published before the next is read, so the driver sees answers early."""
    dev = BlkDevice(NullBackend(MiB))
    drv = Driver(*memory, event_idx=True)
    try:
        for t in range(64):
            drv.submit(t, RequestType.IN, t, in_len=512)
        drv.vq.kick_prepare()
        start(dev, 0, drv, event_idx=True)
        assert len(drv.wait(64)) == 64
        # 16 (48 left), 12 (36), 9 (27), 8 (19), 8 (11), 8 (3), 3.
        assert dev.stats()["queues"][0]["batches"] == 7  # type: ignore[index]
    finally:
        dev.reset()
        drv.close()
