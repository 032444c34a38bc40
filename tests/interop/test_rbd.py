"""Our driver against ``virtblk serve --rbd``: a device whose data lives in a real Ceph
cluster (tests/peers/ceph.py), checked on the cluster's side with the ``rbd`` tool.

What the device writes is read back through ``rbd export``, not only through our own
device: a device that answered reads from a cache of its own would pass the second and
fail the first.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from peers.ceph import CephCluster
from peers.plugin import RbdImageFactory
from peers.process import eventually, process_group
from virtblk import Disk
from virtblk.errors import BlockIOError

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB

ServeRbd = Callable[..., ServeProcess]


def _image_size(cluster: CephCluster, spec: str) -> int:
    size: int = json.loads(cluster.rbd("info", "--format", "json", spec))["size"]
    return size


@pytest.fixture
def serve_rbd(sock_dir: Path, ceph_cluster: CephCluster) -> ServeRbd:
    """``serve_rbd(SPEC, ARGS...)``: ``virtblk serve --rbd SPEC --ceph-conf C ARGS``, not
    started: use it as ``with serve_rbd(spec) as server:``, so that it stops (and lets the
    image go) before the ``rbd_image`` fixture removes the image."""
    count = 0

    def make(spec: str, *args: str) -> ServeProcess:
        nonlocal count
        count += 1
        return ServeProcess(
            sock_dir / f"rbd-{count}.sock",
            ["--rbd", spec, "--ceph-conf", str(ceph_cluster.conf), *args],
        )

    return make


def test_every_request_type_lands_in_the_cluster(
    serve_rbd: ServeRbd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """Reads and writes on both queues, flush, write-zeroes, discard and secure erase,
    each checked in the image the cluster holds; GET_ID is the image's name."""
    spec = rbd_image(size=SIZE)
    data = os.urandom(SIZE)
    with serve_rbd(spec, "--num-queues", "2") as server, Disk.connect(server.socket_path) as disk:
        assert disk.size == SIZE
        assert disk.num_queues == 2
        # One librbd client for both queues (threads of the server's process): a client per
        # worker process would pass the image's exclusive lock back and forth.
        assert server.process is not None
        assert process_group(server.process.pid) == [server.process.pid]
        assert disk.serial == spec.split("/")[-1][-20:]
        for queue, offset in enumerate(range(0, SIZE, 4 * MiB)):
            disk.use_queue(queue % 2)
            disk.pwrite(data[offset : offset + 4 * MiB], offset)
        disk.flush()
        assert disk.pread(SIZE, 0) == data
        assert ceph_cluster.export(spec) == data

        # 4 KiB writes at odd places, the kind a guest makes, on the other queue.
        disk.use_queue(1)
        small = {offset: os.urandom(4096) for offset in (4096, 5 * MiB + 512 * 3, SIZE - 4096)}
        expected = bytearray(data)
        for offset, block in small.items():
            disk.pwrite(block, offset)
            expected[offset : offset + 4096] = block
        disk.write_zeroes(8 * MiB, 1 * MiB)
        expected[8 * MiB : 9 * MiB] = bytes(MiB)
        disk.write_zeroes(12 * MiB, 4 * MiB, unmap=True)
        expected[12 * MiB : 16 * MiB] = bytes(4 * MiB)
        if "SECURE_ERASE" in disk.features:
            disk.secure_erase(20 * MiB, 1 * MiB)
            expected[20 * MiB : 21 * MiB] = bytes(MiB)
        disk.flush()
        assert disk.pread(SIZE, 0) == bytes(expected)
        assert ceph_cluster.export(spec) == bytes(expected)

        # A discarded range's content is unspecified; that the request succeeds, and the
        # rest of the image is untouched, is what can be asserted.
        disk.discard(32 * MiB, 4 * MiB)
        after = ceph_cluster.export(spec)
        assert after[: 32 * MiB] == bytes(expected[: 32 * MiB])
        assert after[36 * MiB :] == bytes(expected[36 * MiB :])


def test_size_creates_the_image_and_an_existing_image_keeps_its_size(
    serve_rbd: ServeRbd, ceph_cluster: CephCluster, rbd_image: RbdImageFactory
) -> None:
    spec = rbd_image(size=8 * MiB)
    fresh = rbd_image(size=None)
    with serve_rbd(fresh, "--size", "16M") as server, Disk.connect(server.socket_path) as disk:
        assert disk.size == 16 * MiB
    assert _image_size(ceph_cluster, fresh) == 16 * MiB
    with serve_rbd(spec, "--size", "16M") as server, Disk.connect(server.socket_path) as disk:
        assert disk.size == 8 * MiB
    assert _image_size(ceph_cluster, spec) == 8 * MiB


def test_resize_reaches_the_driver_both_ways(
    serve_rbd: ServeRbd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, sock_dir: Path
) -> None:
    """``rbd resize`` on the cluster reaches a connected driver as a config change, and
    ``virtblk control ... resize`` resizes the image in the cluster."""
    spec = rbd_image(size=SIZE)
    control = sock_dir / "control.sock"
    seen: list[tuple[int, int]] = []
    with (
        serve_rbd(spec, "--control", str(control)) as server,
        Disk.connect(server.socket_path) as disk,
    ):
        disk.on_resize(lambda old, new: seen.append((old, new)))
        ceph_cluster.rbd("resize", "--no-progress", "--size", "96M", spec)
        assert eventually(lambda: disk.size == 96 * MiB, 15.0), f"size stayed {disk.size}"
        assert (SIZE, 96 * MiB) in seen
        tail = os.urandom(4096)
        disk.pwrite(tail, 96 * MiB - 4096)
        disk.flush()

        result = run_virtblk("control", str(control), "resize", "128M")
        assert result.returncode == 0, result.stderr
        assert _image_size(ceph_cluster, spec) == 128 * MiB
        assert eventually(lambda: disk.size == 128 * MiB, 15.0), f"size stayed {disk.size}"
        assert disk.pread(4096, 96 * MiB - 4096) == tail
        assert disk.pread(4096, 128 * MiB - 4096) == bytes(4096)


def test_read_only_refuses_writes_and_leaves_the_image_alone(
    serve_rbd: ServeRbd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    spec = rbd_image(size=8 * MiB)
    before = ceph_cluster.export(spec)
    with serve_rbd(spec, "--read-only") as server, Disk.connect(server.socket_path) as disk:
        assert disk.read_only
        assert disk.pread(8 * MiB, 0) == before
        with pytest.raises(BlockIOError):
            disk.pwrite(b"x" * 4096, 0)
    assert ceph_cluster.export(spec) == before


def test_a_stopped_osd_answers_ioerr_and_the_device_survives(
    serve_rbd: ServeRbd, rbd_image: RbdImageFactory, ceph_cluster: CephCluster
) -> None:
    """With ``--rbd-op-timeout``, a cluster that stops answering fails the request (EIO)
    instead of hanging it; once the cluster is back, the same connection works."""
    spec = rbd_image(size=8 * MiB)
    block = os.urandom(4096)
    with (
        serve_rbd(spec, "--rbd-op-timeout", "2") as server,
        Disk.connect(server.socket_path) as disk,
    ):
        disk.pwrite(block, 0)
        disk.flush()
        ceph_cluster.pause_osd()
        try:
            started = time.monotonic()
            with pytest.raises(BlockIOError) as failed:
                disk.pwrite(os.urandom(4096), 4096)
            assert failed.value.errno == errno.EIO
            assert time.monotonic() - started < 30
        finally:
            ceph_cluster.resume_osd()
        assert disk.pread(4096, 0) == block
        disk.pwrite(block, 8192)
        assert disk.pread(4096, 8192) == block
        assert server.process is not None and server.process.poll() is None


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-pool", r"pool"),
        ("missing-image", r"image"),
        ("missing-conf", r"conf"),
        ("unreachable", r"cluster|connect|timed out"),
    ],
)
def test_a_cluster_problem_fails_serve_at_start_in_one_line(
    case: str, expected: str, ceph_cluster: CephCluster, sock_dir: Path
) -> None:
    """Exit status 1 and one ``Error:`` line naming the problem, never a traceback; an
    unreachable cluster fails within the connection timeout instead of hanging."""
    conf = str(ceph_cluster.conf)
    spec = "rbd/no-such-image"
    if case == "missing-pool":
        spec = "no-such-pool/image"
    elif case == "missing-conf":
        conf = str(sock_dir / "no-such.conf")
    elif case == "unreachable":
        dead = sock_dir / "dead.conf"
        text = ceph_cluster.conf.read_text()
        dead.write_text(re.sub(r"mon host = .*", "mon host = v2:127.0.0.1:9", text))
        conf = str(dead)
    started = time.monotonic()
    result = run_virtblk(
        "serve",
        "--socket",
        str(sock_dir / "never.sock"),
        "--rbd",
        spec,
        "--ceph-conf",
        conf,
        timeout=90,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(expected, errors[0], re.IGNORECASE), errors[0]
    assert time.monotonic() - started < 60
    assert not (sock_dir / "never.sock").exists()


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_embedded_device_over_rbd(
    mode: str, rbd_image: RbdImageFactory, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """``Disk.embedded(backend="rbd")``: the embedded device serves an image too."""
    spec = rbd_image(size=8 * MiB)
    data = os.urandom(8 * MiB)
    with Disk.embedded(
        backend="rbd", path=spec, ceph_conf=str(ceph_cluster.conf), mode=mode
    ) as disk:  # type: ignore[arg-type]
        assert disk.size == 8 * MiB
        disk.pwrite(data, 0)
        disk.flush()
    assert ceph_cluster.export(spec) == data
