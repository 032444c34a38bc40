"""A wait that ends early (Ctrl-C, a cancelled task) never frees memory the device may
still write: the bounce buffer of a request on the ring outlives the request.

Each test holds a read in the device, interrupts its caller, then takes memory for someone
else (``Disk.buffer``, another read) and lets the held read finish with a distinctive
payload: that payload must land only in the held read's own buffer, which the request's
completion then frees.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from peers.faulty import faulty_disk
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.blkmq import HardwareQueue, Request

HELD = 8  # the held read's sector
OTHER = 64  # another caller's sector
BS = 4096
PAYLOAD = b"\xee" * BS  # what the held read returns, late
MINE = b"\x5a" * BS  # another caller's data in memory taken after the interrupt


def _in_flight(q: HardwareQueue) -> list[Request]:
    """The requests whose tags are out (on the ring, as nothing is parked here)."""
    free = set(q._free_tags)
    return [r for r in q._requests if r.tag not in free]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@contextmanager
def _ctrl_c_when(event: threading.Event) -> Iterator[None]:
    """SIGINT to the main thread once ``event`` is set (the device holds the request), with
    Python's own handler: KeyboardInterrupt in whatever the main thread waits in."""
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    firing = threading.Thread(
        target=lambda: event.wait(60) and signal.pthread_kill(main, signal.SIGINT))
    firing.start()
    try:
        yield
    finally:
        firing.join(60)
        signal.signal(signal.SIGINT, old)


def _prepare(disk: Disk, device: Any) -> bytes:
    """Write the payload the held read will return and another caller's data; from now on
    reads at HELD are held.  Returns the other caller's data."""
    disk.pwrite(PAYLOAD, HELD * 512)
    other = bytes(range(256)) * (BS // 256)
    disk.pwrite(other, OTHER * 512)
    device.slow_sector = HELD
    return other


def test_ctrl_c_during_pread_leaves_the_bounce_buffer_to_the_request() -> None:
    with faulty_disk() as (disk, device, _):
        other = _prepare(disk, device)
        q = disk.device.queues[0]
        allocator = disk.device.allocator
        free = allocator.free_bytes
        with _ctrl_c_when(device.holding), pytest.raises(KeyboardInterrupt):
            disk.pread(BS, HELD * 512)
        [held] = _in_flight(q)
        assert held.in_bufs and not held.done
        held_buf = held.in_bufs[0]
        assert allocator.free_bytes == free - BS, "the held read's buffer was freed"
        # Someone else takes memory now; and another read waits behind the held one.
        mine = disk.buffer(BS)
        gpa = disk.buffer_address(mine)
        assert gpa is not None
        assert not _overlaps((gpa, BS), held_buf), "the held buffer was handed out twice"
        mine[:] = MINE
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(disk.pread(BS, OTHER * 512)))
        reader.start()
        device.release.set()  # the held read ends: the payload lands in its own buffer
        reader.join(60)
        assert got == [other]
        assert bytes(mine) == MINE
        assert held.done
        assert allocator.free_bytes == free - BS  # the held buffer is back; ``mine`` is out
        disk.free_buffer(mine)
        assert allocator.free_bytes == free


def test_ctrl_c_during_pread_with_a_request_timeout() -> None:
    """The interrupted read's request is never completed; the next waiter's wait resets
    the ring once it is due, and only then is its buffer free again."""
    with faulty_disk(lost_sector=HELD, disk_options={"request_timeout": 1}) as (
            disk, device, _):
        q = disk.device.queues[0]
        allocator = disk.device.allocator
        free = allocator.free_bytes
        with _ctrl_c_when(device.lost_seen), pytest.raises(KeyboardInterrupt):
            disk.pread(BS, HELD * 512)
        [held] = _in_flight(q)
        held_buf = held.in_bufs[0]
        mine = disk.buffer(BS)
        gpa = disk.buffer_address(mine)
        assert gpa is not None and not _overlaps((gpa, BS), held_buf)
        mine[:] = MINE
        assert disk.pread(BS, 0) == bytes(BS)  # the queue works meanwhile
        q.wait_until(lambda: held.done, 30)  # the reset, when the held read is due
        assert q.stats_timeouts == 1
        assert allocator.free_bytes == free - BS  # the held buffer is back
        assert bytes(mine) == MINE
        disk.free_buffer(mine)


def test_a_cancelled_async_read_leaves_the_bounce_buffer_to_the_request() -> None:
    with faulty_disk() as (disk, device, _):
        other = _prepare(disk, device)
        q = disk.device.queues[0]
        allocator = disk.device.allocator

        async def main() -> None:
            adisk = AsyncDisk(disk)
            free = allocator.free_bytes
            task = asyncio.ensure_future(adisk.read(BS, HELD * 512))
            while not device.holding.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            [held] = _in_flight(q)
            held_buf = held.in_bufs[0]
            assert allocator.free_bytes == free - BS, "the held read's buffer was freed"
            mine = disk.buffer(BS)
            gpa = disk.buffer_address(mine)
            assert gpa is not None and not _overlaps((gpa, BS), held_buf)
            mine[:] = MINE
            reading = asyncio.ensure_future(adisk.read(BS, OTHER * 512))
            device.release.set()
            assert await reading == other
            while adisk.in_flight():
                await asyncio.sleep(0.01)
            assert bytes(mine) == MINE
            disk.free_buffer(mine)
            assert allocator.free_bytes == free
            await adisk.aclose(close_disk=False)

        asyncio.run(asyncio.wait_for(main(), 60))
