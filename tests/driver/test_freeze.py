"""Freeze and restore: in-flight I/O drains, I/O issued while frozen waits, then completes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from peers.faulty import faulty_disk
from virtblk import Disk

MiB = 1 << 20


@pytest.fixture(params=["thread", "process"])
def disk(request: pytest.FixtureRequest) -> Iterator[Disk]:
    with Disk.embedded(size=4 * MiB, mode=request.param) as d:
        yield d


def test_data_survives_freeze_and_restore(disk: Disk) -> None:
    data = os.urandom(256 * 1024)
    disk.pwrite(data, 0)
    disk.freeze()
    assert disk.frozen
    disk.restore()
    assert not disk.frozen
    assert disk.pread(len(data), 0) == data
    more = os.urandom(4096)
    disk.pwrite(more, MiB)
    assert disk.pread(4096, MiB) == more


def test_io_issued_while_frozen_waits_then_completes(disk: Disk) -> None:
    disk.freeze()
    data = os.urandom(64 * 1024)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            disk.pwrite(data, 8192)
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not done.wait(0.5), "a write completed while the disk was frozen"
    disk.restore()
    assert done.wait(10)
    t.join()
    assert not errors
    assert disk.pread(len(data), 8192) == data


def test_freeze_twice_and_restore_twice_are_harmless(disk: Disk) -> None:
    disk.freeze()
    disk.freeze()
    disk.restore()
    disk.restore()
    disk.pwrite(b"\7" * 512, 0)
    assert disk.pread(512, 0) == b"\7" * 512


def test_repeated_cycles_under_load(disk: Disk) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []
    block = os.urandom(4096)

    def load() -> None:
        i = 0
        while not stop.is_set():
            off = (i % 64) * 4096
            try:
                disk.pwrite(block, off)
                assert disk.pread(4096, off) == block
            except BaseException as exc:
                failures.append(exc)
                return
            i += 1

    t = threading.Thread(target=load)
    t.start()
    for _ in range(5):
        disk.freeze()
        disk.restore()
    stop.set()
    t.join(20)
    assert not failures


@pytest.mark.interop
def test_freeze_and_restore_against_qemu_storage_daemon(qsd_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    qsd = qsd_factory(image=str(image))
    with Disk.connect(str(qsd.socket_path)) as d:
        data = os.urandom(128 * 1024)
        d.pwrite(data, 0)
        d.freeze()
        done = threading.Event()
        t = threading.Thread(target=lambda: (d.pwrite(data, MiB), done.set()))
        t.start()
        assert not done.wait(0.3)
        d.restore()
        assert done.wait(10)
        t.join()
        assert d.pread(len(data), 0) == data
        assert d.pread(len(data), MiB) == data
        d.flush()
    assert image.read_bytes()[MiB : MiB + len(data)] == data


def test_io_parked_during_freeze_is_not_sent_when_the_ring_drains() -> None:
    """A request issued while freeze waits for the ring stays parked when the ring's last
    request completes (the drain restarts BUSY requests, not frozen ones), so freeze does
    not chase new I/O and nothing reaches the device between freeze and restore."""
    slow = 64
    with faulty_disk(slow_sector=slow) as (disk, device, _):
        q = disk.device.queues[0]
        threads = [threading.Thread(target=disk.pread, args=(512, slow * 512))]
        threads[0].start()
        _wait_until(lambda: q.in_flight() == 1)
        frozen = threading.Thread(target=disk.freeze, args=(10,))
        frozen.start()
        _wait_until(lambda: q._frozen)
        written = threading.Event()
        data = os.urandom(4096)
        threads.append(threading.Thread(
            target=lambda: (disk.pwrite(data, 0), written.set())))
        threads[1].start()
        _wait_until(lambda: q.in_flight() == 2)
        device.release.set()
        frozen.join(10)
        assert not frozen.is_alive() and disk.frozen
        assert not written.is_set(), "a write issued while freezing ran before restore"
        disk.restore()
        for t in threads:
            t.join(10)
        assert written.is_set()
        assert disk.pread(4096, 0) == data


def _wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_a_freeze_that_times_out_leaves_the_disk_usable() -> None:
    """freeze(timeout) that gives up must not leave a queue frozen: restore() would do
    nothing (the disk is not frozen) and every later request would wait forever."""
    slow = 64
    with faulty_disk(slow_sector=slow) as (disk, device, _):
        q = disk.device.queues[0]
        held = threading.Thread(target=disk.pread, args=(512, slow * 512))
        held.start()
        _wait_until(lambda: q.in_flight() == 1)
        with pytest.raises(TimeoutError):
            disk.freeze(0.3)
        assert not disk.frozen
        device.release.set()
        held.join(10)
        written = threading.Event()
        t = threading.Thread(target=lambda: (disk.pwrite(b"\5" * 512, 0), written.set()))
        t.start()
        assert written.wait(5), "I/O after a failed freeze never completes"
        t.join(5)
