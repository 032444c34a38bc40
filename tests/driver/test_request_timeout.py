"""A device that keeps its socket open but never answers a request: ``request_timeout``.

The request fails with ``RequestTimeoutError`` (ETIMEDOUT) and its queue's ring is reset,
so the same queue serves later requests; a device that does not even let the ring be
stopped (GET_VRING_BASE unanswered) is given up: ETIMEDOUT, then ``DeviceGoneError``,
nothing left hanging.  Against a device that completes everything, the option changes
nothing.

Every call that could hang on a broken driver runs in a thread joined with a bound
(``_outcome``), so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from peers.faulty import FaultyDevice, faulty_disk
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.queue_api import Completion, QueueHandle
from virtblk.driver.virtio_blk import VirtioBlk
from virtblk.errors import BlockIOError, DeviceGoneError, RequestTimeoutError
from virtblk.spec import Feature
from virtblk.vhost_user.server import serve_connected

LOST = 8  # the sector whose requests the device never completes
BS = 4096


def _outcome(call: Callable[[], Any], bound: float = 60.0) -> Any:
    """What ``call()`` returned or raised, run in a thread; fails if it is still running
    after ``bound`` seconds (the hang this file is about)."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # the outcome under test
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"still waiting after {bound} s"
    return result[0]


def _until(cond: Callable[[], bool], bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_a_request_the_device_never_completes_fails_with_etimedout() -> None:
    with faulty_disk(lost_sector=LOST, disk_options={"request_timeout": 0.5}) as (
            disk, device, _):
        q = disk.device.queues[0]
        data = os.urandom(4096)
        disk.pwrite(data, 0)
        exc = _outcome(lambda: disk.pread(512, LOST * 512))
        assert isinstance(exc, RequestTimeoutError), exc
        assert isinstance(exc, BlockIOError) and isinstance(exc, OSError)
        assert not isinstance(exc, TimeoutError)  # that is the caller's own wait timeout
        assert exc.errno == errno.ETIMEDOUT
        assert device.lost == 1
        assert q.stats_timeouts == 1
        # The same queue serves again: its ring was reset, not left with a chain on it.
        assert _outcome(lambda: disk.pread(4096, 0)) == data
        assert q.vq.in_flight == 0 and q.tags_free == q.depth
        device.lost_sector = None
        disk.pwrite(b"\7" * 512, LOST * 512)
        assert disk.pread(512, LOST * 512) == b"\7" * 512
        assert q.stats_timeouts == 1


def test_every_request_on_the_reset_ring_fails_with_etimedout() -> None:
    """Two requests the device holds: the reset takes both back and both fail with
    ETIMEDOUT (neither is known to be done); the queue then serves again."""
    with faulty_disk(lost_sector=LOST, disk_options={"request_timeout": 2}) as (disk, device, _):
        outcomes: list[Any] = []
        threads = [threading.Thread(
            target=lambda: outcomes.append(_outcome(lambda: disk.pread(512, LOST * 512))))
            for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 2
        for exc in outcomes:
            assert isinstance(exc, RequestTimeoutError), exc
        assert device.lost == 2
        assert _outcome(lambda: disk.pread(512, 0)) == bytes(512)


def test_requests_waiting_for_room_go_to_the_fresh_ring() -> None:
    """A ring of 4 descriptors without indirect tables holds one request (header, data,
    status): the others wait for room (BUSY).  The reset fails only the one the device
    held; those that waited go to the fresh ring and complete."""
    device = FaultyDevice(1 << 20, lost_sector=LOST)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    serving = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    serving.start()
    dev = VirtioBlk(ours, queue_size=4, queue_depth=4, request_timeout=1,
                    exclude_features=Feature.RING_INDIRECT_DESC.mask)
    with Disk(dev) as disk:
        q = dev.queues[0]
        blocks = {i: os.urandom(512) for i in (16, 24, 32)}
        for sector, data in blocks.items():
            disk.pwrite(data, sector * 512)
        outcomes: dict[int, Any] = {}

        def read(sector: int) -> None:
            outcomes[sector] = _outcome(lambda: disk.pread(512, sector * 512))

        threads = [threading.Thread(target=read, args=(LOST,))]
        threads[0].start()
        assert device.lost_seen.wait(30)
        busy = q.stats_busy
        threads += [threading.Thread(target=read, args=(s,)) for s in blocks]
        for t in threads[1:]:
            t.start()
        _until(lambda: q.stats_busy == busy + 3 or outcomes.keys() >= blocks.keys())
        for t in threads:
            t.join(60)
        assert q.stats_busy == busy + 3, "the others did not wait for room"
        assert isinstance(outcomes[LOST], RequestTimeoutError), outcomes[LOST]
        assert {s: outcomes[s] for s in blocks} == blocks
        assert q.stats_timeouts == 1
    serving.join(10)


def test_a_timed_out_request_gives_its_tag_back() -> None:
    """A queue of depth 1 still works after its one tag's request timed out."""
    with faulty_disk(lost_sector=LOST, disk_options={
            "request_timeout": 0.5, "queue_depth": 1}) as (disk, _device, _):
        q = disk.device.queues[0]
        exc = _outcome(lambda: disk.pwrite(b"\1" * 512, LOST * 512))
        assert isinstance(exc, RequestTimeoutError), exc
        assert q.tags_free == 1
        assert _outcome(lambda: disk.pread(512, 0)) == bytes(512)


def test_a_device_that_does_not_stop_the_ring_is_given_up() -> None:
    """The device holds a request and, stopping a ring waiting for it, answers no
    GET_VRING_BASE: the request fails with ETIMEDOUT once the reply timeout has passed
    too, every later request with DeviceGoneError, and nothing is left running."""
    before = set(threading.enumerate())
    with faulty_disk(slow_sector=LOST, disk_options={
            "request_timeout": 0.5, "timeout": 0.5}) as (disk, device, _):
        exc = _outcome(lambda: disk.pread(512, LOST * 512))
        assert isinstance(exc, RequestTimeoutError), exc
        assert device.holding.is_set()
        assert disk.device.lost is not None
        later = _outcome(lambda: disk.pread(512, 0))
        assert isinstance(later, DeviceGoneError), later
        later = _outcome(lambda: disk.pwrite(b"\1" * 512, 0))
        assert isinstance(later, DeviceGoneError), later
        assert _outcome(disk.close) is None
    _until(lambda: set(threading.enumerate()) <= before)


def test_memory_a_lost_device_may_write_is_not_handed_out_again() -> None:
    """Once the connection is given up with a request on the ring, the buffers freed
    after that stay out of the allocator: the device could still write them."""
    with faulty_disk(slow_sector=LOST, disk_options={
            "request_timeout": 0.5, "timeout": 0.5}) as (disk, _device, _):
        exc = _outcome(lambda: disk.pread(512, LOST * 512))
        assert isinstance(exc, RequestTimeoutError), exc
        allocator = disk.device.allocator
        free_before = allocator.free_bytes
        buf = disk.buffer(4096)
        disk.free_buffer(buf)
        assert allocator.free_bytes == free_before - 4096


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_request_timeout_changes_nothing_on_a_device_that_answers(mode: str) -> None:
    """A verified random read/write run from four threads: every byte as written, no
    request timed out."""
    size = 8 << 20
    shadow = bytearray(size)
    lock = threading.Lock()
    errors: list[BaseException] = []
    with Disk.embedded(size, mode=mode, request_timeout=5) as disk:  # type: ignore[arg-type]
        assert disk.request_timeout == 5

        def job(seed: int) -> None:
            try:
                run(seed)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def run(seed: int) -> None:
            r = random.Random(seed)
            # Each thread owns one quarter: the shadow stays exact without ordering.
            base = seed * (size // 4)
            for _ in range(300):
                length = r.choice((512, 4096, 65536))
                offset = base + r.randrange(0, (size // 4 - length) // 512) * 512
                if r.random() < 0.5:
                    data = r.randbytes(length)
                    disk.pwrite(data, offset)
                    with lock:
                        shadow[offset : offset + length] = data
                else:
                    got = disk.pread(length, offset)
                    with lock:
                        assert got == bytes(shadow[offset : offset + length])

        threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert disk.pread(size, 0) == bytes(shadow)
        assert sum(q.stats_timeouts for q in disk.device.queues) == 0


def test_request_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="request_timeout"), faulty_disk(
            disk_options={"request_timeout": 0}):
        pass


def test_async_disk_request_times_out_and_the_queue_serves_again() -> None:
    """No thread waits in an AsyncDisk: a loop timer resets the ring."""
    with faulty_disk(lost_sector=LOST, disk_options={"request_timeout": 0.5}) as (
            disk, device, _):

        async def main() -> None:
            adisk = AsyncDisk(disk)
            data = os.urandom(BS)
            await adisk.write(data, 0)
            with pytest.raises(RequestTimeoutError) as exc:
                await adisk.read(512, LOST * 512)
            assert exc.value.errno == errno.ETIMEDOUT
            assert adisk.in_flight() == 0
            assert await adisk.read(BS, 0) == data
            device.lost_sector = None
            assert await adisk.read(512, LOST * 512) == bytes(512)
            await adisk.aclose(close_disk=False)

        asyncio.run(asyncio.wait_for(main(), 60))
        assert device.lost == 1


def test_async_disk_on_a_device_that_does_not_stop_the_ring() -> None:
    with faulty_disk(slow_sector=LOST, disk_options={
            "request_timeout": 0.5, "timeout": 0.5}) as (disk, _device, _):

        async def main() -> None:
            adisk = AsyncDisk(disk)
            with pytest.raises(RequestTimeoutError):
                await adisk.read(512, LOST * 512)
            with pytest.raises(DeviceGoneError):
                await adisk.read(512, 0)
            await adisk.aclose(close_disk=False)

        asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_queue_handle_request_times_out_and_the_queue_serves_again(poll: bool) -> None:
    """A QueueHandle drives the ring itself: the request completes with -ETIMEDOUT, the
    one beside it as the device answered it, and the fresh ring serves the next.

    A polling handle spins holding the GIL, and this device is a thread of the same
    process: its answers can take a second there (measured up to 2.3 s, with or without a
    reset), so that mode gets a timeout no healthy answer reaches."""
    timeout = 8 if poll else 0.5
    with faulty_disk(lost_sector=LOST, disk_options={"request_timeout": timeout}) as (
            disk, _device, _), QueueHandle(disk, poll=poll) as q:
        lost, fine = disk.buffer(BS), disk.buffer(BS)
        q.read(LOST * 512, lost, "lost")
        q.read(0, fine, "fine")
        done = {c.user_data: c for c in q.do_io(2, timeout=30)}
        assert done["fine"] == Completion("fine", 0)
        assert done["lost"].ret == -errno.ETIMEDOUT
        assert "in time" in done["lost"].error_msg
        assert q.in_flight == 0
        for i in range(3):  # the same tags, on the fresh ring
            q.read(2 * BS, lost, i)  # not at LOST
            q.write(3 * BS, fine, -i)
            assert sorted(c.ret for c in q.do_io(2, timeout=30)) == [0, 0]
        assert disk.device.queues[0].stats_timeouts == 1


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_queue_handle_on_a_device_that_does_not_stop_the_ring(poll: bool) -> None:
    with faulty_disk(slow_sector=LOST, disk_options={
            "request_timeout": 0.5, "timeout": 0.5}) as (disk, device, _), \
            QueueHandle(disk, poll=poll) as q:
        buf = disk.buffer(BS)
        q.read(LOST * 512, buf, "held")
        assert q.do_io(0) == []  # submitted; the device must hold it before the reset,
        assert device.holding.wait(30)  # or the ring would stop (a loaded machine's race)
        [held] = q.do_io(1, timeout=30)
        assert held.user_data == "held" and held.ret == -errno.ETIMEDOUT
        q.read(0, buf, "next")
        with pytest.raises(DeviceGoneError):
            q.do_io(1, timeout=30)
