"""Our driver against our device, ``virtblk serve`` run as a real process on a Unix socket.

The embedded device (a socketpair) is tested elsewhere; this is the deployment shape:
a listening socket file, a server that outlives its frontends, signals, permissions.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from peers.threads import run_in_threads
from virtblk import Disk
from virtblk.errors import BlockIOError, DeviceGoneError, FeatureNotNegotiatedError
from virtblk.spec import DiscardSegment, Lifetime, RequestType, Status

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
SERIAL = "virtblk-interop"


def _host_read(image: Path, offset: int, length: int) -> bytes:
    with image.open("rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture(params=["file", "memory", "null"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[1, 2], ids=["1queue", "2queues"])
def num_queues(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def server(sock_dir: Path, image: Path, kind: str, num_queues: int) -> Iterator[ServeProcess]:
    backend = {
        "file": ["--file", str(image)],
        "memory": ["--memory", str(SIZE)],
        "null": ["--null", str(SIZE)],
    }[kind]
    args = [*backend, "--num-queues", str(num_queues), "--serial", SERIAL]
    with ServeProcess(sock_dir / "vb.sock", args) as proc:
        yield proc


def test_every_request_type(server: ServeProcess, kind: str, image: Path, num_queues: int) -> None:
    stores = kind != "null"
    with Disk.connect(str(server.socket_path), num_queues=num_queues) as disk:
        assert disk.size == SIZE
        assert disk.num_queues == num_queues
        assert disk.serial == SERIAL  # GET_ID
        assert disk.logical_block_size == 512
        for name in ("BLK_FLUSH", "BLK_DISCARD", "BLK_WRITE_ZEROES", "BLK_SECURE_ERASE"):
            assert name in disk.features

        data = os.urandom(6 * MiB)  # two staging chunks
        assert disk.pwrite(data, MiB) == len(data)  # OUT
        got = disk.pread(len(data), MiB)  # IN
        assert got == (data if stores else bytes(len(data)))
        disk.flush()  # FLUSH
        if kind == "file":
            assert _host_read(image, MiB, len(data)) == data

        # WRITE_ZEROES without and with unmap, then SECURE_ERASE, then DISCARD: each on its
        # own MiB of the pattern; the MiB around them must stay intact.
        disk.write_zeroes(2 * MiB, MiB)
        disk.write_zeroes(3 * MiB, MiB, unmap=True)
        disk.secure_erase(4 * MiB, MiB)
        disk.discard(5 * MiB, MiB)
        disk.flush()
        for start in (2, 3, 4):
            assert disk.pread(MiB, start * MiB) == bytes(MiB), f"MiB {start} not zeroed"
        if stores:
            assert disk.pread(MiB, MiB) == data[:MiB]
            assert disk.pread(MiB, 6 * MiB) == data[5 * MiB :]
        if kind == "file":
            assert _host_read(image, 2 * MiB, 3 * MiB) == bytes(3 * MiB)
            assert _host_read(image, MiB, MiB) == data[:MiB]
            assert _host_read(image, 6 * MiB, MiB) == data[5 * MiB :]

        # GET_LIFETIME: serve offers no lifetime, so the driver refuses it up front...
        with pytest.raises(FeatureNotNegotiatedError):
            _ = disk.lifetime
        # ...and the device answers UNSUPP when asked anyway.
        q = disk.device.queues[0]
        gpa = disk.device.allocator.alloc(Lifetime.SIZE)
        req = q.get_tag()
        q.submit(req, RequestType.GET_LIFETIME, 0, in_bufs=[(gpa, Lifetime.SIZE)])
        q.wait_for(req, timeout=10)
        assert req.status == Status.UNSUPP
        q.put_tag(req)
        disk.device.allocator.free(gpa)


def test_get_lifetime(sock_dir: Path) -> None:
    wear = Lifetime(pre_eol_info=2, device_lifetime_est_typ_a=4, device_lifetime_est_typ_b=9)
    args = ["--memory", "1M", "--lifetime", "2,4,9"]
    with (
        ServeProcess(sock_dir / "vb.sock", args) as srv,
        Disk.connect(str(srv.socket_path)) as disk,
    ):
        assert "BLK_LIFETIME" in disk.features
        assert disk.lifetime == wear


def test_get_lifetime_on_the_embedded_device() -> None:
    """The embedded device in its child process gets the Lifetime struct across too."""
    wear = Lifetime(pre_eol_info=1, device_lifetime_est_typ_a=3, device_lifetime_est_typ_b=7)
    with Disk.embedded(size=MiB, backend="memory", lifetime=wear) as disk:
        assert "BLK_LIFETIME" in disk.features
        assert disk.lifetime == wear


def test_two_threads_use_both_queues(sock_dir: Path, image: Path) -> None:
    with (
        ServeProcess(sock_dir / "vb.sock", ["--file", str(image), "--num-queues", "2"]) as srv,
        Disk.connect(str(srv.socket_path), num_queues=2) as disk,
    ):
        patterns = [os.urandom(128 * 1024) for _ in range(2)]

        def work(t: int) -> None:
            for i in range(16):
                offset = (8 + 4 * t) * MiB + i * 128 * 1024
                disk.pwrite(patterns[t], offset)
                if disk.pread(128 * 1024, offset) != patterns[t]:
                    raise AssertionError(f"thread {t}: bad read-back at {offset}")

        run_in_threads(work, 2)
        assert [q.stats_submitted > 0 for q in disk.device.queues] == [True, True]
        disk.flush()
        assert _host_read(image, 12 * MiB, 128 * 1024) == patterns[1]


def test_read_only(sock_dir: Path, image: Path) -> None:
    data = os.urandom(MiB)
    image.write_bytes(data + bytes(SIZE - MiB))
    with (
        ServeProcess(sock_dir / "vb.sock", ["--file", str(image), "--read-only"]) as srv,
        Disk.connect(str(srv.socket_path)) as disk,
    ):
        assert disk.read_only
        assert "BLK_RO" in disk.features
        assert disk.pread(MiB, 0) == data
        # The driver refuses writes and zeroing up front...
        with pytest.raises(BlockIOError) as refused:
            disk.pwrite(bytes(512), 0)
        assert refused.value.errno == errno.EROFS
        with pytest.raises(BlockIOError) as refused:
            disk.write_zeroes(0, 4096)
        assert refused.value.errno == errno.EROFS
        # ...and the device refuses what gets past the driver: OUT, WRITE_ZEROES, DISCARD.
        q = disk.device.queues[0]
        buf = disk.buffer(4096)
        buf[:] = b"\xa5" * 4096
        gpa = disk.device.memory.guest_address_of(buf)
        assert gpa is not None
        segment = DiscardSegment(0, 8, 0).pack()
        requests = [
            (RequestType.OUT, [(gpa, 4096)]),
            (RequestType.WRITE_ZEROES, [(gpa + 2048, len(segment))]),
            (RequestType.DISCARD, [(gpa + 2048, len(segment))]),
        ]
        for type_, out in requests:
            if type_ != RequestType.OUT:
                buf[2048 : 2048 + len(segment)] = segment
            req = q.get_tag()
            q.submit(req, type_, 0, out_bufs=out)
            q.wait_for(req, timeout=10)
            assert req.status == Status.IOERR, type_.name
            q.put_tag(req)
        disk.free_buffer(buf)
        assert disk.pread(MiB, 0) == data
    assert _host_read(image, 0, MiB) == data


def test_socket_file_is_private(sock_dir: Path) -> None:
    with ServeProcess(sock_dir / "vb.sock", ["--memory", "1M"]) as srv:
        mode = srv.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600


def test_sigterm_shuts_down_cleanly(sock_dir: Path, image: Path) -> None:
    srv = ServeProcess(sock_dir / "vb.sock", ["--file", str(image)]).start()
    try:
        with Disk.connect(str(srv.socket_path)) as disk:
            disk.pwrite(b"\x5a" * 4096, 0)
        assert srv.terminate() == 0, srv.output
        assert not srv.socket_path.exists()
    finally:
        srv.stop()


def test_sigterm_under_load(sock_dir: Path, image: Path) -> None:
    """SIGTERM while a frontend streams writes on two queues: the server exits 0 and
    removes its socket; the driver gets DeviceGoneError (no hang); acknowledged data stays."""
    srv = ServeProcess(sock_dir / "vb.sock", ["--file", str(image), "--num-queues", "2"]).start()
    disk = Disk.connect(str(srv.socket_path), num_queues=2)
    outcomes: list[BaseException | None] = []
    try:
        disk.pwrite(b"\x5a" * 4096, 0)
        # Passed once each stream has written on its queue: then both are streaming.
        streaming = threading.Barrier(3, timeout=60)

        def stream(base: int) -> None:
            chunk = os.urandom(MiB)
            try:
                disk.pwrite(chunk, base)
                streaming.wait()
                while True:
                    for i in range(4):
                        disk.pwrite(chunk, base + i * MiB)
            except BaseException as exc:
                outcomes.append(exc)

        threads = [
            threading.Thread(target=stream, args=(base,), daemon=True)
            for base in (8 * MiB, 16 * MiB)
        ]
        for thread in threads:
            thread.start()
        streaming.wait()
        assert srv.terminate() == 0, srv.output
        assert not srv.socket_path.exists()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads), "the driver hung"
        assert len(outcomes) == 2
        assert all(isinstance(exc, DeviceGoneError) for exc in outcomes), outcomes
    finally:
        closer = threading.Thread(target=disk.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "Disk.close hung after the server exited"
        srv.stop()
    assert _host_read(image, 0, 4096) == b"\x5a" * 4096


#: A frontend in a child process: writes a pattern, reports it acknowledged, and dies hard
#: while two threads (one per queue) keep writes in flight elsewhere on the disk.
_DYING_FRONTEND = textwrap.dedent(
    """
    import os, signal, sys, threading
    from virtblk import Disk
    disk = Disk.connect(sys.argv[1], num_queues=int(sys.argv[2]))
    pattern = bytes.fromhex(sys.argv[3]) * (1 << 14)
    disk.pwrite(pattern, 1 << 20)
    print("acknowledged", flush=True)
    streaming = threading.Barrier(3)  # passed once each thread has written: both stream
    def stream(base):
        chunk = os.urandom(1 << 20)
        disk.pwrite(chunk, base)
        streaming.wait()
        while True:
            for i in range(8):
                disk.pwrite(chunk, base + (i << 20))
    for base in (16 << 20, 24 << 20):
        threading.Thread(target=stream, args=(base,), daemon=True).start()
    streaming.wait()
    os.kill(os.getpid(), signal.SIG{how})
    """
)


@pytest.mark.parametrize("how", ["KILL", "TERM"])
def test_dying_frontend_leaves_the_server_ready(sock_dir: Path, image: Path, how: str) -> None:
    with ServeProcess(sock_dir / "vb.sock", ["--file", str(image), "--num-queues", "2"]) as srv:
        for round_ in range(2):
            pattern = os.urandom(64)
            child = subprocess.run(
                [
                    sys.executable, "-c", _DYING_FRONTEND.format(how=how),
                    str(srv.socket_path), "2", pattern.hex(),
                ],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert child.returncode == -getattr(signal, f"SIG{how}"), child.stderr
            assert child.stdout.strip() == "acknowledged"
            # Acknowledged data is on the backend, without any flush.
            expected = pattern * (1 << 14)
            assert _host_read(image, MiB, len(expected)) == expected, f"round {round_}"
            assert srv.process is not None and srv.process.poll() is None, srv.output
        # The next frontend gets a working device, and sees what the dead one wrote.
        with Disk.connect(str(srv.socket_path), num_queues=2) as disk:
            assert disk.pread(len(expected), MiB) == expected
            disk.pwrite(b"\x11" * 512, 0)
            assert disk.pread(512, 0) == b"\x11" * 512
        assert srv.terminate() == 0, srv.output


def test_info_cli_reports_our_device(sock_dir: Path) -> None:
    args = ["--memory", "8M", "--num-queues", "2", "--serial", SERIAL, "--blk-size", "4096"]
    with ServeProcess(sock_dir / "vb.sock", args) as srv:
        result = run_virtblk("info", str(srv.socket_path), "--json")
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["serial"] == SERIAL
        assert info["capacity_bytes"] == 8 * MiB
        assert info["logical_block_size"] == 4096
        assert info["device_max_queues"] == 2
        assert info["config"]["blk_size"] == 4096
        assert info["config"]["seg_max"] == 126
        assert info["config"]["num_queues"] == 2
        for name in ("BLK_SECURE_ERASE", "BLK_DISCARD", "BLK_WRITE_ZEROES", "BLK_MQ"):
            assert name in info["features_offered"]
        # The server is still there for the next frontend.
        text = run_virtblk("info", str(srv.socket_path))
        assert text.returncode == 0, text.stderr
        assert re.search(rf"^serial\s+{SERIAL}$", text.stdout, re.MULTILINE), text.stdout
