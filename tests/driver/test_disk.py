"""The Disk API against our embedded device: the whole stack, driver to backend."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest

from virtblk import Disk
from virtblk.errors import BlockIOError, FeatureNotNegotiatedError

MiB = 1 << 20


@pytest.fixture(params=["process", "thread"])
def disk(request: pytest.FixtureRequest) -> Disk:
    d = Disk.embedded(size=8 * MiB, backend="memory", mode=request.param, serial="virtblk-test")
    yield d
    d.close()


def test_write_then_read_back(disk: Disk) -> None:
    data = os.urandom(64 * 1024)
    assert disk.pwrite(data, 4096) == len(data)
    assert disk.pread(len(data), 4096) == data


def test_properties(disk: Disk) -> None:
    assert disk.size == 8 * MiB
    assert disk.logical_block_size == 512
    assert disk.serial == "virtblk-test"
    assert disk.read_only is False
    assert "VERSION_1" in disk.features
    assert disk.name.startswith("vd")


def test_preadv_pwritev_scatter_gather(disk: Disk) -> None:
    parts = [os.urandom(512), os.urandom(1536), os.urandom(2048)]
    assert disk.pwritev(parts, 0) == 4096
    a, b = bytearray(1024), bytearray(3072)
    assert disk.preadv([a, b], 0) == 4096
    assert bytes(a) + bytes(b) == b"".join(parts)


def test_zero_copy_buffers(disk: Disk) -> None:
    buf = disk.buffer(8192)
    buf[:] = os.urandom(8192)
    disk.pwritev([buf], 8192)
    out = disk.buffer(8192)
    disk.preadv([out], 8192)
    assert bytes(out) == bytes(buf)
    assert disk.pread(8192, 8192) == bytes(buf)
    disk.free_buffer(buf)
    disk.free_buffer(out)


def test_large_io_is_split_and_reassembled(disk: Disk) -> None:
    data = os.urandom(6 * MiB)  # more than one staging chunk, many segments
    disk.pwrite(data, 0)
    assert disk.pread(len(data), 0) == data


def test_misaligned_io_is_refused(disk: Disk) -> None:
    with pytest.raises(ValueError, match="multiples of the logical block size"):
        disk.pread(100, 0)
    with pytest.raises(ValueError, match="multiples"):
        disk.pwrite(b"x" * 512, 3)


def test_io_past_the_end_is_refused(disk: Disk) -> None:
    with pytest.raises(ValueError, match="past the end"):
        disk.pread(1024, disk.size - 512)


def test_use_after_close(disk: Disk) -> None:
    disk.close()
    with pytest.raises(ValueError, match="closed"):
        disk.pread(512, 0)


def _flushes(disk: Disk) -> int:
    assert disk.embedded_device is not None
    return disk.embedded_device.requests().get("FLUSH", 0)


def test_flush(disk: Disk) -> None:
    """A flush reaches the device in write-back only: in write-through the seed's block
    layer has no flush support, writes are durable on completion."""
    assert disk.cache_mode == "write back"
    disk.pwrite(b"\1" * 512, 0)
    disk.flush()
    assert _flushes(disk) == 1
    disk.cache_mode = "write through"
    disk.pwrite(b"\2" * 512, 0)
    disk.flush()
    assert _flushes(disk) == 1
    disk.cache_mode = "write back"
    disk.flush()
    assert _flushes(disk) == 2


def test_read_only_disk_refuses_writes_up_front() -> None:
    with Disk.embedded(size=MiB, backend="memory", read_only=True) as d:
        assert d.read_only
        with pytest.raises(BlockIOError) as info:
            d.pwrite(b"\0" * 512, 0)
        assert info.value.errno == errno.EROFS
        assert d.pread(512, 0) == b"\0" * 512


def test_file_backend_round_trip(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (2 * MiB))
    data = os.urandom(128 * 1024)
    with Disk.embedded(backend="file", path=str(img), size=2 * MiB) as d:
        d.pwrite(data, 512 * 10)
        d.flush()
    assert img.read_bytes()[5120 : 5120 + len(data)] == data


def test_discard_and_write_zeroes(disk: Disk) -> None:
    disk.pwrite(b"\xff" * 12288, 0)
    disk.write_zeroes(0, 4096)
    assert disk.pread(12288, 0) == b"\0" * 4096 + b"\xff" * 8192
    disk.discard(4096, 4096)
    # Our memory disk punches a hole for a discard: the range reads as zeros, and the
    # block after it keeps its data.
    assert disk.pread(12288, 0) == b"\0" * 8192 + b"\xff" * 4096
    assert disk.embedded_device is not None
    requests = disk.embedded_device.requests()
    assert (requests.get("WRITE_ZEROES"), requests.get("DISCARD")) == (1, 1), requests


def test_missing_feature_is_a_clear_error() -> None:
    with Disk.embedded(size=MiB, backend="null") as d, pytest.raises(
        FeatureNotNegotiatedError, match="LIFETIME"
    ):
        _ = d.lifetime


def test_disks_get_distinct_names() -> None:
    with Disk.embedded(size=MiB, mode="thread") as a, Disk.embedded(size=MiB, mode="thread") as b:
        assert a.name != b.name


def test_an_embedded_device_that_cannot_start_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control socket cannot be made (its path is longer than AF_UNIX takes): the
    device already built is closed with its storage, and nothing is left behind."""
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    with pytest.raises(OSError, match="too long"):
        Disk.embedded(size=MiB, mode="thread")
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert list(long_dir.iterdir()) == []
