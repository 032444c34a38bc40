"""The device end of a split virtqueue, against a hand-played (often hostile) driver."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_helpers import REGION_GPA, REGION_SIZE, Guest, RawRing

from virtblk.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
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


FUZZ_SIZE = 1 << 16
ring_bytes = st.binary(min_size=0, max_size=16 * 16 + 6 + 2 * 16 + 6 + 8 * 16)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 8, 16]),
    event_idx=st.booleans(),
    last_avail=st.integers(0, 0xFFFF),
    noise=ring_bytes,
    descs=st.lists(
        st.tuples(
            st.one_of(
                st.integers(REGION_GPA, REGION_GPA + FUZZ_SIZE),
                st.integers(0, (1 << 64) - 1),
                st.just(REGION_GPA),  # the descriptor table itself, as an indirect table
            ),
            st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 4096]),
                      st.integers(0, (1 << 32) - 1)),
            st.integers(0, 0xFFFF) | st.integers(0, 7),
            st.integers(0, 0xFFFF) | st.integers(0, 16),
        ),
        max_size=16,
    ),
    avail=st.lists(st.integers(0, 0xFFFF) | st.integers(0, 16), max_size=16),
    avail_idx=st.integers(0, 0xFFFF) | st.integers(0, 20),
)
def test_fuzz_pop_raises_only_chain_or_ring_errors(
    num: int,
    event_idx: bool,
    last_avail: int,
    noise: bytes,
    descs: list[tuple[int, int, int, int]],
    avail: list[int],
    avail_idx: int,
) -> None:
    with Guest(size=FUZZ_SIZE, gpa=REGION_GPA) as g:
        addrs = VringAddrs.allocate(g.allocator, num)
        assert addrs.desc == REGION_GPA
        raw = RawRing(g, addrs)
        # Random bytes over everything from the descriptor table on, then some structure.
        area = g.memory.view(addrs.desc, len(noise))
        area[:] = noise[: len(area)]
        for i, desc in enumerate(descs[:num]):
            raw.write_desc(i, *desc)
        for i, entry in enumerate(avail[:num]):
            raw.avail[2 + i] = entry
        raw.avail[1] = (last_avail + avail_idx) & 0xFFFF
        vq = DeviceVirtqueue(g.memory, addrs, event_idx=event_idx, last_avail_idx=last_avail)
        for _ in range(num + 2):
            try:
                chain = vq.pop()
            except ChainError as exc:
                assert exc.head is None or 0 <= exc.head < num
                continue
            except RingError:
                break
            if chain is None:
                break
            assert chain.readable_len == sum(len(b) for b in chain.readable)
            assert chain.writable_len == sum(len(b) for b in chain.writable)
            assert 0 <= chain.head < num
        # The batch path over the same hostile ring: only its own errors, and every chain
        # it takes as a request (a Triple) is exactly what the careful walk makes of it.
        batch = DeviceVirtqueue(g.memory, addrs, event_idx=event_idx, last_avail_idx=last_avail)
        assert_batch_agrees_with_careful_walk(batch)


def assert_batch_agrees_with_careful_walk(vq: DeviceVirtqueue) -> None:
    """Pop everything with ``pop_batch``: no exception but RingError, and each item is what
    ``_walk_careful`` says of its head (a Triple: the same buffers as the careful chain)."""
    try:
        view, items = vq.pop_batch(vq.num)
    except RingError:
        return
    for item in items:
        if isinstance(item, ChainError):
            assert item.head is None or 0 <= item.head < vq.num
            continue
        assert 0 <= item.head < vq.num
        try:
            careful = vq._walk_careful(item.head)
        except ChainError as exc:
            raise AssertionError(f"pop_batch accepted a chain the walk refuses: {exc}") from None
        got = item.chain(view) if isinstance(item, Triple) else item
        for side in ("readable", "writable"):
            mine, ref = getattr(got, side), getattr(careful, side)
            assert [len(v) for v in mine] == [len(v) for v in ref]
            assert [bytes(v) for v in mine] == [bytes(v) for v in ref]
        assert (got.readable_len, got.writable_len) == (careful.readable_len,
                                                        careful.writable_len)


PACKED_RING_BYTES = 288 + 6 + 8 * 8  # num 8: desc at 0, avail at 128, used at 288


@settings(max_examples=300, deadline=None)
@given(
    noise=st.binary(min_size=PACKED_RING_BYTES, max_size=PACKED_RING_BYTES),
    event_idx=st.booleans(),
)
def test_fuzz_random_bytes_in_the_whole_ring_area(noise: bytes, event_idx: bool) -> None:
    with Guest(size=1 << 12, gpa=0) as g:
        addrs = VringAddrs(8, desc=0, avail=16 * 8, used=256 + 32)  # rings packed at gpa 0
        g.memory.view(0, len(noise))[:] = noise
        vq = DeviceVirtqueue(g.memory, addrs, event_idx=event_idx)
        for _ in range(10):
            try:
                if vq.pop() is None:
                    break
            except ChainError:
                continue
            except RingError:
                break
        g.memory.view(0, len(noise))[:] = noise  # the same ring again, for the batch path
        assert_batch_agrees_with_careful_walk(DeviceVirtqueue(g.memory, addrs,
                                                              event_idx=event_idx))


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
