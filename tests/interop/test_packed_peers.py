"""Ring negotiation with real peers: ``virtblk serve`` (offers the packed ring unless
``--no-packed``) and qemu-storage-daemon 7.2 (libvhost-user: no packed ring).

``packed=None`` takes packed from our device and falls back to split on the daemon;
``packed=True`` is refused by the daemon with a NegotiationError naming RING_PACKED; a
packed disk survives restarts of ``virtblk serve`` (the driver resubmits: the in-flight
buffer's layout is the split ring's); ``virtblk info`` and ``bench`` say which ring ran.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from interop.test_reconnect import BLOCK, BLOCKS, Load, kill_and_restart, read_image
from peers.plugin import QsdFactory
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.errors import NegotiationError

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(16 * MiB)
    return path


@pytest.mark.parametrize("workers", ["process", "thread"])
def test_virtblk_serve_gives_packed_unless_told_otherwise(
        sock_dir: Path, image: Path, workers: str) -> None:
    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--file", str(image), "--workers", workers, "--num-queues", "2"]):
        for packed, ring in ((None, "packed"), (True, "packed"), (False, "split")):
            with Disk.connect(sock, packed=packed, num_queues=2) as disk:
                assert disk.ring == ring
                data = os.urandom(64 * 1024)
                disk.pwrite(data, MiB)
                disk.flush()
                assert disk.pread(len(data), MiB) == data
        assert image.read_bytes()[MiB : MiB + len(data)] == data


def test_async_disk_connect_takes_the_ring_option(sock_dir: Path, image: Path) -> None:
    async def ring(sock: Path, packed: bool | None) -> str:
        async with await AsyncDisk.connect(sock, packed=packed) as adisk:
            await adisk.write(b"\3" * 4096, 0)
            assert await adisk.read(4096, 0) == b"\3" * 4096
            return adisk.ring

    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--file", str(image)]):
        assert asyncio.run(ring(sock, None)) == "packed"
        assert asyncio.run(ring(sock, False)) == "split"


def test_virtblk_serve_no_packed_refuses_packed_true(sock_dir: Path, image: Path) -> None:
    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--file", str(image), "--no-packed"]):
        with pytest.raises(NegotiationError, match="RING_PACKED"):
            Disk.connect(sock, packed=True)
        with Disk.connect(sock) as disk:
            assert disk.ring == "split"
            disk.pwrite(b"\1" * 4096, 0)
            assert disk.pread(4096, 0) == b"\1" * 4096


def test_qemu_storage_daemon_falls_back_to_split(qsd_factory: QsdFactory, image: Path) -> None:
    daemon = qsd_factory(image=image)
    with pytest.raises(NegotiationError, match="does not offer VIRTIO_F_RING_PACKED"):
        Disk.connect(str(daemon.socket_path), packed=True)
    with Disk.connect(str(daemon.socket_path)) as disk:
        assert disk.ring == "split"
        assert "RING_PACKED" not in disk.features
        data = os.urandom(128 * 1024)
        disk.pwrite(data, 2 * MiB)
        disk.flush()
        assert disk.pread(len(data), 2 * MiB) == data
    assert image.read_bytes()[2 * MiB : 2 * MiB + len(data)] == data


def test_packed_disk_survives_sigkills_of_virtblk_serve(sock_dir: Path, image: Path) -> None:
    """A packed disk asks for no in-flight buffer (its layout is split-only): after each
    SIGKILL the driver takes its requests off the old packed ring and resubmits them on a
    fresh one; every acknowledged write is there at the end."""
    sock = sock_dir / "vb.sock"
    args = ["--file", str(image)]
    server = [ServeProcess(sock, args).start()]

    def restart() -> None:
        server[0] = ServeProcess(sock, args).start()

    try:
        with Disk.connect(str(sock), reconnect_timeout=60.0, packed=True) as disk:
            assert disk.ring == "packed" and not disk.device.device_resubmits
            with Load(disk) as load:
                kill_and_restart(load, 10, lambda: server[0].kill(), restart)
            assert not load.errors, f"the caller saw errors: {load.errors!r}"
            assert disk.reconnects == 10 and disk.ring == "packed"
            load.verify(lambda b: disk.pread(BLOCK, b * BLOCK), "read from the device")
        load.verify(read_image(image), "in the image file")
        assert BLOCKS
    finally:
        if server[0].process is not None:
            server[0].stop()


def test_reconnecting_disks_keep_the_device_s_resubmission_unless_told(
        sock_dir: Path, image: Path) -> None:
    """``packed=None`` with ``reconnect_timeout`` on a device offering the in-flight buffer
    stays split (the buffer's packed layout is unknown to the driver), ``packed=True``
    goes packed and resubmits itself; without the buffer None goes packed."""
    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--file", str(image)]):
        with Disk.connect(str(sock), reconnect_timeout=5.0) as disk:
            assert disk.ring == "split" and disk.device.device_resubmits
        with Disk.connect(str(sock), reconnect_timeout=5.0, packed=True) as disk:
            assert disk.ring == "packed" and not disk.device.device_resubmits
        with Disk.connect(str(sock)) as disk:
            assert disk.ring == "packed"
    with ServeProcess(sock, ["--file", str(image), "--no-inflight"]), Disk.connect(
            str(sock), reconnect_timeout=5.0) as disk:
        assert disk.ring == "packed" and not disk.device.device_resubmits


def test_a_packed_disk_refuses_a_device_that_comes_back_without_packed(
        sock_dir: Path, image: Path) -> None:
    sock = sock_dir / "vb.sock"
    first = ServeProcess(sock, ["--file", str(image)]).start()
    try:
        with Disk.connect(str(sock), reconnect_timeout=20.0, packed=True) as disk:
            assert disk.ring == "packed"
            first.kill()
            with (ServeProcess(sock, ["--file", str(image), "--no-packed"]),
                  pytest.raises(NegotiationError, match="RING_PACKED")):
                disk.pread(4096, 0)
    finally:
        first.stop()


def test_info_shows_the_ring(sock_dir: Path, qsd_factory: QsdFactory, image: Path) -> None:
    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--memory", "16M"]):
        for flag, ring in (("--packed", "packed"), ("--split", "split")):
            done = run_virtblk("info", str(sock), "--json", flag)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["ring"] == ring
        done = run_virtblk("info", str(sock))
        assert done.returncode == 0, done.stderr
        assert any(line.split() == ["ring", "packed"] for line in done.stdout.splitlines())
    daemon = qsd_factory(image=image)
    done = run_virtblk("info", str(daemon.socket_path), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ring"] == "split"
    done = run_virtblk("info", str(daemon.socket_path), "--packed")
    assert done.returncode == 1
    assert "does not offer VIRTIO_F_RING_PACKED" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("flags", "ring"), [((), "packed"), (("--packed",), "packed"),
                                             (("--split",), "split")])
def test_bench_records_the_ring(flags: tuple[str, ...], ring: str) -> None:
    done = run_virtblk("bench", "--runtime", "0.3", "--rw", "randread", "--iodepth", "4",
                       "--output-format", "json", *flags)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["virtblk"]["ring"] == ring
    done = run_virtblk("bench", "--runtime", "0.2", *flags)
    assert done.returncode == 0, done.stderr
    assert f"{ring} ring" in done.stdout


def test_bench_packed_against_qsd_is_a_clear_error(qsd_factory: QsdFactory, image: Path) -> None:
    daemon = qsd_factory(image=image)
    done = run_virtblk("bench", "--runtime", "0.2", "--packed", str(daemon.socket_path))
    assert done.returncode == 1
    assert "RING_PACKED" in done.stderr and "Traceback" not in done.stderr
    done = run_virtblk("bench", "--runtime", "0.2", "--output-format", "json",
                       str(daemon.socket_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["virtblk"]["ring"] == "split"
