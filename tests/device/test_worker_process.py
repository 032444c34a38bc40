"""Queues served from worker processes (``BlkDevice(workers="process")``): the storage,
the device's state and its counters cross the process boundary; a dead worker costs only
what it had in hand; nothing is left running.  (test_worker.py runs its end-to-end tests
on both kinds of worker too.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from device_helpers import Driver, start

from virtblk.device import worker_process
from virtblk.device.backends import FileBackend, MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.options import DeviceOptions
from virtblk.device.worker_process import WorkerError
from virtblk.device.zoned import ZonedMemoryBackend
from virtblk.spec import RequestType, Status
from virtblk.util import process_cpu_seconds
from virtblk.virtio.memory import BufferAllocator, GuestMemory

MiB = 1 << 20


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_disk_and_follow_the_device_state(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    backend = MemoryBackend(MiB)
    dev = BlkDevice(backend, num_queues=2, workers="process")
    pids = dev.worker_pids
    assert len(pids) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
    drv0, drv1 = Driver(*memory, event_idx=True), Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv0, event_idx=True)
        start(dev, 1, drv1, event_idx=True)
        drv0.submit(0, RequestType.OUT, 16, out=b"\x11" * 4096)
        drv0.kick_device()
        assert drv0.wait(1) == {0: 1}
        # Written by worker 0, read by worker 1 and by this process: one disk.
        drv1.submit(0, RequestType.IN, 16, in_len=4096)
        drv1.kick_device()
        assert drv1.wait(1) == {0: 4097} and drv1.data_of(0, 4096) == b"\x11" * 4096
        assert bytes(backend._view[16 * 512 : 16 * 512 + 4096]) == b"\x11" * 4096

        dev.set_read_only(True)
        drv0.submit(1, RequestType.OUT, 16, out=b"\x22" * 512)
        drv0.kick_device()
        assert drv0.wait(1) == {1: 1} and drv0.status_of(1) == Status.IOERR
        dev.set_read_only(False)

        dev.resize(64 << 10)  # the sector read next is past the new end
        drv1.submit(1, RequestType.IN, 256, in_len=512)
        drv1.kick_device()
        assert drv1.wait(1) == {1: 1} and drv1.status_of(1) == Status.IOERR
        dev.resize(MiB)
        with pytest.raises(ValueError, match="size"):
            dev.resize(-512)  # refused before a worker hears of it
        drv1.submit(2, RequestType.IN, 16, in_len=4096)  # below the cut: kept
        drv1.kick_device()
        assert drv1.wait(1) == {2: 4097} and drv1.data_of(2, 4096) == b"\x11" * 4096

        stats = dev.stats()
        assert stats["requests"] == {"OUT": 2, "IN": 3}
        assert stats["errors"] == {"IOERR": 2, "UNSUPP": 0}
        assert [q["running"] for q in stats["queues"]] == [True, True]  # type: ignore[attr-defined]
        assert dev.stop_queue(0) == 2 and dev.running_queues() == [1]
        assert dev.stats()["queues"][0]["requests"] == {"OUT": 2}  # type: ignore[index]
    finally:
        dev.close()
        backend.close()
        drv0.close()
        drv1.close()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "worker processes outlived close()"


def test_a_killed_worker_is_replaced_and_the_queue_resumes(
    memory: tuple[GuestMemory, BufferAllocator], caplog: pytest.LogCaptureFixture,
) -> None:
    backend = NullBackend(MiB)
    dev = BlkDevice(backend, workers="process")
    drv = Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        for t in range(4):
            drv.submit(t, RequestType.IN, t, in_len=512)
        drv.kick_device()
        assert len(drv.wait(4)) == 4
        failures: list[str] = []
        dev.failed = failures.append  # what the vhost-user connection installs
        (victim,) = dev.worker_pids
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        # The watcher saw it die with the ring in hand: the frontend must be dropped.
        assert failures and "worker process died" in failures[0]
        base = dev.stop_queue(0)  # where it got to, for whoever starts the ring again
        assert base == 4
        assert "starting a new worker for queue 0" in caplog.text
        (replacement,) = dev.worker_pids
        assert replacement != victim and alive(replacement)
        drv.submit(4, RequestType.IN, 4, in_len=512)
        drv.vq.kick_prepare()
        start(dev, 0, drv, event_idx=True, last_avail=base)
        assert drv.wait(1) == {4: 513}
    finally:
        dev.close()
        drv.close()


def test_a_file_served_from_workers(
    memory: tuple[GuestMemory, BufferAllocator], tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    backend = FileBackend(image)
    dev = BlkDevice(backend, workers="process")
    drv = Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        for t in range(8):
            drv.submit(t, RequestType.OUT, 8 * t, out=bytes([t + 1]) * 4096)
        drv.kick_device()
        assert drv.wait(8) == {t: 1 for t in range(8)}
        drv.submit(8, RequestType.FLUSH, 0)
        drv.kick_device()
        assert drv.wait(1) == {8: 1} and drv.status_of(8) == Status.OK
    finally:
        dev.close()
        backend.close()
        drv.close()
    data = image.read_bytes()
    assert all(data[4096 * t : 4096 * (t + 1)] == bytes([t + 1]) * 4096 for t in range(8))


def test_what_workers_cannot_serve_is_refused_up_front() -> None:
    zoned = ZonedMemoryBackend(4 * MiB, zone_size=MiB)
    with pytest.raises(ValueError, match="threads"):
        BlkDevice(zoned, workers="process")
    zoned.close()
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        BlkDevice(NullBackend(MiB), workers="fibers")  # type: ignore[arg-type]
    # What `virtblk serve` and the embedded device build: processes, except when zoned.
    options = DeviceOptions(backend="null", size=MiB)
    dev = options.build()
    try:
        assert len(dev.worker_pids) == 1 and dev.poll_ns > 0
    finally:
        dev.close()
    dev = DeviceOptions(backend="memory", size=4 * MiB, zoned={"zone_size": MiB}).build()
    try:
        assert dev.worker_pids == [] and dev.poll_ns == 0
    finally:
        dev.close()
        dev.backend.close()


def test_stats_during_a_stop_wait_for_the_workers_last_counts(
    memory: tuple[GuestMemory, BufferAllocator],
) -> None:
    """A stats request that comes while a queue is being stopped (a driver that just
    disconnected) reports the queue's counts, not the stale copy from before the stop."""
    dev = BlkDevice(MemoryBackend(MiB), workers="process")
    drv = Driver(*memory, event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        for token in range(3):
            drv.submit(token, RequestType.OUT, 8 * token, out=b"\x33" * 4096)
        drv.kick_device()
        assert len(drv.wait(3)) == 3
        (worker,) = dev.worker_pids
        os.kill(worker, signal.SIGSTOP)  # the stop below waits for the worker's answer
        try:
            stopping = threading.Thread(target=dev.stop_queue, args=(0,))
            stopping.start()
            deadline = time.monotonic() + 20
            while 0 in dev.running_queues() and time.monotonic() < deadline:
                time.sleep(0.01)  # (running_queues hides a stopping queue since the stop began)
            seen: list[dict[str, object]] = []
            asking = threading.Thread(target=lambda: seen.append(dev.stats()))
            asking.start()
            asking.join(0.5)  # it waits for the stop (fixed) or answers at once (stale)
        finally:
            os.kill(worker, signal.SIGCONT)
        stopping.join(20)
        asking.join(20)
        assert seen and seen[0]["requests"] == {"OUT": 3}
    finally:
        dev.close()


def test_a_device_cpu_counts_its_worker_processes() -> None:
    """The bench reads a device's CPU from /proc: its workers' must be in it."""
    backend = NullBackend(MiB)
    dev = BlkDevice(backend, workers="process")
    try:
        (worker,) = dev.worker_pids
        before = process_cpu_seconds(os.getpid())
        worker_before = process_cpu_seconds(worker)
        burnt_r, burnt_w = os.pipe()  # the child says when it has burnt 0.15 s
        stop_r, stop_w = os.pipe()  # and burns on until we close this
        burner = os.fork()
        if burner == 0:  # a child of ours that burns CPU
            os.close(burnt_r)
            os.close(stop_w)
            os.set_blocking(stop_r, False)
            start = time.process_time()
            told = False
            while True:
                if not told and time.process_time() - start >= 0.15:
                    os.write(burnt_w, b"x")
                    told = True
                if told and time.process_time() - start >= 0.3:
                    try:
                        if os.read(stop_r, 1) == b"":
                            break
                    except BlockingIOError:
                        pass
            os._exit(0)
        os.close(burnt_w)
        os.close(stop_r)
        try:
            assert os.read(burnt_r, 1) == b"x"  # a condition, however loaded the machine
            during = process_cpu_seconds(os.getpid())  # counted while it runs
        finally:
            os.close(stop_w)
            os.close(burnt_r)
            os.waitpid(burner, 0)
        after = process_cpu_seconds(os.getpid())  # and once it is waited for
        assert during - before >= 0.1
        assert after - before >= 0.25
        assert process_cpu_seconds(worker) >= worker_before
    finally:
        dev.close()


def test_a_frontend_loses_its_device_when_a_worker_dies() -> None:
    """End to end: our driver on the embedded device (workers in processes); a worker
    killed while serving drops the connection, so I/O fails with DeviceGoneError (a
    crashed device) instead of waiting forever for answers that will not come."""
    from virtblk import Disk
    from virtblk.errors import DeviceGoneError

    with Disk.embedded(size=MiB, backend="memory") as disk:
        assert disk.embedded_device is not None and disk.embedded_device.process is not None
        disk.pwrite(b"\x01" * 4096, 0)
        server = disk.embedded_device.process.pid
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == server]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        with pytest.raises(DeviceGoneError):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the dropped connection is seen
                disk.pread(4096, 0)
                time.sleep(0.01)


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_a_worker_that_cannot_be_told_its_device_is_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The init message cannot be sent (here: over the size the protocol takes): the
    worker just spawned is ended and waited for, not left running or a zombie."""
    monkeypatch.setattr(worker_process, "_MAX_MESSAGE", 16)
    before = children()
    with pytest.raises(WorkerError, match="too large"):
        BlkDevice(NullBackend(MiB), workers="process")
    assert children() == before


def children() -> set[int]:
    """This process's children, zombies included."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == os.getpid()}
