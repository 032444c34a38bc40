"""Linux native AIO for the file backend: reads and writes through io_submit on the
O_DIRECT descriptor, completions on an eventfd, errors and misaligned requests answered
right, and the device serving a file with it."""

from __future__ import annotations

import errno
import mmap
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from device_helpers import Driver, start

from virtblk.device import linux_aio
from virtblk.device.backends import FileBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestType, Status
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    yield path


def wait_all(aio: linux_aio.LinuxAio, count: int) -> list[tuple[Any, BaseException | None]]:
    waiter = select.poll()
    waiter.register(aio.event_fd, select.POLLIN)
    done: list[tuple[Any, BaseException | None]] = []
    while len(done) < count:
        if not aio.has_done:
            assert waiter.poll(10_000), f"{len(done)} of {count} completions"
            continue
        done += aio.take()
    return done


def test_reads_and_writes_through_io_submit(image: Path) -> None:
    assert linux_aio.available()
    backend = FileBackend(image)
    assert backend.direct_fd >= 0, "the test filesystem takes O_DIRECT"
    fallbacks: list[tuple[bool, int]] = []

    def fallback(write: bool, buf: memoryview, offset: int) -> None:
        fallbacks.append((write, offset))
        (backend.write_from if write else backend.read_into)(buf, offset)

    aio = linux_aio.LinuxAio(64, direct_fd=backend.direct_fd, fallback=fallback, align=512,
                             rw_flags=lambda: 0)
    area = mmap.mmap(-1, 64 * 4096)  # page aligned, as O_DIRECT wants
    try:
        view = memoryview(area)
        for i in range(32):  # 32 reads in one io_submit
            aio.submit(False, view[i * 4096 : (i + 1) * 4096], i * 8192, ("read", i))
        aio.flush()
        done = wait_all(aio, 32)
        assert sorted(t for t, _ in done) == [("read", i) for i in range(32)]
        assert {e for _, e in done} == {None}
        expected = bytes(range(256)) * 16
        assert all(view[i * 4096 : (i + 1) * 4096] == expected for i in range(32))
        for i in range(8):
            view[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
            aio.submit(True, view[i * 4096 : (i + 1) * 4096], MiB + i * 4096, ("write", i))
        aio.submit(False, view[40 * 4096 + 100 : 40 * 4096 + 612], 0, "misaligned")  # fallback
        aio.flush()
        assert {e for _, e in wait_all(aio, 9)} == {None}
        assert fallbacks == [(False, 0)]
        aio.submit(False, view[:4096], 64 * MiB, "past the end")  # res 0: a short read
        aio.flush()
        [(token, error)] = wait_all(aio, 1)
        assert token == "past the end" and isinstance(error, OSError)
        assert error.errno == errno.EIO and "short transfer" in str(error)
        assert aio.in_flight == 0
    finally:
        aio.close()
        view.release()
        area.close()
        backend.close()
    data = image.read_bytes()
    assert all(data[MiB + i * 4096 : MiB + (i + 1) * 4096] == bytes([i + 1]) * 4096
               for i in range(8))


def test_what_io_submit_refuses_is_done_at_once(image: Path) -> None:
    """io_submit refuses the whole round (here EBADF: a descriptor never opened; the
    kernel's AIO limit gives EAGAIN the same way): each request is done with the fallback
    on its own buffer, and answered as any other."""
    backend = FileBackend(image)
    fallbacks: list[tuple[bool, int, bytes]] = []

    def fallback(write: bool, buf: memoryview, offset: int) -> None:
        fallbacks.append((write, offset, bytes(buf[:1])))
        (backend.write_from if write else backend.read_into)(buf, offset)

    aio = linux_aio.LinuxAio(8, direct_fd=0x7FFFFFFF, fallback=fallback, align=512,
                             rw_flags=lambda: 0)
    area = mmap.mmap(-1, 4 * 4096)
    try:
        view = memoryview(area)
        view[3 * 4096 : 4 * 4096] = b"\x5a" * 4096
        for i in range(3):
            aio.submit(False, view[i * 4096 : (i + 1) * 4096], (i + 1) * 4096, i)
        aio.submit(True, view[3 * 4096 :], MiB, 3)
        assert fallbacks == []  # queued for io_submit
        aio.flush()
        assert sorted(wait_all(aio, 4)) == [(0, None), (1, None), (2, None), (3, None)]
        assert [(w, off) for w, off, _ in fallbacks] == [
            (False, 4096), (False, 8192), (False, 12288), (True, MiB)]
        assert fallbacks[3][2] == b"\x5a"
        expected = bytes(range(256)) * 16
        assert all(view[i * 4096 : (i + 1) * 4096] == expected for i in range(3))
        assert aio.in_flight == 0
    finally:
        aio.close()
        view.release()
        area.close()
        backend.close()
    assert image.read_bytes()[MiB : MiB + 4096] == b"\x5a" * 4096


def test_a_file_device_keeps_many_reads_in_flight_with_aio(image: Path) -> None:
    region = MemoryRegion.create(8 * MiB, guest_phys_addr=0x100000)
    memory = GuestMemory([region])
    backend = FileBackend(image)
    dev = BlkDevice(backend)
    drv = Driver(memory, BufferAllocator(region), event_idx=True)
    try:
        start(dev, 0, drv, event_idx=True)
        server = dev._workers[0].server  # type: ignore[attr-defined]
        assert isinstance(server._pool, linux_aio.LinuxAio)
        for t in range(48):
            drv.submit(t, RequestType.IN, 8 * t, in_len=4096)
        drv.kick_device()
        assert drv.wait(48, timeout=20) == {t: 4097 for t in range(48)}
        assert all(drv.status_of(t) == Status.OK for t in range(48))
        assert all(drv.data_of(t, 4096) == bytes(range(256)) * 16 for t in range(48))
        drv.submit(48, RequestType.OUT, 16, out=b"\x7e" * 4096)
        drv.submit(49, RequestType.IN, 2 * 4 * MiB // 512, in_len=4096)  # past the end
        drv.kick_device()
        assert drv.wait(2, timeout=20) == {48: 1, 49: 1}
        assert drv.status_of(48) == Status.OK and drv.status_of(49) == Status.IOERR
        assert dev.stats()["requests"] == {"IN": 49, "OUT": 1}
    finally:
        dev.reset()
        backend.close()
        drv.close()
        memory.close()
    with open(image, "rb") as f:
        os.lseek(f.fileno(), 16 * 512, os.SEEK_SET)
        assert f.read(4096) == b"\x7e" * 4096
