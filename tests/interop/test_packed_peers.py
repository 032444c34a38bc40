"""Ring negotiation with real peers: ``virtblk serve`` (offers the packed ring unless
``--no-packed``) and qemu-storage-daemon 7.2 (libvhost-user: no packed ring).

``packed=None`` takes packed from our device and falls back to split on the daemon;
``packed=True`` is refused by the daemon with a NegotiationError naming RING_PACKED; a
packed disk survives restarts of ``virtblk serve`` (the device resubmits from the in-flight
buffer's packed layout, or, without it, the driver); ``virtblk info`` and ``bench`` say
which ring ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from interop.test_reconnect import (
    BLOCK,
    BLOCKS,
    Load,
    check_resubmitter,
    inflight_args,
    kill_and_restart,
    read_image,
    report,
)
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


@pytest.mark.parametrize(("workers", "inflight"), [
    ("process", True), ("thread", True), ("process", False),
], ids=["device-resubmits-process", "device-resubmits-thread", "driver-resubmits"])
def test_packed_disk_survives_sigkills_of_virtblk_serve(
        sock_dir: Path, image: Path, workers: str, inflight: bool) -> None:
    """A packed disk with ``reconnect_timeout`` hands the device the in-flight buffer (its
    packed layout): after each SIGKILL the same packed ring is announced to the restarted
    device, which resubmits what its journal holds in flight (its log says how many, and
    over 10 kills under this load some kill lands with requests in flight).  Without the
    buffer (``--no-inflight``) the driver takes its requests off the old ring and resubmits
    them on a fresh one.  Either way every acknowledged write is there at the end."""
    sock = sock_dir / "vb.sock"
    args = ["--file", str(image), "--workers", workers, *inflight_args(inflight)]
    logs: list[str] = []

    def start() -> ServeProcess:
        serve = ServeProcess(sock, args)
        serve.argv[1:1] = ["--log-level", "info"]  # virtblk --log-level info serve ...
        return serve.start()

    server = [start()]

    def kill() -> None:
        server[0].kill()
        logs.append(server[0].output)

    def restart() -> None:
        server[0] = start()

    try:
        with Disk.connect(str(sock), reconnect_timeout=60.0, packed=True) as disk:
            assert disk.ring == "packed"
            with Load(disk) as load:
                kill_and_restart(load, 10, kill, restart)
            assert not load.errors, f"the caller saw errors: {load.errors!r}"
            assert disk.reconnects == 10 and disk.ring == "packed"
            check_resubmitter(disk, inflight)
            load.verify(lambda b: disk.pread(BLOCK, b * BLOCK), "read from the device")
            report(disk, load)
        logs.append(server[0].output)
        load.verify(read_image(image), "in the image file")
        said = "".join(logs)
        resubmitted = sum(int(n) for n in re.findall(r"resubmitting (\d+) in-flight", said))
        if inflight:
            assert resubmitted > 0, f"the device never resubmitted: {said[-2000:]}"
        else:
            assert resubmitted == 0
        assert BLOCKS
    finally:
        if server[0].process is not None:
            server[0].stop()


def test_reconnecting_disks_pick_the_ring_as_any_other(sock_dir: Path, image: Path) -> None:
    """``reconnect_timeout`` plays no part in the ring: ``packed=None`` goes packed on our
    device and asks for the in-flight buffer on it as on the split ring (the device
    resubmits); without the buffer (``--no-inflight``) the driver resubmits."""
    sock = sock_dir / "vb.sock"
    with ServeProcess(sock, ["--file", str(image)]):
        for packed, ring in ((None, "packed"), (True, "packed"), (False, "split")):
            with Disk.connect(str(sock), reconnect_timeout=5.0, packed=packed) as disk:
                assert disk.ring == ring and disk.device.device_resubmits
        with Disk.connect(str(sock)) as disk:
            assert disk.ring == "packed" and not disk.device.device_resubmits
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
