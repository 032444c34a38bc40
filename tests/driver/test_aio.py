"""virtblk.aio: the Disk on an asyncio loop, completions from the call eventfds, no threads."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from peers.faulty import faulty_disk
from peers.plugin import QsdFactory
from virtblk.aio import AsyncDisk
from virtblk.errors import BlockIOError, DeviceGoneError

MiB = 1 << 20
BS = 4096


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


def test_5000_concurrent_requests_from_one_task_group_without_threads() -> None:
    async def main() -> None:
        async with await AsyncDisk.embedded(size=32 * MiB, backend="memory") as adisk:
            baseline = threading.active_count()
            samples: list[tuple[int, int]] = []
            blocks = {i: os.urandom(BS) for i in range(5000)}

            async def write_then_read(i: int) -> None:
                await adisk.write(blocks[i], i * BS)
                samples.append((threading.active_count(), adisk.in_flight()))
                assert await adisk.read(BS, i * BS) == blocks[i]

            async with asyncio.TaskGroup() as tg:
                for i in blocks:
                    tg.create_task(write_then_read(i))
            assert {threads for threads, _ in samples} == {baseline}
            assert max(in_flight for _, in_flight in samples) > 1  # really concurrent
            assert adisk.in_flight() == 0
            assert adisk.disk.pread(BS, 4999 * BS) == blocks[4999]

    run(main)


def test_more_waiters_than_tags() -> None:
    """With 2 tags, 200 requests queue on the loop side and all complete, in any order."""

    async def main() -> None:
        async with await AsyncDisk.embedded(size=4 * MiB, queue_depth=2) as adisk:
            assert adisk.disk.device.queues[0].depth == 2
            data = [bytes([i]) * 512 for i in range(200)]
            await asyncio.gather(*(adisk.write(d, i * 512) for i, d in enumerate(data)))
            got = await asyncio.gather(*(adisk.read(512, i * 512) for i in range(200)))
            assert got == data

    run(main)


def test_large_io_is_split_by_the_device_limits() -> None:
    """seg_max 4 x size_max 8 KiB: 32 KiB per request, so 5 MiB is 160 requests at once."""

    async def main() -> None:
        async with await AsyncDisk.embedded(
            size=16 * MiB, seg_max=4, size_max=8192, num_queues=2
        ) as adisk:
            data = os.urandom(5 * MiB + 512)
            assert await adisk.write(data, 3 * MiB - 512) == len(data)
            assert await adisk.read(len(data), 3 * MiB - 512) == data
            assert adisk.disk.pread(len(data), 3 * MiB - 512) == data

    run(main)


def test_big_io_through_bounce_buffers_and_zero_copy() -> None:
    async def main() -> None:
        async with await AsyncDisk.embedded(size=32 * MiB) as adisk:
            data = os.urandom(9 * MiB)  # more than two staging chunks
            await adisk.write(data, MiB)
            out = bytearray(9 * MiB)
            assert await adisk.readinto(out, MiB) == len(out)
            assert out == data
            shared = adisk.disk.buffer(64 * 1024)
            shared[:] = os.urandom(len(shared))
            await adisk.write(shared, 0)
            back = adisk.disk.buffer(64 * 1024)
            await adisk.readinto(back, 0)
            assert bytes(back) == bytes(shared)
            adisk.disk.free_buffer(shared)
            adisk.disk.free_buffer(back)

    run(main)


def test_flush_discard_write_zeroes() -> None:
    async def main() -> None:
        async with await AsyncDisk.embedded(size=8 * MiB) as adisk:
            await adisk.write(b"\xcd" * (3 * MiB), 0)
            await adisk.flush()
            await adisk.write_zeroes(0, MiB)
            await adisk.discard(MiB, MiB)
            await adisk.write_zeroes(2 * MiB, BS, unmap=True)
            data = await adisk.read(3 * MiB, 0)
            assert data[:MiB] == bytes(MiB)
            # Our memory disk punches a hole for a discard: the range reads as zeros.
            assert data[MiB : 2 * MiB] == bytes(MiB)
            assert data[2 * MiB : 2 * MiB + BS] == bytes(BS)
            assert data[2 * MiB + BS :] == b"\xcd" * (MiB - BS)

    run(main)


def test_argument_errors() -> None:
    async def main() -> None:
        async with await AsyncDisk.embedded(size=MiB) as adisk:
            with pytest.raises(ValueError, match="multiples of the logical block size"):
                await adisk.read(100, 0)
            with pytest.raises(ValueError, match="past the end"):
                await adisk.write(bytes(BS), MiB)
            with pytest.raises(TypeError, match="writable"):
                await adisk.readinto(bytes(BS), 0)
        with pytest.raises(ValueError, match="closed"):
            await adisk.read(BS, 0)

    run(main)


def test_read_only_device() -> None:
    async def main() -> None:
        async with await AsyncDisk.embedded(size=MiB, read_only=True) as adisk:
            with pytest.raises(BlockIOError) as info:
                await adisk.write(bytes(BS), 0)
            assert info.value.errno == errno.EROFS
            for change in (adisk.discard(0, BS), adisk.write_zeroes(0, BS)):
                with pytest.raises(BlockIOError, match="read-only"):
                    await change
            assert await adisk.read(BS, 0) == bytes(BS)

    run(main)


def _on_faulty_disk(
    body: Callable[[AsyncDisk, Any, socket.socket], Awaitable[None]], **faults: Any
) -> None:
    with faulty_disk(**faults) as (disk, device, device_sock):

        async def main() -> None:
            adisk = AsyncDisk(disk)
            await body(adisk, device, device_sock)
            await adisk.aclose()

        run(main)


def test_device_errors_raise_eio_and_enotty() -> None:
    async def body(adisk: AsyncDisk, device: Any, sock: socket.socket) -> None:
        with pytest.raises(BlockIOError) as eio:
            await adisk.read(BS, 8 * 512)
        assert eio.value.errno == errno.EIO and "IOERR" in str(eio.value)
        with pytest.raises(BlockIOError) as enotty:
            await adisk.flush()
        assert enotty.value.errno == errno.ENOTTY
        assert await adisk.read(BS, 0) == bytes(BS)  # the disk still works

    _on_faulty_disk(body, bad_sector=8, unsupp_flush=True)


def test_timeout_leaves_the_callers_buffer_alone() -> None:
    async def body(adisk: AsyncDisk, device: Any, sock: socket.socket) -> None:
        device.release.set()  # let the first write through, then hold requests there
        await adisk.write(b"\x11" * BS, 16 * 512)
        device.release.clear()
        out = bytearray(BS)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await adisk.readinto(out, 16 * 512)
        assert adisk.in_flight() == 1  # the device still holds it
        device.release.set()
        while adisk.in_flight():
            await asyncio.sleep(0.01)
        assert out == bytes(BS)  # completed after the caller gave up: not copied in
        assert await adisk.read(BS, 16 * 512) == b"\x11" * BS

    _on_faulty_disk(body, slow_sector=16)


def test_device_hangup_fails_requests_in_flight() -> None:
    async def body(adisk: AsyncDisk, device: Any, sock: socket.socket) -> None:
        pending = asyncio.ensure_future(adisk.read(BS, 16 * 512))
        while not adisk.in_flight():
            await asyncio.sleep(0.01)
        sock.shutdown(socket.SHUT_RDWR)  # the device goes away mid-request
        with pytest.raises(DeviceGoneError):
            await pending
        with pytest.raises(DeviceGoneError):
            await adisk.read(BS, 0)

    _on_faulty_disk(body, slow_sector=16)


def test_embedded_device_killed() -> None:
    async def main() -> None:
        adisk = await AsyncDisk.embedded(size=MiB)
        embedded = adisk.disk.embedded_device
        assert embedded is not None and embedded.process is not None
        embedded.process.kill()
        embedded.process.wait()
        with pytest.raises(DeviceGoneError):
            async with asyncio.timeout(10):
                while True:  # the hangup is noticed on the loop, then every call fails
                    await adisk.read(BS, 0)
                    await asyncio.sleep(0.01)
        await adisk.aclose()

    run(main)


@pytest.mark.interop
def test_against_qemu_storage_daemon(qsd_factory: QsdFactory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    daemon = qsd_factory(image=image, num_queues=2)
    blocks = [os.urandom(BS) for _ in range(1000)]
    big = os.urandom(3 * MiB)

    async def main() -> None:
        async with await AsyncDisk.connect(str(daemon.socket_path)) as adisk:
            assert adisk.disk.num_queues == 2
            async with asyncio.TaskGroup() as tg:
                for i, b in enumerate(blocks):
                    tg.create_task(adisk.write(b, i * BS))
            await adisk.write(big, 8 * MiB)
            await adisk.write(b"\xee" * (2 * MiB), 12 * MiB)
            await adisk.flush()
            await adisk.write_zeroes(12 * MiB, MiB)
            await adisk.discard(13 * MiB, MiB)
            reads = await asyncio.gather(*(adisk.read(BS, i * BS) for i in range(1000)))
            assert reads == blocks
            assert await adisk.read(len(big), 8 * MiB) == big
            assert await adisk.read(MiB, 12 * MiB) == bytes(MiB)

    run(main)
    with open(image, "rb") as f:
        assert f.read(len(blocks) * BS) == b"".join(blocks)
        f.seek(8 * MiB)
        assert f.read(len(big)) == big
        f.seek(12 * MiB)
        assert f.read(MiB) == bytes(MiB)  # the write-zeroed range, written 0xee before
