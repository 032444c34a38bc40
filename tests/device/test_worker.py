"""End to end on a real split ring: a DriverVirtqueue in guest memory on one side, the
BlkDevice queue worker thread on the other, eventfds for kick and call."""

from __future__ import annotations

import logging
import os
import re
import select
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from device_helpers import NUM, Driver, start

from virtblk.device.backends import MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestHeader, RequestType, Status
from virtblk.util import process_cpu_seconds
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.split_device import DeviceVirtqueue

MiB = 1 << 20


@pytest.fixture(params=["thread", "process"])
def dev(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlkDevice]:
    """A two-queue device whose queues are served by threads, or by worker processes
    (``workers="process"``: the same tests, the ring crossing a process boundary).
    Worker processes log to the stderr they inherit: a file here, read by ``logged``."""
    backend = MemoryBackend(MiB)
    log = tmp_path / "workers.log"
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    try:
        d = BlkDevice(backend, num_queues=2, serial="e2e", workers=request.param)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    d.worker_log = log  # type: ignore[attr-defined]
    yield d
    d.close()
    backend.close()


def logged(caplog: pytest.LogCaptureFixture, dev: BlkDevice) -> str:
    """What the device logged: here (threads) or in its worker processes."""
    return caplog.text + dev.worker_log.read_text()  # type: ignore[attr-defined]


@pytest.mark.parametrize("event_idx", [True, False])
def test_requests_complete_through_the_worker(
    dev: BlkDevice, memory: tuple[GuestMemory, BufferAllocator], event_idx: bool,
) -> None:
    drv = Driver(*memory, event_idx=event_idx)
    start(dev, 0, drv, event_idx=event_idx)
    payload = os.urandom(4096)
    drv.submit(0, RequestType.OUT, 8, out=payload)
    drv.submit(1, RequestType.FLUSH, 0)
    drv.kick_device()
    assert drv.wait(2) == {0: 1, 1: 1}
    drv.submit(2, RequestType.IN, 8, in_len=4096)
    drv.submit(3, RequestType.GET_ID, 0, in_len=20)
    drv.kick_device()
    assert drv.wait(2) == {2: 4097, 3: 21}
    assert all(drv.status_of(t) == Status.OK for t in range(4))
    assert drv.data_of(2, 4096) == payload
    assert drv.data_of(3, 20) == b"e2e" + bytes(17)
    # Many at once, more than fit in one kick's worth of wakeups.
    for rounds in range(5):
        for t in range(32):
            drv.submit(t, RequestType.IN, t, in_len=512)
        drv.kick_device()
        assert len(drv.wait(32)) == 32, rounds
    drv.close()


def test_malformed_chain_in_the_middle_is_reported_and_later_requests_complete(
    dev: BlkDevice, memory: tuple[GuestMemory, BufferAllocator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    drv = Driver(*memory, event_idx=True)
    start(dev, 0, drv, event_idx=True)
    drv.submit(0, RequestType.OUT, 0, out=b"\x01" * 512)
    # A chain with a buffer far outside guest memory: a ChainError on the device side.
    hdr = drv.buffer(RequestHeader(RequestType.OUT, 0, 0).pack())
    drv.vq.add([(hdr, 16), (0x7F00_0000_0000, 512)], [(drv.buffer(b"\xff"), 1)], 1)
    # A well-formed chain carrying a malformed request: a 100-byte read.
    drv.submit(2, RequestType.IN, 0, in_len=100)
    drv.submit(3, RequestType.IN, 0, in_len=512)
    with caplog.at_level(logging.WARNING, "virtblk.device"):
        drv.kick_device()
        done = drv.wait(4)
    assert done == {0: 1, 1: 0, 2: 1, 3: 513}
    assert drv.status_of(2) == Status.IOERR
    assert drv.status_of(3) == Status.OK and drv.data_of(3, 512) == b"\x01" * 512
    stats = dev.stats()
    queue0 = stats["queues"][0]  # type: ignore[index]
    assert queue0["chain_errors"] == 1 and queue0["malformed"] == 1 and not queue0["broken"]
    text = logged(caplog, dev)
    assert "queue 0: bad descriptor chain" in text
    assert "not a multiple of 512" in text
    drv.close()


def test_broken_ring_stops_only_its_queue(
    dev: BlkDevice, memory: tuple[GuestMemory, BufferAllocator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = Driver(*memory, event_idx=True)
    good = Driver(*memory, event_idx=True)
    start(dev, 0, bad, event_idx=True)
    start(dev, 1, good, event_idx=True)
    with caplog.at_level(logging.ERROR, "virtblk.device"):
        # The driver claims 1000 entries on a 64-entry ring.
        bad.memory.view(bad.addrs.avail, 4).cast("H")[1] = 1000
        os.eventfd_write(bad.kick, 1)
        good.submit(0, RequestType.OUT, 1, out=b"\x02" * 512)
        good.kick_device()
        assert good.wait(1) == {0: 1}
        deadline = time.monotonic() + 60  # bounds a failure only: a loaded machine is slow
        while time.monotonic() < deadline:
            if dev.stats()["queues"][0]["broken"]:  # type: ignore[index]
                break
            select.select([], [], [], 0.01)
    assert dev.stats()["queues"][0]["broken"]  # type: ignore[index]
    assert "ring unusable" in logged(caplog, dev)
    assert dev.stop_queue(0) == 0
    good.submit(1, RequestType.IN, 1, in_len=512)
    good.kick_device()
    assert good.wait(1) == {1: 513} and good.data_of(1, 512) == b"\x02" * 512
    bad.close()
    good.close()


def test_stop_returns_the_avail_index_and_restart_resumes(
    dev: BlkDevice, memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    drv = Driver(*memory, event_idx=True)
    start(dev, 0, drv, event_idx=True)
    for t in range(3):
        drv.submit(t, RequestType.FLUSH, 0)
    drv.kick_device()
    assert len(drv.wait(3)) == 3
    assert dev.running_queues() == [0]
    base = dev.stop_queue(0)
    assert base == 3 and dev.running_queues() == []
    with pytest.raises(ValueError, match="not running"):
        dev.stop_queue(0)
    # Submitted while stopped: served as soon as the queue starts again, without a kick.
    drv.submit(3, RequestType.OUT, 0, out=bytes(512))
    drv.vq.kick_prepare()
    start(dev, 0, drv, event_idx=True, last_avail=base)
    assert drv.wait(1) == {3: 1}
    with pytest.raises(ValueError, match="already running"):
        start(dev, 0, drv, event_idx=True)
    with pytest.raises(ValueError, match="does not exist"):
        start(dev, 2, drv, event_idx=True)
    assert dev.stats()["queues"][0]["running"]  # type: ignore[index]
    dev.reset()
    assert dev.running_queues() == []
    drv.close()


def test_closed_kick_fd_does_not_spin_and_stop_still_works(
    dev: BlkDevice, memory: tuple[GuestMemory, BufferAllocator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    drv = Driver(*memory, event_idx=True)
    kick, writer = os.pipe()
    os.close(writer)  # poll reports POLLHUP for the reader at once, and would forever
    devq = DeviceVirtqueue(drv.memory, drv.addrs, event_idx=True)
    with caplog.at_level(logging.ERROR, "virtblk.device"):
        dev.start_queue(0, devq, kick, drv.call)
        # Measured once the worker has met the hang-up (a worker process has imported and
        # started serving by then): a window that starts earlier counts its start-up, which
        # on a loaded machine can outlast any fixed sleep.
        deadline = time.monotonic() + 60
        while not re.search(r"kick fd \d+ failed", logged(caplog, dev)):
            assert time.monotonic() < deadline, "the worker never reported the kick fd"
            time.sleep(0.01)
        cpu_before = process_cpu_seconds(os.getpid())  # worker processes included
        select.select([], [], [], 0.3)
        cpu_used = process_cpu_seconds(os.getpid()) - cpu_before
        assert dev.stop_queue(0) == 0
    assert cpu_used < 0.15, f"worker spun: {cpu_used:.2f}s CPU in 0.3s"
    os.close(kick)
    drv.close()


class _RepostingBackend(MemoryBackend):
    """Storage that, on every read, re-posts a chain on the ring behind the device's back:
    the driver of a hostile (or just very busy) guest that never lets the ring go empty."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.avail: memoryview | None = None
        self.head = 0
        self.reads = 0
        self.reposting = True

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        self.reads += 1
        if self.reposting and self.avail is not None:
            idx = self.avail[1]
            self.avail[2 + idx % NUM] = self.head
            self.avail[1] = (idx + 1) & 0xFFFF
        return super().preadv(buffers, offset)

    def read_into(self, buf: memoryview, offset: int) -> None:
        self.preadv((buf,), offset)  # the device's fast path reads here


def test_stop_is_not_held_off_by_a_ring_that_never_empties(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    backend = _RepostingBackend(MiB)
    dev = BlkDevice(backend)
    drv = Driver(*memory, event_idx=True)
    drv.submit(0, RequestType.IN, 0, in_len=512)
    drv.vq.kick_prepare()
    backend.avail = drv.memory.view(drv.addrs.avail, 4 + 2 * NUM).cast("H")
    backend.head = backend.avail[2]
    start(dev, 0, drv, event_idx=True)
    stopper = threading.Thread(target=dev.stop_queue, args=(0,))
    try:
        while backend.reads < 10:
            time.sleep(0.01)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "stop_queue waited on a ring that never empties"
    finally:
        backend.reposting = False
        if stopper.is_alive():
            stopper.join()
        dev.reset()
        drv.close()


def test_a_request_that_fails_to_complete_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read whose buffers (one 1 GiB buffer listed five times) add up to more than the
    32-bit used length can say: answering it fails, but the batch it came in with must
    still complete, and the failed chain must still be returned."""
    gib = 1 << 30
    region = MemoryRegion.create(2 * gib, guest_phys_addr=0)  # sparse: never touched
    mem = GuestMemory([region])
    alloc = BufferAllocator(region)
    dev = BlkDevice(NullBackend(8 * gib, read_zeroes=False))
    drv = Driver(mem, alloc, event_idx=True)
    try:
        big = alloc.alloc(gib)
        hdr = drv.buffer(RequestHeader(RequestType.IN, 0, 0).pack())
        drv.status[0] = drv.buffer(b"\xff")
        drv.vq.add([(hdr, 16)], [(big, gib)] * 5 + [(drv.status[0], 1)], 0)
        drv.submit(1, RequestType.FLUSH, 0)
        start(dev, 0, drv, event_idx=True)
        with caplog.at_level(logging.ERROR, "virtblk.device"):
            drv.kick_device()
            done = drv.wait(2)
        assert done[1] == 1 and drv.status_of(1) == Status.OK
        assert done[0] == 0
        assert dev.stats()["internal_errors"] == 1
    finally:
        dev.reset()
        drv.close()
        mem.close()
