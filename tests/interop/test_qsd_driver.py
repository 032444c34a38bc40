"""Our driver (``virtblk.Disk``) against the real qemu-storage-daemon.

qemu-storage-daemon is the reference vhost-user-blk device: whatever our driver writes
through it must be on the image file byte for byte, and whatever the daemon advertises
must come out of ``virtblk info``.  These tests must run (a missing daemon fails them).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from interop.serve_process import run_virtblk
from peers.plugin import QsdFactory
from peers.qsd import QemuStorageDaemon
from peers.threads import run_in_threads
from virtblk import Disk
from virtblk.errors import DeviceGoneError
from virtblk.spec import Feature

pytestmark = pytest.mark.interop

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB

#: What qemu-storage-daemon 7.2 offers (NOTES.md; bit 26 is VHOST_F_LOG_ALL, not ANY_LAYOUT).
QSD_FEATURES = [
    "BLK_SIZE_MAX", "BLK_SEG_MAX", "BLK_BLK_SIZE", "BLK_FLUSH", "BLK_TOPOLOGY",
    "BLK_CONFIG_WCE", "BLK_MQ", "BLK_DISCARD", "BLK_WRITE_ZEROES", "NOTIFY_ON_EMPTY",
    "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VHOST_USER_PROTOCOL_FEATURES", "VERSION_1",
]  # fmt: skip

#: Offsets (bytes) and lengths of the pattern writes: sector-sized, unaligned to pages,
#: crossing a MiB boundary, and one that takes several staging chunks and requests.
PATTERN_WRITES = [
    (0, 512),
    (4096 + 512, 3 * 4096),
    (MiB - 8192, 64 * 1024),
    (5 * MiB + 512, 9 * MiB),
    (IMAGE_SIZE - 4096, 4096),
]

Backend = Callable[[int], tuple[QemuStorageDaemon, Path | None]]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(params=["file", "null"])
def backend(request: pytest.FixtureRequest, qsd_factory: QsdFactory, image: Path) -> Backend:
    """Start a daemon with the file (raw image) or the null-co backend, N queues."""

    def start(num_queues: int) -> tuple[QemuStorageDaemon, Path | None]:
        if request.param == "file":
            return qsd_factory(image=image, num_queues=num_queues), image
        return qsd_factory(null_size=IMAGE_SIZE, num_queues=num_queues), None

    return start


@pytest.fixture(params=[1, 2], ids=["1queue", "2queues"])
def num_queues(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def connected(backend: Backend, num_queues: int) -> Iterator[tuple[Disk, Path | None]]:
    daemon, image = backend(num_queues)
    with Disk.connect(str(daemon.socket_path), num_queues=num_queues, timeout=10) as disk:
        yield disk, image


def _host_read(image: Path, offset: int, length: int) -> bytes:
    with image.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_properties(connected: tuple[Disk, Path | None], num_queues: int) -> None:
    disk, _ = connected
    assert disk.size == IMAGE_SIZE
    assert disk.logical_block_size == 512
    assert disk.serial == "vhost_user_blk"
    assert disk.num_queues == num_queues
    assert disk.read_only is False
    assert disk.limits.max_segments == 126
    assert disk.cache_mode == "write through"


def test_pattern_round_trip(connected: tuple[Disk, Path | None]) -> None:
    """Random data at several offsets reads back through us and, after flush, from the file."""
    disk, image = connected
    written = [(offset, os.urandom(length)) for offset, length in PATTERN_WRITES]
    for offset, data in written:
        assert disk.pwrite(data, offset) == len(data)
    disk.flush()
    if image is None:  # null-co with read-zeroes: the data goes nowhere
        for offset, data in written:
            assert disk.pread(len(data), offset) == bytes(len(data))
        return
    for offset, data in written:
        assert disk.pread(len(data), offset) == data
        assert _host_read(image, offset, len(data)) == data
    # Nothing leaked around the pattern.
    assert _host_read(image, 512, 4096) == bytes(4096)


def test_more_segments_than_seg_max(connected: tuple[Disk, Path | None]) -> None:
    """300 separate shared buffers in one pwritev: the driver splits at seg_max=126.

    Every other allocation is kept so no two buffers touch in memory (touching buffers
    coalesce into one segment, as Linux merges physically contiguous pages)."""
    disk, image = connected
    queues = disk.device.queues
    before = sum(q.stats_submitted for q in queues)
    buffers = [disk.buffer(4096) for _ in range(600)][::2]
    pattern = os.urandom(300 * 4096)
    for i, buf in enumerate(buffers):
        buf[:] = pattern[i * 4096 : (i + 1) * 4096]
    assert disk.pwritev(buffers, 2 * MiB) == len(pattern)
    submitted = sum(q.stats_submitted for q in queues) - before
    assert submitted == 3  # ceil(300 / 126) requests
    disk.flush()
    if image is not None:
        assert disk.pread(len(pattern), 2 * MiB) == pattern
        assert _host_read(image, 2 * MiB, len(pattern)) == pattern
    for buf in buffers:
        disk.free_buffer(buf)


def test_two_threads_use_both_queues(backend: Backend) -> None:
    """With two hardware queues, two submitting threads put requests on both rings."""
    daemon, image = backend(2)
    with Disk.connect(str(daemon.socket_path), num_queues=2) as disk:
        patterns = {t: os.urandom(256 * 1024) for t in range(2)}

        def work(t: int) -> None:
            base = (16 + 8 * t) * MiB
            for i in range(8):
                disk.pwrite(patterns[t], base + i * 256 * 1024)
            for i in range(8):
                got = disk.pread(256 * 1024, base + i * 256 * 1024)
                if image is not None and got != patterns[t]:
                    raise AssertionError(f"thread {t} read back other data at chunk {i}")

        run_in_threads(work, 2)
        assert [q.stats_submitted > 0 for q in disk.device.queues] == [True, True]
        disk.flush()
        if image is not None:
            for t in range(2):
                base = (16 + 8 * t) * MiB
                assert _host_read(image, base, 256 * 1024) == patterns[t]


def test_out_of_range_io_is_refused(connected: tuple[Disk, Path | None]) -> None:
    disk, _ = connected
    with pytest.raises(ValueError, match="past the end of the disk"):
        disk.pwrite(bytes(4096), IMAGE_SIZE - 512)
    with pytest.raises(ValueError, match="past the end of the disk"):
        disk.pread(512, IMAGE_SIZE)
    with pytest.raises(ValueError, match="multiples of the logical block size"):
        disk.pread(100, 0)
    with pytest.raises(ValueError, match="negative"):
        disk.pread(512, -512)
    # The disk is still usable afterwards.
    assert len(disk.pread(512, IMAGE_SIZE - 512)) == 512


def test_write_zeroes_and_discard(qsd_factory: QsdFactory, image: Path) -> None:
    daemon = qsd_factory(image=image)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert "BLK_DISCARD" in disk.features
        assert "BLK_WRITE_ZEROES" in disk.features
        assert disk.limits.max_write_zeroes_sectors == 32768
        assert disk.limits.max_discard_seg == 1
        data = os.urandom(20 * MiB)  # more than 32768 sectors: several requests
        disk.pwrite(data, 4 * MiB)
        disk.flush()
        assert _host_read(image, 4 * MiB, len(data)) == data
        # Zero the middle 18 MiB, leaving 1 MiB of pattern at each end.
        disk.write_zeroes(5 * MiB, 18 * MiB)
        disk.flush()
        assert disk.pread(18 * MiB, 5 * MiB) == bytes(18 * MiB)
        assert _host_read(image, 5 * MiB, 18 * MiB) == bytes(18 * MiB)
        assert disk.pread(MiB, 4 * MiB) == data[:MiB]
        assert _host_read(image, 23 * MiB, MiB) == data[-MiB:]
        # Unmap allowed: still zeros afterwards.
        disk.pwrite(data[: 2 * MiB], 40 * MiB)
        disk.write_zeroes(40 * MiB, 2 * MiB, unmap=True)
        disk.flush()
        assert disk.pread(2 * MiB, 40 * MiB) == bytes(2 * MiB)
        assert _host_read(image, 40 * MiB, 2 * MiB) == bytes(2 * MiB)
        # Discard is a hint: it must succeed.  The daemon's file node has the block
        # layer's default discard=ignore, so the data even stays where it was.
        disk.discard(4 * MiB, MiB)
        disk.flush()
        assert _host_read(image, 4 * MiB, MiB) == data[:MiB]
        assert _host_read(image, 23 * MiB, MiB) == data[-MiB:]
        assert not disk.limits.write_zeroes_may_unmap


def test_cache_mode_switch(qsd_factory: QsdFactory, image: Path) -> None:
    """CONFIG_WCE: the daemon starts write-through; the driver may turn write-back on."""
    daemon = qsd_factory(image=image)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.cache_mode == "write through"
        disk.cache_mode = "write back"
        assert disk.cache_mode == "write back"
        data = os.urandom(MiB)
        disk.pwrite(data, 0)
        disk.flush()
        assert _host_read(image, 0, MiB) == data


def test_info_cli_reports_the_daemon(qsd_factory: QsdFactory, image: Path) -> None:
    daemon = qsd_factory(image=image, num_queues=2)
    result = run_virtblk("info", str(daemon.socket_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    offered = info["features_offered"]
    assert [name for name in QSD_FEATURES if name not in offered] == []
    assert "VHOST_F_LOG_ALL" in offered
    assert info["capacity_bytes"] == IMAGE_SIZE
    assert info["capacity_sectors"] == IMAGE_SIZE // 512
    assert info["limits"]["max_segments"] == 126
    config = info["config"]
    assert config["capacity"] == IMAGE_SIZE // 512
    assert config["seg_max"] == 126
    assert config["blk_size"] == 512
    assert config["num_queues"] == 2
    assert config["size_max"] == 0  # offered with BLK_SIZE_MAX, but 0: no limit
    assert config["max_discard_sectors"] == 32768
    assert info["logical_block_size"] == 512
    assert info["device_num_queues"] == 2
    assert info["device_max_queues"] == 2
    assert info["serial"] == "vhost_user_blk"
    assert info["read_only"] is False
    assert "VERSION_1" in info["features_negotiated"]


def test_info_cli_without_device_is_a_clear_error(sock_dir: Path) -> None:
    missing = sock_dir / "nobody.sock"
    result = run_virtblk("info", str(missing))
    assert result.returncode == 1
    assert f"cannot connect to {missing}" in result.stderr


def test_daemon_killed_mid_run(qsd_factory: QsdFactory, image: Path) -> None:
    """SIGKILL the daemon under a stream of I/O: the driver raises DeviceGoneError, no hang."""
    daemon = qsd_factory(image=image, num_queues=1)
    disk = Disk.connect(str(daemon.socket_path), timeout=5)
    try:
        data = os.urandom(MiB)
        disk.pwrite(data, 0)
        outcome: list[BaseException] = []
        streaming = threading.Event()

        def stream() -> None:
            try:
                for i in range(100_000):
                    disk.pwrite(data, (i % 32) * MiB)
                    streaming.set()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert streaming.wait(60), outcome
        assert daemon.process is not None
        daemon.process.kill()
        thread.join(30)
        assert not thread.is_alive(), "the driver hung after the daemon died"
        assert len(outcome) == 1
        assert isinstance(outcome[0], DeviceGoneError), repr(outcome[0])
        # Later I/O fails the same way, at once.
        with pytest.raises(DeviceGoneError):
            disk.pread(512, 0)
    finally:
        closer = threading.Thread(target=disk.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "Disk.close hung after the daemon died"


def test_feature_set_matches_notes(qsd_factory: QsdFactory) -> None:
    """The raw offer, so a changed qemu-storage-daemon package shows up here first."""
    daemon = qsd_factory(null_size=IMAGE_SIZE)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.device.offered_features == 0x175007E46
        assert not disk.device.offered_features & Feature.ANY_LAYOUT.mask


def test_4096_byte_logical_blocks(qsd_factory: QsdFactory, image: Path) -> None:
    daemon = qsd_factory(image=image, logical_block_size=4096)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.logical_block_size == 4096
        assert disk.size == IMAGE_SIZE
        with pytest.raises(ValueError, match="logical block size 4096"):
            disk.pwrite(bytes(512), 0)
        with pytest.raises(ValueError, match="logical block size 4096"):
            disk.pread(4096, 512)
        data = os.urandom(5 * 4096)
        disk.pwrite(data, 3 * 4096)  # sector numbers stay in 512-byte units: sector 24
        disk.flush()
        assert disk.pread(len(data), 3 * 4096) == data
        assert _host_read(image, 3 * 4096, len(data)) == data
        assert _host_read(image, 0, 3 * 4096) == bytes(3 * 4096)


def test_read_only_export(qsd_factory: QsdFactory, image: Path) -> None:
    content = os.urandom(MiB)
    with image.open("r+b") as f:
        f.write(content)
    daemon = qsd_factory(image=image, writable=False)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.read_only
        assert "BLK_RO" in disk.features
        assert disk.pread(MiB, 0) == content
        with pytest.raises(OSError, match="read-only"):
            disk.pwrite(bytes(512), 0)
    assert _host_read(image, 0, MiB) == content


def test_block_resize_is_invisible_to_frontends(qsd_factory: QsdFactory, image: Path) -> None:
    """qemu-storage-daemon 7.2: QMP block_resize grows the image, but the export's config
    space keeps the capacity it had at creation: no config-change message, and neither a
    re-read (Disk.refresh) nor a new connection sees the new size."""
    daemon = qsd_factory(image=image)
    with Disk.connect(str(daemon.socket_path)) as disk:
        seen: list[tuple[int, int]] = []
        disk.on_resize(lambda old, new: seen.append((old, new)))
        daemon.qmp("block_resize", node_name="disk0", size=2 * IMAGE_SIZE)
        assert image.stat().st_size == 2 * IMAGE_SIZE
        time.sleep(0.5)
        disk.refresh()
        assert disk.size == IMAGE_SIZE
        assert seen == []
        with pytest.raises(ValueError, match="past the end of the disk"):
            disk.pwrite(bytes(4096), IMAGE_SIZE)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.size == IMAGE_SIZE
