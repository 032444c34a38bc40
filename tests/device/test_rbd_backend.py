"""The RBD backend on a real one-node Ceph cluster (tests/peers/ceph.py): every request type
through a BlkDevice's queue, served by a thread and by a worker process, with what landed
in the image read through Ceph's own bindings (a client of their own); the image resized
by the device and by ``rbd resize``; a cluster that stops answering; the errors at open."""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from device_helpers import Driver, start

from peers.ceph import CephCluster
from peers.plugin import RbdImageFactory
from virtblk.device.blk import BlkDevice
from virtblk.device.rbd import (
    DEBIAN_DIR,
    RbdBackend,
    RbdError,
    load_bindings,
    parse_image_spec,
)
from virtblk.spec import (
    DiscardSegment,
    Feature,
    RequestHeader,
    RequestType,
    Status,
    has_feature,
)
from virtblk.virtio.memory import BufferAllocator, GuestMemory

MiB = 1 << 20
SECTOR = 512
OBJECT = 4 * MiB  # an RBD image's default object size

Memory = tuple[GuestMemory, BufferAllocator]


@pytest.fixture(params=["thread", "process"])
def workers(request: pytest.FixtureRequest) -> str:
    """Where the queue is served: both must work."""
    param: str = request.param
    return param


@contextlib.contextmanager
def serving(
    cluster: CephCluster, spec: str, memory: Memory, workers: str, *,
    device: dict[str, Any] | None = None, **backend: Any,
) -> Iterator[tuple[BlkDevice, RbdBackend, Driver]]:
    """A device over the image with its queue 0 started, and the driver end of the ring;
    all closed at the end (the device first: it stops the queue the driver's eventfds
    serve)."""
    with contextlib.ExitStack() as stack:
        backend_ = RbdBackend(spec, conf=str(cluster.conf), **backend)
        stack.callback(backend_.close)
        drv = Driver(*memory, event_idx=True)
        stack.callback(drv.close)
        dev = BlkDevice(backend_, workers=workers, **(device or {}))  # type: ignore[arg-type]
        stack.callback(dev.close)
        start(dev, 0, drv, event_idx=True)
        yield dev, backend_, drv


@contextlib.contextmanager
def image_of(cluster: CephCluster, spec: str, *, writable: bool = False) -> Iterator[Any]:
    """The image opened through Ceph's own bindings, on a connection of its own."""
    rados, rbd = load_bindings()
    pool, namespace, name, snapshot = parse_image_spec(spec)
    with rados.Rados(conffile=str(cluster.conf)) as conn, conn.open_ioctx(pool) as ioctx:
        ioctx.set_namespace(namespace)
        with rbd.Image(ioctx, name, snapshot=snapshot, read_only=not writable) as image:
            yield image


Request = tuple[int, int, bytes, int]
"""(type, sector, data the device reads, bytes it writes back)."""


def run(drv: Driver, *requests: Request) -> list[tuple[int, bytes]]:
    """Submit the requests at once, kick once, wait for every answer: (status, data read)
    of each, in order."""
    for token, (rtype, sector, out, in_len) in enumerate(requests):
        drv.submit(token, rtype, sector, out=out, in_len=in_len)
    drv.kick_device()
    drv.wait(len(requests))
    return [(drv.status_of(token), drv.data_of(token, in_len) if in_len else b"")
            for token, (_, _, _, in_len) in enumerate(requests)]


def read(sector: int, length: int) -> Request:
    return (RequestType.IN, sector, b"", length)


def write(sector: int, data: bytes) -> Request:
    return (RequestType.OUT, sector, data, 0)


def segment(rtype: int, sector: int, sectors: int, flags: int = 0) -> Request:
    return (rtype, 0, DiscardSegment(sector, sectors, flags).pack(), 0)


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(length))


def served_by(dev: BlkDevice) -> int:
    """The process whose librbd serves queue 0."""
    return dev.worker_pids[0] if dev.worker_pids else os.getpid()


def admin(cluster: CephCluster, pid: int, *command: str) -> Any:
    """A command's answer from the admin socket of the Ceph client in process ``pid`` (the
    test cluster's configuration gives every client one)."""
    asok = cluster.workdir / f"client.admin.{pid}.asok"
    out = subprocess.run(["ceph", "--admin-daemon", str(asok), *command],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


def librbd_counters(cluster: CephCluster, pid: int, spec: str) -> dict[str, Any]:
    """librbd's performance counters for the image in process ``pid``."""
    pool, _, name, _ = parse_image_spec(spec)
    (counters,) = [v for k, v in admin(cluster, pid, "perf", "dump").items()
                   if k.startswith("librbd-") and k.endswith(f"-{pool}-{name}")]
    return dict(counters)


def test_load_bindings_gives_ceph_s_modules_to_our_interpreter() -> None:
    rados, rbd = load_bindings()
    assert rados.Rados and rbd.Image and rbd.RBD().version()[0] >= 1
    assert sys.modules["rados"] is rados and sys.modules["rbd"] is rbd
    # Not on our path: Debian's two files were loaded, the rest of dist-packages was not.
    assert rbd.__file__ == f"{DEBIAN_DIR}/rbd{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    assert DEBIAN_DIR not in sys.path
    assert load_bindings() == (rados, rbd)


def test_missing_bindings_name_the_debian_packages(tmp_path: Path) -> None:
    # A fresh interpreter that finds no bindings where Debian puts them.
    code = ("import virtblk.device.rbd as m; m.DEBIAN_DIR = sys.argv[1]\n"
            "try:\n    m.load_bindings()\nexcept m.RbdError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.count("\n") == 1
    assert "apt-get install --no-install-recommends python3-rados python3-rbd" in out
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in out


@pytest.mark.parametrize(("text", "parsed"), [
    ("rbd/disk", ("rbd", "", "disk", None)),
    ("rbd/ns/disk", ("rbd", "ns", "disk", None)),
    ("rbd/disk@snap1", ("rbd", "", "disk", "snap1")),
    ("rbd/ns/disk@snap1", ("rbd", "ns", "disk", "snap1")),
])
def test_image_specs(text: str, parsed: tuple[str, str, str, str | None]) -> None:
    assert parse_image_spec(text) == parsed


@pytest.mark.parametrize("text", ["disk", "rbd/", "/disk", "rbd//disk", "a/b/c/d",
                                  "rbd/disk@", "rbd/disk@a@b", ""])
def test_image_specs_refused(text: str) -> None:
    with pytest.raises(ValueError, match="POOL/IMAGE or POOL/NAMESPACE/IMAGE"):
        parse_image_spec(text)


def test_reads_and_writes_land_in_the_image(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    last = 16 * MiB // SECTOR - 8
    with serving(ceph_cluster, spec, memory, workers) as (dev, backend, drv):
        assert dev.capacity == 16 * MiB // SECTOR and backend.image == spec.split("/")[1]
        assert backend.client_id == "admin" and backend.pool == "rbd"
        assert run(drv, write(0, pattern(1, 4096)), write(8, pattern(2, 512)),
                   write(last, pattern(3, 4096))) == [(Status.OK, b"")] * 3
        with image_of(ceph_cluster, spec) as image:
            assert image.read(0, 4096) == pattern(1, 4096)
            assert image.read(4096, 512) == pattern(2, 512)
            assert image.read(last * SECTOR, 4096) == pattern(3, 4096)
        with image_of(ceph_cluster, spec, writable=True) as image:
            image.write(pattern(4, 8192), 1 * MiB)
        assert run(drv, read(1 * MiB // SECTOR, 8192), read(0, 4096)) == [
            (Status.OK, pattern(4, 8192)), (Status.OK, pattern(1, 4096))]
        # Past the end: refused by the device, which goes on serving.
        assert run(drv, read(last + 8, 512))[0][0] == Status.IOERR
        assert run(drv, read(8, 512)) == [(Status.OK, pattern(2, 512))]


def test_a_burst_of_32_is_in_flight_at_once(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    with serving(ceph_cluster, spec, memory, workers, client_id="client.admin") as (
            dev, _, drv):
        # Every serving process a client of its own: answered writes are on the OSDs.
        assert admin(ceph_cluster, served_by(dev), "config", "get", "rbd_cache") == {
            "rbd_cache": "false"}
        burst = [write(i * 64, pattern(i, 4096)) for i in range(32)]
        assert run(drv, *burst) == [(Status.OK, b"")] * 32
        assert run(drv, *[read(i * 64, 4096) for i in range(32)]) == [
            (Status.OK, pattern(i, 4096)) for i in range(32)]
        (queue,) = dev.stats()["queues"]  # type: ignore[misc]
        # The queue handed librbd many calls before the first came back.
        assert queue["most_in_flight"] > 1, queue
        assert queue["requests"] == {"OUT": 32, "IN": 32}


def test_a_write_answered_on_one_queue_is_read_on_the_other(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    # With worker processes the two queues are two librbd clients of the image.
    spec = rbd_image(size=16 * MiB)
    with contextlib.ExitStack() as stack:
        backend = RbdBackend(spec, conf=str(ceph_cluster.conf))
        stack.callback(backend.close)
        drivers = [Driver(*memory, event_idx=True) for _ in range(2)]
        for drv in drivers:
            stack.callback(drv.close)
        dev = BlkDevice(backend, num_queues=2, workers=workers)  # type: ignore[arg-type]
        stack.callback(dev.close)
        for index, drv in enumerate(drivers):
            start(dev, index, drv, event_idx=True)
        for round_ in range(8):
            writer, reader = drivers[round_ % 2], drivers[1 - round_ % 2]
            data = [pattern(round_ * 16 + i, 4096) for i in range(16)]
            assert run(writer, *[write(i * 8, data[i]) for i in range(16)]) == [
                (Status.OK, b"")] * 16
            assert run(reader, *[read(i * 8, 4096) for i in range(16)]) == [
                (Status.OK, data[i]) for i in range(16)]


def submit_scattered(drv: Driver, token: int, rtype: int, sector: int,
                     pieces: list[bytes]) -> list[tuple[int, int]]:
    """A read or write whose data lies in several buffers (as a guest's page cache hands
    over pages that are not adjacent): one descriptor for each piece; where they are."""
    hdr = drv.buffer(RequestHeader(rtype, 0, sector).pack())
    status = drv.buffer(b"\xff")
    data = [(drv.buffer(piece), len(piece)) for piece in pieces]
    drv.status[token] = status
    drv.data[token] = data[0][0]
    if rtype == RequestType.IN:
        drv.vq.add([(hdr, 16)], [*data, (status, 1)], token)
    else:
        drv.vq.add([(hdr, 16), *data], [(status, 1)], token)
    return data


def test_scattered_reads_and_writes_are_in_flight_at_once_too(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    pieces = [[pattern(i, 4096), pattern(i + 100, 512), pattern(i + 200, 3584)]
              for i in range(16)]
    with serving(ceph_cluster, spec, memory, workers) as (dev, _, drv):
        for i in range(16):
            submit_scattered(drv, i, RequestType.OUT, i * 64, pieces[i])
        drv.kick_device()
        assert drv.wait(16) == dict.fromkeys(range(16), 1)
        assert {drv.status_of(i) for i in range(16)} == {Status.OK}
        buffers = [submit_scattered(drv, i, RequestType.IN, i * 64, [bytes(512), bytes(7680)])
                   for i in range(16)]
        drv.kick_device()
        assert drv.wait(16) == dict.fromkeys(range(16), 8192 + 1)
        for i in range(16):
            got = b"".join(bytes(drv.memory.view(gpa, n)) for gpa, n in buffers[i])
            assert drv.status_of(i) == Status.OK and got == b"".join(pieces[i])
        (queue,) = dev.stats()["queues"]  # type: ignore[misc]
        assert queue["most_in_flight"] > 1, queue
        assert queue["requests"] == {"OUT": 16, "IN": 16}
    with image_of(ceph_cluster, spec) as image:
        for i in range(16):
            assert image.read(i * 64 * SECTOR, 8192) == b"".join(pieces[i])


def test_flush_discard_write_zeroes_and_secure_erase(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    full = pattern(9, 8 * MiB)
    with image_of(ceph_cluster, spec, writable=True) as image:
        image.write(full, 0)
    with serving(ceph_cluster, spec, memory, workers) as (_, _, drv):
        wz, unmap = RequestType.WRITE_ZEROES, 1  # VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        assert run(drv,
                   (RequestType.FLUSH, 0, b"", 0),
                   # A whole object: librbd drops it (a part of one it may keep).
                   segment(RequestType.DISCARD, OBJECT // SECTOR, OBJECT // SECTOR),
                   segment(wz, 8, 8),
                   segment(wz, 64, 16, unmap),
                   segment(RequestType.SECURE_ERASE, 128, 8),
                   ) == [(Status.OK, b"")] * 5
    expected = bytearray(full)
    for sector, sectors in ((8, 8), (64, 16), (128, 8), (OBJECT // SECTOR, OBJECT // SECTOR)):
        expected[sector * SECTOR : (sector + sectors) * SECTOR] = bytes(sectors * SECTOR)
    with image_of(ceph_cluster, spec) as image:
        assert image.read(0, 8 * MiB) == expected


def test_write_through_and_fua_writes_are_flushed(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    with serving(ceph_cluster, spec, memory, workers, device={"fua": True}) as (dev, _, drv):
        def flushes() -> int:
            count: int = librbd_counters(ceph_cluster, served_by(dev), spec)["flush"]
            return count

        run(drv, write(0, pattern(1, 512)))  # the first write takes the image's lock
        before = flushes()
        assert run(drv, *[write(i, pattern(i, 512)) for i in range(8)]) == [(Status.OK, b"")] * 8
        assert flushes() == before  # write-back: the driver's FLUSH does it

        dev.set_cache_mode("write through")
        before = flushes()
        assert run(drv, *[write(i, pattern(i, 512)) for i in range(8)]) == [(Status.OK, b"")] * 8
        assert flushes() >= before + 8

        dev.set_cache_mode("write back")
        before = flushes()
        assert run(drv, (RequestType.OUT_FUA, 0, pattern(5, 512), 0)) == [(Status.OK, b"")]
        assert flushes() >= before + 1
    with image_of(ceph_cluster, spec) as image:
        assert image.read(0, 512) == pattern(5, 512)


def test_read_only_refuses_writes_and_leaves_the_image_alone(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    with image_of(ceph_cluster, spec, writable=True) as image:
        image.write(pattern(1, 4096), 0)
    with serving(ceph_cluster, spec, memory, workers, read_only=True) as (dev, backend, drv):
        assert backend.read_only and has_feature(dev.features, Feature.BLK_RO)
        assert run(drv, write(0, bytes(4096)), segment(RequestType.WRITE_ZEROES, 0, 8),
                   segment(RequestType.DISCARD, 0, 8), read(0, 4096)) == [
            (Status.IOERR, b""), (Status.IOERR, b""), (Status.IOERR, b""),
            (Status.OK, pattern(1, 4096))]
        with pytest.raises(OSError, match="read-only"):
            backend.resize(32 * MiB)
    with image_of(ceph_cluster, spec) as image:
        assert image.read(0, 4096) == pattern(1, 4096) and image.size() == 16 * MiB


def test_a_snapshot_is_served_read_only(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory,
) -> None:
    spec = rbd_image(size=16 * MiB)
    with image_of(ceph_cluster, spec, writable=True) as image:
        image.write(pattern(1, 4096), 0)
        image.create_snap("before")
        image.write(pattern(2, 4096), 0)
    try:
        with serving(ceph_cluster, f"{spec}@before", memory, "thread") as (_, backend, drv):
            assert backend.read_only and backend.snapshot == "before"
            assert run(drv, read(0, 4096), write(0, bytes(512))) == [
                (Status.OK, pattern(1, 4096)), (Status.IOERR, b"")]
    finally:
        ceph_cluster.rbd("snap", "purge", "--no-progress", spec)


def test_an_image_in_a_namespace(ceph_cluster: CephCluster, memory: Memory) -> None:
    spec = "rbd/virtblk-ns/disk"
    ceph_cluster.rbd("namespace", "create", "rbd/virtblk-ns")
    try:
        ceph_cluster.rbd("create", "--size", f"{4 * MiB}B", spec)
        try:
            with serving(ceph_cluster, spec, memory, "thread") as (_, backend, drv):
                assert (backend.pool, backend.namespace, backend.image) == (
                    "rbd", "virtblk-ns", "disk")
                assert run(drv, write(8, pattern(6, 4096))) == [(Status.OK, b"")]
            with image_of(ceph_cluster, spec) as image:
                assert image.read(4096, 4096) == pattern(6, 4096)
            with pytest.raises(RbdError, match="no image 'disk' in pool 'rbd', namespace "
                                               "'other'"):
                RbdBackend("rbd/other/disk", conf=str(ceph_cluster.conf))
        finally:
            ceph_cluster.rbd("rm", "--no-progress", spec)
    finally:
        ceph_cluster.rbd("namespace", "remove", "rbd/virtblk-ns")


def test_resize_through_the_device(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    changes: list[int] = []
    with serving(ceph_cluster, spec, memory, workers) as (dev, _, drv):
        dev.config_changed = lambda: changes.append(dev.capacity)
        dev.resize(24 * MiB)
        assert changes == [24 * MiB // SECTOR]
        with image_of(ceph_cluster, spec) as image:
            assert image.size() == 24 * MiB
        tail = 24 * MiB // SECTOR - 8
        assert run(drv, write(tail, pattern(3, 4096))) == [(Status.OK, b"")]
        assert run(drv, read(tail, 4096)) == [(Status.OK, pattern(3, 4096))]
        dev.resize(8 * MiB)
        assert changes[-1] == 8 * MiB // SECTOR
        assert run(drv, read(tail, 512))[0][0] == Status.IOERR
        with image_of(ceph_cluster, spec) as image:
            assert image.size() == 8 * MiB


def wait_for(event: threading.Event, what: str) -> None:
    """A bound on a failure only (the device looks about once a second)."""
    if not event.wait(60):
        raise AssertionError(f"{what} did not happen within 60 s")


def test_a_resize_outside_reaches_the_driver(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    changed = threading.Event()
    with serving(ceph_cluster, spec, memory, workers) as (dev, backend, drv):
        dev.config_changed = changed.set
        ceph_cluster.rbd("resize", "--no-progress", "--size", f"{32 * MiB}B", spec)
        wait_for(changed, "the config change for the growth")
        assert dev.capacity == 32 * MiB // SECTOR and backend.size == 32 * MiB
        tail = 32 * MiB // SECTOR - 8  # served where the queue is, worker process or not
        assert run(drv, write(tail, pattern(4, 4096))) == [(Status.OK, b"")]
        assert run(drv, read(tail, 4096)) == [(Status.OK, pattern(4, 4096))]

        changed.clear()
        ceph_cluster.rbd("resize", "--no-progress", "--allow-shrink", "--size",
                         f"{8 * MiB}B", spec)
        wait_for(changed, "the config change for the shrink")
        assert dev.capacity == 8 * MiB // SECTOR
        assert run(drv, read(tail, 512))[0][0] == Status.IOERR
        assert run(drv, read(0, 512))[0][0] == Status.OK


def test_a_paused_osd_gives_ioerr_and_the_device_serves_again(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, memory: Memory, workers: str,
) -> None:
    spec = rbd_image(size=16 * MiB)
    with serving(ceph_cluster, spec, memory, workers, op_timeout=2) as (dev, backend, drv):
        assert backend.op_timeout == 2
        assert run(drv, write(0, pattern(1, 4096))) == [(Status.OK, b"")]
        ceph_cluster.pause_osd()
        try:
            # Answered when librados gives up on the OSD (op_timeout), not when it returns.
            answers = run(drv, write(8, pattern(2, 4096)), read(0, 4096))
        finally:
            ceph_cluster.resume_osd()
        assert [status for status, _ in answers] == [Status.IOERR, Status.IOERR]
        assert dev.stats()["errors"] == {"IOERR": 2, "UNSUPP": 0}
        assert run(drv, write(8, pattern(3, 4096)), read(0, 4096)) == [
            (Status.OK, b""), (Status.OK, pattern(1, 4096))]
    with image_of(ceph_cluster, spec) as image:
        assert image.read(4096, 4096) == pattern(3, 4096)


# ---------------------------------------------------------------------- errors at open


def one_line(exc: pytest.ExceptionInfo[RbdError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_missing_pool(ceph_cluster: CephCluster) -> None:
    with pytest.raises(RbdError) as exc:
        RbdBackend("nopool/disk", conf=str(ceph_cluster.conf), create_size=MiB)
    assert one_line(exc) == "RBD image nopool/disk: pool 'nopool' does not exist"


def test_a_missing_image(ceph_cluster: CephCluster) -> None:
    with pytest.raises(RbdError) as exc:
        RbdBackend("rbd/nosuchimage", conf=str(ceph_cluster.conf))
    assert one_line(exc) == ("RBD image rbd/nosuchimage: no image 'nosuchimage' in pool "
                             "'rbd' (give a size to create it)")
    with pytest.raises(RbdError, match="no image 'nosuchimage' with snapshot 's'"):
        RbdBackend("rbd/nosuchimage@s", conf=str(ceph_cluster.conf), create_size=MiB)


def test_a_size_creates_a_missing_image_and_not_an_existing_one(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "virtblk")
    spec = "rbd/created-by-virtblk"
    backend = RbdBackend(spec, conf=str(ceph_cluster.conf), create_size=3 * MiB)
    try:
        assert backend.size == 3 * MiB
        with image_of(ceph_cluster, spec) as image:
            assert image.size() == 3 * MiB
    finally:
        backend.close()
        ceph_cluster.rbd("rm", "--no-progress", spec)
    existing = rbd_image(size=5 * MiB)
    backend = RbdBackend(existing, conf=str(ceph_cluster.conf), create_size=3 * MiB)
    backend.close()
    assert backend.size == 5 * MiB
    assert f"{existing}: the image exists with {5 * MiB} bytes; serving that size" in caplog.text


def test_an_image_smaller_than_a_sector(
    ceph_cluster: CephCluster, rbd_image: RbdImageFactory,
) -> None:
    spec = rbd_image(size=0)
    with pytest.raises(RbdError) as exc:
        RbdBackend(spec, conf=str(ceph_cluster.conf))
    assert one_line(exc) == (f"RBD image {spec}: the image has 0 bytes, not one 512-byte "
                             "sector to serve (grow it with rbd resize)")


def test_an_unreachable_cluster_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = v2:127.0.0.1:{port}\n"
                    "auth client required = none\n")
    began = time.monotonic()
    with pytest.raises(RbdError) as exc:
        RbdBackend("rbd/disk", conf=str(conf), connect_timeout=2)
    # Without the timeout librados would wait for the monitors for good (a bound on a
    # failure only).
    assert time.monotonic() - began < 60
    assert one_line(exc).startswith(f"RBD image rbd/disk: cannot reach the Ceph cluster "
                                    f"(the monitors of {conf}) within 2 s: ")


def test_a_missing_conf_file(tmp_path: Path) -> None:
    with pytest.raises(RbdError) as exc:
        RbdBackend("rbd/disk", conf=str(tmp_path / "nope.conf"))
    assert one_line(exc) == (f"RBD image rbd/disk: the Ceph configuration file "
                             f"{tmp_path / 'nope.conf'} does not exist")


def test_a_bad_spec_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="POOL/IMAGE"):
        RbdBackend("disk")
