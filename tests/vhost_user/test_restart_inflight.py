"""A device killed with SIGKILL while requests are in flight, restarted as ``virtblk
serve`` on the same socket and image: handed the in-flight buffer back, it executes and
answers them.

The frontend is this test, driving its ring itself as QEMU 7.2 does across a backend
crash: it keeps ring memory and the buffer GET_INFLIGHT_FD gave, reconnects, sends
SET_INFLIGHT_FD, the memory table, and SET_VRING_BASE = the used idx in ring memory.  The
first device (``holding_device.py``) hangs inside the first write while it answers the
others: at the kill the used idx is past the one request in flight, which only the
buffer remembers (starting from the used idx, a device would serve the last write a
second time, an answer the driver refuses, and the first never).

Over a packed ring too: there QEMU 7.2 sends the initial base (0x80008000) after a crash,
having no ring position of its own, and the journal's packed layout is all that says where
the ring was and which chains (their descriptors overwritten in the ring by the used ones
the dead device wrote after them) are owed.  The successor runs thread or process workers
(a process worker takes the recovered chains over).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from interop.serve_process import START_TIMEOUT, ServeProcess
from peers.process import accepts, kill_group, wait_ready
from virtblk.spec import Feature, RequestHeader, RequestType, Status
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature
from virtblk.virtio import packed_layout
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.split_driver import DriverVirtqueue
from virtblk.virtio.split_layout import VringAddrs

NUM = 64
HOLD_SECTOR = 16
WRITES = (HOLD_SECTOR, 0, 8, 24)  # sectors; one request each, 4 KiB: the first is held
MiB = 1 << 20
FRESH_PACKED = 0x8000_8000  # position 0, both wrap counters 1: a packed ring's initial base


def pattern(sector: int) -> bytes:
    return bytes([0x30 + sector // 8]) * 4096


class RingFrontend:
    """One queue, split or packed, driven by hand over a vhost-user connection that may be
    replaced."""

    def __init__(self, packed: bool = False) -> None:
        self.packed = packed
        self.region = MemoryRegion.create(4 * MiB, guest_phys_addr=0)
        self.memory = GuestMemory([self.region])
        self.alloc = BufferAllocator(self.region)
        self.vq: DriverVirtqueue | PackedDriverVirtqueue
        if packed:
            self.addrs = packed_layout.allocate(self.alloc, NUM)
            self.vq = PackedDriverVirtqueue(self.memory, self.addrs, event_idx=False,
                                            indirect=True, allocator=self.alloc, max_chain=8)
        else:
            self.addrs = VringAddrs.allocate(self.alloc, NUM)
            self.vq = DriverVirtqueue(self.memory, self.addrs, event_idx=False, indirect=True,
                                      allocator=self.alloc, max_chain=8)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.status: dict[int, int] = {}
        self.inflight: tuple[int, int] | None = None  # fd, size: kept across restarts
        self.frontend: VhostUserFrontend | None = None

    def connect(self, path: Path) -> None:
        """QEMU 7.2's order: features, [GET_INFLIGHT_FD the first time], SET_INFLIGHT_FD,
        memory, then the ring with base = the used idx in ring memory (a packed ring: the
        initial base, all QEMU knows after a crash), enable last."""
        if self.frontend is not None:
            self.frontend.close()
        fe = self.frontend = VhostUserFrontend.connect(str(path))
        fe.get_features()
        offered = fe.get_protocol_features()
        assert offered & ProtocolFeature.INFLIGHT_SHMFD.mask
        fe.set_protocol_features(offered)
        fe.set_owner()
        features = Feature.VERSION_1.mask | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
        fe.set_features(features | (Feature.RING_PACKED.mask if self.packed else 0))
        if self.inflight is None:
            reply = fe.get_inflight_fd(1, NUM)
            assert reply.fd is not None
            self.inflight = (reply.fd.take(), reply.mmap_size)
        fd, size = self.inflight
        fe.set_inflight_fd(size, 0, 1, NUM, fd)
        fe.set_mem_table([self.region])
        uva = self.region.user_addr - self.region.guest_phys_addr
        fe.set_vring_num(0, NUM)
        if self.packed:
            fe.set_vring_base(0, FRESH_PACKED)
        else:
            fe.set_vring_base(0, self.memory.view(self.addrs.used + 2, 2).cast("H")[0])
        fe.set_vring_addr(0, uva + self.addrs.desc, uva + self.addrs.used,
                          uva + self.addrs.avail)
        fe.set_vring_call(0, self.call)
        fe.set_vring_kick(0, self.kick)
        fe.set_vring_enable(0, True)

    def write(self, token: int, sector: int, data: bytes) -> None:
        header = self.alloc.alloc(16)
        self.memory.view(header, 16)[:] = RequestHeader(RequestType.OUT, 0, sector).pack()
        buf = self.alloc.alloc(len(data))
        self.memory.view(buf, len(data))[:] = data
        status = self.status[token] = self.alloc.alloc(1)
        self.memory.view(status, 1)[0] = 0xFF
        self.vq.add([(header, 16), (buf, len(data))], [(status, 1)], token)

    def kick_device(self) -> None:
        self.vq.kick_prepare()
        os.eventfd_write(self.kick, 1)

    def wait(self, count: int, timeout: float = 60.0) -> dict[int, int]:
        done: dict[int, int] = {}
        poller = select.poll()
        poller.register(self.call, select.POLLIN)
        while len(done) < count:
            done.update(self.vq.get_used())
            if len(done) < count and not poller.poll(timeout * 1000):
                raise TimeoutError(f"only {len(done)} of {count} answered: {done}")
            if len(done) < count:
                os.eventfd_read(self.call)
        return done

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
        if self.inflight is not None:
            os.close(self.inflight[0])
        os.close(self.kick)
        os.close(self.call)
        self.memory.close()


@pytest.fixture
def ring(request: pytest.FixtureRequest) -> Iterator[RingFrontend]:
    """The frontend's ring: split unless the test is parametrized with ``ring="packed"``."""
    r = RingFrontend(packed=getattr(request, "param", "split") == "packed")
    yield r
    r.close()


def start_holding_device(path: Path, image: Path, marker: Path) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("holding_device.py")
    process = subprocess.Popen(
        [sys.executable, str(script), str(path), str(image), str(marker), str(HOLD_SECTOR)],
        start_new_session=True)
    if wait_ready(process, lambda: accepts(path), START_TIMEOUT, 0.05) is not None:
        raise RuntimeError("the holding device exited before listening")
    return process


@pytest.mark.parametrize(("ring", "workers"), [
    ("split", "thread"),
    ("packed", "thread"),
    ("packed", "process"),
], indirect=["ring"])  # fmt: skip
def test_a_sigkilled_device_s_requests_are_resubmitted_by_its_successor(
    ring: RingFrontend, sock_dir: Path, tmp_path: Path, workers: str
) -> None:
    path = sock_dir / "blk.sock"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    marker = tmp_path / "holding"
    device = start_holding_device(path, image, marker)
    try:
        ring.connect(path)
        for token, sector in enumerate(WRITES):
            ring.write(token, sector, pattern(sector))
        ring.kick_device()
        answered = ring.wait(len(WRITES) - 1)  # all but the held one
        assert sorted(answered) == list(range(1, len(WRITES)))
        assert marker.exists() and device.poll() is None  # inside the held write
    finally:
        kill_group(device)
    assert ring.vq.get_used() == []  # the held write was not answered
    assert path.exists()  # the dead device's socket file is left behind

    serve = ServeProcess(path, ["--file", str(image), "--workers", workers])
    serve.argv[1:1] = ["--log-level", "info"]  # virtblk --log-level info serve ...
    with serve:
        ring.connect(path)
        assert ring.wait(1) == {0: 1}
        statuses = [ring.memory.view(ring.status[t], 1)[0] for t in range(len(WRITES))]
        assert statuses == [Status.OK] * len(WRITES)
        # A new request after the resubmitted ones is served too.
        ring.write(len(WRITES), 40, pattern(40))
        ring.kick_device()
        assert ring.wait(1) == {len(WRITES): 1}
        assert "queue 0: resubmitting 1 in-flight requests" in serve.output
        assert "will not resume" not in serve.output
    data = image.read_bytes()
    for sector in (*WRITES, 40):
        assert data[sector * 512 : sector * 512 + 4096] == pattern(sector), sector


@pytest.mark.parametrize(("args", "offered"), [([], True), (["--no-inflight"], False)])
def test_serve_offers_the_inflight_buffer_unless_told_not_to(
    sock_dir: Path, args: list[str], offered: bool
) -> None:
    path = sock_dir / "blk.sock"
    with ServeProcess(path, ["--memory", "1M", *args]), \
            VhostUserFrontend.connect(str(path)) as fe:
        fe.get_features()
        features = fe.get_protocol_features()
    assert bool(features & ProtocolFeature.INFLIGHT_SHMFD.mask) is offered
