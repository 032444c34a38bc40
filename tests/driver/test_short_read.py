"""A device that answers a request status OK but with a used length that does not cover
the data it had to write (here: used length 1, the status byte alone) fails that request
with EIO, on every front end.

The spec lets the driver trust no byte of a device-writable buffer beyond the used length
(VIRTIO 1.2, 2.7.8.2).  Before the check, such a read returned whatever the shared bounce
buffer last held: four reads of four blocks all gave the block written last.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from peers.faulty import faulty_disk
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.queue_api import QueueHandle
from virtblk.errors import BlockIOError
from virtblk.spec import Lifetime, RequestType

BS = 4096
OFFSETS = [0, 2 * BS, 5 * BS, 9 * BS]
PATTERNS = [bytes([ord("A") + i]) * BS for i in range(len(OFFSETS))]


def _write_patterns(disk: Disk) -> None:
    for pattern, offset in zip(PATTERNS, OFFSETS, strict=True):
        disk.pwrite(pattern, offset)


def test_pread_answered_short_fails_with_eio_and_copies_nothing() -> None:
    with faulty_disk() as (disk, device, _):
        _write_patterns(disk)
        device.short_answers.add(RequestType.IN)
        for offset in OFFSETS:
            with pytest.raises(BlockIOError) as exc:
                disk.pread(BS, offset)
            assert exc.value.errno == errno.EIO
            out = bytearray(BS)
            with pytest.raises(BlockIOError):
                disk.preadv([out], offset)
            assert out == bytes(BS)  # the bounce buffer's stale bytes never reach the caller
        device.short_answers.clear()
        assert [disk.pread(BS, offset) for offset in OFFSETS] == PATTERNS


def test_async_read_answered_short_fails_with_eio() -> None:
    with faulty_disk() as (disk, device, _):
        _write_patterns(disk)

        async def main() -> None:
            adisk = AsyncDisk(disk)
            device.short_answers.add(RequestType.IN)
            for offset in OFFSETS:
                with pytest.raises(BlockIOError) as exc:
                    await adisk.read(BS, offset)
                assert exc.value.errno == errno.EIO
                out = bytearray(BS)
                with pytest.raises(BlockIOError):
                    await adisk.readinto(out, offset)
                assert out == bytes(BS)
            device.short_answers.clear()
            assert [await adisk.read(BS, offset) for offset in OFFSETS] == PATTERNS
            await adisk.aclose()

        asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_queue_handle_read_answered_short_completes_with_eio(poll: bool) -> None:
    with faulty_disk() as (disk, device, _), QueueHandle(disk, poll=poll) as q:
        sources = [disk.buffer(BS) for _ in OFFSETS]
        for buf, pattern, offset in zip(sources, PATTERNS, OFFSETS, strict=True):
            buf[:] = pattern
            q.write(offset, buf, offset)
        assert all(c.ret == 0 for c in q.do_io(len(OFFSETS), timeout=30))
        # One buffer for every read, as a caller recycling its buffer would: it holds the
        # last block written, which a short answer must not pass off as the block read.
        buf = sources[-1]
        device.short_answers.add(RequestType.IN)
        for offset in OFFSETS:
            q.read(offset, buf, offset)
            (done,) = q.do_io(1, timeout=30)
            assert done.user_data == offset and done.ret == -errno.EIO, done
        device.short_answers.clear()
        for pattern, offset in zip(PATTERNS, OFFSETS, strict=True):
            q.read(offset, buf, offset)
            (done,) = q.do_io(1, timeout=30)
            assert done.ret == 0 and bytes(buf) == pattern


def test_get_id_answered_short_reads_as_no_serial() -> None:
    """GET_ID answered short fails like any request, and the serial is then empty, as for
    a device without GET_ID (the seed's ``virtblk_serial_show``), not stale bytes."""
    with faulty_disk(serial="shortread") as (disk, device, _):
        _write_patterns(disk)  # leave the patterns in the bounce buffers GET_ID reuses
        device.short_answers.add(RequestType.GET_ID)
        assert disk.serial == ""
    with faulty_disk(serial="shortread") as (disk, device, _):
        _write_patterns(disk)
        assert disk.serial == "shortread"


def test_get_lifetime_answered_short_fails_with_eio() -> None:
    with faulty_disk(lifetime=Lifetime(1, 2, 3)) as (disk, device, _):
        _write_patterns(disk)
        device.short_answers.add(RequestType.GET_LIFETIME)
        with pytest.raises(BlockIOError) as exc:
            disk.lifetime  # noqa: B018 (the property sends the request)
        assert exc.value.errno == errno.EIO
        device.short_answers.clear()
        assert disk.lifetime == Lifetime(1, 2, 3)
