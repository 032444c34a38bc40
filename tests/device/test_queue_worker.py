"""The queue loop's parts: adaptive polling, rounds of a quarter of the backlog, and the
pool that keeps a blocking backend's reads and writes in flight together."""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pytest
from device_helpers import NUM, Driver, start

from virtblk.device.backends import MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.queue_worker import IoPool
from virtblk.spec import RequestType, Status
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.polling import POLL_START_NS, RESTART_AFTER, AdaptivePoll

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


def test_qemus_rule_restarts_at_the_first_short_wait() -> None:
    """What the driver's queue handle uses: ``restart_after=1`` is QEMU's own rule."""
    poll = AdaptivePoll(100_000, restart_after=1)
    poll.adjust(150_000)
    assert poll.ns == 0
    poll.adjust(10_000)
    assert poll.ns == POLL_START_NS
    with pytest.raises(ValueError, match="restart_after"):
        AdaptivePoll(1000, restart_after=0)


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


class _StuckMemory(MemoryBackend):
    """A RAM disk that says it blocks, whose reads wait until ``release`` is set."""

    blocking = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = threading.Event()
        self.calls = 0

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.calls += 1
        self.release.wait(20)
        super().read_into(buf, offset)


def test_a_driver_that_offers_heads_again_cannot_grow_the_pool(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    """A hostile driver republishes one head over and over while its reads are stuck on
    the disk: the device never has more in flight than the ring holds."""
    backend = _StuckMemory(MiB)
    dev = BlkDevice(backend, io_threads=4)
    drv = Driver(*memory, event_idx=True)
    try:
        drv.submit(0, RequestType.IN, 0, in_len=512)
        drv.vq.kick_prepare()
        start(dev, 0, drv, event_idx=True)
        server = dev._workers[0].server  # type: ignore[attr-defined]
        avail = drv.memory.view(drv.addrs.avail, 4 + 2 * NUM).cast("H")
        head = avail[2]
        for _ in range(20):  # republish the whole ring, again and again
            idx = avail[1]
            last = server.vq.last_avail_idx
            for k in range(NUM - ((idx - last) & 0xFFFF)):
                avail[2 + (idx + k) % NUM] = head
            avail[1] = (last + NUM) & 0xFFFF
            os.eventfd_write(drv.kick, 1)
            time.sleep(0.01)
            assert server._pool.in_flight <= NUM
        assert server._pool.in_flight == NUM  # as much as the ring holds, no more
    finally:
        backend.release.set()
        dev.reset()
        drv.close()
        backend.close()


def test_what_the_disk_finished_is_answered_even_when_the_ring_breaks(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    backend = _StuckMemory(MiB)
    dev = BlkDevice(backend, io_threads=4)
    drv = Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        drv.submit(0, RequestType.IN, 0, in_len=512)
        drv.kick_device()
        deadline = time.monotonic() + 10
        while backend.calls < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.calls == 1  # on the disk
        drv.memory.view(drv.addrs.avail, 4).cast("H")[1] = 1000  # the ring breaks
        os.eventfd_write(drv.kick, 1)
        backend.release.set()
        assert drv.wait(1) == {0: 513} and drv.status_of(0) == Status.OK
        deadline = time.monotonic() + 10
        while not dev.stats()["queues"][0]["broken"] and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.01)
        assert dev.stats()["queues"][0]["broken"]  # type: ignore[index]
    finally:
        backend.release.set()
        dev.reset()
        drv.close()
        backend.close()
