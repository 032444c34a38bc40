"""The request rules one disk's three front ends share (virtblk.driver.requests): split by
the device's limits, and refused the same way, in the same words, by Disk, AsyncDisk and
QueueHandle."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.queue_api import Completion, QueueHandle
from virtblk.spec import DiscardSegment, RequestType

MiB = 1 << 20
SIZE_MAX = 8192
SEG_MAX = 4


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    """Small limits, so that splitting shows: 4 segments of 8 KiB per read or write,
    16 sectors per write-zeroes segment and 2 segments per request."""
    with Disk.embedded(size=4 * MiB, seg_max=SEG_MAX, size_max=SIZE_MAX,
                       max_write_zeroes_sectors=16, max_write_zeroes_seg=2) as d:
        yield d


def test_reads_and_writes_are_split_by_size_max_and_seg_max(disk: Disk) -> None:
    rules = disk.requests
    assert rules.max_transfer == SEG_MAX * SIZE_MAX
    gpa = 1 << 20
    assert rules.segments(gpa, 20000) == ((gpa, 8192), (gpa + 8192, 8192), (gpa + 16384, 3616))
    limits = disk.queue_limits
    assert (limits.max_segments, limits.max_segment_size) == (SEG_MAX, SIZE_MAX)


def test_range_payloads_follow_the_sector_and_segment_limits(disk: Disk) -> None:
    rules = disk.requests
    segs = rules.range_segments(RequestType.WRITE_ZEROES, 512, 40 * 512, unmap=True)
    assert segs == [DiscardSegment(1, 16, 1), DiscardSegment(17, 16, 1),
                    DiscardSegment(33, 8, 1)]
    payloads = rules.range_payloads(RequestType.WRITE_ZEROES, 512, 40 * 512, unmap=True)
    assert payloads == [segs[0].pack() + segs[1].pack(), segs[2].pack()]
    assert rules.range_payloads(RequestType.WRITE_ZEROES, 0, 0) == []


def test_a_registered_buffer_is_known_without_a_lookup_and_forgotten_when_freed(
    disk: Disk,
) -> None:
    buf = disk.buffer(3 * SIZE_MAX)
    view, gpa, segs = disk.requests.buffers[id(buf)]
    assert view is buf and disk.buffer_address(buf) == gpa
    assert segs == disk.requests.segments(gpa, 3 * SIZE_MAX)
    assert disk.buffer_address(buf[512:]) == gpa + 512  # a part of one: the memory knows
    disk.free_buffer(buf)
    assert id(buf) not in disk.requests.buffers


def test_the_three_front_ends_refuse_a_bad_range_in_the_same_words(disk: Disk) -> None:
    cases = [(512, 1), (512, 4 * MiB), (100, 0)]
    expected = []
    for length, offset in cases:
        with pytest.raises(ValueError) as info:
            disk.pread(length, offset)
        expected.append(str(info.value))
    assert "multiples of the logical block size" in expected[0]
    assert "past the end" in expected[1]

    async def from_the_loop() -> list[str]:
        adisk = AsyncDisk(disk)
        seen = []
        for length, offset in cases:
            with pytest.raises(ValueError) as info:
                await adisk.read(length, offset)
            seen.append(str(info.value))
        await adisk.aclose(close_disk=False)
        return seen

    assert asyncio.run(asyncio.wait_for(from_the_loop(), 60)) == expected
    seen = []
    with QueueHandle(disk) as q:
        for length, offset in cases:
            buf = disk.buffer(length)
            with pytest.raises(ValueError) as info:
                q.read(offset, buf)
            seen.append(str(info.value))
            disk.free_buffer(buf)
    assert seen == expected


def test_a_large_write_zeroes_is_split_by_disk_and_async_disk_and_refused_by_a_handle(
    disk: Disk,
) -> None:
    length = 40 * 512  # three segments, two requests
    disk.pwrite(os.urandom(2 * length), 0)
    disk.write_zeroes(0, length)
    assert disk.pread(length, 0) == bytes(length)

    async def from_the_loop() -> None:
        adisk = AsyncDisk(disk)
        await adisk.write_zeroes(length, length)
        await adisk.aclose(close_disk=False)

    asyncio.run(asyncio.wait_for(from_the_loop(), 60))
    assert disk.pread(length, length) == bytes(length)
    # A queue handle carries one segment per request and never splits (libblkio's rule).
    disk.pwrite(b"\xff" * 16 * 512, 0)
    with QueueHandle(disk) as q:
        with pytest.raises(ValueError, match="40 sectors exceed the device's limit of 16"):
            q.write_zeroes(0, length)
        q.write_zeroes(0, 16 * 512, "zeroes")
        assert q.do_io(1) == [Completion("zeroes", 0)]
    assert disk.pread(16 * 512, 0) == bytes(16 * 512)
