"""Backends: what a block request needs from storage."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtblk.device.backends import (
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FileBackend,
    MemoryBackend,
    NullBackend,
    zero_fill,
)

MiB = 1 << 20


def views(*sizes: int, fill: int = 0) -> list[memoryview]:
    return [memoryview(bytearray([fill]) * n) for n in sizes]


def test_zero_fill_spans_more_than_one_chunk() -> None:
    buf = bytearray(b"\xff") * (3 * MiB + 7)
    zero_fill(memoryview(buf))
    assert buf.count(0) == len(buf)


def test_memory_round_trip_across_buffers() -> None:
    b = MemoryBackend(MiB)
    data = [memoryview(bytearray(os.urandom(n))) for n in (512, 1024, 3584)]
    assert b.pwritev(data, 4096) == 5120
    out = views(100, 5020)
    assert b.preadv(out, 4096) == 5120
    assert b"".join(bytes(v) for v in out) == b"".join(bytes(v) for v in data)


def test_memory_starts_zeroed_and_write_zeroes_zeroes_unaligned_range() -> None:
    b = MemoryBackend(64 * 1024)
    out = views(64 * 1024, fill=0xAA)
    b.preadv(out, 0)
    assert bytes(out[0]) == bytes(64 * 1024)
    b.pwritev(views(64 * 1024, fill=0x55), 0)
    b.write_zeroes(512, 20 * 1024, unmap=True)  # crosses page boundaries, unaligned ends
    b.preadv(out, 0)
    got = bytes(out[0])
    assert got[:512] == b"\x55" * 512
    assert got[512 : 512 + 20 * 1024] == bytes(20 * 1024)
    assert got[512 + 20 * 1024 :] == b"\x55" * (64 * 1024 - 512 - 20 * 1024)


def test_memory_resize_keeps_data_and_zero_extends() -> None:
    b = MemoryBackend(8192)
    b.pwritev(views(8192, fill=7), 0)
    b.resize(16384)
    assert b.size == 16384
    out = views(16384, fill=1)
    b.preadv(out, 0)
    assert bytes(out[0]) == b"\x07" * 8192 + bytes(8192)
    b.resize(4096)
    out = views(4096)
    b.preadv(out, 0)
    assert bytes(out[0]) == b"\x07" * 4096
    b.close()


def test_memory_shrinks_and_grows_under_io_without_a_fault() -> None:
    """Reads and writes near the end while the disk shrinks and grows, from other threads
    (queue workers): each either completes or fails cleanly; none touches the mapping past
    the end of its memfd (SIGBUS would kill this process), and none sees a size that is
    ahead of its mapping."""
    big, small = 16 * 4096, 4 * 4096
    b = MemoryBackend(big)
    stop = threading.Event()
    faults: list[BaseException] = []

    def io() -> None:
        buf = memoryview(bytearray(4096))
        while not stop.is_set():
            for offset in range(0, big, 4096):
                try:
                    if offset + 4096 <= b.size:  # what the device checks first
                        b.read_into(buf, offset)
                        b.write_from(buf, offset)
                except ValueError:
                    pass  # shrunk between the check and the call: a clean refusal
                except BaseException as exc:
                    faults.append(exc)

    threads = [threading.Thread(target=io) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            b.resize(small)
            b.resize(big)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not faults, faults[:3]
    assert b.size == big
    b.close()


def test_null_reads_zeroes_or_leaves_buffers() -> None:
    out = views(512, fill=9)
    assert NullBackend(MiB).preadv(out, 0) == 512
    assert bytes(out[0]) == bytes(512)
    out = views(512, fill=9)
    NullBackend(MiB, read_zeroes=False).preadv(out, 0)
    assert bytes(out[0]) == b"\x09" * 512
    assert NullBackend(MiB).pwritev(views(512, 1024), 0) == 1536


def test_file_round_trip_and_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    b = FileBackend(path, create_size=MiB)
    assert b.size == MiB and not b.read_only
    data = [memoryview(bytearray(os.urandom(n))) for n in (512, 4096)]
    assert b.pwritev(data, 8192) == 4608
    out = views(4608)
    b.preadv(out, 8192)
    assert bytes(out[0]) == bytes(data[0]) + bytes(data[1])
    b.flush()
    b.close()
    # create_size does not truncate an existing file
    b2 = FileBackend(path, create_size=4096)
    assert b2.size == MiB
    b2.close()
    assert path.read_bytes()[8192 : 8192 + 4608] == bytes(data[0]) + bytes(data[1])


def test_file_short_read_at_eof_zero_fills(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x11" * 1000)
    b = FileBackend(path)
    out = views(512, 1024, fill=0xEE)
    assert b.preadv(out, 0) == 1536
    assert bytes(out[0]) == b"\x11" * 512
    assert bytes(out[1]) == b"\x11" * 488 + bytes(536)
    b.close()


def test_file_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    b = FileBackend(path, read_only=True)
    assert b.read_only
    with pytest.raises(OSError):
        b.pwritev(views(512), 0)
    with pytest.raises(OSError):
        b.discard(0, 512)
    b.close()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_file_discard_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    b = FileBackend(path, create_size=4 * MiB)
    b.pwritev(views(4 * MiB, fill=0x33), 0)
    b.flush()
    before = _allocated(path)
    b.discard(MiB, 2 * MiB)
    assert _allocated(path) <= before - 2 * MiB
    out = views(4 * MiB)
    b.preadv(out, 0)
    got = bytes(out[0])
    assert got[:MiB] == b"\x33" * MiB and got[3 * MiB :] == b"\x33" * MiB
    assert b.size == 4 * MiB  # KEEP_SIZE
    b.close()


@pytest.mark.parametrize("unmap", [False, True])
def test_file_write_zeroes(tmp_path: Path, unmap: bool) -> None:
    path = tmp_path / "wz.img"
    b = FileBackend(path, create_size=MiB)
    b.pwritev(views(MiB, fill=0x44), 0)
    b.write_zeroes(4096, 8192, unmap=unmap)
    out = views(MiB)
    b.preadv(out, 0)
    got = bytes(out[0])
    assert got[:4096] == b"\x44" * 4096
    assert got[4096:12288] == bytes(8192)
    assert got[12288:] == b"\x44" * (MiB - 12288)
    b.close()


def test_file_write_zeroes_fallback_when_fallocate_refused(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "fb.img", create_size=MiB)
    b.pwritev(views(MiB, fill=0x66), 0)
    # As if the filesystem answered EOPNOTSUPP to both fallocate modes.
    b._refused |= {FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE}
    b.write_zeroes(0, 65536, unmap=True)
    out = views(65536 * 2)
    b.preadv(out, 0)
    assert bytes(out[0]) == bytes(65536) + b"\x66" * 65536
    b.close()


def test_file_secure_erase_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "se.img"
    b = FileBackend(path, create_size=65536)
    b.pwritev(views(65536, fill=0x77), 0)
    b.secure_erase(512, 1024)
    b.close()
    data = path.read_bytes()
    assert data[:512] == b"\x77" * 512 and data[512:1536] == bytes(1024)
    assert data[1536:] == b"\x77" * (65536 - 1536)


def test_file_write_through_and_fua_use_the_dsync_descriptor(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "wt.img", create_size=MiB)
    assert b._dsync_fd >= 0
    fdinfo = Path(f"/proc/self/fdinfo/{b._dsync_fd}").read_text()
    flags = int(fdinfo.split("flags:")[1].split()[0], 8)
    assert flags & os.O_DSYNC
    b.set_write_cache(False)
    assert not b.writeback
    assert b.pwritev(views(4096, fill=1), 0) == 4096
    b.set_write_cache(True)
    assert b.pwritev(views(4096, fill=2), 4096, fua=True) == 4096
    out = views(8192)
    b.preadv(out, 0)
    assert bytes(out[0]) == b"\x01" * 4096 + b"\x02" * 4096
    b.close()


def test_file_resize_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "rs.img"
    b = FileBackend(path, create_size=MiB)
    b.resize(2 * MiB)
    assert b.size == 2 * MiB and path.stat().st_size == 2 * MiB
    b.close()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "loop.img"
    image.write_bytes(bytes(4 * MiB))
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(image)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device here: {exc}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_file_backend_on_a_block_device(loop_device: str) -> None:
    b = FileBackend(loop_device)
    assert b.size == 4 * MiB  # from lseek(END): st_size of a block device is 0
    b.pwritev(views(8192, fill=0x5A), 0)
    b.write_zeroes(4096, 4096, unmap=False)
    b.discard(MiB, MiB)
    b.flush()
    out = views(8192)
    b.preadv(out, 0)
    assert bytes(out[0]) == b"\x5a" * 4096 + bytes(4096)
    with pytest.raises(ValueError, match="not a regular file"):
        b.resize(8 * MiB)
    b.close()
