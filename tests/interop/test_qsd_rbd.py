"""Our driver against qemu-storage-daemon exporting an RBD image (its own ``rbd`` driver).

qemu-storage-daemon over librbd is the reference that ``virtblk serve --rbd`` is measured
against (benchmarks/rbd_peers.py), so it must first work as a peer: whatever our driver
writes through it must be in the image, read back with ``rbd export`` (Ceph's own tool,
not our device and not the daemon), and what Ceph holds must come out of our driver.
The cluster is the session's one-node Ceph (tests/peers/ceph.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peers.ceph import POOL, CephCluster
from peers.plugin import QsdFactory, RbdImageFactory
from peers.qsd import QemuStorageDaemon
from peers.threads import run_in_threads
from virtblk import Disk

pytestmark = pytest.mark.interop

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB

#: Offsets and lengths of the pattern writes: a sector, a span unaligned to pages, one
#: across the boundary of two 4 MiB RADOS objects, one over several objects and requests,
#: the last page of the image.
PATTERN_WRITES = [
    (0, 512),
    (4096 + 512, 3 * 4096),
    (4 * MiB - 8192, 64 * 1024),
    (9 * MiB + 512, 13 * MiB),
    (IMAGE_SIZE - 4096, 4096),
]


@pytest.fixture(params=[1, 2], ids=["1queue", "2queues"])
def num_queues(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def import_image(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[Callable[[bytes], str]]:
    """``import_image(content)``: a new image whose content came in through ``rbd import``
    (Ceph's tool, not a device); its ``POOL/NAME``.  Removed when the test ends."""
    names: list[str] = []

    def create(content: bytes) -> str:
        source = tmp_path / f"import-{len(names)}"
        source.write_bytes(content)
        name = f"{POOL}/i{uuid.uuid4().hex[:12]}"
        ceph_cluster.rbd("import", "--no-progress", str(source), name)
        names.append(name)
        return name

    yield create
    for name in names:
        ceph_cluster.rbd("rm", "--no-progress", name)


RbdQsd = Callable[..., QemuStorageDaemon]


@pytest.fixture
def rbd_qsd(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory,
    import_image: Callable[[bytes], str], qsd_factory: QsdFactory,
) -> Iterator[RbdQsd]:  # fmt: skip
    """``rbd_qsd(spec, **options)``: qemu-storage-daemon exporting the image ``spec`` of the
    session's cluster (other options as ``qsd_factory``'s).

    The daemons are stopped here, before the images are removed: ``rbd rm`` refuses an
    image that a client still has open, and this fixture depends on both image fixtures,
    so its teardown runs first whatever order a test names them in."""
    started: list[QemuStorageDaemon] = []

    def start(spec: str, **options: Any) -> QemuStorageDaemon:
        daemon = qsd_factory(rbd=spec, ceph_conf=ceph_cluster.conf, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def test_pattern_writes_land_in_the_image(
    rbd_qsd: RbdQsd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, num_queues: int,
    tmp_path: Path,
) -> None:  # fmt: skip
    spec = rbd_image(size=IMAGE_SIZE)
    daemon = rbd_qsd(spec, num_queues=num_queues)
    written = [(offset, os.urandom(length)) for offset, length in PATTERN_WRITES]
    with Disk.connect(str(daemon.socket_path), num_queues=num_queues, timeout=10) as disk:
        assert disk.size == IMAGE_SIZE
        assert disk.num_queues == num_queues
        for offset, data in written:
            assert disk.pwrite(data, offset) == len(data)
        disk.flush()
        for offset, data in written:
            assert disk.pread(len(data), offset) == data
    expected = bytearray(IMAGE_SIZE)
    for offset, data in written:
        expected[offset : offset + len(data)] = data
    # Every pattern where it was written, zeros everywhere else.
    assert ceph_cluster.export(spec) == expected


def test_reads_what_ceph_holds(rbd_qsd: RbdQsd, import_image: Callable[[bytes], str]) -> None:
    content = os.urandom(IMAGE_SIZE)
    daemon = rbd_qsd(import_image(content))
    with Disk.connect(str(daemon.socket_path), timeout=10) as disk:
        assert disk.size == IMAGE_SIZE
        assert disk.pread(IMAGE_SIZE, 0) == content


def test_two_threads_on_two_queues(
    rbd_qsd: RbdQsd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """Two submitting threads, one hardware queue each, both rings busy; the image holds
    both threads' data."""
    spec = rbd_image(size=IMAGE_SIZE)
    daemon = rbd_qsd(spec, num_queues=2)
    patterns = [os.urandom(8 * MiB) for _ in range(2)]
    with Disk.connect(str(daemon.socket_path), num_queues=2, timeout=10) as disk:

        def work(t: int) -> None:
            for i in range(0, 8 * MiB, 256 * 1024):
                disk.pwrite(patterns[t][i : i + 256 * 1024], (16 + 16 * t) * MiB + i)

        run_in_threads(work, 2)
        assert [q.stats_submitted > 0 for q in disk.device.queues] == [True, True]
        disk.flush()
    image = ceph_cluster.export(spec)
    assert image[16 * MiB : 24 * MiB] == patterns[0]
    assert image[32 * MiB : 40 * MiB] == patterns[1]


def test_write_zeroes_reaches_the_image(
    rbd_qsd: RbdQsd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """WRITE_ZEROES becomes librbd's write_zeroes: zeros in Ceph, the data around intact.
    DISCARD succeeds but is a hint: the daemon's node has the block layer's default
    ``discard=ignore``, so the data stays."""
    spec = rbd_image(size=IMAGE_SIZE)
    daemon = rbd_qsd(spec)
    data = os.urandom(20 * MiB)  # zeroing 18 MiB takes several requests of 32768 sectors
    with Disk.connect(str(daemon.socket_path), timeout=10) as disk:
        assert {"BLK_DISCARD", "BLK_WRITE_ZEROES"} <= set(disk.features)
        disk.pwrite(data, 4 * MiB)
        disk.write_zeroes(5 * MiB, 18 * MiB)
        disk.discard(22 * MiB, MiB)
        disk.flush()
        assert disk.pread(18 * MiB, 5 * MiB) == bytes(18 * MiB)
        assert disk.pread(MiB, 23 * MiB) == data[-MiB:]
    image = ceph_cluster.export(spec)
    assert image[4 * MiB : 5 * MiB] == data[:MiB]
    assert image[5 * MiB : 23 * MiB] == bytes(18 * MiB)
    assert image[23 * MiB : 24 * MiB] == data[-MiB:]


def test_read_only_export(
    rbd_qsd: RbdQsd, import_image: Callable[[bytes], str], ceph_cluster: CephCluster,
    tmp_path: Path,
) -> None:  # fmt: skip
    content = os.urandom(IMAGE_SIZE)
    spec = import_image(content)
    daemon = rbd_qsd(spec, writable=False)
    with Disk.connect(str(daemon.socket_path), timeout=10) as disk:
        assert disk.read_only
        assert disk.pread(MiB, 0) == content[:MiB]
        with pytest.raises(OSError, match="read-only"):
            disk.pwrite(bytes(512), 0)
    assert ceph_cluster.export(spec) == content


def test_rbd_resize_is_invisible_to_the_export(
    rbd_qsd: RbdQsd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster
) -> None:
    """qemu-storage-daemon 7.2 reads an RBD image's size once, when it opens it: after
    ``rbd resize`` neither its block node nor its export's config space (a new connection
    reads it afresh) has the new size.  ``virtblk serve --rbd`` is meant to differ here: it
    watches the image and tells the driver with a config change."""
    spec = rbd_image(size=IMAGE_SIZE)
    daemon = rbd_qsd(spec)
    ceph_cluster.rbd("resize", "--no-progress", "--size", f"{2 * IMAGE_SIZE}B", spec)
    assert f"size {2 * IMAGE_SIZE // MiB} MiB" in ceph_cluster.rbd("info", spec)
    with Disk.connect(str(daemon.socket_path), timeout=10) as disk:
        assert disk.size == IMAGE_SIZE
        with pytest.raises(ValueError, match="past the end of the disk"):
            disk.pwrite(bytes(4096), IMAGE_SIZE)
    nodes = daemon.qmp("query-named-block-nodes")
    sizes = {node["node-name"]: node["image"]["virtual-size"] for node in nodes}
    assert sizes[daemon.node_name] == IMAGE_SIZE
