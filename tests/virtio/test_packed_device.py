"""The device end of a packed virtqueue, against a hand-played (often hostile) driver."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packed_helpers import AVAIL, PDESC, USED, PackedRawRing, avail, used
from virtq_helpers import REGION_GPA, REGION_SIZE, Guest

from virtblk.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from virtblk.virtio import packed_layout
from virtblk.virtio.packed_device import PackedChainError, PackedDeviceVirtqueue
from virtblk.virtio.packed_layout import PackedRingBase, decode_vring_base, encode_vring_base
from virtblk.virtio.split_device import ChainError, DescriptorChain, RingError, Triple
from virtblk.virtio.split_layout import VringAddrs

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
NUM = 8
BUF = REGION_GPA + 0x8000  # data buffers live here, well inside memory
ID = 5  # the buffer id the hand-played driver uses


def make(
    guest: Guest, num: int = NUM, *, event_idx: bool = False, **kw: int | bool
) -> tuple[PackedDeviceVirtqueue, PackedRawRing]:
    addrs = packed_layout.allocate(guest.allocator, num)
    vq = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=event_idx, **kw)  # type: ignore[arg-type]
    return vq, PackedRawRing(guest, addrs)


def table(guest: Guest, *descs: tuple[int, int, int, int]) -> int:
    """Write an indirect table (``addr, len, id, flags`` entries); returns its gpa."""
    gpa = guest.allocator.alloc(16 * len(descs), 16)
    view = guest.memory.view(gpa, 16 * len(descs))
    for i, desc in enumerate(descs):
        PDESC.pack_into(view, 16 * i, *desc)
    return gpa


def request(bid: int = ID) -> tuple[tuple[int, int, int, int], ...]:
    """A virtio-blk shaped direct chain: header, data, status byte."""
    return ((BUF, 16, bid, NEXT), (BUF + 0x100, 512, bid, NEXT | WRITE),
            (BUF + 0x400, 1, bid, WRITE))


def assert_serves_next_good_chain(vq: PackedDeviceVirtqueue, raw: PackedRawRing) -> None:
    raw.offer(vq.last_avail_idx, vq.avail_wrap_counter, (BUF, 16, 2, 0))
    chain = vq.pop()
    assert chain is not None and chain.head == 2 and chain.readable_len == 16


class TestGoodChains:
    def test_direct_chain(self, guest: Guest) -> None:
        vq, raw = make(guest)
        assert vq.pop() is None
        guest.memory.view(BUF, 16)[:] = b"H" * 16
        raw.offer(0, True, *request())
        assert vq.avail_pending() and vq.avail_backlog() == 1
        chain = vq.pop()
        assert isinstance(chain, DescriptorChain)
        assert chain.head == ID and chain.readable_len == 16 and chain.writable_len == 513
        assert [bytes(b) for b in chain.readable] == [b"H" * 16]
        assert [len(b) for b in chain.writable] == [512, 1]
        chain.writable[1][0] = 0x5A
        assert guest.memory.view(BUF + 0x400, 1)[0] == 0x5A  # zero-copy view into memory
        assert vq.pop() is None and (vq.last_avail_idx, vq.avail_wrap_counter) == (3, True)

    def test_the_buffer_id_is_the_last_descriptors(self, guest: Guest) -> None:
        """The spec puts the id in the last descriptor; the others' ids mean nothing."""
        vq, raw = make(guest)
        raw.offer(0, True, (BUF, 16, 1, NEXT), (BUF + 0x100, 1, 6, WRITE))
        chain = vq.pop()
        assert chain is not None and chain.head == 6

    def test_indirect_chain_pop_and_pop_batch(self, guest: Guest) -> None:
        vq, raw = make(guest)
        descs = ((BUF, 16, 0, 0), (BUF + 0x100, 4096, 0, WRITE), (BUF + 0x2000, 1, 0, WRITE))
        gpa = table(guest, *descs)
        pos, wrap = raw.offer(0, True, (gpa, 48, 3, INDIRECT))
        raw.offer(pos, wrap, (gpa, 48, 4, INDIRECT))
        chain = vq.pop()
        assert chain is not None and chain.head == 3
        assert (chain.readable_len, chain.writable_len) == (16, 4097)
        view, [triple] = vq.pop_batch(8)
        assert triple == Triple(4, BUF - REGION_GPA, 16, BUF + 0x100 - REGION_GPA, 4096, True,
                                BUF + 0x2000 - REGION_GPA, 1)
        view[triple.third] = 0x5A  # the status byte, through the batch's view
        assert guest.memory.view(BUF + 0x2000, 1)[0] == 0x5A
        assert vq.last_avail_idx == 2

    def test_next_in_an_indirect_table_is_ignored(self, guest: Guest) -> None:
        """Only WRITE means something in a table entry; the table's length says how many."""
        vq, raw = make(guest)
        gpa = table(guest, (BUF, 16, 9, NEXT), (BUF + 0x100, 1, 9, NEXT | WRITE))
        raw.offer(0, True, (gpa, 32, 1, INDIRECT))
        chain = vq.pop()
        assert chain is not None and (chain.readable_len, chain.writable_len) == (16, 1)

    def test_a_chain_across_the_ring_end_changes_lap(self, guest: Guest) -> None:
        vq, raw = make(guest, 4, last_avail_idx=2, used_idx=2)
        raw.offer(2, True, (BUF, 1, 0, NEXT), (BUF, 1, 0, NEXT), (BUF, 1, 0, NEXT | WRITE),
                  (BUF + 8, 1, 7 % 4, WRITE))
        assert raw.flags[7] & (AVAIL | USED) == USED  # position 0 is in the next lap
        chain = vq.pop()
        assert chain is not None and chain.head == 3 and chain.writable_len == 2
        assert (vq.last_avail_idx, vq.avail_wrap_counter) == (2, False)
        vq.add_used(3, 2)
        vq.flush_used()
        assert raw.read_desc(2)[1:] == (2, 3, used(True) | WRITE)
        assert (vq.used_idx, vq.used_wrap_counter) == (2, False)

    def test_zero_length_descriptors_are_skipped(self, guest: Guest) -> None:
        vq, raw = make(guest)
        raw.offer(0, True, (BUF, 16, 0, NEXT), (0xDEAD_BEEF_0000, 0, 0, NEXT | WRITE),
                  (BUF + 0x400, 1, 0, WRITE))
        chain = vq.pop()
        assert chain is not None and len(chain.writable) == 1 and chain.writable_len == 1

    def test_a_chain_as_long_as_the_queue(self, guest: Guest) -> None:
        vq, raw = make(guest)
        raw.offer(0, True, *[(BUF + i, 1, 1, NEXT if i < NUM - 1 else 0) for i in range(NUM)])
        chain = vq.pop()
        assert chain is not None and chain.readable_len == NUM
        assert (vq.last_avail_idx, vq.avail_wrap_counter) == (0, False)


@pytest.mark.parametrize("bits", [0, USED, AVAIL | USED, used(False)])
def test_bits_that_contradict_the_wrap_counter_are_not_available(guest: Guest, bits: int) -> None:
    """Not an error: the descriptor is simply not the driver's to give yet."""
    vq, raw = make(guest)
    raw.write_desc(0, BUF, 16, 1, bits)
    assert vq.pop() is None and vq.pop_batch(8)[1] == [] and not vq.avail_pending()
    assert vq.avail_backlog() == 0 and vq.last_avail_idx == 0


def test_in_the_second_lap_the_old_bits_are_not_available(guest: Guest) -> None:
    vq, raw = make(guest, 2)
    raw.offer(0, True, (BUF, 1, 0, 0))
    raw.offer(1, True, (BUF, 1, 1, 0))
    assert len(vq.pop_batch(4)[1]) == 2
    assert vq.pop() is None  # position 0 still says "available in lap 1": stale, not new
    vq.add_used_batch([1, 0, 0, 0])
    vq.flush_used()
    raw.offer(0, False, (BUF, 1, 1, 0))  # the driver's second lap
    chain = vq.pop()
    assert chain is not None and chain.head == 1


def set_up_chain(*descs: tuple[int, int, int, int]) -> Callable[[Guest, PackedRawRing], int]:
    """A BAD_CHAINS builder offering ``descs`` at position 0; returns how many it spans."""
    def build(guest: Guest, raw: PackedRawRing) -> int:
        raw.offer(0, True, *descs)
        return len(descs)
    return build


def indirect_chain(length: int, *entries: tuple[int, int, int, int],
                   extra: int = 0) -> Callable[[Guest, PackedRawRing], int]:
    def build(guest: Guest, raw: PackedRawRing) -> int:
        gpa = table(guest, *entries) if entries else BUF
        raw.offer(0, True, (gpa, length, ID, INDIRECT | extra))
        return 1
    return build


def never_ends(guest: Guest, raw: PackedRawRing) -> int:
    raw.offer(0, True, *[(BUF, 1, ID, NEXT)] * NUM)
    return NUM


def runs_off(guest: Guest, raw: PackedRawRing) -> int:
    raw.offer(0, True, (BUF, 1, ID, NEXT), (BUF, 1, ID, NEXT))
    raw.write_desc(2, BUF, 1, ID, USED)  # written for lap 0: not available in lap 1
    return 2


def nested(guest: Guest, raw: PackedRawRing) -> int:
    inner = table(guest, (BUF, 1, 0, 0))
    raw.offer(0, True, (table(guest, (BUF, 1, 0, 0), (inner, 16, 0, INDIRECT)), 32, ID, INDIRECT))
    return 1


BAD_CHAINS: dict[str, tuple[Callable[[Guest, PackedRawRing], int], str]] = {
    "address outside memory": (
        set_up_chain((REGION_GPA + REGION_SIZE - 8, 16, ID, 0)),
        "descriptor at position 0: buffer: gpa .* not inside one guest memory region"),
    "address wraps 64 bits": (
        set_up_chain(((1 << 64) - 8, 16, ID, WRITE)), "not inside one guest memory region"),
    "readable after writable": (
        set_up_chain((BUF, 16, ID, NEXT), (BUF + 0x100, 512, ID, NEXT | WRITE),
                     (BUF + 0x400, 1, ID, 0)),
        "position 2: device-readable descriptor after a device-writable one"),
    "readable after an empty writable one": (
        set_up_chain((BUF, 0, ID, NEXT | WRITE), (BUF, 16, ID, 0)),
        "device-readable descriptor after a device-writable one"),
    "lengths summing past 2^32": (
        set_up_chain((BUF, 0xFFFF_FFFF, ID, NEXT), (BUF, 1, ID, WRITE)),
        "lengths sum to 4294967296, past 2"),
    "chain never ends": (never_ends, "never ends: all 8 descriptors of the ring have NEXT"),
    "chain runs off the available descriptors": (
        runs_off, "runs off the available descriptors: descriptor at position 2 is not available"),
    "INDIRECT with NEXT": (
        set_up_chain((BUF, 16, ID, INDIRECT | NEXT), (BUF, 1, ID, 0)),
        "position 0 has both INDIRECT and NEXT"),
    "INDIRECT at the end of a chain": (
        set_up_chain((BUF, 1, ID, NEXT), (BUF, 16, ID, INDIRECT)),
        "INDIRECT descriptor at position 1 ends a chain of 2 descriptors"),
    "indirect inside indirect": (nested, "INDIRECT descriptor inside the indirect table"),
    "indirect length not a multiple of 16": (
        indirect_chain(24, (BUF, 1, 0, 0), (BUF, 1, 0, 0)), "not a non-zero multiple of 16"),
    "indirect length zero": (indirect_chain(0, (BUF, 1, 0, 0)), "not a non-zero multiple of 16"),
    "indirect table larger than the queue": (
        indirect_chain(16 * (NUM + 1)), "indirect table of 9 entries exceeds 8"),
    "indirect table outside memory": (
        lambda g, raw: set_up_chain((REGION_GPA + REGION_SIZE - 16, 32, ID, INDIRECT))(g, raw),
        "indirect table: gpa"),
    "indirect lengths summing past 2^32": (
        indirect_chain(32, (BUF, 0x8000_0000, 0, 0), (BUF, 0x8000_0000, 0, WRITE)),
        "lengths sum to 4294967296"),
    "buffer outside memory in an indirect table": (
        indirect_chain(16, (1 << 40, 1, 0, WRITE)), "indirect entry 0: buffer: gpa 0x10000000000"),
    "writable before readable in an indirect table": (
        indirect_chain(32, (BUF, 1, 0, WRITE), (BUF, 1, 0, 0)),
        "indirect entry 1: device-readable descriptor after a device-writable one"),
}


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("case", list(BAD_CHAINS))
def test_a_bad_chain_is_consumed_reported_and_the_queue_goes_on(
    guest: Guest, case: str, batch: bool
) -> None:
    vq, raw = make(guest)
    build, message = BAD_CHAINS[case]
    spans = build(guest, raw)
    if batch:
        _view, [error] = vq.pop_batch(1)
        assert isinstance(error, PackedChainError)
    else:
        with pytest.raises(ChainError) as info:
            vq.pop()
        error = info.value
    assert isinstance(error, PackedChainError)
    assert error.head == ID and error.position == 0
    assert f"chain at ring position 0 (buffer id {ID}): " in str(error)
    assert re.search(message, str(error)), str(error)
    # Consumed whole: the next chain is looked for after it.
    assert (vq.last_avail_idx, vq.avail_wrap_counter) == (spans % NUM, spans < NUM)
    vq.add_used(ID, 0)  # answered, as the spec wants
    vq.flush_used()
    assert raw.read_desc(0)[1:] == (0, ID, used(True))
    assert (vq.used_idx, vq.used_wrap_counter) == (spans % NUM, spans < NUM)
    if spans < NUM:
        raw.write_desc(spans, 0, 0, 0, 0)  # what the hostile builder left past the chain
    assert_serves_next_good_chain(vq, raw)


@pytest.mark.parametrize(
    ("bid", "message"),
    [(NUM, "buffer id 8 is outside the queue \\(size 8\\)"),
     (0xFFFF, "buffer id 65535 is outside the queue")],
)
def test_a_buffer_id_out_of_range_cannot_be_answered(guest: Guest, bid: int, message: str) -> None:
    vq, raw = make(guest)
    raw.offer(0, True, (BUF, 16, bid, 0))
    with pytest.raises(PackedChainError, match=message) as info:
        vq.pop()
    assert info.value.head is None and "an id that cannot be answered" in str(info.value)
    assert vq.last_avail_idx == 1
    with pytest.raises(ValueError, match="not all in flight"):
        vq.add_used(bid, 0)
    assert_serves_next_good_chain(vq, raw)


def test_an_id_already_in_flight_cannot_be_answered(guest: Guest) -> None:
    vq, raw = make(guest)
    pos, wrap = raw.offer(0, True, (BUF, 16, 3, 0))
    raw.offer(pos, wrap, (1 << 40, 16, 3, 0))  # the same id again, and a bad address too
    _view, (chain, error) = vq.pop_batch(4)
    assert isinstance(chain, DescriptorChain) and chain.head == 3
    assert isinstance(error, PackedChainError) and error.head is None
    assert "buffer id 3 is already in flight; descriptor at position 1: buffer" in str(error)
    vq.add_used(3, 0)  # the first one is answered as usual
    vq.flush_used()
    assert raw.read_desc(0)[2:] == (3, used(True))


def test_more_descriptors_than_the_ring_holds_break_it(guest: Guest) -> None:
    """A driver that offers a position the device has not answered yet: the device would
    have to write a used descriptor over one it has not read.  The ring is unusable."""
    vq, raw = make(guest, 4)
    pos, wrap = 0, True
    for bid in range(4):
        pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
    _view, items = vq.pop_batch(8)
    assert [item.head for item in items if isinstance(item, DescriptorChain)] == [0, 1, 2, 3]
    raw.offer(pos, wrap, (BUF, 1, 0, 0))  # lap 2 before anything came back
    with pytest.raises(RingError, match="more than the queue size 4 in flight"):
        vq.pop_batch(8)
    assert vq.broken
    with pytest.raises(RingError, match="broken"):
        vq.pop()


def test_construction_checks_the_ring(guest: Guest) -> None:
    mem = guest.memory
    inside = REGION_GPA + 0x1000
    end = REGION_GPA + REGION_SIZE
    with pytest.raises(RingError, match="not in guest memory"):
        PackedDeviceVirtqueue(mem, VringAddrs(256, end - 2048, inside, inside + 4),
                              event_idx=False)
    with pytest.raises(RingError, match="not in guest memory"):
        PackedDeviceVirtqueue(mem, VringAddrs(8, inside, inside + 256, end),
                              event_idx=False)
    with pytest.raises(RingError, match=r"descriptor ring .* not 16-byte aligned"):
        PackedDeviceVirtqueue(mem, VringAddrs(8, inside + 8, inside + 256, inside + 512),
                              event_idx=True)
    with pytest.raises(RingError, match=r"device event suppression .* not 4-byte aligned"):
        PackedDeviceVirtqueue(mem, VringAddrs(8, inside, inside + 256, inside + 514),
                              event_idx=True)
    for bad in (0, 32769):
        with pytest.raises(RingError, match=r"not in 1\.\.32768"):
            PackedDeviceVirtqueue(mem, VringAddrs(bad, inside, inside, inside), event_idx=True)
    ok = VringAddrs(6, inside, inside + 256, inside + 512)  # not a power of two: fine
    PackedDeviceVirtqueue(mem, ok, event_idx=True)
    with pytest.raises(RingError, match="positions 6, 0 are not in a ring of 6"):
        PackedDeviceVirtqueue(mem, ok, event_idx=True, last_avail_idx=6)
    with pytest.raises(RingError, match="not within a lap behind"):
        PackedDeviceVirtqueue(mem, ok, event_idx=True, last_avail_idx=1, used_idx=2)
    with pytest.raises(RingError, match="not within a lap behind"):
        PackedDeviceVirtqueue(mem, ok, event_idx=True, last_avail_idx=3, used_idx=2,
                              avail_wrap_counter=False)


def test_vring_base_encoding() -> None:
    fresh = PackedRingBase(0, True, 0, True)
    assert encode_vring_base(fresh) == 0x8000_8000
    base = PackedRingBase(5, False, 32767, True)
    assert encode_vring_base(base) == 5 | 32767 << 16 | 1 << 31
    assert decode_vring_base(encode_vring_base(base)) == base
    assert decode_vring_base(0x8000_8000) == fresh
    with pytest.raises(ValueError, match="not a 15-bit ring position"):
        encode_vring_base(PackedRingBase(32768, True, 0, True))
    with pytest.raises(ValueError, match="not a 32-bit value"):
        decode_vring_base(1 << 32)


def test_resuming_at_a_saved_ring_base(guest: Guest) -> None:
    """GET_VRING_BASE of one queue starts the next where it stopped, wrap counters too."""
    addrs = packed_layout.allocate(guest.allocator, 4)
    raw = PackedRawRing(guest, addrs)
    first = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=False)
    pos, wrap = 0, True
    for bid in range(3):
        pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
    assert len(first.pop_batch(8)[1]) == 3
    first.add_used_batch([2, 0, 0, 0, 1, 0])
    first.flush_used()
    base = first.vring_base
    assert decode_vring_base(base) == PackedRingBase(3, True, 3, True)
    second = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=False,
                                   **decode_vring_base(base)._asdict())
    for bid in (3, 0):
        pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
    _view, items = second.pop_batch(8)
    assert [item.head for item in items if isinstance(item, DescriptorChain)] == [3, 0]
    second.add_used_batch([0, 1, 3, 1])
    second.flush_used()
    assert raw.read_desc(3)[2:] == (0, used(True) | WRITE)
    assert raw.read_desc(0)[2:] == (3, used(False) | WRITE)
    assert decode_vring_base(second.vring_base) == PackedRingBase(1, False, 1, False)


def test_used_descriptors_are_written_as_the_spec_says(guest: Guest) -> None:
    vq, raw = make(guest, 9)
    pos, wrap = 0, True
    for bid in (0, 1, 2):
        pos, wrap = raw.offer(pos, wrap, *request(bid))
    assert len(vq.pop_batch(8)[1]) == 3
    vq.add_used_batch([2, 513, 0, 0])
    assert vq.used_idx == 6  # each answer covers its chain's three descriptors
    # Written but for the flags: the driver sees nothing yet.
    assert raw.read_desc(0)[1:] == (513, 2, NEXT | avail(True))
    assert raw.read_desc(3)[1:] == (0, 0, NEXT | avail(True))
    vq.flush_used()
    assert raw.read_desc(0)[1:] == (513, 2, used(True) | WRITE)  # WRITE: data was written
    assert raw.read_desc(3)[1:] == (0, 0, used(True))
    vq.add_used(1, 1)
    vq.flush_used()
    assert raw.read_desc(6)[1:] == (1, 1, used(True) | WRITE)
    assert (vq.used_idx, vq.used_wrap_counter) == (0, False)


class _Recorder:
    """Stands in for the ring's 16-bit view and the barrier, recording what is stored."""

    def __init__(self, inner: memoryview, log: list[tuple[str, int, int]]) -> None:
        self.inner = inner
        self.log = log

    def __getitem__(self, index: int) -> int:
        return int(self.inner[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.log.append(("store", index, value))
        self.inner[index] = value


def test_flush_stores_the_first_flags_last_after_a_barrier(guest: Guest) -> None:
    vq, raw = make(guest)
    pos, wrap = 0, True
    for bid in (0, 1, 2):
        pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
    vq.pop_batch(8)
    log: list[tuple[str, int, int]] = []
    vq._desc_h = _Recorder(vq._desc_h, log)  # type: ignore[assignment]
    vq._barrier = lambda: log.append(("barrier", 0, 0))  # type: ignore[assignment,method-assign]
    vq.add_used_batch([1, 0, 2, 0, 0, 0])
    assert all(slot % 8 == 6 for _, slot, _ in log)  # ids only: no flags before the flush
    del log[:]
    vq.flush_used()
    flags = used(True)
    assert log == [("store", 15, flags), ("store", 23, flags), ("barrier", 0, 0),
                   ("store", 7, flags)]


class TestNotifications:
    def test_without_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest)
        assert raw.device_event[1] == RING_EVENT_FLAGS_ENABLE
        pos, wrap = 0, True
        for bid in (0, 1):
            pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
        vq.pop_batch(4)
        assert vq.needs_notification() is False  # nothing published
        vq.add_used(0, 1)
        assert vq.needs_notification() is False  # added but not flushed
        vq.flush_used()
        assert vq.needs_notification() is True
        assert vq.needs_notification() is False  # already decided for these
        raw.driver_event[1] = RING_EVENT_FLAGS_DISABLE
        vq.add_used(1, 1)
        vq.flush_used()
        assert vq.needs_notification() is False

    def test_with_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest, 4, event_idx=True)
        raw.driver_event[1] = RING_EVENT_FLAGS_DESC
        pos, wrap = 0, True
        for bid in range(4):
            pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
        vq.pop_batch(8)
        vq.add_used(0, 1)
        vq.flush_used()
        assert vq.needs_notification() is True  # first decision: no history, signal
        raw.driver_event[0] = 3 | 1 << 15  # interrupt once position 3 of lap 1 is used
        vq.add_used(1, 1)
        vq.add_used(2, 1)
        vq.flush_used()
        assert vq.needs_notification() is False  # published positions 1, 2
        vq.add_used(3, 1)
        vq.flush_used()
        assert vq.needs_notification() is True  # position 3
        for bid in range(2):
            pos, wrap = raw.offer(pos, wrap, (BUF, 1, bid, 0))
        vq.pop_batch(8)
        raw.driver_event[0] = 1  # position 1 of lap 0 (the second lap)
        vq.add_used(0, 1)
        vq.flush_used()
        assert vq.needs_notification() is False
        vq.add_used(1, 1)
        vq.flush_used()
        assert vq.needs_notification() is True
        raw.driver_event[1] = RING_EVENT_FLAGS_ENABLE  # the driver is back to every one

    def test_an_event_in_the_previous_lap_has_passed(self, guest: Guest) -> None:
        vq, raw = make(guest, 4, event_idx=True, last_avail_idx=3, used_idx=3)
        raw.driver_event[1] = RING_EVENT_FLAGS_DESC
        pos, wrap = raw.offer(3, True, (BUF, 1, 0, 0))
        raw.offer(pos, wrap, (BUF, 1, 1, 0))
        vq.pop_batch(8)
        vq.add_used(0, 1)
        vq.flush_used()
        assert vq.needs_notification()  # the first decision
        raw.driver_event[0] = 3 | 1 << 15  # lap 1, position 3: just used
        vq.add_used(1, 1)  # position 0 of lap 0
        vq.flush_used()
        assert vq.needs_notification() is False

    def test_suppressing_kicks(self, guest: Guest) -> None:
        vq, raw = make(guest, event_idx=False)
        vq.disable_notifications()
        assert raw.device_event[1] == RING_EVENT_FLAGS_DISABLE
        assert vq.enable_notifications() is False
        assert raw.device_event[1] == RING_EVENT_FLAGS_ENABLE
        raw.offer(0, True, (BUF, 1, 0, 0))
        assert vq.enable_notifications() is True  # pop before sleeping

    def test_suppressing_kicks_with_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest, event_idx=True)
        assert list(raw.device_event) == [1 << 15, RING_EVENT_FLAGS_DESC]  # position 0, lap 1
        pos, wrap = raw.offer(0, True, *request(0))
        assert vq.pop() is not None
        assert raw.device_event[0] == 3 | 1 << 15  # pop keeps asking for the next one
        vq.disable_notifications()
        assert raw.device_event[1] == RING_EVENT_FLAGS_DISABLE
        raw.offer(pos, wrap, (BUF, 1, 1, 0))
        assert vq.pop() is not None
        assert raw.device_event[0] == 3 | 1 << 15  # not while disabled
        assert vq.enable_notifications() is False
        assert list(raw.device_event) == [4 | 1 << 15, RING_EVENT_FLAGS_DESC]


def test_avail_backlog_counts_chains(guest: Guest) -> None:
    vq, raw = make(guest)
    pos, wrap = raw.offer(0, True, *request(0))
    pos, wrap = raw.offer(pos, wrap, (BUF, 1, 1, 0))
    assert vq.avail_backlog() == 2
    raw.write_desc(pos, BUF, 1, 2, NEXT | avail(True))  # a chain's body, its head not yet
    assert vq.avail_backlog() == 2


def test_add_used_checks_its_arguments(guest: Guest) -> None:
    vq, raw = make(guest)
    raw.offer(0, True, (BUF, 1, 1, 0))
    vq.pop()
    for bad, message in (([0, 0], "not all in flight"), ([NUM, 0], "not all in flight"),
                         ([-1, 0], "not all in flight"), ([1, 1 << 32], "32-bit"),
                         ([1, 0, 1, 0], "twice")):
        with pytest.raises(ValueError, match=message):
            vq.add_used_batch(bad)
    assert vq.used_idx == 0  # nothing half-written
    vq.add_used_batch([])
    vq.add_used(1, 0)
    assert vq.used_idx == 1


# --------------------------------------------------------------------------- hostile rings
# A hostile ring is checked against an oracle: a reference reading of the packed chain
# rules (as the ``packed_device`` docstrings state them), applied to a snapshot of guest
# memory.  The device pops everything (``pop`` one by one, or ``pop_batch``), fills every
# writable buffer it was given, answers each chain it can with what it wrote (0 for a
# malformed one) and publishes.  Then: every chain is found where the oracle finds it,
# consumed as far as the oracle says, with the oracle's id and buffers (or refused when
# the oracle refuses it); the used descriptors are where the spec puts them; and no byte
# changed outside the writable buffers, the used descriptors' fields and our event
# suppression structure.

FUZZ_SIZE = 1 << 16
ADJACENT = 1 << 12  # a second region right after the first: a buffer may not span both
FILL = 0xA5
U32 = 0xFFFF_FFFF
Buffers = list[tuple[int, int]]
"""(gpa, length) of each non-empty buffer, in order."""
Served = tuple[int, int, int | None, tuple[Buffers, Buffers] | None]
"""(position, descriptors consumed, answerable id or None, buffers or None if malformed)."""


def available(flags: int, wrap: bool) -> bool:
    return bool(flags & AVAIL) == wrap and bool(flags & USED) != wrap


class PackedOracle:
    """What the packed chain rules make of a ring in a snapshot of guest memory."""

    def __init__(self, memory: object, addrs: VringAddrs, max_indirect: int) -> None:
        from virtblk.virtio.memory import GuestMemory
        assert isinstance(memory, GuestMemory)
        self.regions = [(r.guest_phys_addr, bytes(r.view)) for r in memory.regions]
        self.num = addrs.num
        ring = self.read(addrs.desc, 16 * addrs.num)
        assert ring is not None
        self.ring = [PDESC.unpack_from(ring, 16 * i) for i in range(addrs.num)]
        self.max_indirect = max_indirect

    def read(self, gpa: int, length: int) -> bytes | None:
        for base, data in self.regions:
            if base <= gpa and gpa + length <= base + len(data):
                return data[gpa - base : gpa - base + length]
        return None

    def serve(self, pos: int, wrap: bool,
              outstanding: int) -> tuple[list[Served], bool, tuple[int, bool]]:
        """Every chain from ``pos`` in ring order, whether the ring then broke (more
        descriptors in flight than it holds), and the position and wrap after them."""
        num = self.num
        in_flight: set[int] = set()
        served: list[Served] = []
        while available(self.ring[pos][3], wrap):
            entries = []
            p, w, whole = pos, wrap, True
            while True:
                entries.append(self.ring[p])
                p, w = (p + 1, w) if p + 1 < num else (0, not w)
                if not entries[-1][3] & NEXT:
                    break
                if len(entries) == num or not available(self.ring[p][3], w):
                    whole = False
                    break
            if outstanding + len(entries) > num:
                return served, True, (pos, wrap)
            outstanding += len(entries)
            bid = entries[-1][2]
            answerable = bid < num and bid not in in_flight
            if answerable:
                in_flight.add(bid)
            # A chain whose id cannot be answered is refused, however good its buffers.
            buffers = self.buffers(entries) if whole and answerable else None
            served.append((pos, len(entries), bid if answerable else None, buffers))
            pos, wrap = p, w
        return served, False, (pos, wrap)

    def buffers(self, entries: list[tuple[int, int, int, int]]) -> tuple[Buffers, Buffers] | None:
        if len(entries) == 1 and entries[0][3] & INDIRECT:
            addr, length, _, _ = entries[0]
            if not length or length % 16 or length // 16 > self.max_indirect:
                return None
            raw = self.read(addr, length)
            if raw is None:
                return None
            descs = [PDESC.unpack_from(raw, 16 * i) for i in range(length // 16)]
            if any(flags & INDIRECT for _, _, _, flags in descs):
                return None
        else:
            descs = entries
            if any(flags & INDIRECT for _, _, _, flags in descs):
                return None
        if sum(length for _, length, _, _ in descs) > U32:
            return None
        readable: Buffers = []
        writable: Buffers = []
        seen_write = False
        for addr, length, _, flags in descs:
            if not flags & WRITE and seen_write:
                return None
            seen_write = seen_write or bool(flags & WRITE)
            if length:
                if self.read(addr, length) is None:
                    return None
                (writable if flags & WRITE else readable).append((addr, length))
        return readable, writable


def gpas(memory: object, views: list[memoryview]) -> Buffers:
    from virtblk.virtio.memory import GuestMemory
    assert isinstance(memory, GuestMemory)
    out: Buffers = []
    for view in views:
        gpa = memory.guest_address_of(view)
        assert gpa is not None, "a buffer outside guest memory"
        out.append((gpa, len(view)))
    return out


Popped = tuple[int | None, tuple[Buffers, Buffers] | None, list[memoryview]]


def pop_everything(vq: PackedDeviceVirtqueue, batch: bool) -> tuple[list[Popped], bool]:
    """Every chain available, in ring order, and whether the ring broke."""
    out: list[Popped] = []
    memory = vq.memory
    if batch:
        try:
            view, items = vq.pop_batch(vq.num + 1)
        except RingError:
            return out, True
        for item in items:
            if isinstance(item, Triple):
                item = item.chain(view)
            if isinstance(item, ChainError):
                out.append((item.head, None, []))
            else:
                out.append((item.head, (gpas(memory, item.readable),
                                        gpas(memory, item.writable)), item.writable))
        try:
            assert vq.pop_batch(vq.num)[1] == []  # one batch took it all
        except RingError:
            return out, True
        return out, False
    for _ in range(vq.num + 1):
        try:
            chain = vq.pop()
        except ChainError as exc:
            out.append((exc.head, None, []))
            continue
        except RingError:
            return out, True
        if chain is None:
            return out, False
        assert chain.readable_len == sum(len(b) for b in chain.readable)
        assert chain.writable_len == sum(len(b) for b in chain.writable)
        out.append((chain.head, (gpas(memory, chain.readable), gpas(memory, chain.writable)),
                    chain.writable))
    raise AssertionError(f"pop gave more than the queue size ({vq.num}) of chains")


def check_against_oracle(guest: Guest, addrs: VringAddrs, *, event_idx: bool, pos: int,
                         wrap: bool, behind: int) -> None:
    """Serve the ring once with ``pop`` and once (from the same memory) with ``pop_batch``
    from avail position ``pos``/``wrap``, the used position ``behind`` descriptors back."""
    num = addrs.num
    used_pos = (pos - behind) % num
    used_wrap = wrap if pos >= behind else not wrap
    regions = guest.memory.regions
    snapshot = [bytes(r.view) for r in regions]
    oracle = PackedOracle(guest.memory, addrs, max_indirect=num)
    served, breaks, end = oracle.serve(pos, wrap, behind)
    for batch in (False, True):
        for region, data in zip(regions, snapshot, strict=True):
            region.view[:] = data
        vq = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=event_idx, last_avail_idx=pos,
                                   avail_wrap_counter=wrap, used_idx=used_pos,
                                   used_wrap_counter=used_wrap)
        popped, broke = pop_everything(vq, batch)
        assert broke == breaks, "the ring broke where the oracle serves it, or the reverse"
        assert len(popped) == len(served), "a chain was skipped, split or taken twice"
        assert (vq.last_avail_idx, vq.avail_wrap_counter) == end, "consumed another extent"
        allowed = [(addrs.used, 4)]  # our event suppression structure
        answers: list[tuple[int, int, int]] = []  # id, length, descriptors covered
        for (_, count, bid, buffers), (head, got, views) in zip(served, popped, strict=True):
            assert head == bid, f"id {head}, the oracle says {bid}"
            assert got == buffers, "other buffers, or a malformed chain accepted or refused"
            if bid is None:
                continue
            if got is None:
                answers.append((bid, 0, count))
                continue
            allowed += got[1]
            for view in views:
                view[:] = bytes([FILL]) * len(view)
            answers.append((bid, sum(length for _, length in got[1]), count))
        for bid, length, _ in answers:
            vq.add_used(bid, length)
        vq.flush_used()
        raw = PackedRawRing(guest, addrs)
        q, w = used_pos, used_wrap
        for bid, length, count in answers:
            assert raw.read_desc(q)[1:] == (length, bid, used(w) | (WRITE if length else 0))
            allowed.append((addrs.desc + 16 * q + 8, 8))
            q, w = (q + count, w) if q + count < num else (q + count - num, not w)
        assert (vq.used_idx, vq.used_wrap_counter) == (q, w)
        for region, before in zip(regions, snapshot, strict=True):
            after = bytes(region.view)
            base = region.guest_phys_addr
            for offset in (i for i in range(len(after)) if after[i] != before[i]):
                gpa = base + offset
                assert any(a <= gpa < a + n for a, n in allowed), (
                    f"byte at {gpa:#x} changed outside the writable buffers and used fields")


TABLE_GPA = REGION_GPA + 0x2000  # indirect tables live at TABLE_GPA + 0x200 * k
BUFS = REGION_GPA + 0x4000
END = REGION_GPA + FUZZ_SIZE  # where the first region ends and the adjacent one starts
ADDRESSES = st.one_of(
    st.integers(BUFS, BUFS + 0x4000),
    st.sampled_from([END - 16, END, END + ADJACENT - 8, END + ADJACENT, REGION_GPA - 8,
                     REGION_GPA]),
    st.sampled_from([TABLE_GPA + 0x200 * k for k in range(3)]),
    st.integers(0, (1 << 64) - 1),
)
LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 4096, 0x8000_0000]),
                    st.integers(0, U32))
SPANS = st.one_of(  # (addr, len)
    st.tuples(ADDRESSES, LENGTHS),
    st.integers(1, 64).map(lambda n: (END - n, n)),  # ends exactly at the region's end
    st.integers(2, 64).map(lambda n: (END - n + 1, n)),  # one byte into the next region
    st.integers(1, 64).map(lambda n: (END, n)),  # inside the adjacent region
)
BITS = st.sampled_from([AVAIL, USED, AVAIL | USED, 0])
FLAGS = st.builds(lambda base, bits: base | bits,
                  st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT,
                                   INDIRECT | WRITE]) | st.integers(0, 0xFFFF),
                  BITS | st.just(0))
IDS = st.integers(0, 3) | st.integers(0, 20) | st.integers(0, 0xFFFF)
DESCS = st.builds(lambda span, bid, flags: (*span, bid, flags), SPANS, IDS, FLAGS)
IN_BUFS = st.integers(BUFS, BUFS + 0x4000)
REQUEST_TABLE = st.builds(  # the shape pop_batch reads at once: header, data, status
    lambda a0, data, w, status: [(a0, 16, 0, 0), (*data, 0, WRITE if w else 0),
                                 (*status, 0, WRITE)],
    IN_BUFS, st.tuples(IN_BUFS, st.sampled_from([512, 4096])) | SPANS, st.booleans(),
    st.tuples(IN_BUFS, st.just(1)) | SPANS,
)
TABLES = st.lists(REQUEST_TABLE | st.lists(DESCS, min_size=1, max_size=8), max_size=3)
LAP_BITS = st.none() | st.none() | st.sampled_from([AVAIL, USED, AVAIL | USED, 0])
"""None: the AVAIL/USED bits that make the descriptor available in the lap it falls in."""
BASE_FLAGS = (st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT,
                               INDIRECT | WRITE])
              | st.integers(0, 0xFFFF).map(lambda f: f & ~(AVAIL | USED)))
RING = st.lists(st.tuples(st.just("desc"), SPANS, IDS, BASE_FLAGS, LAP_BITS)
                | st.tuples(st.just("table"), st.integers(0, 2), IDS, LAP_BITS), max_size=16)
"""Ring descriptors from the start position on: ``("table", k, ...)`` is the whole indirect
table k."""


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 3, 4, 8, 16]),
    event_idx=st.booleans(),
    start=st.integers(0, 15),
    wrap=st.booleans(),
    behind=st.just(0) | st.integers(0, 16),
    noise=st.binary(max_size=16 * 16 + 8),
    descs=RING,
    tables=TABLES,
)
def test_a_hostile_ring_is_served_as_the_oracle_says(
    num: int, event_idx: bool, start: int, wrap: bool, behind: int, noise: bytes,
    descs: list[tuple[object, ...]], tables: list[list[tuple[int, int, int, int]]],
) -> None:
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA, adjacent=ADJACENT) as g:
        addrs = packed_layout.allocate(g.allocator, num)
        assert addrs.desc == REGION_GPA
        raw = PackedRawRing(g, addrs)
        area = g.memory.view(addrs.desc, min(len(noise), 16 * num + 8))
        area[:] = noise[: len(area)]  # noise over the ring and both event structures
        pos = start % num
        for i, item in enumerate(descs[:num]):
            bits = item[-1]
            if bits is None:
                bits = avail(wrap if pos + i < num else not wrap)
            if item[0] == "table":
                _, k, bid, _ = item
                k = k % len(tables) if tables else 0
                size = 16 * len(tables[k]) if tables else 16
                desc = (TABLE_GPA + 0x200 * k, size, bid, INDIRECT)
            else:
                _, (addr, length), bid, flags, _ = item
                desc = (addr, length, bid, flags)
            raw.write_desc((pos + i) % num, *desc[:3], desc[3] | bits)  # type: ignore[operator]
        for k, entries in enumerate(tables):
            view = g.memory.view(TABLE_GPA + 0x200 * k, 16 * len(entries))
            for i, entry in enumerate(entries):
                PDESC.pack_into(view, 16 * i, *entry)
        check_against_oracle(g, addrs, event_idx=event_idx, pos=pos, wrap=wrap,
                             behind=min(behind, num))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise=st.binary(min_size=16 * 8 + 8, max_size=16 * 8 + 8), event_idx=st.booleans(),
       wrap=st.booleans())
def test_random_bytes_over_the_whole_ring_are_served_as_the_oracle_says(
    noise: bytes, event_idx: bool, wrap: bool
) -> None:
    with Guest(size=1 << 12, gpa=0) as g:
        addrs = VringAddrs(8, desc=0, avail=128, used=132)  # ring and structures at gpa 0
        g.memory.view(0, len(noise))[:] = noise
        check_against_oracle(g, addrs, event_idx=event_idx, pos=0, wrap=wrap, behind=0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num=st.sampled_from([2, 3, 8]), chains=st.lists(
    st.lists(st.tuples(SPANS, st.sampled_from([0, WRITE])), min_size=1, max_size=4),
    min_size=1, max_size=8))
def test_well_formed_rings_with_any_buffers(
    num: int, chains: list[list[tuple[tuple[int, int], int]]]
) -> None:
    """Rings a correct driver would write (every chain available, in its lap), with
    buffers anywhere: the oracle decides which chains are malformed."""
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA, adjacent=ADJACENT) as g:
        addrs = packed_layout.allocate(g.allocator, num)
        raw = PackedRawRing(g, addrs)
        pos, wrap, used_descs = 0, True, 0
        for bid, buffers in enumerate(chains):
            if used_descs + len(buffers) > num:
                break
            descs = [(addr, length, bid, flags | (NEXT if k + 1 < len(buffers) else 0))
                     for k, ((addr, length), flags) in enumerate(buffers)]
            pos, wrap = raw.offer(pos, wrap, *descs)
            used_descs += len(buffers)
        check_against_oracle(g, addrs, event_idx=False, pos=0, wrap=True, behind=0)


near_shape_entry = st.tuples(
    st.sampled_from([BUFS, BUFS + 0x100, END - 8, END, REGION_GPA - 16, 1 << 40]),
    st.sampled_from([0, 1, 8, 16, 512, 4096, 0x8000_0000, U32]),
    st.sampled_from([0, 7, 0xFFFF]),
    st.sampled_from([0, WRITE, NEXT, NEXT | WRITE, INDIRECT, 0x80]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(near_shape_entry, min_size=1, max_size=4),
    head_flags=st.sampled_from([INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
    extra_len=st.sampled_from([0, 0, 0, 8, 16]),
    bid=st.sampled_from([0, 3, NUM]),
)
def test_the_request_fast_path_agrees_with_the_careful_walk(
    entries: list[tuple[int, int, int, int]], head_flags: int, extra_len: int, bid: int
) -> None:
    """``pop_batch`` reads the request shape at once; ``pop`` walks every chain.  Both
    must do what the oracle says (``check_against_oracle`` serves the ring both ways),
    and a chain of exactly the request shape must never miss the fast path."""
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA, adjacent=ADJACENT) as g:
        addrs = packed_layout.allocate(g.allocator, NUM)
        raw = PackedRawRing(g, addrs)
        view = g.memory.view(TABLE_GPA, 16 * len(entries) + 16)
        view[:] = bytes(len(view))
        for i, entry in enumerate(entries):
            PDESC.pack_into(view, 16 * i, *entry)
        raw.offer(0, True, (TABLE_GPA, 16 * len(entries) + extra_len, bid, head_flags))
        shaped = (
            head_flags == INDIRECT and not extra_len and len(entries) == 3 and bid < NUM
            and [flags for _, _, _, flags in entries[::2]] == [0, WRITE]
            and entries[1][3] in (0, WRITE)
            and all(length and addr >= BUFS and addr + length <= END
                    for addr, length, _, _ in entries)
            and sum(length for _, length, _, _ in entries) <= U32)
        vq = PackedDeviceVirtqueue(g.memory, addrs, event_idx=False)
        _view, items = vq.pop_batch(1)
        assert isinstance(items[0], Triple) == shaped
        check_against_oracle(g, addrs, event_idx=False, pos=0, wrap=True, behind=0)
