"""Our driver against ``virtblk serve --nbd``: a device whose data lives on a real NBD
server (tests/peers/nbd.py), checked on the server's side: the raw file behind qemu-nbd,
nbdkit memory's data read by ``nbdcopy`` over a second connection.

(Named test_serve_nbd, not test_nbd_backend: tests/device has that module name, and the
suite's modules share one namespace.)
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from peers.nbd import NbdkitMemory, QemuNbd
from peers.plugin import NbdServerFactory
from peers.process import eventually, process_group
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.errors import BlockIOError
from virtblk.nbd.client import NbdError

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB

ServeNbd = Callable[..., ServeProcess]


@pytest.fixture
def serve_nbd(sock_dir: Path) -> ServeNbd:
    """``serve_nbd(URI, ARGS...)``: ``virtblk serve --nbd URI ARGS``, not started (use it
    as ``with serve_nbd(uri) as server:``)."""
    count = 0

    def make(uri: str, *args: str) -> ServeProcess:
        nonlocal count
        count += 1
        return ServeProcess(sock_dir / f"nbd-dev-{count}.sock", ["--nbd", uri, *args])

    return make


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_every_request_type_lands_in_the_file(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory, image: Path,
) -> None:
    """Reads of what the file held, writes on both queues, flush, write-zeroes (both
    kinds), secure erase, discard: each checked in the file qemu-nbd serves; GET_ID is the
    export's name; one process (both queues are threads on one connection)."""
    expected = bytearray(image.read_bytes())
    server = nbd_server(QemuNbd, image, export="vm-disk-1")
    with serve_nbd(server.uri, "--num-queues", "2") as dev, Disk.connect(dev.socket_path) as disk:
        assert disk.size == SIZE and disk.num_queues == 2
        assert disk.serial == "vm-disk-1"
        assert dev.process is not None
        assert process_group(dev.process.pid) == [dev.process.pid]
        assert disk.pread(SIZE, 0) == expected
        for queue, offset in enumerate(range(0, 8 * MiB, MiB)):
            disk.use_queue(queue % 2)
            block = os.urandom(MiB)
            disk.pwrite(block, offset)
            expected[offset:offset + MiB] = block
        for offset in (4096 + 512, 9 * MiB + 512 * 3, SIZE - 4096):
            block = os.urandom(4096)
            disk.pwrite(block, offset)
            expected[offset:offset + 4096] = block
        disk.write_zeroes(10 * MiB, MiB)
        expected[10 * MiB:11 * MiB] = bytes(MiB)
        disk.write_zeroes(12 * MiB, 2 * MiB, unmap=True)
        expected[12 * MiB:14 * MiB] = bytes(2 * MiB)
        assert "BLK_SECURE_ERASE" in disk.features
        disk.secure_erase(16 * MiB, MiB)
        expected[16 * MiB:17 * MiB] = bytes(MiB)
        disk.flush()
        assert image.read_bytes() == expected
        assert disk.pread(SIZE, 0) == expected
        # A discarded range's content is unspecified (qemu-nbd ignores discards by
        # default); that the request succeeds and the rest is untouched is what holds.
        disk.discard(20 * MiB, 4 * MiB)
        after = image.read_bytes()
        assert after[:20 * MiB] == expected[:20 * MiB]
        assert after[24 * MiB:] == expected[24 * MiB:]


def test_nbdkit_memory_over_tcp(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE, tcp=True)
    data = os.urandom(4 * MiB)
    with serve_nbd(server.uri) as dev, Disk.connect(dev.socket_path) as disk:
        assert disk.size == SIZE
        disk.pwrite(data, MiB)
        disk.write_zeroes(2 * MiB, MiB, unmap=True)
        disk.flush()
        copy = server.read_all()
    assert copy[MiB:2 * MiB] == data[:MiB]
    assert copy[2 * MiB:3 * MiB] == bytes(MiB)
    assert copy[3 * MiB:5 * MiB] == data[2 * MiB:]


def test_many_requests_in_flight_through_the_embedded_device(
    nbd_server: NbdServerFactory, image: Path,
) -> None:
    """32 reads and 32 writes at once from the asyncio disk: the device had many NBD
    requests in flight on its one connection (qemu-nbd takes one client)."""
    server = nbd_server(QemuNbd, image)
    blocks = {i * 64 * 1024: os.urandom(4096) for i in range(32)}

    async def main() -> None:
        async with await AsyncDisk.embedded(backend="nbd", path=server.uri) as disk:
            assert disk.size == SIZE
            await asyncio.gather(*(disk.write(b, off) for off, b in blocks.items()))
            got = await asyncio.gather(*(disk.read(4096, off) for off in blocks))
            assert got == list(blocks.values())
            device = disk.disk.embedded_device
            assert device is not None
            stats = device.stats()
            (queue,) = stats["queues"]
            assert queue["most_in_flight"] > 4, queue

    asyncio.run(main())
    on_disk = image.read_bytes()
    assert all(on_disk[off:off + 4096] == b for off, b in blocks.items())


def test_a_read_only_export(serve_nbd: ServeNbd, nbd_server: NbdServerFactory,
                            image: Path) -> None:
    before = image.read_bytes()
    server = nbd_server(QemuNbd, image, read_only=True)
    with serve_nbd(server.uri) as dev, Disk.connect(dev.socket_path) as disk:
        assert disk.read_only
        assert disk.pread(4096, 0) == before[:4096]
        with pytest.raises(BlockIOError):
            disk.pwrite(bytes(4096), 0)
    assert image.read_bytes() == before


def test_read_only_option_on_a_writable_export(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE)
    with serve_nbd(server.uri, "--read-only") as dev, Disk.connect(dev.socket_path) as disk:
        assert disk.read_only
        with pytest.raises(BlockIOError):
            disk.pwrite(bytes(4096), 0)


def test_a_restarted_qemu_nbd_is_served_again(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory, image: Path,
) -> None:
    """qemu-nbd killed under a connected driver: requests fail (IOERR) at once while it is
    gone, and once it is back the same driver reads and writes the file again."""
    server = nbd_server(QemuNbd, image)
    with serve_nbd(server.uri) as dev, Disk.connect(dev.socket_path) as disk:
        first = os.urandom(4096)
        disk.pwrite(first, 0)
        server.kill()
        started = time.monotonic()
        with pytest.raises(BlockIOError):
            disk.pread(4096, 0)
        assert time.monotonic() - started < 5
        server.start()

        def served() -> bool:
            try:
                return disk.pread(4096, 0) == first
            except BlockIOError:
                return False

        assert eventually(served, 20.0, interval=0.2)
        second = os.urandom(4096)
        disk.pwrite(second, 8192)
        disk.flush()
        assert image.read_bytes()[8192:12288] == second
        assert "connected again" in dev.output


@pytest.mark.parametrize("case", ["unreachable", "unknown-export", "not-nbd", "tls"])
def test_a_server_problem_fails_serve_at_start_in_one_line(
    case: str, nbd_server: NbdServerFactory, sock_dir: Path, tmp_path: Path,
) -> None:
    """Exit status 1 and one ``Error:`` line naming the problem, never a traceback."""
    image = tmp_path / "small.raw"
    image.write_bytes(bytes(MiB))
    stop = threading.Event()
    if case == "unreachable":
        uri, expected = f"nbd+unix:///x?socket={sock_dir}/none.sock", "cannot connect"
    elif case == "unknown-export":
        uri = nbd_server(QemuNbd, image).uri.replace("/disk?", "/nope?")
        expected = "has no export named 'nope'"
    elif case == "tls":
        keys = tmp_path / "keys.psk"
        keys.write_text(f"alice:{os.urandom(32).hex()}\n")
        uri = nbd_server(NbdkitMemory, MiB,
                         options=["--tls=require", f"--tls-psk={keys}"]).uri
        expected = "requires TLS; virtblk does not speak TLS"
    else:
        path = sock_dir / "http.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(0.2)

        def answer() -> None:
            while not stop.is_set():
                try:
                    peer, _ = listener.accept()
                except TimeoutError:
                    continue
                with peer:
                    peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            listener.close()

        threading.Thread(target=answer, daemon=True).start()
        uri, expected = f"nbd+unix:///?socket={path}", "not an NBD server"
    try:
        result = run_virtblk("serve", "--socket", str(sock_dir / "dev.sock"), "--nbd", uri,
                             timeout=60)
    finally:
        stop.set()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--nbd", "nbds://127.0.0.1/x"], "TLS"),
    (["--nbd", "nbd+unix:///x"], "needs ?socket=PATH"),
    (["--nbd", "nbd://h/x", "--workers", "process"], "from threads"),
    (["--nbd", "nbd://h/x", "--size", "1G"], "--nbd the server's"),
    (["--nbd", "nbd://h/x", "--memory", "1G"], "exactly one of"),
])
def test_bad_nbd_options_are_usage_errors(args: list[str], expected: str,
                                          sock_dir: Path) -> None:
    result = run_virtblk("serve", "--socket", str(sock_dir / "dev.sock"), *args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_embedded_device_errors_reach_the_caller(nbd_server: NbdServerFactory,
                                                 image: Path) -> None:
    server = nbd_server(QemuNbd, image)
    with pytest.raises(NbdError, match="has no export named 'other'"):
        Disk.embedded(backend="nbd", path=server.uri.replace("/disk?", "/other?"))
    with Disk.embedded(backend="nbd", path=server.uri, mode="thread") as disk:
        assert disk.serial == "disk"
        assert disk.pread(512, 0) == image.read_bytes()[:512]


def test_a_server_s_minimum_block_is_the_logical_block_size(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE, filters=["blocksize-policy"],
                        params=["blocksize-minimum=4096", "blocksize-error-policy=error"])
    with serve_nbd(server.uri) as dev, Disk.connect(dev.socket_path) as disk:
        assert disk.logical_block_size == 4096
        data = os.urandom(8192)
        disk.pwrite(data, 4096)
        assert disk.pread(8192, 4096) == data


def test_a_server_restarted_with_a_larger_export_grows_the_disk(
    serve_nbd: ServeNbd, nbd_server: NbdServerFactory,
) -> None:
    """The device follows the size the new connection reports (the driver gets a config
    change), as it follows ``rbd resize``."""
    server = nbd_server(NbdkitMemory, SIZE)
    assert isinstance(server, NbdkitMemory)
    seen: list[tuple[int, int]] = []
    with serve_nbd(server.uri) as dev, Disk.connect(dev.socket_path) as disk:
        disk.on_resize(lambda old, new: seen.append((old, new)))
        server.kill()
        server.plugin[1] = str(2 * SIZE)
        server.start()
        assert eventually(lambda: disk.size == 2 * SIZE, 20.0, interval=0.2), dev.output
        assert (SIZE, 2 * SIZE) in seen
        disk.pwrite(b"\x5a" * 4096, 2 * SIZE - 4096)
        assert disk.pread(4096, 2 * SIZE - 4096) == b"\x5a" * 4096
