"""Closing a disk waits for requests on the ring, and never hangs on one that never ends."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest

from peers.faulty import faulty_disk
from virtblk import Disk
from virtblk.driver.virtio_blk import VirtioBlk
from virtblk.spec import RequestType


def _writer(disk: Disk, offset: int, outcome: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            disk.pwrite(b"\1" * 512, offset)
            outcome.append("ok")
        except Exception as exc:  # recorded for the assertions
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_close_waits_for_a_request_in_flight() -> None:
    with faulty_disk(slow_sector=8) as (disk, device, _):
        outcome: list[object] = []
        t = _writer(disk, 8 * 512, outcome)
        assert device.holding.wait(60)
        assert outcome == []  # held by the device
        threading.Timer(0.5, device.release.set).start()
        disk.close()
        t.join(5)
        assert outcome == ["ok"]  # close waited for it to complete


def test_close_gives_up_on_a_request_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    real_close = VirtioBlk.close
    monkeypatch.setattr(VirtioBlk, "close", lambda self: real_close(self, timeout=0.5))
    with faulty_disk(slow_sector=8) as (disk, device, _):
        outcome: list[object] = []
        t = _writer(disk, 8 * 512, outcome)
        assert device.holding.wait(60)
        started = time.monotonic()
        disk.close()
        assert time.monotonic() - started < 5
        t.join(5)
        assert not t.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], OSError)


def test_io_racing_close_after_its_queue_is_aborted_fails_instead_of_hanging() -> None:
    """A thread that passed the disk's closed check just before close() reaches its queue
    after close aborted it (before the queue's memory is released): its request must fail,
    not park on a queue nobody will ever thaw or reap."""
    with Disk.embedded(size=1 << 20, mode="thread") as disk:
        q = disk.device.queues[0]
        q.freeze(5)  # what VirtioBlk.close does to each queue, in this order
        q.abort_all()
        outcome: list[object] = []
        t = _writer(disk, 0, outcome)
        t.join(5)
        assert not t.is_alive(), "a request issued after abort_all hangs"
        assert len(outcome) == 1 and isinstance(outcome[0], Exception)


class _Interrupted(Exception):
    """What a signal handler raises in the thread polling the call eventfd (Ctrl-C)."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_an_interrupted_poller_hands_polling_over_to_the_next_waiter() -> None:
    """The poller is interrupted (a signal handler raises in it) while another thread
    sleeps behind it: that thread must take over polling, not sleep forever."""
    slow = 8
    with faulty_disk(slow_sector=slow) as (disk, device, _):
        q = disk.device.queues[0]
        buf = disk.buffer(512)
        gpa = disk.device.memory.guest_address_of(buf)
        assert gpa is not None
        held = q.get_tag()
        q.submit(held, RequestType.IN, slow, in_bufs=[(gpa, 512)])  # a read the device holds
        outcome: list[object] = []
        behind = threading.Thread(target=lambda: outcome.append(disk.pread(512, 0)))
        threading.Timer(0.2, behind.start).start()  # sleeps while we poll
        old = signal.signal(signal.SIGALRM, _interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.6)
            with pytest.raises(_Interrupted):
                q.wait_for(held)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert behind.is_alive()
        device.release.set()
        behind.join(5)
        assert not behind.is_alive(), "the waiter behind the interrupted poller hangs"
        assert outcome == [bytes(512)]
        q.wait_for(held, 5)
        q.put_tag(held)


def _driver_memory() -> tuple[int, int]:
    """The driver memfds this process has mapped and open: (mappings, fds)."""
    with open("/proc/self/maps") as maps:
        mapped = sum("/memfd:virtblk-driver" in line for line in maps)
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += "/memfd:virtblk-driver" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return mapped, fds


@pytest.mark.parametrize("engine", ["disk", "queue handle"])
def test_close_unmaps_the_driver_memory_at_once(engine: str) -> None:
    """No garbage collection needed: a process that opens and closes disks must not keep
    each one's guest memory (and the memfd) until a collection happens to run."""
    from virtblk.driver.queue_api import QueueHandle

    gc.collect()
    before = _driver_memory()
    gc.disable()
    try:
        disk = Disk.embedded(size=1 << 20, mode="thread")
        assert _driver_memory() != before
        disk.pwrite(b"\7" * 4096, 0)
        if engine == "queue handle":
            buf = disk.buffer(4096)
            with QueueHandle(disk, 0) as q:
                q.read(0, buf)
                assert [c.ret for c in q.do_io(1)] == [0]
            del buf
        assert disk.pread(4096, 0) == b"\7" * 4096
        disk.close()
        assert _driver_memory() == before
    finally:
        gc.enable()
