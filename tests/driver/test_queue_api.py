"""The libblkio-style queue API: enqueue, one kick per do_io, completions with -errno, polling."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.faulty import faulty_disk
from peers.plugin import QsdFactory
from virtblk import Disk
from virtblk.driver.queue_api import Completion, QueueHandle, queues
from virtblk.errors import BlockIOError

MiB = 1 << 20
BS = 4096


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    d = Disk.embedded(size=16 * MiB, backend="memory", mode="process")
    yield d
    d.close()


@pytest.fixture(params=[False, True], ids=["interrupt", "poll"])
def q(request: pytest.FixtureRequest, disk: Disk) -> Iterator[QueueHandle]:
    with QueueHandle(disk, 0, poll=request.param) as handle:
        yield handle


def _buffers(disk: Disk, n: int, size: int = BS) -> list[memoryview]:
    return [disk.buffer(size) for _ in range(n)]


def _free(disk: Disk, bufs: list[memoryview]) -> None:
    for b in bufs:
        disk.free_buffer(b)


def _reap(q: QueueHandle, n: int) -> list[Completion]:
    done: list[Completion] = []
    while len(done) < n:
        done += q.do_io(1, timeout=30)
    return done


def test_write_read_round_trip_carries_user_data(disk: Disk, q: QueueHandle) -> None:
    src = _buffers(disk, 32)
    dst = _buffers(disk, 32)
    for i, b in enumerate(src):
        b[:] = os.urandom(BS)
        q.write(i * BS, b, user_data=("w", i))
    done = q.do_io(32, timeout=30)
    assert sorted(c.user_data for c in done) == [("w", i) for i in range(32)]
    assert {(c.ret, c.error_msg) for c in done} == {(0, "")}
    for i, b in enumerate(dst):
        q.read(i * BS, b, user_data=i)
    assert sorted(c.user_data for c in _reap(q, 32)) == list(range(32))
    assert [bytes(b) for b in dst] == [bytes(b) for b in src]
    _free(disk, src + dst)


def test_enqueue_submits_nothing_and_do_io_kicks_once(disk: Disk, q: QueueHandle) -> None:
    hw = disk.device.queues[0]
    bufs = _buffers(disk, 32)
    submitted, kicks = hw.stats_submitted, hw.stats_kicks
    for i, b in enumerate(bufs):
        q.read(i * BS, b, user_data=i)
    assert (q.pending, q.in_flight, hw.stats_submitted) == (32, 0, submitted)
    assert q.do_io(0, 0) == []  # submit only
    assert (q.pending, hw.stats_submitted - submitted) == (0, 32)
    assert hw.stats_kicks - kicks <= 1
    assert len(_reap(q, 32)) == 32
    _free(disk, bufs)


def test_do_io_min_and_max(disk: Disk, q: QueueHandle) -> None:
    bufs = _buffers(disk, 8)
    for i, b in enumerate(bufs):
        q.read(i * BS, b, user_data=i)
    first = q.do_io(3, 3, timeout=30)  # at least 3 ready; whatever else was reaped stays
    assert len(first) == 3
    rest = q.do_io(5, 5, timeout=30)
    assert sorted(c.user_data for c in first + rest) == list(range(8))
    with pytest.raises(ValueError, match="exceeds the 0 requests outstanding"):
        q.do_io(1)
    q.read(0, bufs[0])
    with pytest.raises(ValueError, match="min_completions"):
        q.do_io(1, 0)
    assert len(q.do_io(1, timeout=30)) == 1
    _free(disk, bufs)


def test_more_requests_than_tags_are_submitted_as_tags_free(disk: Disk) -> None:
    hw = disk.device.queues[0]
    n = hw.depth * 2 + 5
    bufs = _buffers(disk, n, 512)
    with QueueHandle(disk) as q:
        for i, b in enumerate(bufs):
            q.read(i * 512, b, user_data=i)
        done = q.do_io(n, timeout=60)
        assert sorted(c.user_data for c in done) == list(range(n))
    _free(disk, bufs)


def test_discard_write_zeroes_flush(disk: Disk, q: QueueHandle) -> None:
    pattern = disk.buffer(4 * BS)
    pattern[:] = b"\xab" * (4 * BS)
    q.write(0, pattern, "pattern")
    assert q.do_io(1, timeout=30) == [Completion("pattern", 0)]
    q.write_zeroes(BS, BS, "wz")
    q.discard(2 * BS, BS, "discard")
    q.write_zeroes(3 * BS, BS, "wz-unmap", unmap=True)
    q.flush("flush")
    done = q.do_io(4, timeout=30)
    assert {c.user_data: c.ret for c in done} == {
        "wz": 0, "discard": 0, "wz-unmap": 0, "flush": 0
    }  # fmt: skip
    q.read(0, pattern, "check")
    assert q.do_io(1, timeout=30) == [Completion("check", 0)]
    data = bytes(pattern)
    disk.free_buffer(pattern)
    assert data[:BS] == b"\xab" * BS
    assert data[BS : 2 * BS] == bytes(BS)
    # Our memory disk punches a hole for a discard: the range reads as zeros.
    assert data[2 * BS : 3 * BS] == bytes(BS)
    assert data[3 * BS :] == bytes(BS)


def test_refuses_buffers_outside_shared_memory(q: QueueHandle) -> None:
    with pytest.raises(TypeError, match=r"disk\.buffer"):
        q.read(0, bytearray(BS))
    with pytest.raises(TypeError, match=r"disk\.buffer"):
        q.write(0, b"\0" * BS)
    assert q.pending == 0


def test_refuses_misaligned_out_of_range_and_oversized(disk: Disk, q: QueueHandle) -> None:
    buf = disk.buffer(BS)
    with pytest.raises(ValueError, match="multiples of the logical block size"):
        q.read(100, buf)
    with pytest.raises(ValueError, match="past the end"):
        q.write(disk.size, buf)
    with pytest.raises(ValueError, match="past the end"):
        q.discard(disk.size - 512, 1024)
    odd = disk.buffer(100)  # a registered buffer whose length is not whole blocks
    with pytest.raises(ValueError, match="multiples of the logical block size"):
        q.read(0, odd)
    with pytest.raises(ValueError, match="multiples of the logical block size"):
        q.write(0, odd)
    assert q.pending == 0
    disk.free_buffer(buf)
    disk.free_buffer(odd)


def test_a_closed_handle_refuses_io_and_leaves_the_queue_alone(disk: Disk) -> None:
    q = QueueHandle(disk, 0)
    buf = disk.buffer(BS)
    q.close()
    for enqueue in (q.read, q.write):
        with pytest.raises(ValueError, match="closed"):
            enqueue(0, buf)
    with pytest.raises(ValueError, match="closed"):
        q.do_io(0)
    # The disk's own I/O runs on the queue the handle gave back.
    disk.pwrite(b"\x3c" * BS, 0)
    assert disk.pread(BS, 0) == b"\x3c" * BS
    disk.free_buffer(buf)


def test_one_request_per_enqueue_within_the_device_limits() -> None:
    with Disk.embedded(size=MiB, seg_max=2, size_max=BS) as disk:
        with QueueHandle(disk) as q:
            assert q.max_transfer == 2 * BS
            ok, big = disk.buffer(2 * BS), disk.buffer(2 * BS + 512)
            with pytest.raises(ValueError, match="max_transfer"):
                q.read(0, big)
            ok[:] = os.urandom(2 * BS)
            q.write(BS, ok, "w")  # two segments of size_max: what the device accepts
            assert q.do_io(1, timeout=30) == [Completion("w", 0)]
        assert disk.pread(2 * BS, BS) == bytes(ok)


def test_a_handle_owns_its_queue_until_it_closes() -> None:
    with Disk.embedded(size=MiB, num_queues=2) as disk:
        first = QueueHandle(disk, 0)
        with pytest.raises(ValueError, match="already driven"):
            QueueHandle(disk, 0)
        disk.pwrite(b"\x07" * BS, 0)  # blocking I/O takes the queue nobody drives
        assert disk.device.queues[1].stats_submitted and first.in_flight == 0
        with QueueHandle(disk, 1), pytest.raises(ValueError, match="every hardware queue"):
            disk.pread(BS, 0)
        first.close()
        assert disk.pread(BS, 0) == b"\x07" * BS
        QueueHandle(disk, 0)  # free again; closing the disk closes the handle
    assert disk.device.queues == []


def test_read_only_device_refuses_writes() -> None:
    with Disk.embedded(size=MiB, read_only=True) as disk, QueueHandle(disk) as q:
        buf = disk.buffer(BS)
        with pytest.raises(BlockIOError) as info:
            q.write(0, buf)
        assert info.value.errno == errno.EROFS
        with pytest.raises(BlockIOError, match="read-only"):
            q.discard(0, BS)
        with pytest.raises(BlockIOError, match="read-only"):
            q.write_zeroes(0, BS)
        assert q.pending == 0
        q.read(0, buf, "r")  # reads still go
        assert q.do_io(1, timeout=30) == [Completion("r", 0)]


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_completions_carry_eio_and_enotty(poll: bool) -> None:
    with faulty_disk(bad_sector=8, unsupp_flush=True) as (disk, _, _), QueueHandle(
        disk, poll=poll
    ) as q:
        good, bad = disk.buffer(BS), disk.buffer(BS)
        q.read(0, good, "good")
        q.read(8 * 512, bad, "bad")
        q.flush("flush")
        done = {c.user_data: c for c in q.do_io(3, timeout=30)}
        assert done["good"] == Completion("good", 0)
        assert done["bad"].ret == -errno.EIO
        assert "IOERR" in done["bad"].error_msg and "in" in done["bad"].error_msg
        assert done["flush"].ret == -errno.ENOTTY
        assert "UNSUPP" in done["flush"].error_msg


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_timeout_keeps_completions_for_later(poll: bool) -> None:
    with faulty_disk(slow_sector=16) as (disk, device, _), QueueHandle(disk, poll=poll) as q:
        fast, slow = disk.buffer(BS), disk.buffer(BS)
        q.read(16 * 512, slow, "slow")
        with pytest.raises(TimeoutError, match="0 of 1 completions"):
            q.do_io(1, timeout=0.3)
        assert q.in_flight == 1
        device.release.set()
        assert q.do_io(1, timeout=30) == [Completion("slow", 0)]
        q.read(0, fast, "fast")
        assert q.do_io(1, timeout=30) == [Completion("fast", 0)]


def test_poll_mode_never_gets_a_notification() -> None:
    with Disk.embedded(size=4 * MiB, backend="memory") as disk:
        hw = disk.device.queues[0]
        # A fresh device queue signals its first completion whatever the driver asked (it
        # has no earlier decision to compare used_event with, as Linux vhost): spend it.
        disk.pread(BS, 0)
        assert select.select([hw.call_fd], [], [], 0)[0] == []
        interrupts = hw.stats_interrupts
        with QueueHandle(disk, poll=True) as q:
            bufs = _buffers(disk, 32)
            for rounds in range(20):
                for i, b in enumerate(bufs):
                    if rounds % 2:
                        q.read(i * BS, b, i)
                    else:
                        q.write(i * BS, b, i)
                assert len(_reap(q, 32)) == 32
            # The device never signalled: the eventfd counter is still zero.
            assert select.select([hw.call_fd], [], [], 0)[0] == []
            with pytest.raises(BlockingIOError):
                os.read(hw.call_fd, 8)
            assert hw.stats_interrupts == interrupts
            _free(disk, bufs)
        # Closing the handle turns notifications back on for blocking I/O.
        disk.pwrite(b"\x01" * BS, 0)
        assert disk.pread(BS, 0) == b"\x01" * BS


def test_one_handle_per_queue() -> None:
    with Disk.embedded(size=4 * MiB, num_queues=2) as disk:
        handles = queues(disk)
        assert [h.index for h in handles] == [0, 1]
        bufs = _buffers(disk, 2)
        for i, (h, b) in enumerate(zip(handles, bufs, strict=True)):
            b[:] = bytes([i + 1]) * BS
            h.write(i * BS, b, i)
        for i, h in enumerate(handles):
            assert h.do_io(1, timeout=30) == [Completion(i, 0)]
            h.close()
        assert disk.pread(2 * BS, 0) == b"\x01" * BS + b"\x02" * BS
        with pytest.raises(ValueError, match="out of range"):
            QueueHandle(disk, 2)


@pytest.mark.interop
def test_against_qemu_storage_daemon(qsd_factory: QsdFactory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    daemon = qsd_factory(image=image)
    with Disk.connect(str(daemon.socket_path)) as disk:
        for poll in (False, True):
            with QueueHandle(disk, poll=poll) as q:
                src, dst = _buffers(disk, 16), _buffers(disk, 16)
                for i, b in enumerate(src):
                    b[:] = os.urandom(BS)
                    q.write(i * BS, b, i)
                # A pattern over and around the blocks to write-zero and discard, so the
                # zeros read back are the write-zeroes' doing.
                fill = disk.buffer(3 * BS)
                fill[:] = b"\x5e" * (3 * BS)
                q.write(16 * BS, fill, "fill")
                q.flush("flush")
                done = _reap(q, 18)
                assert {c.ret for c in done} == {0}
                for i, b in enumerate(dst):
                    q.read(i * BS, b, i)
                q.write_zeroes(16 * BS, BS, "wz")
                q.discard(17 * BS, BS, "discard")
                done = _reap(q, 18)
                assert {c.ret for c in done} == {0}
                assert [bytes(b) for b in dst] == [bytes(b) for b in src]
                with open(image, "rb") as f:
                    assert f.read(16 * BS) == b"".join(bytes(b) for b in src)
                    assert f.read(BS) == bytes(BS)
                    # qsd's file node ignores discards (discard=ignore): not checked.
                    f.seek(18 * BS)
                    assert f.read(BS) == b"\x5e" * BS  # the neighbour kept the pattern
                _free(disk, [*src, *dst, fill])


def test_a_handle_and_an_async_disk_never_share_a_queue() -> None:
    """Both reap a queue's completions: one would swallow the other's interrupts."""
    import asyncio

    from virtblk.aio import AsyncDisk

    with Disk.embedded(size=MiB, num_queues=2) as disk:

        async def main() -> None:
            with QueueHandle(disk, 0):
                with pytest.raises(ValueError, match="driven by"):
                    AsyncDisk(disk)  # all queues, queue 0 among them
                adisk = AsyncDisk(disk, queues=[1])
                with pytest.raises(ValueError, match="in use by an AsyncDisk"):
                    QueueHandle(disk, 1)
                await adisk.write(b"\x5a" * BS, 0)
                assert await adisk.read(BS, 0) == b"\x5a" * BS
                await adisk.aclose(close_disk=False)
            QueueHandle(disk, 1).close()  # free again once the AsyncDisk closed

        asyncio.run(main())
