"""Our device (``BlkDevice`` behind ``VhostUserServer``) over packed rings, through the
real vhost-user socket, with queue workers of both kinds.

The frontend is this test: it negotiates VIRTIO_F_RING_PACKED and drives its rings itself,
with ``PackedDriverVirtqueue`` for ordinary I/O, and by writing descriptors into ring
memory by hand for what no correct driver sends.  What is checked: I/O on two queues over
many laps of small rings, direct and indirect chains; a ring stopped with GET_VRING_BASE
and started again with the base it answered (QEMU's 32-bit packed layout) continues where
it was; hostile descriptors are answered or refused as a split ring's are (a chain whose
buffers break a rule: used length 0; one whose buffer id cannot be answered: consumed,
never answered; one whose AVAIL/USED bits contradict the wrap counter: not available),
and the device keeps serving.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.control import handle_request
from virtblk.spec import (
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Feature,
    RequestHeader,
    RequestType,
    Status,
)
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature
from virtblk.vhost_user.server import VhostUserServer
from virtblk.virtio import packed_layout
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.packed_layout import PackedRingBase, decode_vring_base
from virtblk.virtio.split_layout import VringAddrs

MiB = 1 << 20
FEATURES = (Feature.VERSION_1.mask | Feature.RING_PACKED.mask | Feature.RING_EVENT_IDX.mask
            | Feature.RING_INDIRECT_DESC.mask | Feature.VHOST_USER_PROTOCOL_FEATURES.mask)
PROTOCOL = ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.CONFIG.mask
PDESC = struct.Struct("<QIHH")  # addr, len, id, flags


@pytest.fixture(params=["thread", "process"])
def server(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[tuple[str, BlkDevice]]:
    """Our device with two queues on a 4 MiB memory disk, served on a socket by a thread
    of this process; its queues served by threads or by worker processes."""
    device = BlkDevice(MemoryBackend(4 * MiB), num_queues=2, workers=request.param)
    path = str(sock_dir / "vb.sock")
    srv = VhostUserServer(path, device)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, device
    finally:
        srv.stop()
        thread.join(timeout=10)
        device.close()
    assert not thread.is_alive()
    assert srv.last_violation is None, srv.last_violation


class Frontend:
    """A guest of our own: memory, a vhost-user connection, rings started by hand."""

    def __init__(self, path: str) -> None:
        self.region = MemoryRegion.create(4 * MiB, guest_phys_addr=0)
        self.memory = GuestMemory([self.region])
        self.alloc = BufferAllocator(self.region)
        self.fe = VhostUserFrontend.connect(path)
        self.eventfds: list[int] = []
        fe = self.fe
        assert fe.get_features() & Feature.RING_PACKED.mask
        fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL)
        fe.set_owner()
        fe.set_features(FEATURES)
        fe.set_mem_table([self.region])

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.eventfds.append(fd)
        return fd

    def start_ring(self, index: int, addrs: VringAddrs, kick: int, call: int,
                   base: int | None = None) -> None:
        """QEMU's order: size, base, addresses, call, kick, enable."""
        fe = self.fe
        uva = self.region.user_addr - self.region.guest_phys_addr
        fe.set_vring_num(index, addrs.num)
        if base is not None:
            fe.set_vring_base(index, base)
        fe.set_vring_addr(index, uva + addrs.desc, uva + addrs.used, uva + addrs.avail)
        fe.set_vring_call(index, call)
        fe.set_vring_kick(index, kick)
        fe.set_vring_enable(index, True)

    def buffer(self, data: bytes) -> int:
        gpa = self.alloc.alloc(len(data))
        self.memory.view(gpa, len(data))[:] = data
        return gpa

    def close(self) -> None:
        self.fe.close()
        for fd in self.eventfds:
            os.close(fd)
        self.memory.close()


@pytest.fixture
def frontend(server: tuple[str, BlkDevice]) -> Iterator[Frontend]:
    f = Frontend(server[0])
    yield f
    f.close()


class Queue:
    """One packed ring driven by ``PackedDriverVirtqueue``."""

    def __init__(self, f: Frontend, index: int, num: int, *, indirect: bool) -> None:
        self.f = f
        self.index = index
        self.addrs = packed_layout.allocate(f.alloc, num)
        self.vq = PackedDriverVirtqueue(f.memory, self.addrs, event_idx=True,
                                        indirect=indirect, allocator=f.alloc, max_chain=4)
        self.kick, self.call = f.eventfd(), f.eventfd()
        self.status: dict[int, int] = {}
        self.data: dict[int, int] = {}

    def start(self, base: int | None = None) -> None:
        self.f.start_ring(self.index, self.addrs, self.kick, self.call, base)

    def submit(self, token: int, rtype: int, sector: int, *, out: bytes = b"",
               in_len: int = 0) -> None:
        f = self.f
        outs = [(f.buffer(RequestHeader(rtype, 0, sector).pack()), 16)]
        ins: list[tuple[int, int]] = []
        if out:
            outs.append((f.buffer(out), len(out)))
        if in_len:
            self.data[token] = f.buffer(bytes(in_len))
            ins.append((self.data[token], in_len))
        self.status[token] = f.buffer(b"\xff")
        ins.append((self.status[token], 1))
        self.vq.add(outs, ins, token)

    def kick_device(self) -> None:
        if self.vq.kick_prepare():
            os.eventfd_write(self.kick, 1)

    def wait(self, count: int, timeout: float = 30.0) -> dict[int, int]:
        done: dict[int, int] = {}
        poller = select.poll()
        poller.register(self.call, select.POLLIN)
        while len(done) < count:
            done.update(self.vq.get_used())
            if len(done) >= count or not self.vq.enable_cb():
                continue
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"queue {self.index}: {len(done)} of {count}: {done}")
            os.eventfd_read(self.call)
        return done

    def status_of(self, token: int) -> int:
        return self.f.memory.view(self.status[token], 1)[0]

    def data_of(self, token: int, length: int) -> bytes:
        return bytes(self.f.memory.view(self.data[token], length))


def pattern(queue: int, n: int) -> bytes:
    return bytes([queue * 0x40 + n % 0x40 + 1]) * 4096


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_io_on_two_packed_queues_over_many_laps(
    server: tuple[str, BlkDevice], frontend: Frontend, indirect: bool
) -> None:
    """Rings of 11 (not a power of two), three requests in flight per round (nine
    descriptors when direct): each queue goes round its ring again and again, and the
    last writes are read back from the disk."""
    _, device = server
    queues = [Queue(frontend, i, 11, indirect=indirect) for i in range(2)]
    for q in queues:
        q.start()
    rounds = 20
    for r in range(rounds):
        for q in queues:
            for k in range(2):
                n = 2 * r + k
                q.submit(k, RequestType.OUT, 8 * (q.index * 64 + n % 64), out=pattern(q.index, n))
            q.submit(2, RequestType.IN, 8 * (q.index * 64 + (2 * r) % 64), in_len=4096)
            q.kick_device()
        for q in queues:
            done = q.wait(3)  # the read's data is not checked: it may pass the write
            assert done == {0: 1, 1: 1, 2: 4097}
            assert all(q.status_of(t) == Status.OK for t in range(3))
    for q in queues:
        for n in range(2 * rounds - 2, 2 * rounds):
            q.submit(0, RequestType.IN, 8 * (q.index * 64 + n % 64), in_len=4096)
            q.kick_device()
            assert q.wait(1) == {0: 4097} and q.data_of(0, 4096) == pattern(q.index, n)
    stats = device.stats()
    assert stats["ring"] == "packed"
    assert handle_request(device, {"command": "get-config"})["ring"] == "packed"
    assert stats["requests"] == {"OUT": 2 * 2 * rounds, "IN": 2 * rounds + 4}
    assert stats["malformed"] == stats["chain_errors"] == 0


def test_a_stopped_ring_resumes_from_the_base_it_answered(
    server: tuple[str, BlkDevice], frontend: Frontend
) -> None:
    """GET_VRING_BASE stops the ring and answers both positions and wrap counters; the
    ring started again with that base serves on from there (each time at a different
    place of the ring, in both laps)."""
    q = Queue(frontend, 0, 5, indirect=False)  # three descriptors a request
    q.start()
    bases = []
    for n in range(8):
        q.submit(0, RequestType.OUT, 8 * n, out=pattern(0, n))
        q.kick_device()
        assert q.wait(1) == {0: 1}
        base = frontend.fe.get_vring_base(0)
        position, lap = 3 * (n + 1) % 5, 3 * (n + 1) // 5
        assert decode_vring_base(base) == PackedRingBase(position, lap % 2 == 0,
                                                         position, lap % 2 == 0)
        bases.append(base)
        q.start(base)
    assert len(set(bases)) == 8
    for n in range(8):
        q.submit(0, RequestType.IN, 8 * n, in_len=4096)
        q.kick_device()
        assert q.wait(1) == {0: 4097} and q.data_of(0, 4096) == pattern(0, n)


class RawRing:
    """A packed ring written by hand: any descriptor, legal or not."""

    def __init__(self, f: Frontend, index: int, num: int) -> None:
        self.f = f
        self.num = num
        self.addrs = packed_layout.allocate(f.alloc, num)
        self.desc = f.memory.view(self.addrs.desc, 16 * num)
        self.flags = self.desc.cast("H")
        self.kick, self.call = f.eventfd(), f.eventfd()
        self.pos, self.wrap = 0, True  # where the next descriptor goes
        self.used_pos, self.used_wrap = 0, True  # where the next used descriptor comes
        self.lengths: dict[int, int] = {}  # buffer id -> descriptors of its chain
        f.start_ring(index, self.addrs, self.kick, self.call)

    def offer(self, bid: int, *descs: tuple[int, int, int], bits: int | None = None) -> None:
        """Make ``(addr, len, flags)`` descriptors available as one chain with buffer id
        ``bid``, the first one's flags last; ``bits`` replaces the first one's AVAIL/USED
        bits."""
        first = (self.pos, self.wrap)
        for k, (addr, length, flags) in enumerate(descs):
            PDESC.pack_into(self.desc, 16 * self.pos, addr, length, bid, 0)
            if k:
                self.flags[8 * self.pos + 7] = flags | packed_layout.avail_bits(self.wrap)
            self.pos += 1
            if self.pos == self.num:
                self.pos, self.wrap = 0, not self.wrap
        own = packed_layout.avail_bits(first[1]) if bits is None else bits
        self.flags[8 * first[0] + 7] = descs[0][2] | own
        self.lengths[bid] = len(descs)
        os.eventfd_write(self.kick, 1)

    def request(self, bid: int, rtype: int, sector: int, *, out: bytes = b"",
                in_len: int = 0) -> tuple[int, int]:
        """A well-formed request as a direct chain; (data gpa, status gpa)."""
        f = self.f
        header = f.buffer(RequestHeader(rtype, 0, sector).pack())
        status = f.buffer(b"\xff")
        data = f.buffer(out or bytes(in_len))
        self.offer(bid, (header, 16, VRING_DESC_F_NEXT),
                   (data, len(out) or in_len,
                    VRING_DESC_F_NEXT | (0 if out else VRING_DESC_F_WRITE)),
                   (status, 1, VRING_DESC_F_WRITE))
        return data, status

    def next_used(self, timeout: float = 30.0) -> tuple[int, int] | None:
        """The next used descriptor's (buffer id, length), None if none came in time."""
        deadline = time.monotonic() + timeout
        want = packed_layout.used_bits(self.used_wrap)
        both = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        while self.flags[8 * self.used_pos + 7] & both != want:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        _, length, bid, _ = PDESC.unpack_from(self.desc, 16 * self.used_pos)
        self.used_pos += self.lengths.pop(bid)
        if self.used_pos >= self.num:
            self.used_pos -= self.num
            self.used_wrap = not self.used_wrap
        return bid, length


def test_hostile_descriptors_are_answered_or_refused_and_the_device_serves_on(
    server: tuple[str, BlkDevice], frontend: Frontend
) -> None:
    _, device = server
    f = frontend
    ring = RawRing(f, 0, 16)
    mem = f.memory

    # A chain that never ends (NEXT on all 16 descriptors): consumed whole, answered 0.
    scratch = f.buffer(bytes(64))
    ring.offer(1, *[(scratch, 4, VRING_DESC_F_NEXT)] * 16)
    assert ring.next_used() == (1, 0)

    _, status = ring.request(0, RequestType.OUT, 0, out=b"\x5a" * 4096)
    assert ring.next_used() == (0, 1) and mem.view(status, 1)[0] == Status.OK

    # A buffer outside guest memory: the chain is answered with used length 0.
    header = f.buffer(RequestHeader(RequestType.IN, 0, 0).pack())
    ring.offer(2, (header, 16, VRING_DESC_F_NEXT), (64 * MiB, 4096, VRING_DESC_F_WRITE))
    assert ring.next_used() == (2, 0)

    # Device-readable after device-writable: used length 0.
    st = f.buffer(b"\xff")
    ring.offer(3, (st, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT), (header, 16, 0))
    assert ring.next_used() == (3, 0)

    # A buffer id past the ring: consumed and never answered; the next one is.
    ring.offer(99, (header, 16, VRING_DESC_F_NEXT), (st, 1, VRING_DESC_F_WRITE))
    del ring.lengths[99]  # never comes back
    data, status = ring.request(4, RequestType.IN, 0, in_len=4096)
    assert ring.next_used() == (4, 4097)
    assert bytes(mem.view(data, 4096)) == b"\x5a" * 4096 and mem.view(status, 1)[0] == Status.OK

    # AVAIL/USED bits that say "used" in this lap: not available, nothing is taken...
    position, wrap = ring.pos, ring.wrap
    data, status = f.buffer(bytes(4096)), f.buffer(b"\xff")
    ring.offer(5, (f.buffer(RequestHeader(RequestType.IN, 0, 0).pack()), 16, VRING_DESC_F_NEXT),
               (data, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
               (status, 1, VRING_DESC_F_WRITE), bits=packed_layout.used_bits(wrap))
    assert ring.next_used(timeout=0.5) is None and mem.view(status, 1)[0] == 0xFF
    # ...until the driver makes it available after all.
    flags = ring.flags[8 * position + 7]
    ring.flags[8 * position + 7] = (flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
                                    | packed_layout.avail_bits(wrap))
    os.eventfd_write(ring.kick, 1)
    assert ring.next_used() == (5, 4097) and bytes(mem.view(data, 4096)) == b"\x5a" * 4096

    stats = device.stats()
    assert stats["chain_errors"] == 4 and stats["requests"] == {"OUT": 1, "IN": 2}
    # The other queue never noticed.
    q = Queue(f, 1, 8, indirect=True)
    q.start()
    q.submit(0, RequestType.IN, 0, in_len=4096)
    q.kick_device()
    assert q.wait(1) == {0: 4097} and q.data_of(0, 4096) == b"\x5a" * 4096
