"""The NBD backend against real NBD servers (tests/peers/nbd.py): ``qemu-nbd`` over a raw
file, whose bytes the test reads, and ``nbdkit memory``, whose ``log`` filter shows each
command as the server received it (its flags included) and whose data ``nbdcopy`` reads
over a second connection.  Requests go through a BlkDevice's queue, as a driver sends them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from device_helpers import Driver, start

from peers.nbd import Nbdkit, NbdkitMemory, QemuNbd
from peers.plugin import NbdServerFactory
from peers.process import eventually
from virtblk.device.blk import BlkDevice
from virtblk.device.nbd import NbdBackend
from virtblk.device.options import DeviceOptions
from virtblk.nbd.client import NbdError
from virtblk.nbd.wire import TransmissionFlag
from virtblk.spec import DiscardSegment, Feature, RequestType, Status, has_feature
from virtblk.virtio.memory import BufferAllocator, GuestMemory

pytestmark = pytest.mark.interop

MiB = 1 << 20
SECTOR = 512
SIZE = 16 * MiB

Memory = tuple[GuestMemory, BufferAllocator]
Request = tuple[int, int, bytes, int]
"""(type, sector, data the device reads, bytes it writes back)."""


@contextlib.contextmanager
def serving(uri: str, memory: Memory, *, device: dict[str, Any] | None = None,
            **backend: Any) -> Iterator[tuple[BlkDevice, NbdBackend, Driver]]:
    """A device over the export with its queue 0 started, and the driver end of the ring."""
    with contextlib.ExitStack() as stack:
        backend_ = NbdBackend(uri, **backend)
        stack.callback(backend_.close)
        drv = Driver(*memory, event_idx=True)
        stack.callback(drv.close)
        dev = BlkDevice(backend_, **(device or {}))
        stack.callback(dev.close)
        start(dev, 0, drv, event_idx=True)
        yield dev, backend_, drv


def run(drv: Driver, *requests: Request, timeout: float = 60.0) -> list[tuple[int, bytes]]:
    """Submit the requests at once, kick once, wait for every answer: (status, data read)."""
    for token, (rtype, sector, out, in_len) in enumerate(requests):
        drv.submit(token, rtype, sector, out=out, in_len=in_len)
    drv.kick_device()
    drv.wait(len(requests), timeout)
    return [(drv.status_of(token), drv.data_of(token, in_len) if in_len else b"")
            for token, (_, _, _, in_len) in enumerate(requests)]


def read(sector: int, length: int) -> Request:
    return (RequestType.IN, sector, b"", length)


def write(sector: int, data: bytes) -> Request:
    return (RequestType.OUT, sector, data, 0)


def flush() -> Request:
    return (RequestType.FLUSH, 0, b"", 0)


def segment(rtype: int, sector: int, sectors: int, flags: int = 0) -> Request:
    return (rtype, 0, DiscardSegment(sector, sectors, flags).pack(), 0)


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(length))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw file of random bytes for qemu-nbd to serve."""
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_reads_and_writes_land_in_the_file(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    before = image.read_bytes()
    server = nbd_server(QemuNbd, image)
    last = SIZE // SECTOR - 8
    with serving(server.uri, memory) as (dev, backend, drv):
        assert dev.capacity == SIZE // SECTOR and not backend.read_only
        assert run(drv, read(0, 4096), read(last, 4096)) == [
            (Status.OK, before[:4096]), (Status.OK, before[-4096:])]
        assert run(drv, write(0, pattern(1, 4096)), write(8, pattern(2, 512)),
                   write(last, pattern(3, 4096)), flush()) == [(Status.OK, b"")] * 4
        on_disk = image.read_bytes()
        assert on_disk[:4096] == pattern(1, 4096)[:4096]
        assert on_disk[4096:4608] == pattern(2, 512)
        assert on_disk[-4096:] == pattern(3, 4096)
        assert on_disk[8192:-4096] == before[8192:-4096]
        with image.open("r+b") as f:  # the server's data changed behind the device
            f.seek(MiB)
            f.write(pattern(4, 8192))
        assert run(drv, read(MiB // SECTOR, 8192)) == [(Status.OK, pattern(4, 8192))]
        # Past the end: refused by the device, which goes on serving.
        assert run(drv, read(last + 8, 512))[0][0] == Status.IOERR
        assert run(drv, read(8, 512)) == [(Status.OK, pattern(2, 512))]


def test_holes_of_a_sparse_file_read_as_zeros(
    nbd_server: NbdServerFactory, memory: Memory, tmp_path: Path,
) -> None:
    """qemu-nbd answers a read over a sparse file with OFFSET_HOLE chunks around the data
    (structured replies): the guest's buffer gets zeros there, over stale bytes."""
    sparse = tmp_path / "sparse.raw"
    with sparse.open("wb") as f:
        f.truncate(SIZE)
        f.seek(MiB + 4096)
        f.write(pattern(7, 4096))
    server = nbd_server(QemuNbd, sparse)
    with serving(server.uri, memory) as (_, _, drv):
        drv.submit(0, RequestType.IN, MiB // SECTOR, in_len=2 * MiB)
        drv.memory.view(drv.data[0], 2 * MiB)[:] = b"\xee" * (2 * MiB)  # stale bytes
        drv.kick_device()
        drv.wait(1)
        assert drv.status_of(0) == Status.OK
        assert drv.data_of(0, 2 * MiB) == bytes(4096) + pattern(7, 4096) + bytes(
            2 * MiB - 8192)


def test_a_burst_of_32_is_in_flight_on_one_connection(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    # qemu-nbd takes one client (--shared=1): every request shares the one connection.
    server = nbd_server(QemuNbd, image, tcp=True)
    with serving(server.uri, memory) as (dev, _, drv):
        burst = [write(i * 64, pattern(i, 4096)) for i in range(32)]
        assert run(drv, *burst) == [(Status.OK, b"")] * 32
        assert run(drv, *[read(i * 64, 4096) for i in range(32)]) == [
            (Status.OK, pattern(i, 4096)) for i in range(32)]
        queue: Any = dev.stats()["queues"]
        (queue,) = queue
        assert queue["most_in_flight"] > 1, queue
        assert queue["requests"] == {"OUT": 32, "IN": 32}
    on_disk = image.read_bytes()
    assert all(on_disk[i * 32 * 1024:i * 32 * 1024 + 4096] == pattern(i, 4096)
               for i in range(32))


def test_two_queues_at_once_on_one_connection(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    """Both queues' threads send and read on the one connection at the same time: each
    gets its own answers, whichever thread read them (qemu-nbd takes one client)."""
    before = image.read_bytes()
    server = nbd_server(QemuNbd, image)
    with contextlib.ExitStack() as stack:
        backend = NbdBackend(server.uri)
        stack.callback(backend.close)
        drivers = [Driver(*memory, event_idx=True) for _ in range(2)]
        for drv in drivers:
            stack.callback(drv.close)
        dev = BlkDevice(backend, num_queues=2)
        stack.callback(dev.close)
        for index, drv in enumerate(drivers):
            start(dev, index, drv, event_idx=True)
        for round_ in range(6):
            for q, drv in enumerate(drivers):
                for i in range(16):
                    sector = (q * 16 + i) * 64 + round_ * 8
                    if (i + round_) % 2:
                        drv.submit(i, RequestType.OUT, sector, out=pattern(round_ + i, 4096))
                    else:
                        drv.submit(i, RequestType.IN, sector, in_len=4096)
            for drv in drivers:  # both queues busy at once
                drv.kick_device()
            for q, drv in enumerate(drivers):
                drv.wait(16)
                for i in range(16):
                    assert drv.status_of(i) == Status.OK
                    if not (i + round_) % 2:
                        offset = ((q * 16 + i) * 64 + round_ * 8) * SECTOR
                        assert drv.data_of(i, 4096) == before[offset:offset + 4096]
                drv.data.clear()
    on_disk = image.read_bytes()
    for round_ in range(6):
        for q in range(2):
            for i in range(16):
                if (i + round_) % 2:
                    offset = ((q * 16 + i) * 64 + round_ * 8) * SECTOR
                    assert on_disk[offset:offset + 4096] == pattern(round_ + i, 4096)


def test_every_request_type_as_the_server_receives_it(
    nbd_server: NbdServerFactory, memory: Memory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE, log_requests=True)
    assert isinstance(server, NbdkitMemory)
    data = os.urandom(64 * 1024)
    with serving(server.uri, memory) as (dev, _, drv):
        assert has_feature(dev.features, Feature.BLK_FLUSH)
        assert run(drv, write(0, data)) == [(Status.OK, b"")]
        assert run(drv, flush()) == [(Status.OK, b"")]
        assert run(drv, segment(RequestType.DISCARD, 16, 8))[0][0] == Status.OK
        assert run(drv, segment(RequestType.WRITE_ZEROES, 32, 8))[0][0] == Status.OK
        assert run(drv, segment(RequestType.WRITE_ZEROES, 40, 8, 1))[0][0] == Status.OK
        assert run(drv, segment(RequestType.SECURE_ERASE, 64, 1))[0][0] == Status.OK
        assert run(drv, read(0, 64 * 1024)) == [(Status.OK, server.read_all()[:64 * 1024])]
    assert server.requests() == [
        "Write id=1 offset=0x0 count=0x10000 fua=0 ...",
        "Flush id=2 ...",
        "Trim id=3 offset=0x2000 count=0x1000 fua=0 ...",
        "Zero id=4 offset=0x4000 count=0x1000 trim=0 fua=0 fast=0 ...",  # NO_HOLE
        "Zero id=5 offset=0x5000 count=0x1000 trim=1 fua=0 fast=0 ...",  # unmap allowed
        "Write id=6 offset=0x8000 count=0x200 fua=0 ...",  # secure erase: zeros written,
        "Flush id=7 ...",  # then flushed
        "Read id=8 offset=0x0 count=0x10000 ...",
    ]
    expected = bytearray(data)
    expected[0x2000:0x3000] = bytes(0x1000)  # nbdkit memory's trim zeroes
    expected[0x4000:0x6000] = bytes(0x2000)
    expected[0x8000:0x8200] = bytes(0x200)
    assert server.read_all()[:64 * 1024] == expected


def test_write_through_writes_are_fua(nbd_server: NbdServerFactory, memory: Memory) -> None:
    server = nbd_server(NbdkitMemory, SIZE, log_requests=True)
    assert isinstance(server, NbdkitMemory)
    with serving(server.uri, memory, device={"writeback": False}) as (_, _, drv):
        assert run(drv, write(0, pattern(1, 4096))) == [(Status.OK, b"")]
        assert run(drv, segment(RequestType.WRITE_ZEROES, 8, 8)) == [(Status.OK, b"")]
    assert server.requests() == [
        "Write id=1 offset=0x0 count=0x1000 fua=1 ...",
        "Zero id=2 offset=0x1000 count=0x1000 trim=0 fua=1 fast=0 ...",
    ]


def test_write_through_without_fua_writes_then_flushes(
    nbd_server: NbdServerFactory, memory: Memory, tmp_path: Path,
) -> None:
    """An export that takes FLUSH but not FUA (nbdkit's eval plugin over a file, saying
    so): a write-through write is answered after a FLUSH that followed it."""
    store = tmp_path / "store.raw"
    store.write_bytes(bytes(MiB))
    plugin = ["eval", f"get_size=echo {MiB}", "can_write=exit 0", "can_flush=exit 0",
              "flush=exit 0", "can_fua=echo none",
              f"pread=dd if={store} skip=$4 count=$3 iflag=skip_bytes,count_bytes "
              "status=none",
              f"pwrite=dd of={store} seek=$4 conv=notrunc oflag=seek_bytes status=none"]
    server = nbd_server(Nbdkit, plugin, log_requests=True)
    assert isinstance(server, Nbdkit)
    with serving(server.uri, memory, device={"writeback": False}) as (_, backend, drv):
        assert not backend.export.can(TransmissionFlag.SEND_FUA)
        assert run(drv, write(8, pattern(1, 4096))) == [(Status.OK, b"")]
        assert store.read_bytes()[4096:8192] == pattern(1, 4096)
    assert server.requests() == ["Write id=1 offset=0x1000 count=0x1000 fua=0 ...",
                                 "Flush id=2 ..."]


def test_a_burst_that_fills_the_socket_both_ways(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    """12 writes and 12 reads of 256 KiB at once (6 MiB each way, the socket holds a few
    hundred KiB): the sender reads replies while the socket is full, so neither end
    waits for the other for ever."""
    server = nbd_server(QemuNbd, image)
    before = image.read_bytes()
    chunk = 256 * 1024
    with serving(server.uri, memory) as (_, _, drv):
        requests = [write(i * chunk // SECTOR, pattern(i, chunk)) for i in range(12)]
        requests += [read((12 + i) * chunk // SECTOR, chunk) for i in range(12)]
        assert run(drv, *requests, timeout=30) == [(Status.OK, b"")] * 12 + [
            (Status.OK, before[(12 + i) * chunk:(13 + i) * chunk]) for i in range(12)]
    on_disk = image.read_bytes()
    assert all(on_disk[i * chunk:(i + 1) * chunk] == pattern(i, chunk) for i in range(12))


def test_large_requests_are_split_at_the_server_s_maximum(
    nbd_server: NbdServerFactory, memory: Memory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE, log_requests=True, filters=["blocksize-policy"],
                        params=["blocksize-maximum=65536", "blocksize-minimum=512"])
    assert isinstance(server, NbdkitMemory)
    data = os.urandom(200 * 1024)
    with serving(server.uri, memory) as (_, backend, drv):
        assert backend.export.max_payload == 65536
        assert run(drv, write(8, data)) == [(Status.OK, b"")]
        assert run(drv, read(8, len(data))) == [(Status.OK, data)]
    assert [line.split(" id=")[0] for line in server.requests()] == ["Write"] * 4 + [
        "Read"] * 4
    assert server.read_all()[4096:4096 + len(data)] == data


def test_without_write_zeroes_zeros_are_written(
    nbd_server: NbdServerFactory, memory: Memory,
) -> None:
    server = nbd_server(NbdkitMemory, SIZE, log_requests=True, filters=["nozero"],
                        params=["zeromode=none"])
    assert isinstance(server, NbdkitMemory)
    with serving(server.uri, memory) as (_, _, drv):
        # One at a time: two requests in flight at once may reach the server in any order.
        assert run(drv, write(0, pattern(1, 8192))) == [(Status.OK, b"")]
        assert run(drv, segment(RequestType.WRITE_ZEROES, 4, 4, 1)) == [(Status.OK, b"")]
    assert server.requests()[1] == "Write id=2 offset=0x800 count=0x800 fua=0 ...", (
        server.request_log.read_text())
    assert server.read_all()[:8192] == pattern(1, 2048) + bytes(2048) + pattern(1, 8192)[4096:]


def test_a_read_only_export_is_a_read_only_device(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    before = image.read_bytes()
    server = nbd_server(QemuNbd, image, read_only=True)
    with serving(server.uri, memory) as (dev, backend, drv):
        assert backend.read_only and has_feature(dev.features, Feature.BLK_RO)
        assert run(drv, write(0, pattern(1, 512)))[0][0] == Status.IOERR
        assert run(drv, segment(RequestType.DISCARD, 0, 8))[0][0] == Status.IOERR
        assert run(drv, read(0, 512)) == [(Status.OK, before[:512])]
    assert image.read_bytes() == before


def test_a_killed_server_gives_ioerr_and_a_restarted_one_serves(
    nbd_server: NbdServerFactory, image: Path, memory: Memory,
) -> None:
    server = nbd_server(QemuNbd, image)
    with serving(server.uri, memory) as (dev, backend, drv):
        assert run(drv, write(0, pattern(1, 4096))) == [(Status.OK, b"")]
        server.kill()
        assert eventually(lambda: not backend.connected, 10.0)
        started = time.monotonic()
        statuses = [status for status, _ in run(drv, read(0, 4096), write(8, pattern(2, 512)))]
        assert statuses == [Status.IOERR, Status.IOERR]
        assert time.monotonic() - started < 2.0  # answered at once, not after a timeout
        server.start()
        assert eventually(lambda: backend.connected, 15.0)
        assert run(drv, read(0, 4096), write(8, pattern(3, 512))) == [
            (Status.OK, pattern(1, 4096)), (Status.OK, b"")]
        assert dev.stats()["errors"]["IOERR"] == 2  # type: ignore[index]
    assert image.read_bytes()[4096:4608] == pattern(3, 512)


def test_requests_in_flight_when_the_server_dies_answer_ioerr(
    nbd_server: NbdServerFactory, memory: Memory,
) -> None:
    """Reads the server holds (nbdkit's delay filter: 30 s each) when it is killed: every
    one is answered IOERR at once, nothing waits for the delay."""
    server = nbd_server(NbdkitMemory, SIZE, log_requests=True, filters=["delay"],
                        params=["rdelay=30"])
    assert isinstance(server, NbdkitMemory)
    with serving(server.uri, memory) as (_, backend, drv):
        for token in range(3):
            drv.submit(token, RequestType.IN, token * 8, in_len=4096)
        drv.kick_device()
        assert eventually(lambda: len(server.requests()) == 3, 10.0), server.requests()
        started = time.monotonic()
        server.kill()
        drv.wait(3, 10)
        assert time.monotonic() - started < 5
        assert [drv.status_of(t) for t in range(3)] == [Status.IOERR] * 3
        assert not backend.connected


@pytest.mark.parametrize(("uri", "words"), [
    ("nbd+unix:///?socket=/nonexistent/nbd.sock", "cannot connect: No such file"),
    ("nbd://127.0.0.1:1/x", "127.0.0.1:1, export 'x': cannot connect: Connection refused"),
])
def test_an_unreachable_server(uri: str, words: str) -> None:
    with pytest.raises(NbdError, match=words):
        NbdBackend(uri)


def test_an_unknown_export(nbd_server: NbdServerFactory, image: Path) -> None:
    server = nbd_server(QemuNbd, image)
    with pytest.raises(NbdError, match="has no export named 'nope'"):
        NbdBackend(server.uri.replace("/disk?", "/nope?"))


def test_a_server_that_is_not_nbd(sock_dir: Path) -> None:
    path = sock_dir / "ssh.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def greet() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                peer.recv(100)

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        with pytest.raises(NbdError, match="not an NBD server"):
            NbdBackend(f"nbd+unix:///?socket={path}")
        thread.join(5)


def test_a_silent_server_times_out(sock_dir: Path) -> None:
    path = sock_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(NbdError, match=r"no answer within 0\.5 s"):
            NbdBackend(f"nbd+unix:///?socket={path}", connect_timeout=0.5)
        assert time.monotonic() - started < 5


def test_a_server_that_requires_tls(nbd_server: NbdServerFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(f"alice:{os.urandom(32).hex()}\n")
    server = nbd_server(NbdkitMemory, SIZE, options=["--tls=require", f"--tls-psk={keys}"])
    with pytest.raises(NbdError, match="requires TLS; virtblk does not speak TLS"):
        NbdBackend(server.uri)


def test_an_export_smaller_than_a_sector(nbd_server: NbdServerFactory) -> None:
    server = nbd_server(NbdkitMemory, 100)
    with pytest.raises(NbdError, match="100 bytes, not one 512-byte sector"):
        NbdBackend(server.uri)


def test_options_judge_the_uri_and_refuse_what_nbd_does_not_take() -> None:
    with pytest.raises(ValueError, match="TLS"):
        DeviceOptions(backend="nbd", path="nbds://h/e")
    with pytest.raises(ValueError, match="needs an export's URI"):
        DeviceOptions(backend="nbd")
    with pytest.raises(ValueError, match="size from the server"):
        DeviceOptions(backend="nbd", path="nbd://h/e", size=MiB)
    with pytest.raises(ValueError, match="from threads"):
        DeviceOptions(backend="nbd", path="nbd://h/e", workers="process")
    with pytest.raises(ValueError, match="option of the rbd backend"):
        DeviceOptions(backend="nbd", path="nbd://h/e", ceph_id="admin")
