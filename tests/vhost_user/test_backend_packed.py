"""The backend with VIRTIO_F_RING_PACKED acked, fed messages directly over a recording
device: the packed ring's sizes, areas and 32-bit base (QEMU's layout: avail position and
wrap counter in bits 0-15, used position and wrap counter in 16-31), and a ring served by a
real ``PackedDriverVirtqueue`` stopped and started again where it was."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest
from vhost_user_helpers import GUEST_SIZE, GUEST_UVA, RecordingDevice, describe

from virtblk.spec import Feature
from virtblk.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES, BackendConnection
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
from virtblk.vhost_user.messages import (
    GetFeatures,
    GetInflightFd,
    GetInflightFdReply,
    GetVringBase,
    GetVringBaseReply,
    SetFeatures,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringEnable,
    SetVringKick,
    SetVringNum,
)
from virtblk.virtio import packed_layout
from virtblk.virtio.inflight import queue_region_size
from virtblk.virtio.inflight_packed import packed_queue_region_size
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.packed_layout import PackedRingBase, decode_vring_base, encode_vring_base
from virtblk.virtio.split_device import ChainError, DescriptorChain, DeviceVirtqueue, Triple
from virtblk.virtio.split_layout import VringAddrs

SPLIT = (Feature.VERSION_1.mask | Feature.RING_EVENT_IDX.mask
         | Feature.VHOST_USER_PROTOCOL_FEATURES.mask)
PACKED = SPLIT | Feature.RING_PACKED.mask
FRESH = 0x8000_8000  # position 0 with wrap counter 1, avail and used


@pytest.fixture
def device() -> RecordingDevice:
    """A recording device that offers packed rings."""
    return RecordingDevice(features=PACKED)


@pytest.fixture
def conn(device: RecordingDevice) -> Iterator[BackendConnection]:
    c = BackendConnection(device)
    yield c
    c.close()


def negotiate(conn: BackendConnection, region: MemoryRegion, features: int = PACKED) -> None:
    assert conn.handle(GetFeatures()).value == PACKED  # type: ignore[union-attr]
    conn.handle(SetProtocolFeatures(DEFAULT_PROTOCOL_FEATURES))
    conn.handle(SetOwner())
    conn.handle(SetFeatures(features))
    conn.handle(SetMemTable((describe(region),), (OwnedFd.dup(region.fd),)))


def uva(gpa: int) -> int:
    return GUEST_UVA + gpa


def start(conn: BackendConnection, addrs: VringAddrs, base: int | None = None) -> int:
    """Ring 0 at ``addrs`` (guest addresses), its base if given, kick and enable: started.
    Returns the frontend's kick eventfd."""
    conn.handle(SetVringNum(0, addrs.num))
    if base is not None:
        conn.handle(SetVringBase(0, base))
    conn.handle(SetVringAddr(0, uva(addrs.desc), uva(addrs.used), uva(addrs.avail)))
    kick = os.eventfd(0)
    conn.handle(SetVringKick(0, OwnedFd.dup(kick)))
    conn.handle(SetVringEnable(0, True))
    return kick


def get_base(conn: BackendConnection) -> int:
    reply = conn.handle(GetVringBase(0))
    assert isinstance(reply, GetVringBaseReply)
    return reply.num


@pytest.mark.parametrize("num", [0, 1, 3, 100, 32768, 32769, 65536])
def test_queue_sizes_follow_the_packed_layouts_rule(
    conn: BackendConnection, region: MemoryRegion, num: int
) -> None:
    """Any size up to 2^15, a power of two or not: packed_layout's rule and reason."""
    negotiate(conn, region)
    try:
        packed_layout.check_queue_size(num)
    except ValueError as exc:
        with pytest.raises(ProtocolError) as info:
            conn.handle(SetVringNum(0, num))
        assert str(info.value) == f"SET_VRING_NUM: ring 0: {exc}"
    else:
        conn.handle(SetVringNum(0, num))


def test_split_rings_keep_the_split_rule_when_packed_is_offered_but_not_acked(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    negotiate(conn, region, SPLIT)
    with pytest.raises(ProtocolError, match="must be a power of two"):
        conn.handle(SetVringNum(0, 100))
    with pytest.raises(ProtocolError, match="base 2147516416 is not a 16-bit index"):
        conn.handle(SetVringBase(0, FRESH))


def test_a_fresh_ring_starts_at_position_0_with_both_wrap_counters_set(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    """A frontend that sends no SET_VRING_BASE gets the ring VIRTIO's reset describes."""
    negotiate(conn, region)
    addrs = packed_layout.allocate(BufferAllocator(region), 100)  # not a power of two
    os.close(start(conn, addrs))
    vq = device.running[0][0]
    assert isinstance(vq, PackedDeviceVirtqueue)
    assert (vq.num, vq.addrs, vq.event_idx) == (100, addrs, True)
    assert vq.vring_base == FRESH
    assert get_base(conn) == FRESH
    assert device.log == [("start", 0), ("stop", 0)]


def test_the_base_sets_both_positions_and_wrap_counters(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, region)
    addrs = packed_layout.allocate(BufferAllocator(region), 100)
    base = encode_vring_base(PackedRingBase(7, False, 95, True))  # 12 in flight, across a lap
    os.close(start(conn, addrs, base))
    vq = device.running[0][0]
    assert isinstance(vq, PackedDeviceVirtqueue)
    assert (vq.last_avail_idx, vq.avail_wrap_counter, vq.used_idx, vq.used_wrap_counter) == (
        7, False, 95, True)
    assert get_base(conn) == base


@pytest.mark.parametrize("base, reason", [
    (encode_vring_base(PackedRingBase(100, True, 0, True)), "ring positions 100, 0"),
    (encode_vring_base(PackedRingBase(0, True, 5, True)), "not within a lap behind"),
])  # fmt: skip
def test_an_impossible_base_is_refused_when_the_ring_starts(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion, base: int,
    reason: str,
) -> None:
    negotiate(conn, region)
    addrs = packed_layout.allocate(BufferAllocator(region), 100)
    kick = os.eventfd(0)
    try:
        with pytest.raises(ProtocolError, match=f"ring 0: .*{reason}"):
            os.close(start(conn, addrs, base))
    finally:
        os.close(kick)
    assert device.running == {}


def test_ring_areas_are_translated_with_the_packed_sizes(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    """A packed ring's areas are 16 * num, 4 and 4 bytes: at the very end of guest memory
    they fit (a split ring's would not), one byte further they do not."""
    negotiate(conn, region)
    num = 64
    desc = GUEST_SIZE - 16 * num - 16
    fits = VringAddrs(num, desc, GUEST_SIZE - 8, GUEST_SIZE - 4)
    os.close(start(conn, fits))
    assert device.running[0][0].addrs == fits
    get_base(conn)
    with pytest.raises(ProtocolError, match="ring 0 device event suppression"):
        conn.handle(SetVringAddr(0, uva(desc), uva(GUEST_SIZE - 2), uva(GUEST_SIZE - 8)))
    with pytest.raises(ProtocolError, match=r"ring 0 descriptor ring .* is not 16-aligned"):
        conn.handle(SetVringAddr(0, uva(desc + 8), uva(GUEST_SIZE - 4), uva(GUEST_SIZE - 8)))


def test_split_rings_when_packed_is_not_acked(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, region, SPLIT)
    os.close(start(conn, VringAddrs(64, 0x0, 0x1000, 0x2000), 3))
    vq = device.running[0][0]
    assert isinstance(vq, DeviceVirtqueue) and vq.last_avail_idx == 3
    assert get_base(conn) == 3


def test_a_served_ring_resumes_where_it_stopped(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    """A real driver and the device's ring, stopped (GET_VRING_BASE) and started again
    (SET_VRING_BASE with what it answered) after every three requests of two descriptors
    on a ring of seven:
    the positions and wrap counters go round the ring many times, and every request is
    answered exactly once with its own id."""
    negotiate(conn, region)
    allocator = BufferAllocator(region)
    num = 7
    addrs = packed_layout.allocate(allocator, num)
    memory = GuestMemory([region])
    driver = PackedDriverVirtqueue(memory, addrs, event_idx=True, indirect=False,
                                   allocator=allocator, max_chain=2, max_tokens=num)
    buffers = [allocator.alloc(64) for _ in range(num)]
    base: int | None = None
    done = 0
    for round_ in range(12):
        os.close(start(conn, addrs, base))
        vq = device.running[0][0]
        assert isinstance(vq, PackedDeviceVirtqueue)
        for k in range(3):
            token = (round_ * 3 + k) % num
            driver.add([(buffers[token], 16)], [(buffers[token] + 16, 48)], token)
        driver.kick_prepare()
        _, items = vq.pop_batch(8)
        assert len(items) == 3
        used: list[int] = []
        for item in items:
            assert not isinstance(item, Exception)
            used += [item.head, 48]
        vq.add_used_batch(used)
        vq.flush_used()
        assert sorted(driver.get_used()) == sorted(
            ((round_ * 3 + k) % num, 48) for k in range(3))
        done += 3
        base = get_base(conn)
        position, lap = 2 * done % num, 2 * done // num
        assert decode_vring_base(base) == PackedRingBase(position, lap % 2 == 0,
                                                         position, lap % 2 == 0)
    assert done == 36  # ten laps and a bit


def inflight_buffer(conn: BackendConnection, num: int, num_queues: int = 1) -> tuple[int, int]:
    """GET_INFLIGHT_FD's buffer as the frontend keeps it (its fd, its size), handed back
    with SET_INFLIGHT_FD."""
    reply = conn.handle(GetInflightFd(num_queues, num))
    assert isinstance(reply, GetInflightFdReply) and reply.fd is not None
    with reply:
        fd = os.dup(reply.fd.fileno())
    conn.handle(SetInflightFd(reply.mmap_size, 0, num_queues, num, OwnedFd.dup(fd)))
    return fd, reply.mmap_size


@pytest.mark.parametrize("features, per_queue", [
    (PACKED, packed_queue_region_size),
    (SPLIT, queue_region_size),
])  # fmt: skip
def test_the_inflight_buffer_is_sized_for_the_rings_acked(
    conn: BackendConnection, region: MemoryRegion, features: int,
    per_queue: Callable[[int], int],
) -> None:
    """QEMU sends SET_FEATURES before GET_INFLIGHT_FD and maps the size we answer: 32
    bytes per descriptor for packed rings (DPDK's size), 16 for split ones."""
    negotiate(conn, region, features)
    reply = conn.handle(GetInflightFd(2, 128))
    assert isinstance(reply, GetInflightFdReply) and reply.fd is not None
    with reply:
        assert reply.mmap_size == 2 * per_queue(128) == os.fstat(reply.fd.fileno()).st_size
    assert packed_queue_region_size(128) == 4160  # 32 + 32 * 128, rounded up to 64


def test_a_split_sized_buffer_is_refused_for_packed_rings(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    negotiate(conn, region)
    fd = os.memfd_create("split-sized", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 2 * queue_region_size(128))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with pytest.raises(ProtocolError, match=r"buffer of 4224 bytes, 8320 needed for 2 "
                                                r"queues of 128 \(packed layout\)"):
            conn.handle(SetInflightFd(2 * queue_region_size(128), 0, 2, 128, OwnedFd.dup(fd)))
        assert conn.inflight is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("first, then, message", [
    (PACKED, SPLIT, "ring 0 is a split ring, the in-flight buffer was laid out for packed"),
    (SPLIT, PACKED, "ring 0 is a packed ring, the in-flight buffer was laid out for split"),
])  # fmt: skip
def test_a_buffer_laid_out_for_the_other_ring_kind_is_refused(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion, first: int,
    then: int, message: str,
) -> None:
    """Nothing in the buffer says its layout: it is the one of the rings acked when it was
    handed over, and a ring of the other kind (SET_FEATURES again) does not start on it."""
    negotiate(conn, region, first)
    fd, _ = inflight_buffer(conn, 64)
    conn.handle(SetFeatures(then))
    allocate = packed_layout.allocate if then == PACKED else VringAddrs.allocate
    addrs = allocate(BufferAllocator(region), 64)
    try:
        with pytest.raises(ProtocolError, match=message):
            os.close(start(conn, addrs))
        assert device.running == {}
    finally:
        os.close(fd)


def heads(items: Sequence[Triple | DescriptorChain | ChainError]) -> list[int]:
    """The buffer ids of chains popped, none of them malformed."""
    assert not any(isinstance(item, ChainError) for item in items), items
    return [item.head for item in items if not isinstance(item, ChainError)]


def test_a_restarted_device_resubmits_what_the_packed_journal_holds(
    device: RecordingDevice, region: MemoryRegion, caplog: pytest.LogCaptureFixture,
) -> None:
    """A device pops five requests on a lapped ring of 11 and answers two (out of order),
    then is killed.  The next one is handed the same buffer and the base QEMU 7.2 sends
    after a crash, the initial one: it resumes at the journal's positions, resubmits the
    three requests still in flight oldest first, and every request is answered once."""
    memory = GuestMemory([region])
    allocator = BufferAllocator(region)
    num = 11
    addrs = packed_layout.allocate(allocator, num)
    driver = PackedDriverVirtqueue(memory, addrs, event_idx=True, indirect=False,
                                   allocator=allocator, max_chain=2, max_tokens=num)
    buffers = [allocator.alloc(64) for _ in range(num)]

    def offer(tokens: range) -> None:
        for token in tokens:
            driver.add([(buffers[token], 16)], [(buffers[token] + 16, 48)], token)
        driver.kick_prepare()

    first = BackendConnection(device)
    negotiate(first, region)
    fd, size = inflight_buffer(first, num)
    try:
        os.close(start(first, addrs))
        vq = device.running[0][0]
        assert isinstance(vq, PackedDeviceVirtqueue) and vq.inflight is not None
        offer(range(3))  # a first lap's worth, answered: the positions move on
        _, items = vq.pop_batch(num)
        vq.add_used_batch([n for head in heads(items) for n in (head, 48)])
        vq.flush_used()
        assert sorted(driver.get_used()) == [(0, 48), (1, 48), (2, 48)]
        offer(range(5))  # 10 descriptors more: past the end of the ring
        _, items = vq.pop_batch(num)
        ids = heads(items)  # tokens 0 to 4
        assert len(set(ids)) == 5
        vq.add_used_batch([ids[3], 48, ids[1], 48])
        vq.flush_used()
        assert sorted(driver.get_used()) == [(1, 48), (3, 48)]
        died_at = vq.vring_base
        first.close()  # killed: nothing more reaches the ring

        second = BackendConnection(device)
        negotiate(second, region)
        second.handle(SetInflightFd(size, 0, 1, num, OwnedFd.dup(fd)))
        with caplog.at_level(logging.INFO, "virtblk.vhost_user.backend"):
            os.close(start(second, addrs, FRESH))
        vq = device.running[0][0]
        assert isinstance(vq, PackedDeviceVirtqueue)
        assert vq.resubmit_pending == [ids[0], ids[2], ids[4]]
        assert vq.vring_base == died_at != FRESH
        assert second.resubmitted == [3, 0]
        assert "queue 0: resubmitting 3 in-flight requests" in caplog.text
        assert "will not resume" not in caplog.text
        _, items = vq.pop_batch(num)
        assert heads(items) == [ids[0], ids[2], ids[4]]
        vq.add_used_batch([n for head in heads(items) for n in (head, 48)])
        vq.flush_used()
        assert sorted(driver.get_used()) == [(0, 48), (2, 48), (4, 48)]
        offer(range(5, 7))  # and the ring goes on
        _, items = vq.pop_batch(num)
        assert len(items) == 2 and not any(isinstance(i, Exception) for i in items)
        assert second.handle(GetVringBase(0)) is not None
        second.close()
    finally:
        os.close(fd)
        driver.close()


def test_a_hostile_packed_journal_refuses_the_ring_untouched(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, region)
    fd, size = inflight_buffer(conn, 64)
    with mmap.mmap(fd, size) as buf:
        struct.pack_into("<QHH", buf, 0, 0, 1, 64)  # version 1, 64 entries
        buf[32 + 32 * 3] = 7  # entry 3's in-flight flag
        before = bytes(buf)
        addrs = packed_layout.allocate(BufferAllocator(region), 64)
        try:
            with pytest.raises(ProtocolError) as info:
                os.close(start(conn, addrs))
            assert str(info.value) == ("ring 0: in-flight buffer refused: entry 3 has "
                                       "in-flight flag 7, not 0 or 1")
            assert bytes(buf) == before and device.running == {}
        finally:
            os.close(fd)


@pytest.mark.parametrize("flags, said", [
    (0, False),  # zeroed: fresh (or used in lap 0: cannot be told)
    (packed_layout.avail_bits(True), False),  # the first request of a fresh ring
    (packed_layout.used_bits(True), True),  # answered in lap 1
    (packed_layout.avail_bits(False), True),  # made available in lap 0
])  # fmt: skip
def test_a_used_ring_started_at_its_initial_position_is_reported(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion,
    caplog: pytest.LogCaptureFixture, flags: int, said: bool,
) -> None:
    """What QEMU 7.2 does after a backend crash on a packed ring: it sends the initial
    base again.  Without an in-flight buffer (here none was handed over) nothing says where
    the ring is: where the first descriptor shows the ring was used already, the log says
    this queue cannot resume and why (the ring is still started: the frontend decides)."""
    negotiate(conn, region)
    addrs = packed_layout.allocate(BufferAllocator(region), 64)
    region.view[addrs.desc + 14 : addrs.desc + 16].cast("H")[0] = flags
    with caplog.at_level(logging.ERROR, "virtblk.vhost_user.backend"):
        os.close(start(conn, addrs, FRESH))
    assert isinstance(device.running[0][0], PackedDeviceVirtqueue)
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert bool(errors) == said and all("will not resume" in e and "no in-flight buffer" in e
                                        for e in errors)
