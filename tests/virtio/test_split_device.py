"""The device end of a split virtqueue, against a hand-played (often hostile) driver."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from virtq_helpers import DESC, REGION_GPA, REGION_SIZE, Guest, RawRing

from virtblk.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from virtblk.virtio.memory import GuestMemory
from virtblk.virtio.split_device import (
    ChainError,
    DescriptorChain,
    DeviceVirtqueue,
    RingError,
    Triple,
)
from virtblk.virtio.split_layout import VringAddrs

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
NUM = 8
BUF = REGION_GPA + 0x8000  # data buffers live here, well inside memory


def make(
    guest: Guest, num: int = NUM, *, event_idx: bool = False, **kw: int
) -> tuple[DeviceVirtqueue, RawRing]:
    addrs = VringAddrs.allocate(guest.allocator, num)
    return DeviceVirtqueue(guest.memory, addrs, event_idx=event_idx, **kw), RawRing(guest, addrs)


def table(guest: Guest, *descs: tuple[int, int, int, int]) -> int:
    """Write an indirect table into guest memory; returns its gpa."""
    gpa = guest.allocator.alloc(16 * len(descs), 16)
    view = guest.memory.view(gpa, 16 * len(descs))
    for i, desc in enumerate(descs):
        view[16 * i : 16 * i + 16] = bytes(16)
        RawRing.write_desc_into(view, i, *desc)
    return gpa


def good_chain(raw: RawRing, head: int) -> None:
    """A virtio-blk shaped request: header, data, status byte, at descriptors head..head+2."""
    raw.write_desc(head, BUF, 16, NEXT, head + 1)
    raw.write_desc(head + 1, BUF + 0x100, 512, NEXT | WRITE, head + 2)
    raw.write_desc(head + 2, BUF + 0x400, 1, WRITE, 0)


def assert_serves_next_good_chain(vq: DeviceVirtqueue, raw: RawRing) -> None:
    good_chain(raw, 4)
    raw.offer(4)
    chain = vq.pop()
    assert chain is not None and chain.head == 4 and chain.writable_len == 513


class TestGoodChains:
    def test_direct_chain(self, guest: Guest) -> None:
        vq, raw = make(guest)
        assert vq.pop() is None
        guest.memory.view(BUF, 16)[:] = b"H" * 16
        good_chain(raw, 0)
        raw.offer(0)
        chain = vq.pop()
        assert isinstance(chain, DescriptorChain)
        assert chain.head == 0 and chain.readable_len == 16 and chain.writable_len == 513
        assert [bytes(b) for b in chain.readable] == [b"H" * 16]
        assert [len(b) for b in chain.writable] == [512, 1]
        chain.writable[1][0] = 0x5A
        assert guest.memory.view(BUF + 0x400, 1)[0] == 0x5A  # zero-copy view into memory
        assert vq.pop() is None and vq.last_avail_idx == 1

    def test_indirect_chain(self, guest: Guest) -> None:
        vq, raw = make(guest)
        gpa = table(guest, (BUF, 16, NEXT, 1), (BUF + 0x100, 4096, NEXT | WRITE, 2),
                    (BUF + 0x2000, 1, WRITE, 0))
        raw.write_desc(3, gpa, 48, INDIRECT | WRITE, 0)  # WRITE on the table itself: ignored
        raw.offer(3)
        chain = vq.pop()
        assert chain is not None and chain.head == 3
        assert (chain.readable_len, chain.writable_len) == (16, 4097)

    def test_direct_descriptors_then_an_indirect_table(self, guest: Guest) -> None:
        vq, raw = make(guest)
        gpa = table(guest, (BUF + 0x100, 512, NEXT | WRITE, 1), (BUF + 0x400, 1, WRITE, 0))
        raw.write_desc(0, BUF, 16, NEXT, 1)
        raw.write_desc(1, gpa, 32, INDIRECT, 0)
        raw.offer(0)
        chain = vq.pop()
        assert chain is not None and (chain.readable_len, chain.writable_len) == (16, 513)

    def test_zero_length_descriptors_are_skipped(self, guest: Guest) -> None:
        vq, raw = make(guest)
        raw.write_desc(0, BUF, 16, NEXT, 1)
        raw.write_desc(1, 0xDEAD_BEEF_0000, 0, NEXT | WRITE, 2)  # no bytes, no address check
        raw.write_desc(2, BUF + 0x400, 1, WRITE, 0)
        raw.offer(0)
        chain = vq.pop()
        assert chain is not None and len(chain.writable) == 1 and chain.writable_len == 1

    def test_chain_as_long_as_the_queue(self, guest: Guest) -> None:
        vq, raw = make(guest)
        for i in range(NUM):
            raw.write_desc(i, BUF + i, 1, NEXT if i < NUM - 1 else 0, i + 1)
        raw.offer(0)
        chain = vq.pop()
        assert chain is not None and chain.readable_len == NUM


BAD_CHAINS = {
    "address outside memory": (
        lambda g, raw: raw.write_desc(0, REGION_GPA + REGION_SIZE - 8, 16),
        "not inside one guest memory region",
    ),
    "address wraps 64 bits": (
        lambda g, raw: raw.write_desc(0, (1 << 64) - 8, 16, WRITE),
        "not inside one guest memory region",
    ),
    "loop": (
        lambda g, raw: (raw.write_desc(0, BUF, 1, NEXT, 1), raw.write_desc(1, BUF, 1, NEXT, 0)),
        "loops or is longer than 8",
    ),
    "next outside the table": (
        lambda g, raw: raw.write_desc(0, BUF, 1, NEXT, NUM),
        "next index 8 is outside the queue",
    ),
    "readable after writable": (
        lambda g, raw: (
            raw.write_desc(0, BUF, 16, NEXT, 1),
            raw.write_desc(1, BUF + 0x100, 512, NEXT | WRITE, 2),
            raw.write_desc(2, BUF + 0x400, 1, 0, 0),  # where the status byte belongs
        ),
        "device-readable descriptor after a device-writable one",
    ),
    "INDIRECT with NEXT": (
        lambda g, raw: raw.write_desc(0, table(g, (BUF, 1, 0, 0)), 16, INDIRECT | NEXT, 1),
        "both INDIRECT and NEXT",
    ),
    "indirect inside indirect": (
        lambda g, raw: raw.write_desc(
            0, table(g, (BUF, 1, NEXT, 1), (table(g, (BUF, 1, 0, 0)), 16, INDIRECT, 0)), 32,
            INDIRECT,
        ),
        "INDIRECT descriptor inside an indirect table",
    ),
    "indirect length not a multiple of 16": (
        lambda g, raw: raw.write_desc(0, table(g, (BUF, 1, 0, 0), (BUF, 1, 0, 0)), 24, INDIRECT),
        "not a non-zero multiple of 16",
    ),
    "indirect length zero": (
        lambda g, raw: raw.write_desc(0, table(g, (BUF, 1, 0, 0)), 0, INDIRECT),
        "not a non-zero multiple of 16",
    ),
    "indirect table outside memory": (
        lambda g, raw: raw.write_desc(0, REGION_GPA + REGION_SIZE - 16, 32, INDIRECT),
        "indirect table: gpa",
    ),
    "indirect table larger than the queue": (
        lambda g, raw: raw.write_desc(0, BUF, 16 * (NUM + 1), INDIRECT),
        "indirect table of 9 entries exceeds 8",
    ),
    "indirect table loop": (
        lambda g, raw: raw.write_desc(
            0, table(g, (BUF, 1, NEXT, 1), (BUF, 1, NEXT, 0)), 32, INDIRECT
        ),
        "indirect table loops",
    ),
    "indirect next outside the table": (
        lambda g, raw: raw.write_desc(0, table(g, (BUF, 1, NEXT, 2), (BUF, 1, 0, 0)), 32, INDIRECT),
        "next index 2 is outside the indirect table",
    ),
    "buffer outside memory inside an indirect table": (
        lambda g, raw: raw.write_desc(0, table(g, (1 << 40, 1, WRITE, 0)), 16, INDIRECT),
        "buffer: gpa 0x10000000000",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHAINS))
def test_a_bad_chain_is_consumed_reported_and_the_queue_goes_on(guest: Guest, case: str) -> None:
    vq, raw = make(guest)
    build, message = BAD_CHAINS[case]
    build(guest, raw)
    raw.offer(0)
    with pytest.raises(ChainError, match=message) as info:
        vq.pop()
    assert info.value.head == 0 and "chain at head 0" in str(info.value)
    assert vq.last_avail_idx == 1  # consumed
    vq.add_used(0, 0)  # and answered, as the spec wants
    vq.flush_used()
    assert raw.used[1] == 1 and raw.used_entries(0, 1) == [(0, 0)]
    assert_serves_next_good_chain(vq, raw)


def test_a_head_outside_the_table_cannot_be_answered(guest: Guest) -> None:
    vq, raw = make(guest)
    raw.offer(NUM + 3)
    with pytest.raises(ChainError, match="head index 11 is outside the queue") as info:
        vq.pop()
    assert info.value.head is None
    assert_serves_next_good_chain(vq, raw)


def test_avail_idx_jumping_past_the_queue_size_breaks_the_ring(guest: Guest) -> None:
    vq, raw = make(guest)
    raw.avail[1] = NUM + 1
    with pytest.raises(RingError, match="9 entries past 0, more than the queue size 8"):
        vq.pop()
    assert vq.broken
    raw.avail[1] = 1  # even a sane index is refused until the queue is recreated
    with pytest.raises(RingError, match="broken"):
        vq.pop()


def test_construction_checks_the_rings(guest: Guest) -> None:
    mem = guest.memory
    inside = REGION_GPA + 0x1000
    end = REGION_GPA + REGION_SIZE
    with pytest.raises(RingError, match="not in guest memory"):
        DeviceVirtqueue(mem, VringAddrs(256, end - 2048, inside, inside + 4096), event_idx=False)
    with pytest.raises(RingError, match="not in guest memory"):
        DeviceVirtqueue(mem, VringAddrs(8, inside, inside + 256, end - 64), event_idx=False)
    with pytest.raises(RingError, match="aligned"):
        DeviceVirtqueue(mem, VringAddrs(8, inside + 8, inside + 256, inside + 512), event_idx=True)
    with pytest.raises(RingError, match="power of two"):
        DeviceVirtqueue(mem, VringAddrs(6, inside, inside + 256, inside + 512), event_idx=True)
    # Without EVENT_IDX the trailing avail_event field need not exist.
    DeviceVirtqueue(mem, VringAddrs(8, inside, inside + 256, end - 68), event_idx=False)
    with pytest.raises(RingError, match="not in guest memory"):
        DeviceVirtqueue(mem, VringAddrs(8, inside, inside + 256, end - 68), event_idx=True)


def test_resuming_at_a_saved_ring_base(guest: Guest) -> None:
    addrs = VringAddrs.allocate(guest.allocator, NUM)
    raw = RawRing(guest, addrs)
    raw.avail[1] = 0xFFFE
    raw.used[1] = 0xFFFE
    vq = DeviceVirtqueue(guest.memory, addrs, event_idx=False, last_avail_idx=0xFFFE,
                         used_idx=0xFFFE)
    for head in (0, 3):
        good_chain(raw, head)
    raw.offer(0, 3)
    assert raw.avail[1] == 0
    heads = [c.head for c in (vq.pop(), vq.pop()) if c is not None]
    assert heads == [0, 3] and vq.last_avail_idx == 0
    for head in heads:
        vq.add_used(head, 1)
    assert vq.used_idx == 0 and raw.used[1] == 0xFFFE  # not yet flushed
    vq.flush_used()
    assert raw.used[1] == 0 and raw.used_entries(0xFFFE, 2) == [(0, 1), (3, 1)]


def test_add_used_checks_its_arguments(guest: Guest) -> None:
    vq, _ = make(guest)
    with pytest.raises(ValueError, match="outside the queue"):
        vq.add_used(NUM, 0)
    with pytest.raises(ValueError, match="32-bit"):
        vq.add_used(0, 1 << 32)


def test_pop_batch_returns_errors_in_place(guest: Guest) -> None:
    vq, raw = make(guest)
    good_chain(raw, 0)
    raw.write_desc(3, BUF, 1, NEXT, 99)
    good_chain(raw, 4)
    raw.offer(0, 3, 4)
    _view, got = vq.pop_batch(8)
    assert [type(x) for x in got] == [DescriptorChain, ChainError, DescriptorChain]
    assert isinstance(got[1], ChainError) and got[1].head == 3


class TestNotifications:
    def test_without_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest)
        assert vq.needs_notification() is False  # nothing published
        vq.add_used(0, 1)
        assert vq.needs_notification() is False  # added but not flushed
        vq.flush_used()
        assert vq.needs_notification() is True
        assert vq.needs_notification() is False  # already decided for these
        raw.avail[0] = VRING_AVAIL_F_NO_INTERRUPT
        vq.add_used(1, 1)
        vq.flush_used()
        assert vq.needs_notification() is False

    def test_with_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest, event_idx=True)
        vq.add_used(0, 1)
        vq.flush_used()
        assert vq.needs_notification() is True  # first decision: no history, signal
        raw.used_event = 3  # the driver wants an interrupt once used idx passes 3
        vq.add_used(1, 1)
        vq.add_used(2, 1)
        vq.flush_used()
        assert vq.needs_notification() is False  # published [1, 3)
        vq.add_used(3, 1)
        vq.flush_used()
        assert vq.needs_notification() is True  # [3, 4) covers 3
        vq.add_used(4, 1)
        vq.flush_used()
        assert vq.needs_notification() is False

    def test_suppressing_kicks_without_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest)
        vq.disable_notifications()
        assert raw.used[0] == VRING_USED_F_NO_NOTIFY
        assert vq.enable_notifications() is False
        assert raw.used[0] == 0
        good_chain(raw, 0)
        raw.offer(0)
        assert vq.enable_notifications() is True  # pop before sleeping

    def test_suppressing_kicks_with_event_idx(self, guest: Guest) -> None:
        vq, raw = make(guest, event_idx=True)
        good_chain(raw, 0)
        good_chain(raw, 4)
        raw.offer(0)
        assert vq.pop() is not None
        assert raw.avail_event == 1  # pop keeps asking for the next entry
        vq.disable_notifications()
        raw.offer(4)
        assert vq.pop() is not None
        assert raw.avail_event == 1  # not while disabled
        assert vq.enable_notifications() is False
        assert raw.avail_event == 2 and raw.used[0] == 0


# --------------------------------------------------------------------------- hostile rings
# A hostile ring is checked against an oracle: a reference reading of the chain rules (as
# the ``split_device`` docstrings state them), applied to a snapshot of guest memory.  A
# device end pops everything (``pop`` one by one, or ``pop_batch``), fills every writable
# buffer it was given, answers each chain with what it wrote (0 for a malformed one) and
# publishes.  Then: every chain offered is answered exactly once, in ring order; each
# chain's buffers are the oracle's; used lengths stay within the writable bytes; and no
# byte changed outside the writable buffers and the used ring.

FUZZ_SIZE = 1 << 16
ADJACENT = 1 << 12  # a second region right after the first: a buffer may not span both
FILL = 0xA5
Buffers = list[tuple[int, int]]
"""(gpa, length) of each non-empty buffer, in order."""


class Oracle:
    """What the chain rules make of a ring in a snapshot of guest memory."""

    def __init__(self, memory: GuestMemory, addrs: VringAddrs, max_indirect: int) -> None:
        self.regions = [(r.guest_phys_addr, bytes(r.view)) for r in memory.regions]
        self.addrs = addrs
        self.max_indirect = max_indirect

    def read(self, gpa: int, length: int) -> bytes | None:
        """The bytes at [gpa, gpa + length) when one region holds all of them."""
        for base, data in self.regions:
            if base <= gpa and gpa + length <= base + len(data):
                return data[gpa - base : gpa - base + length]
        return None

    def offered(self, last_avail: int) -> list[int] | None:
        """The heads the driver published past ``last_avail``; None when the avail index
        is further ahead than the queue size (the ring is unusable)."""
        num = self.addrs.num
        avail = self.read(self.addrs.avail, 4 + 2 * num)
        assert avail is not None
        idx = int.from_bytes(avail[2:4], "little")
        pending = (idx - last_avail) & 0xFFFF
        if pending > num:
            return None
        slots = [(last_avail + k) % num for k in range(pending)]
        return [int.from_bytes(avail[4 + 2 * s : 6 + 2 * s], "little") for s in slots]

    def chain(self, head: int) -> tuple[Buffers, Buffers] | None:
        """(readable, writable) buffers of the chain at ``head``; None when malformed."""
        num = self.addrs.num
        table = self.read(self.addrs.desc, 16 * num)
        assert table is not None
        readable: Buffers = []
        writable: Buffers = []
        limit, index, steps, in_table, seen_write = num, head, 0, False, False
        while True:
            steps += 1
            if steps > limit:
                return None  # a loop, or longer than its table
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * index)
            if flags & INDIRECT:
                if in_table or flags & NEXT or not length or length % 16:
                    return None
                if length // 16 > self.max_indirect:
                    return None
                inner = self.read(addr, length)
                if inner is None:
                    return None
                table, limit, index, steps, in_table = inner, length // 16, 0, 0, True
                continue
            if not flags & WRITE and seen_write:
                return None  # readable after writable, even an empty one
            seen_write = seen_write or bool(flags & WRITE)
            if length:  # an empty buffer carries no bytes: its address is never used
                if self.read(addr, length) is None:
                    return None
                (writable if flags & WRITE else readable).append((addr, length))
            if not flags & NEXT:
                return readable, writable
            if nxt >= limit:
                return None
            index = nxt


Popped = tuple[int | None, Buffers | None, Buffers, list[memoryview]]
"""(head, readable or None for a malformed chain, writable, views to fill)."""


def gpas(memory: GuestMemory, views: list[memoryview]) -> Buffers:
    out: Buffers = []
    for view in views:
        gpa = memory.guest_address_of(view)
        assert gpa is not None, "a buffer outside guest memory"
        out.append((gpa, len(view)))
    return out


def pop_everything(vq: DeviceVirtqueue, batch: bool) -> list[Popped] | None:
    """Every chain available, in ring order; None on RingError."""
    out: list[Popped] = []
    memory = vq.memory
    try:
        if batch:
            view, items = vq.pop_batch(vq.num)
            assert vq.pop_batch(vq.num)[1] == []  # nothing left: one batch takes it all
            for item in items:
                if isinstance(item, Triple):
                    item = item.chain(view)
                if isinstance(item, ChainError):
                    out.append((item.head, None, [], []))
                else:
                    out.append((item.head, gpas(memory, item.readable),
                                gpas(memory, item.writable), item.writable))
            return out
        for _ in range(vq.num + 1):
            try:
                chain = vq.pop()
            except ChainError as exc:
                out.append((exc.head, None, [], []))
                continue
            if chain is None:
                return out
            assert chain.readable_len == sum(len(b) for b in chain.readable)
            assert chain.writable_len == sum(len(b) for b in chain.writable)
            out.append((chain.head, gpas(memory, chain.readable),
                        gpas(memory, chain.writable), chain.writable))
        raise AssertionError(f"pop gave more than the queue size ({vq.num}) of chains")
    except RingError:
        assert not out, "a RingError after chains were taken"
        return None


def check_against_oracle(guest: Guest, addrs: VringAddrs, *, event_idx: bool,
                         last_avail: int) -> None:
    """Serve the ring once with ``pop`` and once (from the same memory) with
    ``pop_batch``; both must do exactly what the oracle says."""
    regions = guest.memory.regions
    snapshot = [bytes(r.view) for r in regions]
    oracle = Oracle(guest.memory, addrs, max_indirect=addrs.num)
    offered = oracle.offered(last_avail)
    num = addrs.num
    for batch in (False, True):
        for region, data in zip(regions, snapshot, strict=True):
            region.view[:] = data
        used_idx_before = RawRing(guest, addrs).used[1]
        vq = DeviceVirtqueue(guest.memory, addrs, event_idx=event_idx,
                             last_avail_idx=last_avail)
        popped = pop_everything(vq, batch)
        if offered is None:
            assert popped is None, "an impossible avail index was not refused"
            assert [bytes(r.view) for r in regions] == snapshot
            continue
        assert popped is not None
        assert len(popped) == len(offered), "a chain was skipped or taken twice"
        allowed = [(addrs.used, 6 + 8 * num)]  # what the device may write besides buffers
        answers: list[tuple[int, int]] = []
        for offered_head, (head, readable, writable, views) in zip(offered, popped, strict=True):
            if offered_head >= num:
                assert head is None and readable is None  # cannot be answered at all
                continue
            assert head == offered_head
            expected = oracle.chain(head)
            if expected is None:
                assert readable is None, f"chain {head}: a malformed chain was accepted"
                answers.append((head, 0))
                continue
            assert readable is not None, f"chain {head}: a valid chain was refused"
            assert (readable, writable) == expected, f"chain {head}: other buffers"
            allowed += writable
            for view in views:
                view[:] = bytes([FILL]) * len(view)
            answers.append((head, sum(length for _, length in writable)))
        for head, written in answers:
            vq.add_used(head, written)
        vq.flush_used()
        raw = RawRing(guest, addrs)
        # Each answerable chain exactly once, in order; with none, the used idx is untouched.
        assert raw.used[1] == (len(answers) if answers else used_idx_before)
        assert raw.used_entries(0, len(answers)) == answers
        for region, before in zip(regions, snapshot, strict=True):
            after = bytes(region.view)
            base = region.guest_phys_addr
            for offset in (i for i in range(len(after)) if after[i] != before[i]):
                gpa = base + offset
                assert any(a <= gpa < a + n for a, n in allowed), (
                    f"byte at {gpa:#x} changed outside the writable buffers and used ring")
        used_area = range(addrs.used, addrs.used + 6 + 8 * num)
        for gpa, length in allowed[1:]:
            data = guest.memory.view(gpa, length)
            assert all(b == FILL or gpa + i in used_area for i, b in enumerate(data))


TABLE_GPA = REGION_GPA + 0x2000  # indirect tables live at TABLE_GPA + 0x200 * k
BUFS = REGION_GPA + 0x4000
ADDRESSES = st.one_of(
    st.integers(BUFS, BUFS + 0x4000),
    st.sampled_from([REGION_GPA + FUZZ_SIZE - 16, REGION_GPA + FUZZ_SIZE,  # the boundary
                     REGION_GPA + FUZZ_SIZE + ADJACENT - 8, REGION_GPA + FUZZ_SIZE + ADJACENT,
                     REGION_GPA - 8, REGION_GPA]),
    st.sampled_from([TABLE_GPA + 0x200 * k for k in range(3)]),
    st.integers(0, (1 << 64) - 1),
)
LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 4096]),
                    st.integers(0, (1 << 32) - 1))
END = REGION_GPA + FUZZ_SIZE  # where the first region ends and the adjacent one starts
SPANS = st.one_of(  # (addr, len)
    st.tuples(ADDRESSES, LENGTHS),
    st.integers(1, 64).map(lambda n: (END - n, n)),  # ends exactly at the region's end
    st.integers(2, 64).map(lambda n: (END - n + 1, n)),  # one byte into the next region
    st.integers(1, 64).map(lambda n: (END, n)),  # inside the adjacent region
)
FLAGS = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT]) | st.integers(0, 0xFFFF)
DESCS = st.builds(lambda span, flags, nxt: (*span, flags, nxt), SPANS, FLAGS,
                  st.integers(0, 16) | st.integers(0, 0xFFFF))
IN_BUFS = st.integers(BUFS, BUFS + 0x4000)
REQUEST_TABLE = st.builds(  # the shape pop_batch reads at once: header, data, status
    lambda a0, data, w, status: [(a0, 16, NEXT, 1), (*data, NEXT | WRITE if w else NEXT, 2),
                                 (*status, WRITE, 0)],
    IN_BUFS, st.tuples(IN_BUFS, st.sampled_from([512, 4096])) | SPANS, st.booleans(),
    st.tuples(IN_BUFS, st.just(1)) | SPANS,
)
TABLES = st.lists(REQUEST_TABLE | st.lists(DESCS, min_size=1, max_size=8), max_size=3)
HEADS = st.lists(DESCS | st.integers(0, 2), max_size=16)
"""Ring descriptors; an int k stands for "the indirect table k, whole"."""


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 8, 16]),
    event_idx=st.booleans(),
    last_avail=st.integers(0, 0xFFFF),
    noise=st.binary(max_size=16 * 16 + 6 + 2 * 16 + 6 + 8 * 16),
    descs=HEADS,
    tables=TABLES,
    avail=st.lists(st.integers(0, 16) | st.integers(0, 0xFFFF), max_size=16),
    avail_idx=st.integers(0, 16) | st.integers(0, 0xFFFF),
)
def test_a_hostile_ring_is_served_as_the_oracle_says(
    num: int, event_idx: bool, last_avail: int, noise: bytes,
    descs: list[tuple[int, int, int, int] | int],
    tables: list[list[tuple[int, int, int, int]]],
    avail: list[int], avail_idx: int,
) -> None:
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA, adjacent=ADJACENT) as g:
        addrs = VringAddrs.allocate(g.allocator, num)
        assert addrs.desc == REGION_GPA
        raw = RawRing(g, addrs)
        area = g.memory.view(addrs.desc, len(noise))  # noise over the rings, then structure
        area[:] = noise[: len(area)]
        for i, desc in enumerate(descs[:num]):
            if isinstance(desc, int):
                k = desc % len(tables) if tables else 0
                size = 16 * len(tables[k]) if tables else 16
                desc = (TABLE_GPA + 0x200 * k, size, INDIRECT, 0)
            raw.write_desc(i, *desc)
        for k, entries in enumerate(tables):
            view = g.memory.view(TABLE_GPA + 0x200 * k, 16 * len(entries))
            for i, entry in enumerate(entries):
                RawRing.write_desc_into(view, i, *entry)
        for i, entry in enumerate(avail[:num]):
            raw.avail[2 + i] = entry
        raw.avail[1] = (last_avail + avail_idx) & 0xFFFF
        check_against_oracle(g, addrs, event_idx=event_idx, last_avail=last_avail)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ((BUFS, 512), (END - 1, 1)),  # ends exactly at the region's end: a request
        ((BUFS, 512), (END, 1)),  # in the adjacent region: valid, not the batch's view
        ((END - 511, 512), (BUFS, 1)),  # one byte across the boundary: malformed
        ((END - 512, 512), (BUFS, 1)),
        ((END, 512), (BUFS, 1)),
        ((BUFS, 512), (END - 1, 2)),
    ],
)
@pytest.mark.parametrize("writable_data", [False, True])
def test_request_shaped_chains_at_the_region_boundary(
    data: tuple[int, int], status: tuple[int, int], writable_data: bool
) -> None:
    """The request shape pop_batch takes as offsets into one region's view, with each
    buffer just inside, just across and just past that region's end."""
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA, adjacent=ADJACENT) as g:
        addrs = VringAddrs.allocate(g.allocator, 8)
        raw = RawRing(g, addrs)
        entries = [(BUFS + 0x1000, 16, NEXT, 1),
                   (*data, NEXT | WRITE if writable_data else NEXT, 2), (*status, WRITE, 0)]
        view = g.memory.view(TABLE_GPA, 48)
        for i, entry in enumerate(entries):
            RawRing.write_desc_into(view, i, *entry)
        raw.write_desc(5, TABLE_GPA, 48, INDIRECT, 0)
        raw.offer(5)
        check_against_oracle(g, addrs, event_idx=False, last_avail=0)


PACKED_RING_BYTES = 288 + 6 + 8 * 8  # num 8: desc at 0, avail at 128, used at 288


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    noise=st.binary(min_size=PACKED_RING_BYTES, max_size=PACKED_RING_BYTES),
    event_idx=st.booleans(),
)
# Nothing offered (avail idx 0) over a used idx of 256: nothing answered, nothing published.
@example(noise=bytes(288 + 2) + (256).to_bytes(2, "little") + bytes(8 * 8), event_idx=False)
def test_random_bytes_over_the_whole_ring_area_are_served_as_the_oracle_says(
    noise: bytes, event_idx: bool
) -> None:
    with Guest(size=1 << 12, gpa=0) as g:
        addrs = VringAddrs(8, desc=0, avail=16 * 8, used=256 + 32)  # rings packed at gpa 0
        g.memory.view(0, len(noise))[:] = noise
        check_against_oracle(g, addrs, event_idx=event_idx, last_avail=0)


# The fast path (one in-order indirect table, read flat) must accept exactly the chains the
# careful walker accepts, with the same buffers, and leave every other chain to it.
fast_entry = st.tuples(
    st.sampled_from([BUF, BUF + 0x100, REGION_GPA + REGION_SIZE - 8, 0, 1 << 40]),
    st.sampled_from([0, 1, 8, 16, 512, 4096, 1 << 31]),
    st.sampled_from([0, WRITE, NEXT, NEXT | WRITE, INDIRECT, NEXT | INDIRECT, 0x80 | NEXT]),
    st.booleans() | st.integers(0, 8),  # True: next = i + 1
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(fast_entry, min_size=1, max_size=6),
    head_flags=st.sampled_from([INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
    extra_len=st.sampled_from([0, 0, 0, 8, 16]),
    max_indirect=st.sampled_from([None, 2]),
)
def test_flat_fast_path_agrees_with_the_careful_walk(
    entries: list[tuple[int, int, int, bool | int]],
    head_flags: int,
    extra_len: int,
    max_indirect: int | None,
) -> None:
    with Guest() as g:
        addrs = VringAddrs.allocate(g.allocator, NUM)
        vq = DeviceVirtqueue(g.memory, addrs, event_idx=False, max_indirect=max_indirect)
        raw = RawRing(g, addrs)
        descs = [
            (addr, length, flags, i + 1 if nxt is True else int(nxt))
            for i, (addr, length, flags, nxt) in enumerate(entries)
        ]
        gpa = table(g, *descs, (0, 0, 0, 0))  # a spare zero entry for extra_len
        raw.write_desc(2, gpa, 16 * len(descs) + extra_len, head_flags, 0)
        raw.offer(2)
        expected: DescriptorChain | ChainError
        try:
            expected = vq._walk_careful(2)  # the reference, bypassing the fast path
        except ChainError as exc:
            expected = exc
        view, [got] = vq.pop_batch(4)
        if isinstance(got, Triple):
            assert isinstance(expected, DescriptorChain), expected
            got = got.chain(view)
        elif isinstance(expected, DescriptorChain) and head_flags == INDIRECT:
            # The request shape must never miss the fast path: three non-empty buffers
            # in one region, readable first, writable last, table exactly three entries.
            shaped = (
                not extra_len and len(descs) == 3 and (max_indirect or NUM) >= 3
                and all(length for _, length, _, _ in descs)
                and descs[0][2] == NEXT and descs[0][3] == 1 and descs[1][3] == 2
                and descs[1][2] in (NEXT, NEXT | WRITE) and descs[2][2] == WRITE
                and all(a >= REGION_GPA and a + n <= REGION_GPA + REGION_SIZE
                        for a, n, _, _ in descs))
            assert not shaped, f"a request-shaped chain took the slow path: {descs}"
        if isinstance(expected, ChainError):
            assert isinstance(got, ChainError) and str(got) == str(expected)
            return
        assert isinstance(got, DescriptorChain)
        for side in ("readable", "writable"):
            mine, ref = getattr(got, side), getattr(expected, side)
            assert [len(v) for v in mine] == [len(v) for v in ref]
            assert all(g.memory.guest_address_of(a) == g.memory.guest_address_of(b)
                       for a, b in zip(mine, ref, strict=True))
        assert (got.head, got.readable_len, got.writable_len) == (
            expected.head, expected.readable_len, expected.writable_len)


def test_pop_batch_gives_the_request_shape_as_offsets(guest: Guest) -> None:
    vq, raw = make(guest)
    descs = ((BUF, 16, NEXT, 1), (BUF + 0x100, 4096, NEXT | WRITE, 2), (BUF + 0x2000, 1, WRITE, 0))
    raw.write_desc(0, table(guest, *descs), 48, INDIRECT, 0)
    good_chain(raw, 4)  # a direct chain: not a Triple
    raw.offer(0, 4)
    view, (triple, direct) = vq.pop_batch(8)
    assert isinstance(triple, Triple) and isinstance(direct, DescriptorChain)
    base = REGION_GPA
    assert triple == Triple(0, BUF - base, 16, BUF + 0x100 - base, 4096, True,
                            BUF + 0x2000 - base, 1)
    view[triple.third] = 0x5A  # the status byte, written through the batch's view
    assert guest.memory.view(BUF + 0x2000, 1)[0] == 0x5A
    assert vq.last_avail_idx == 2 and vq.pop_batch(8)[1] == []


def test_add_used_batch_wraps_and_refuses_what_add_used_refuses(guest: Guest) -> None:
    addrs = VringAddrs.allocate(guest.allocator, 4)
    dev = DeviceVirtqueue(guest.memory, addrs, event_idx=False, used_idx=2)
    raw = RawRing(guest, addrs)
    dev.add_used_batch([3, 10, 1, 20, 0, 30])  # slots 2, 3, then 0 after the wrap
    dev.flush_used()
    assert raw.used[1] == 5 and raw.used_entries(2, 3) == [(3, 10), (1, 20), (0, 30)]
    for bad in ([4, 1], [0, 1 << 32], [-1, 1]):
        with pytest.raises(ValueError, match="outside the queue"):
            dev.add_used_batch(bad)
    assert dev.used_idx == 5  # nothing half-written
    dev.add_used_batch([])
    assert dev.used_idx == 5
