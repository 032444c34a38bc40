"""``virtblk nbd`` against the NBD clients storage engineers use, over our device
(``virtblk serve``) and over qemu-storage-daemon: qemu-img, qemu-io, nbdinfo, nbdcopy,
fio's nbd engine, several clients at once, a read-only export, and hostile bytes.

Every program runs as a real process on a Unix socket (TCP on loopback once); the export
is stopped with SIGTERM at the end of each test and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import pytest

from interop.serve_process import ServeProcess, virtblk_argv
from peers.plugin import QsdFactory
from peers.process import accepts, kill_group, wait_ready
from virtblk.device.control import send_command
from virtblk.nbd.wire import (
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    SERVER_GREETING,
    SIMPLE_REPLY,
    ClientFlag,
    Command,
    Errno,
    Info,
    Option,
    OptionReply,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
TIMEOUT = 120


class NbdExport:
    """``virtblk nbd SOCKET --listen ... ARGS`` as a process-group leader; ready once it
    prints its URI.  ``__exit__`` sends SIGTERM and fails the block unless it exits 0 and
    says what it served."""

    def __init__(self, vhost_socket: Path, listen: str, args: Sequence[str] = (),
                 expect_status: int = 0) -> None:
        self.expect_status = expect_status
        self.argv = virtblk_argv("--log-level", "info", "nbd", str(vhost_socket),
                                 "--listen", listen, *args)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process: subprocess.Popen[bytes] | None = None
        self.uri = ""

    @property
    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def _uri(self) -> bool:
        match = re.search(r"at (nbd\S+)", self.output)
        if match:
            self.uri = match.group(1)
        return bool(match)

    def __enter__(self) -> NbdExport:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log, start_new_session=True)
        try:
            rc = wait_ready(self.process, self._uri, 30, interval=0.05)
        except TimeoutError:
            rc = "no URI after 30 s"  # type: ignore[assignment]
        if rc is not None:
            kill_group(self.process)
            raise RuntimeError(f"virtblk nbd did not start ({rc}):\n{self.output}")
        return self

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """``signum`` and the exit status (the group is killed if it does not exit)."""
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)
        try:
            return self.process.wait(timeout=30)
        finally:
            kill_group(self.process)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            rc = self.stop()
            output = self.output
        finally:
            self._log.close()
        if exc_type is None:
            assert rc == self.expect_status, output
            if rc == 0:
                assert "virtblk nbd: stopped after" in output, output
            assert "Traceback" not in output, output


@pytest.fixture(params=["ours", "qsd"])
def device(request: pytest.FixtureRequest, sock_dir: Path,
           qsd_factory: QsdFactory) -> Iterator[Path]:
    """A 64 MiB vhost-user-blk device with two queues: ``virtblk serve --memory`` or
    qemu-storage-daemon over a raw file; yields its socket."""
    if request.param == "ours":
        sock = sock_dir / "virtblk.sock"
        with ServeProcess(sock, ["--memory", str(SIZE), "--num-queues", "2"]):
            yield sock
    else:
        image = sock_dir / "qsd.img"
        with image.open("wb") as f:
            f.truncate(SIZE)
        yield qsd_factory(image=image, num_queues=2).socket_path


@pytest.fixture
def export(device: Path, sock_dir: Path) -> Iterator[NbdExport]:
    with NbdExport(device, f"unix:{sock_dir / 'nbd.sock'}") as running:
        yield running


def run(*argv: str, timeout: float = TIMEOUT) -> str:
    """Run a client to completion; fail with its output unless it exits 0."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_qemu_img_convert_round_trip(export: NbdExport, tmp_path: Path) -> None:
    source = random_file(tmp_path / "source.raw", SIZE)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), export.uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", export.uri, str(back))
    assert back.stat().st_size == SIZE
    assert back.read_bytes() == source.read_bytes()


def test_qemu_io_reads_and_writes(export: NbdExport) -> None:
    out = run("qemu-io", "-f", "raw",
              "-c", "write -P 0xab 0 64k",
              "-c", "write -f -P 0xcd 64k 64k",  # FUA
              "-c", "write -z 128k 64k",
              "-c", "discard 192k 64k",
              "-c", "flush",
              "-c", "read -P 0xab 0 64k",
              "-c", "read -P 0xcd 64k 64k",
              "-c", "read -P 0 128k 64k",
              "-c", "write -P 0x11 63M 1M",
              "-c", "read -P 0x11 63M 1M",
              export.uri)  # fmt: skip
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower(), out
    assert out.count("read ") == 4 and out.count("wrote ") == 4, out
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 64M 512", export.uri],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert "Input/output error" in out.stdout + out.stderr or out.returncode != 0


def test_nbdinfo_shows_size_and_flags(export: NbdExport) -> None:
    info = json.loads(run("nbdinfo", "--json", export.uri))
    (exp,) = info["exports"]
    assert exp["export-size"] == SIZE
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    expected = {"is_read_only": False, "can_flush": True, "can_fua": True, "can_trim": True,
                "can_zero": True, "can_fast_zero": True, "can_multi_conn": True,
                "can_df": True, "can_cache": False, "block_size_minimum": 512,
                "block_size_preferred": 4096, "block_size_maximum": 32 * MiB}
    assert {k: exp[k] for k in expected} == expected
    assert "vhost-user-blk" in exp["description"]


def test_nbdcopy_both_ways_on_several_connections(export: NbdExport, tmp_path: Path) -> None:
    source = random_file(tmp_path / "source.raw", SIZE)
    run("nbdcopy", "--connections=4", "--requests=16", str(source), export.uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", export.uri, str(back))
    assert back.read_bytes() == source.read_bytes()


def test_fio_nbd_engine_verified_workload(export: NbdExport) -> None:
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={export.uri}",
              "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
              "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
              "--output-format=json")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # the verify pass read everything back


def test_several_clients_at_once(export: NbdExport) -> None:
    """Eight qemu-io processes write their own pattern into their own MiB at the same time
    (spread over both hardware queues), then every MiB reads back as its writer left it."""
    clients = [subprocess.Popen(["qemu-io", "-f", "raw", "-c",
                                 f"aio_write -P {0x20 + i} {i}M 1M", "-c", "aio_flush",
                                 "-c", f"read -P {0x20 + i} {i}M 1M", export.uri],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(8)]
    for client in clients:
        out, _ = client.communicate(timeout=TIMEOUT)
        assert client.returncode == 0 and "failed" not in out and "error" not in out, out
    checks = [arg for i in range(8) for arg in ("-c", f"read -P {0x20 + i} {i}M 1M")]
    out = run("qemu-io", "-f", "raw", *checks, export.uri)
    assert "failed" not in out and out.count("read ") == 8, out


def test_clients_are_spread_over_the_hardware_queues(sock_dir: Path) -> None:
    """Two clients one after the other on a two-queue device: each queue served one (our
    device counts the bytes each queue read)."""
    control = sock_dir / "ctl.sock"
    with ServeProcess(sock_dir / "vu.sock", ["--memory", "8M", "--num-queues", "2",
                                             "--control", str(control)]) as server, \
            NbdExport(server.socket_path, f"unix:{sock_dir / 'nbd.sock'}") as running:
        for _ in range(2):
            run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4M", running.uri)
        queues = send_command(str(control), "stats")["stats"]["queues"]
    assert [q["bytes_read"] >= 4 * MiB for q in queues] == [True, True], queues


def test_read_only_export_refuses_writes_with_eperm(device: Path, sock_dir: Path) -> None:
    path = sock_dir / "ro.sock"
    with NbdExport(device, f"unix:{path}", ["--read-only"]) as running:
        info = json.loads(run("nbdinfo", "--json", running.uri))["exports"][0]
        assert info["is_read_only"] is True and info["can_trim"] is False
        assert info["can_zero"] is False
        # qemu-io opened writable refuses a read-only export (EPERM)...
        done = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", running.uri],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert done.returncode != 0
        assert "permission denied" in (done.stdout + done.stderr).lower()
        # ...and opened read-only it reads.
        run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", running.uri)
        # A client that sends a write anyway gets EPERM from the server.
        client = RawClient(path)
        try:
            client.handshake()
            assert client.request(Command.WRITE, 0, 512, bytes(512))[0] == Errno.EPERM
            assert client.request(Command.TRIM, 0, 512)[0] == Errno.EPERM
            assert client.request(Command.READ, 0, 512)[0] == 0
        finally:
            client.close()


# -- a raw client, for what no well-behaved client sends ----------------------------------------
class RawClient:
    """A hand-driven NBD client over a Unix socket: handshake, then single requests."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def handshake(self) -> None:
        self.recv(SERVER_GREETING.size)
        self.sock.sendall(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        data = struct.pack(">IHH", 0, 1, Info.BLOCK_SIZE)
        self.sock.sendall(OPTION_HEADER.pack(IHAVEOPT, Option.GO, len(data)) + data)
        while True:
            _, _, reply, length = OPTION_REPLY_HEADER.unpack(self.recv(OPTION_REPLY_HEADER.size))
            self.recv(length)
            if reply == OptionReply.ACK:
                return
            assert reply == OptionReply.INFO, hex(reply)

    def request(self, command: int, offset: int, length: int, payload: bytes = b"",
                cookie: int = 1) -> tuple[int, bytes]:
        """Send one request (simple replies) and return (error, data)."""
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length)
                          + payload)
        _, error, got = SIMPLE_REPLY.unpack(self.recv(SIMPLE_REPLY.size))
        assert got == cookie
        data = self.recv(length) if command == Command.READ and error == 0 else b""
        return error, data

    def close(self) -> None:
        self.sock.close()


def test_bad_requests_get_the_protocol_errors(export: NbdExport, sock_dir: Path) -> None:
    client = RawClient(sock_dir / "nbd.sock")
    try:
        client.handshake()
        assert client.request(Command.WRITE, 0, 4096, b"\x5a" * 4096) == (0, b"")
        assert client.request(Command.READ, 0, 4096) == (0, b"\x5a" * 4096)
        assert client.request(Command.WRITE, SIZE, 512, bytes(512))[0] == Errno.ENOSPC
        assert client.request(Command.READ, SIZE - 512, 1024)[0] == Errno.EINVAL
        assert client.request(Command.WRITE, 100, 512, bytes(512))[0] == Errno.EINVAL
        assert client.request(Command.READ, 0, 64 * MiB)[0] == Errno.EINVAL
        assert client.request(Command.WRITE, 0, 33 * MiB, bytes(33 * MiB))[0] == Errno.EINVAL
        assert client.request(77, 0, 512)[0] == Errno.EINVAL
        assert client.request(Command.READ, 0, 4096) == (0, b"\x5a" * 4096)  # still serving
    finally:
        client.close()


def test_hostile_clients_leave_the_others_served(export: NbdExport, sock_dir: Path) -> None:
    path = sock_dir / "nbd.sock"
    good = RawClient(path)
    with ExitStack() as stack:
        stack.callback(good.close)
        good.handshake()
        assert good.request(Command.WRITE, 4096, 4096, b"\x77" * 4096)[0] == 0
        hostile = []
        for garbage in (os.urandom(5000), CLIENT_FLAGS.pack(0xFF00),
                        b"\0\0\0\x03" + OPTION_HEADER.pack(IHAVEOPT, Option.EXPORT_NAME, 7)
                        + b"missing"):
            bad = RawClient(path)
            stack.callback(bad.close)
            bad.recv(SERVER_GREETING.size)
            bad.sock.sendall(garbage)
            hostile.append(bad)
        magic = RawClient(path)  # a bad request magic after a good handshake
        stack.callback(magic.close)
        magic.handshake()
        magic.sock.sendall(b"\xde\xad" * 14)
        half = RawClient(path)  # a write header, half its payload, then gone
        half.handshake()
        half.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 9, 0, MiB) + bytes(1000))
        half.close()
        for bad in [*hostile, magic]:  # each is disconnected (EOF), none is answered data
            bad.sock.settimeout(10)
            while bad.sock.recv(65536):
                pass
        assert good.request(Command.READ, 4096, 4096) == (0, b"\x77" * 4096)
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x77 4k 4k", export.uri)
        assert "failed" not in out
    assert accepts(path)


def test_tcp_listener_on_loopback_and_remote_refused(device: Path, sock_dir: Path) -> None:
    with NbdExport(device, "127.0.0.1:0") as running:
        assert running.uri.startswith("nbd://127.0.0.1:")
        info = json.loads(run("nbdinfo", "--json", running.uri))
        assert info["exports"][0]["export-size"] == SIZE
        assert running.stop(signal.SIGINT) == 0  # SIGINT stops it as cleanly as SIGTERM
        assert "signal 2" in running.output
    done = subprocess.run(virtblk_argv("nbd", str(device), "--listen", "0.0.0.0:0"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--allow-remote" in done.stderr
    # A Unix path another server listens on, or a file that is no socket: refused, kept.
    (sock_dir / "plain").touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(sock_dir / "busy.sock"))
        busy.listen()
        for taken, why in ((sock_dir / "busy.sock", "another server listens on"),
                           (sock_dir / "plain", "exists and is not a socket")):
            done = subprocess.run(virtblk_argv("nbd", str(device), "--listen", f"unix:{taken}"),
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 1 and why in done.stderr, done.stderr
            assert taken.exists()


def test_export_name_and_sigterm_during_a_copy(device: Path, sock_dir: Path,
                                               tmp_path: Path) -> None:
    """A named export: the empty name reaches it too, an unknown name is refused, qemu-nbd
    and nbdinfo list it; SIGTERM in the middle of a copy stops the server cleanly (exit 0,
    requests answered)."""
    path = sock_dir / "named.sock"
    running = NbdExport(device, f"unix:{path}", ["--export-name", "disk0"])
    with running:
        assert running.uri.endswith(f"/disk0?socket={path}")
        run("nbdinfo", f"nbd+unix:///?socket={path}")
        done = subprocess.run(["nbdinfo", f"nbd+unix:///nope?socket={path}"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0 and "nope" in done.stderr
        # NBD_OPT_LIST, then NBD_OPT_INFO on each name, as qemu-nbd and nbdinfo do them
        listed = run("qemu-nbd", "--list", "-k", str(path))
        assert "exports available: 1" in listed and "export: 'disk0'" in listed, listed
        assert "flush fua trim zeroes df multi fast-zero" in listed, listed
        assert f"size:  {SIZE}" in listed and "min block: 512" in listed, listed
        listed = run("nbdinfo", "--list", f"nbd+unix:///?socket={path}")
        assert 'export="disk0"' in listed and "vhost-user-blk device" in listed, listed
        source = random_file(tmp_path / "source.raw", SIZE)
        copy = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                 str(source), running.uri], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # the copy is under way: requests in flight
            assert running.stop() == 0
        finally:
            copy.kill()
            copy.wait()
        assert "signal 15" in running.output


@pytest.mark.parametrize("peer", ["ours", "qsd"])
def test_device_gone_stops_the_export(peer: str, sock_dir: Path,
                                      qsd_factory: QsdFactory) -> None:
    """The device dies: the next request fails (EIO) and the export stops with status 1,
    saying why, instead of answering EIO for ever."""
    with ExitStack() as stack:
        if peer == "ours":
            server = stack.enter_context(ServeProcess(sock_dir / "vu.sock", ["--memory", "8M"]))
            vhost, kill = server.socket_path, server.kill
        else:
            image = sock_dir / "qsd.img"
            image.write_bytes(bytes(8 * MiB))
            daemon = qsd_factory(image=image)
            vhost, kill = daemon.socket_path, daemon.stop  # type: ignore[assignment]
        with NbdExport(vhost, f"unix:{sock_dir / 'nbd.sock'}", expect_status=1) as running:
            run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", running.uri)
            kill()
            done = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x42 0 4k",
                                   running.uri], capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
            assert "Input/output error" in done.stdout + done.stderr or done.returncode
            assert running.process is not None
            assert running.process.wait(timeout=30) == 1, running.output
            assert "Error:" in running.output and "went away" in running.output
