"""The packed in-flight journal: a device killed after any store it makes is recovered
exactly, on a ring that wraps again and again.

A crash is simulated at every point of pop -> answer -> publish: a trace function copies
the ring and the in-flight buffer before every line the device's queue code and the
journal run (each line holds at most one store to shared memory that matters), a fresh
device recovers from each copy, and what it resubmits and then finds in the ring is
compared with what the driver is owed: every chain it made available and did not see
used, each exactly once, in the order it made them available; the recovered used position
is where the driver waits for the next used descriptor, and answering everything brings
the driver's used position to its avail position.  Buffers the frontend could have
scribbled on are refused untouched.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_helpers import Guest, crash_points

from virtblk.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from virtblk.virtio import device_common, inflight_packed, packed_device, packed_layout
from virtblk.virtio.inflight import InflightError, queue_region_size
from virtblk.virtio.inflight_packed import (
    PackedInflightJournal,
    PackedRecovery,
    RecoveredChain,
    inflight_region_size,
    packed_queue_region_size,
)
from virtblk.virtio.packed_device import PackedChainError, PackedDeviceVirtqueue
from virtblk.virtio.packed_layout import (
    AVAIL_USED,
    HEAD,
    PackedRingBase,
    avail_bits,
    used_bits,
)
from virtblk.virtio.split_device import ChainError, DescriptorChain, RingError, Triple

GUEST_SIZE = 0x8000
GUEST_GPA = 0x10_0000
DATA = GUEST_GPA + 0x4000  # buffers of buffer id i from DATA + 256 * i
FRESH = PackedRingBase(0, True, 0, True)
HEADER = struct.Struct("<QHHHHHHBB")  # QueueRegionPacked up to its padding
DESC_STATE = struct.Struct("<BxHHHQHHIQ")  # DescStatePacked


def dpdk_size(queue_size: int) -> int:
    """DPDK's get_pervq_shm_size_packed: the fields summed, rounded up to 64."""
    raw = 32 * queue_size + 8 + 2 * 6 + 9
    return (raw + 63) // 64 * 64


@pytest.mark.parametrize("num", [1, 2, 3, 4, 7, 128, 256, 1024, 32768])
def test_region_size_is_what_dpdk_allocates(num: int) -> None:
    assert packed_queue_region_size(num) == dpdk_size(num)
    assert inflight_region_size(num, packed=True) == dpdk_size(num)
    assert inflight_region_size(num, packed=False) == queue_region_size(num)
    assert HEADER.size == 22 and DESC_STATE.size == 32


class Setup:
    """A guest with one packed ring of ``num`` descriptors and an in-flight buffer."""

    def __init__(self, num: int) -> None:
        self.num = num
        self.guest = Guest(size=GUEST_SIZE, gpa=GUEST_GPA)
        self.addrs = packed_layout.allocate(self.guest.allocator, num)
        self.ring = self.guest.memory.view(self.addrs.desc, 16 * num)
        self.ring_h = self.ring.cast("H")
        self.buffer = bytearray(packed_queue_region_size(num))
        for bid in range(num):  # every id's indirect table: readable, readable, writable
            table = self.guest.memory.view(self.table(bid), 48)
            for i, flags in enumerate((0, 0, VRING_DESC_F_WRITE)):
                struct.pack_into("<QIHH", table, 16 * i, self.data(bid, i), 16, 0, flags)

    def table(self, bid: int) -> int:
        return DATA + 256 * bid + 128

    def data(self, bid: int, i: int) -> int:
        return DATA + 256 * bid + 16 * i

    def journal(self) -> PackedInflightJournal:
        return PackedInflightJournal(memoryview(self.buffer), self.num)

    def device(self, *, expect_fresh: bool = False) -> tuple[PackedDeviceVirtqueue, PackedRecovery]:
        """A device that starts on this ring and buffer as a restarted one would."""
        journal = self.journal()
        recovery = journal.recover(self.ring, FRESH)
        assert recovery.fresh == expect_fresh
        base = FRESH if recovery.base is None else recovery.base
        vq = PackedDeviceVirtqueue(self.guest.memory, self.addrs, event_idx=False,
                                   **base._asdict(), inflight=journal,
                                   resubmit=recovery.resubmit)
        return vq, recovery

    def snapshot(self) -> tuple[bytes, bytes]:
        return bytes(self.ring), bytes(self.buffer)

    def restore(self, shot: tuple[bytes, bytes]) -> None:
        self.ring[:] = shot[0]
        self.buffer[:] = shot[1]

    def close(self) -> None:
        self.ring_h.release()
        self.ring.release()
        self.guest.close()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup(4)
    yield s
    s.close()


def scan_used(ring_h: Any, pos: int, wrap: bool, counts: dict[int, int],
              num: int) -> tuple[list[int], int, bool]:
    """What a driver at used position ``pos`` (lap ``wrap``) reads: the ids of the used
    descriptors in a row, each advancing by its chain's descriptors (``counts``)."""
    ids: list[int] = []
    counts = dict(counts)
    while ring_h[8 * pos + 7] & AVAIL_USED == used_bits(wrap):
        bid = ring_h[8 * pos + 6]
        assert bid in counts, f"used id {bid} at position {pos} is not outstanding"
        ids.append(bid)
        pos += counts.pop(bid)
        if pos >= num:
            pos -= num
            wrap = not wrap
    return ids, pos, wrap


class Driver:
    """A driver's bookkeeping written raw into the ring: chains of 1-3 direct descriptors
    or one indirect descriptor, made available in order, their ids from a free list."""

    def __init__(self, setup: Setup) -> None:
        self.s = setup
        self.free = list(range(setup.num))
        self.counts: dict[int, int] = {}  # outstanding id -> descriptors it took
        self.order: list[int] = []  # outstanding ids, in the order made available
        self.avail = (0, True)
        self.used = (0, True)

    @property
    def room(self) -> int:
        return self.s.num - sum(self.counts.values())

    def offer(self, shapes: list[int]) -> None:
        """Make a chain available per shape (0: indirect, n: n direct descriptors, at most
        the ring's size), as many as fit; the first chain's first flags are stored last."""
        num = self.s.num
        stores: list[tuple[int, int]] = []
        pos, wrap = self.avail
        for shape in shapes:
            if num < 3:  # an indirect table of 3 is more than such a queue allows
                shape = max(shape, 1)
            count = 1 if shape == 0 else min(shape, num)
            if count > self.room or not self.free:
                break
            bid = self.free.pop(0)
            for i in range(count):
                if shape == 0:
                    addr, length, flags = self.s.table(bid), 48, VRING_DESC_F_INDIRECT
                else:
                    addr, length = self.s.data(bid, i), 16
                    flags = VRING_DESC_F_NEXT if i < count - 1 else 0
                HEAD.pack_into(self.s.ring, 16 * pos, addr, length, bid)
                stores.append((8 * pos + 7, flags | avail_bits(wrap)))
                pos += 1
                if pos == num:
                    pos, wrap = 0, not wrap
            self.counts[bid] = count
            self.order.append(bid)
        for slot, flags in stores[1:]:
            self.s.ring_h[slot] = flags
        if stores:
            self.s.ring_h[stores[0][0]] = stores[0][1]
        self.avail = (pos, wrap)

    def reap(self) -> list[int]:
        ids, pos, wrap = scan_used(self.s.ring_h, *self.used, self.counts, self.s.num)
        for bid in ids:
            del self.counts[bid]
            self.order.remove(bid)
            self.free.append(bid)
        self.used = (pos, wrap)
        return ids


# The queue's code, the shared base of both device rings included.
_TRACED = {packed_device.__file__, inflight_packed.__file__, device_common.__file__}


def ids_of(items: list[Triple | DescriptorChain | ChainError]) -> list[int]:
    """The buffer ids of popped chains (every chain these tests offer is well formed)."""
    ids = []
    for item in items:
        assert not isinstance(item, ChainError), item
        ids.append(item.head)
    return ids


def drain(vq: PackedDeviceVirtqueue, batch: bool) -> list[int]:
    """Pop everything the device has to serve, one by one or in batches."""
    ids: list[int] = []
    if batch:
        while items := vq.pop_batch(3)[1]:
            ids += ids_of(items)
    else:
        while (chain := vq.pop()) is not None:
            ids.append(chain.head)
    return ids


def owed(shot: tuple[bytes, bytes], driver: Driver, setup: Setup, batch: bool) -> None:
    """Recover a fresh device from ``shot`` and check it owes the driver exactly what the
    driver is waiting for, in the order the driver made it available.

    ``driver`` is the driver's state before the step the shot was taken in; what the
    shot's ring published since then is answered (outstanding ids are distinct, so a used
    descriptor naming one is its answer)."""
    setup.restore(shot)
    num = setup.num
    answered, used_pos, used_wrap = scan_used(setup.ring_h, *driver.used, driver.counts, num)
    waiting = [bid for bid in driver.order if bid not in answered]
    vq, recovery = setup.device()
    assert recovery.base is not None
    assert (recovery.base.used_idx, recovery.base.used_wrap_counter) == (used_pos, used_wrap)
    assert list(recovery.resubmit) == sorted(recovery.resubmit,
                                              key=lambda c: waiting.index(c.id))
    ids = drain(vq, batch)
    assert ids == waiting, (ids, waiting, recovery)
    # A device started there answers every one of them, once, where the driver looks.
    vq.add_used_batch([x for bid in reversed(ids) for x in (bid, 0)])
    vq.flush_used()
    counts = {bid: driver.counts[bid] for bid in waiting}
    done, pos, wrap = scan_used(setup.ring_h, used_pos, used_wrap, counts, num)
    assert sorted(done) == sorted(waiting)
    assert (pos, wrap) == driver.avail
    journal = vq.inflight
    assert journal is not None and journal.in_flight() == []
    again = setup.journal().recover(setup.ring, FRESH)
    assert again.resubmit == () and again.base == PackedRingBase(*driver.avail, *driver.avail)


Step = tuple[str, Any]


def play(setup: Setup, steps: list[Step], check_every_point: bool = True) -> int:
    """Run the device through ``steps`` and check recovery at every crash point (or only
    after each step); returns how many crash points were checked."""
    driver = Driver(setup)
    vq, _ = setup.device(expect_fresh=True)
    popped: list[int] = []
    checked = 0
    for n, (kind, arg) in enumerate(steps):
        if kind == "offer":
            driver.offer(arg)
            continue
        shots: list[tuple[bytes, bytes]] = []
        take = functools.partial(lambda got: got.append(setup.snapshot()), shots)
        with crash_points(take, _TRACED) if check_every_point else nullcontext():
            if kind == "pop":
                if arg == 1:
                    chain = vq.pop()
                    popped += [] if chain is None else [chain.head]
                else:
                    popped += ids_of(vq.pop_batch(arg)[1])
            else:  # answer a selection of what is in flight, in up to two batches
                chosen = list(dict.fromkeys(popped[i % len(popped)] for i in arg)) \
                    if popped else []
                half = len(chosen) // 2
                for part in (chosen[:half], chosen[half:]):
                    vq.add_used_batch([x for bid in part for x in (bid, 0)])
                vq.flush_used()
                popped = [bid for bid in popped if bid not in chosen]
        shots.append(setup.snapshot())
        final = shots[-1]
        for shot in shots:
            owed(shot, driver, setup, batch=bool(n % 2))
            checked += 1
        setup.restore(final)
        driver.reap()
    return checked


def test_a_crash_at_any_store_of_pop_answer_publish_is_recovered(setup: Setup) -> None:
    """Chains of every shape, answered out of order, over several laps of a ring of 4."""
    steps: list[Step] = [
        ("offer", [1, 2]), ("pop", 1), ("offer", [0]), ("pop", 4), ("answer", [1]),
        ("answer", [0, 1]), ("offer", [3]), ("pop", 2), ("offer", [0, 0]),
        ("answer", [1, 0]), ("pop", 4), ("offer", [1, 1]), ("answer", [2, 0, 1]),
        ("pop", 4), ("answer", [0, 1, 2, 3]), ("offer", [2, 2]), ("pop", 4),
        ("answer", [1]), ("offer", [0]), ("pop", 1), ("answer", [0, 1, 2]),
    ]
    assert play(setup, steps) > 300


def test_a_journal_taken_whole_resubmits_nothing(setup: Setup) -> None:
    play(setup, [("offer", [1, 2]), ("pop", 4), ("answer", [0, 1]), ("offer", [0, 3]),
                 ("pop", 4), ("answer", [1, 0])], check_every_point=False)
    recovery = setup.journal().recover(setup.ring, FRESH)
    # 1 + 2 + 1 + 3 descriptors: the ring of 4 wrapped once.
    assert recovery == PackedRecovery(False, PackedRingBase(3, False, 3, False), (), 0)


steps_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.lists(st.integers(0, 3), min_size=1, max_size=4)),
        st.tuples(st.just("pop"), st.integers(1, 4)),
        st.tuples(st.just("answer"), st.lists(st.integers(0, 7), max_size=4)),
    ),
    max_size=14,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_strategy, num=st.sampled_from([1, 2, 3, 4, 5]))
def test_random_interleavings_recover_exactly(steps: list[Step], num: int) -> None:
    s = Setup(num)
    try:
        play(s, steps)
    finally:
        s.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num=st.sampled_from([1, 2, 3, 5, 8]),
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(20, 120),
)
def test_devices_killed_between_calls_lap_the_ring_and_answer_everything_once(
    num: int, seed: int, rounds: int
) -> None:
    """Device after device killed between any two calls (answers added and not flushed
    die with it), the ring lapping many times: every chain the driver made available is
    answered exactly once, and a journal left at the end owes nothing but what is out."""
    rng = random.Random(seed)
    s = Setup(num)
    try:
        driver = Driver(s)
        vq, _ = s.device(expect_fresh=True)
        popped: list[int] = []
        offered = completed = 0
        for _ in range(rounds):
            action = rng.choice(["offer", "pop", "batch", "answer", "flush", "reap", "kill"])
            if action == "offer":
                before = len(driver.order)
                driver.offer([rng.randint(0, 3) for _ in range(rng.randint(1, 3))])
                offered += len(driver.order) - before
            elif action in ("pop", "batch"):
                if action == "pop":
                    chain = vq.pop()
                    popped += [] if chain is None else [chain.head]
                else:
                    popped += ids_of(vq.pop_batch(rng.randint(1, num))[1])
            elif action == "answer" and popped:
                chosen = rng.sample(popped, rng.randint(1, len(popped)))
                vq.add_used_batch([x for bid in chosen for x in (bid, 0)])
                popped = [bid for bid in popped if bid not in chosen]
            elif action == "flush":
                vq.flush_used()
            elif action == "reap":
                completed += len(driver.reap())
            elif action == "kill":
                vq, _ = s.device()
                popped = []
        # Drain: whatever device is alive answers everything left.
        vq.flush_used()
        completed += len(driver.reap())
        vq, recovery = s.device()
        assert [chain.id for chain in recovery.resubmit] == \
            driver.order[: len(recovery.resubmit)]
        rest = drain(vq, batch=True)
        assert rest == driver.order
        vq.add_used_batch([x for bid in rest for x in (bid, 0)])
        vq.flush_used()
        completed += len(driver.reap())
        assert completed == offered and driver.order == []
        assert driver.used == driver.avail
    finally:
        s.close()


# ---------------------------------------------------------------------- the layout


def test_a_chain_is_recorded_in_the_spec_layout(setup: Setup) -> None:
    driver = Driver(setup)
    vq, recovery = setup.device(expect_fresh=True)
    assert recovery == PackedRecovery(True, None, (), 0)
    header = HEADER.unpack_from(setup.buffer)
    assert header == (0, 1, 4, 0, 0, 0, 0, 1, 1)  # version 1, 4 entries, fresh ring
    assert [DESC_STATE.unpack_from(setup.buffer, 32 + 32 * e)[1] for e in range(4)] == \
        [1, 2, 3, 4]  # the free list, ended by desc_num
    driver.offer([0, 2])
    ids = ids_of(vq.pop_batch(4)[1])
    assert ids == [0, 1]
    # Indirect chain: entry 0; two direct descriptors: entries 1 -> 2.
    inflight, _, _, num, counter, bid, flags, length, addr = DESC_STATE.unpack_from(
        setup.buffer, 32)
    assert (inflight, num, counter, bid, length, addr) == (1, 1, 0, 0, 48, setup.table(0))
    assert flags == VRING_DESC_F_INDIRECT | avail_bits(True)
    head = DESC_STATE.unpack_from(setup.buffer, 64)
    assert head[:5] == (1, 2, 2, 2, 1)  # inflight, next, last, num, counter
    assert head[5:] == (1, VRING_DESC_F_NEXT | avail_bits(True), 16, setup.data(1, 0))
    tail = DESC_STATE.unpack_from(setup.buffer, 96)
    assert tail[0] == 0 and tail[5:] == (1, avail_bits(True), 16, setup.data(1, 1))
    assert HEADER.unpack_from(setup.buffer)[3:5] == (3, 3)  # free list: entry 3
    vq.add_used(1, 0)
    vq.flush_used()
    header = HEADER.unpack_from(setup.buffer)
    # Entries 1-2 back on the free list before 3; used position 2 (the chain's length).
    assert header[3:9] == (1, 1, 2, 2, 1, 1)
    assert DESC_STATE.unpack_from(setup.buffer, 64)[0] == 0
    assert DESC_STATE.unpack_from(setup.buffer, 96)[1] == 3


def test_a_journal_for_another_size_or_too_small_is_refused(setup: Setup) -> None:
    with pytest.raises(InflightError, match="a packed queue of 4 needs 192"):
        PackedInflightJournal(memoryview(bytearray(160)), 4)
    journal = PackedInflightJournal(memoryview(bytearray(packed_queue_region_size(8))), 8)
    with pytest.raises(RingError, match="journal for 8 entries, ring of 4"):
        PackedDeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False,
                              inflight=journal)


def test_chains_to_resubmit_must_fit_between_the_positions(setup: Setup) -> None:
    chain = RecoveredChain(0, 0, ((setup.data(0, 0), 16, 0),))
    with pytest.raises(RingError, match="more descriptors than the 0"):
        PackedDeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False,
                              resubmit=[chain])


def test_a_half_initialised_buffer_is_initialised_again(setup: Setup) -> None:
    setup.buffer[:] = b"\x5a" * len(setup.buffer)
    struct.pack_into("<H", setup.buffer, 8, 0)  # version 0: the last store never came
    recovery = setup.journal().recover(setup.ring, PackedRingBase(2, False, 1, False))
    assert recovery.fresh
    assert HEADER.unpack_from(setup.buffer) == (0, 1, 4, 0, 0, 1, 1, 0, 0)


def test_a_fresh_buffer_for_a_base_outside_the_ring_is_refused_untouched(setup: Setup) -> None:
    with pytest.raises(InflightError, match="used position 4 is not in a ring of 4"):
        setup.journal().recover(setup.ring, PackedRingBase(0, True, 4, True))
    assert setup.buffer == bytes(len(setup.buffer))


def test_a_taken_over_journal_continues_where_recovery_left_it(setup: Setup) -> None:
    """What a worker process does: recover in one journal, serve with another over the
    same bytes, given the counter and the chains in flight."""
    driver = Driver(setup)
    vq, _ = setup.device(expect_fresh=True)
    driver.offer([2, 0, 1])
    assert ids_of(vq.pop_batch(4)[1]) == [0, 1, 2]
    recovery = setup.journal().recover(setup.ring, FRESH)
    first = setup.journal()
    assert first.recover(setup.ring, FRESH) == recovery
    taken = PackedInflightJournal(memoryview(setup.buffer), 4, counter=first.counter,
                                  in_flight=recovery.resubmit)
    assert recovery.base is not None
    vq = PackedDeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False,
                               **recovery.base._asdict(), inflight=taken,
                               resubmit=recovery.resubmit)
    assert vq.resubmit_pending == [0, 1, 2] and vq.avail_pending() and vq.avail_backlog() == 3
    assert vq.resubmit_chains == list(recovery.resubmit)
    assert drain(vq, batch=False) == [0, 1, 2]
    vq.add_used_batch([1, 0, 0, 0])
    vq.flush_used()
    assert driver.reap() == [1, 0]
    driver.offer([1])
    assert drain(vq, batch=False) == [3]
    assert [c.id for c in setup.journal().recover(setup.ring, FRESH).resubmit] == [2, 3]
    with pytest.raises(InflightError, match="not where recovery left it"):
        PackedInflightJournal(memoryview(setup.buffer), 4,
                              in_flight=[RecoveredChain(1, 9, ((0, 0, 0),)),
                                         RecoveredChain(1, 8, ((0, 0, 0),))])


def test_a_resubmitted_chain_is_checked_again(setup: Setup) -> None:
    """The descriptors come from the buffer, which the frontend could have changed: they
    are checked like the ring's, and a chain that ran off the ring is refused again."""
    driver = Driver(setup)
    vq, _ = setup.device(expect_fresh=True)
    driver.offer([1, 1])
    assert ids_of(vq.pop_batch(4)[1]) == [0, 1]
    struct.pack_into("<Q", setup.buffer, 32 + 24, 0xDEAD_0000)  # entry 0's addr
    struct.pack_into("<H", setup.buffer, 64 + 18, VRING_DESC_F_NEXT)  # entry 1's flags
    vq, _ = setup.device()
    items = vq.pop_batch(4)[1]
    assert [type(item) for item in items] == [PackedChainError, PackedChainError]
    assert isinstance(items[0], PackedChainError) and isinstance(items[1], PackedChainError)
    assert items[0].head == 0 and items[0].position is None
    assert "resubmitted chain (buffer id 0): descriptor at position 0: buffer" in str(items[0])
    assert items[1].head == 1 and "ends on a descriptor with NEXT" in str(items[1])
    vq.add_used_batch([0, 0, 1, 0])
    vq.flush_used()
    assert driver.reap() == [0, 1]


# ---------------------------------------------------------------------- hostile buffers


def recorded(setup: Setup) -> tuple[Driver, PackedDeviceVirtqueue]:
    """A buffer with chains in flight: an indirect chain answered (used position 1), then
    two direct descriptors (id 1, entries 0 -> 1) and one (id 2, entry 2) popped; entry 3
    is free."""
    driver = Driver(setup)
    vq, _ = setup.device(expect_fresh=True)
    driver.offer([0])
    assert ids_of(vq.pop_batch(4)[1]) == [0]
    vq.add_used(0, 0)
    vq.flush_used()
    driver.reap()
    driver.offer([2, 1])
    assert ids_of(vq.pop_batch(4)[1]) == [1, 2]
    return driver, vq


def entry(e: int, field: int) -> int:
    """Byte offset of a DescStatePacked field of entry ``e``."""
    return 32 + 32 * e + field


HOSTILE: list[tuple[str, list[tuple[str, int, int]], str]] = [
    ("version", [("<H", 8, 2)], "version 2; only 1 is defined"),
    ("desc_num", [("<H", 10, 8)], "made for a queue of 8 entries, the ring has 4"),
    ("used_idx", [("<H", 16, 4)], "used positions 4, 1 are not in a ring of 4"),
    ("old_used_idx", [("<H", 18, 9)], "used positions 1, 9 are not in a ring of 4"),
    ("wrap", [("<B", 20, 2)], "used wrap counters 2, 1 are not 0 or 1"),
    ("free_head", [("<H", 12, 5)], "free list heads 5, 3 are outside the table"),
    ("flag", [("<B", entry(2, 0), 7)], "entry 2 has in-flight flag 7"),
    ("num 0", [("<H", entry(0, 6), 0)], "chain at entry 0 has 0 descriptors"),
    ("num too big", [("<H", entry(0, 6), 5)], "chain at entry 0 has 5 descriptors; with"),
    ("leaves", [("<H", entry(0, 2), 60)], "chain at entry 0 leaves the table at 60"),
    ("overlap", [("<H", entry(0, 2), 2), ("<H", entry(0, 4), 2)],
     "entry 2 belongs to the chains at entries 0 and 2"),
    ("last", [("<H", entry(0, 4), 0)], "chain at entry 0 ends at 1 but says its last entry "
     "is 0"),
    ("counter", [("<Q", entry(2, 8), 1)], "two chains in flight have the same counter"),
    ("counter past", [("<Q", entry(2, 8), 1 << 63)], "counter past 2\\^63"),
    ("ring says nothing", [("<H", 16, 0), ("<H", 18, 0)],
     "3 descriptors\\) in flight, but the ring's descriptor at used position 0 is not "
     "available in lap 1"),
]


@pytest.mark.parametrize(("puts", "match"), [(p, m) for _, p, m in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_a_hostile_buffer_is_refused_untouched(
    setup: Setup, puts: list[tuple[str, int, int]], match: str
) -> None:
    recorded(setup)
    for fmt, offset, value in puts:
        struct.pack_into(fmt, setup.buffer, offset, value)
    before = bytes(setup.buffer)
    with pytest.raises(InflightError, match=match):
        setup.journal().recover(setup.ring, FRESH)
    assert bytes(setup.buffer) == before


def linked_copy(setup: Setup, heads: list[int], used: int, wrap: bool) -> bytearray:
    """The buffer as a device leaves it when killed after linking ``heads`` (journal
    entries) and before the flags store: a copy, recovered, then linked."""
    copy = bytearray(setup.buffer)
    journal = PackedInflightJournal(memoryview(copy), setup.num)
    journal.recover(setup.ring, FRESH)
    journal.link(heads, used, wrap)
    return copy


def test_a_batch_the_ring_never_showed_stays_in_flight(setup: Setup) -> None:
    """Killed after linking a batch and before its flags store: the used position rolls
    back and the batch is resubmitted; killed after the store: it is settled."""
    driver, vq = recorded(setup)
    linked = linked_copy(setup, [2], 2, True)  # id 2 answered at used position 1
    recovery = PackedInflightJournal(memoryview(bytearray(linked)), 4).recover(setup.ring,
                                                                              FRESH)
    assert [c.id for c in recovery.resubmit] == [1, 2] and recovery.settled == 0
    assert recovery.base == PackedRingBase(0, False, 1, True)
    vq.add_used(2, 0)
    vq.flush_used()
    assert driver.reap() == [2]
    setup.buffer[:] = linked  # the flags store happened, the settle did not
    recovery = setup.journal().recover(setup.ring, FRESH)
    assert [c.id for c in recovery.resubmit] == [1] and recovery.settled == 1
    assert recovery.base == PackedRingBase(0, False, 2, True)
    assert HEADER.unpack_from(setup.buffer)[3:9] == (2, 2, 2, 2, 1, 1)


def test_a_batch_list_that_does_not_lead_back_is_refused_untouched(setup: Setup) -> None:
    _, vq = recorded(setup)
    linked = linked_copy(setup, [2], 2, True)
    vq.add_used(2, 0)
    vq.flush_used()  # published: recovery walks the batch list from free_head
    for puts, match in (([("<H", 12, 4)], "reaches entry 4 \\(outside the table"),
                        ([("<H", entry(2, 2), 2)], "reaches entry 2 .* a second time"),
                        ([("<H", 12, 1), ("<H", entry(1, 4), 7)],
                         "entry 1 says its chain ends at entry 7")):
        spoilt = bytearray(linked)
        for fmt, offset, value in puts:
            struct.pack_into(fmt, spoilt, offset, value)
        before = bytes(spoilt)
        with pytest.raises(InflightError, match=match):
            PackedInflightJournal(memoryview(spoilt), 4).recover(setup.ring, FRESH)
        assert bytes(spoilt) == before


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=192, max_size=192), num_in_flight=st.integers(0, 3),
       desc_num=st.sampled_from([4, 4, 4, 5]))
def test_random_buffers_are_refused_untouched_or_give_a_device_that_serves(
    data: bytes, num_in_flight: int, desc_num: int
) -> None:
    """Random bytes with a plausible header over a ring whose descriptors are available
    in the buffer's lap: recovery refuses them without writing, or gives positions and
    chains a device accepts and serves (each resubmitted chain comes back as a chain or a
    ChainError, never anything else), and says the same when asked again."""
    s = Setup(4)
    try:
        buffer = bytearray(data)
        struct.pack_into("<HH", buffer, 8, 1, desc_num)
        # Small header values, so that positions and lists are often inside the ring.
        for offset, limit in ((12, 5), (14, 5), (16, 4), (18, 4), (20, 2), (21, 2)):
            fmt = "<B" if offset >= 20 else "<H"
            value = struct.unpack_from(fmt, buffer, offset)[0]
            struct.pack_into(fmt, buffer, offset, value % (limit + (value & 0x80 == 0x80)))
        for e in range(4):  # a few entries flagged, chains of 1 or 2, links mostly inside
            flagged = e < num_in_flight
            buffer[entry(e, 0)] = flagged
            for field in (2, 4, 6):
                value = struct.unpack_from("<H", buffer, entry(e, field))[0]
                struct.pack_into("<H", buffer, entry(e, field), value % 5)
            if flagged:
                struct.pack_into("<H", buffer, entry(e, 6), 1 + buffer[entry(e, 6)] % 2)
                if buffer[entry(e, 1)] & 1:  # (padding byte) a consistent ``last``
                    nxt = struct.unpack_from("<H", buffer, entry(e, 2))[0]
                    last = e if buffer[entry(e, 6)] == 1 else nxt
                    struct.pack_into("<H", buffer, entry(e, 4), last)
            s.ring_h[8 * e + 7] = avail_bits(buffer[20] == 1)
        before = bytes(buffer)
        journal = PackedInflightJournal(memoryview(buffer), 4)
        try:
            recovery = journal.recover(s.ring, FRESH)
        except InflightError:
            assert bytes(buffer) == before
            return
        assert recovery.base is not None
        vq = PackedDeviceVirtqueue(s.guest.memory, s.addrs, event_idx=False,
                                   **recovery.base._asdict(), inflight=journal,
                                   resubmit=recovery.resubmit)
        served = 0
        while vq.resubmit_pending:
            try:
                vq.pop()
            except ChainError:
                pass
            served += 1
        assert served == len(recovery.resubmit)
        again = PackedInflightJournal(memoryview(buffer), 4).recover(s.ring, FRESH)
        assert (again.base, again.resubmit) == (recovery.base, recovery.resubmit)
    finally:
        s.close()
