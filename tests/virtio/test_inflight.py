"""The in-flight journal: a device killed after any store it makes is recovered exactly.

A crash is simulated at every point of pop -> answer -> publish: a trace function copies
the ring memory and the in-flight buffer before every line the device's queue code runs
(each line holds at most one store to shared memory that matters), a fresh device
recovers from each copy, and what it would resubmit and take from the avail ring is
compared with what the driver is owed: every request it offered and did not see
answered, each exactly once, the in-flight ones in the order they were popped.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtq_helpers import Guest, RawRing, crash_points

from virtblk.virtio import device_common, split_device
from virtblk.virtio import inflight as inflight_module
from virtblk.virtio.inflight import InflightError, InflightJournal, queue_region_size
from virtblk.virtio.split_device import (
    ChainError,
    DescriptorChain,
    DeviceVirtqueue,
    RingError,
    Triple,
)
from virtblk.virtio.split_layout import VringAddrs

NUM = 8
GUEST_SIZE = 0x4000
GUEST_GPA = 0x10_0000
DATA = GUEST_GPA + 0x2000  # buffer of head i at DATA + 16 * i


def test_region_size_is_the_spec_layout_rounded_to_64() -> None:
    assert queue_region_size(128) == 2112  # 16 + 16 * 128 = 2064, rounded up
    assert queue_region_size(8) == 192  # 16 + 128 = 144
    assert queue_region_size(1) == 64


class Setup:
    """A guest with one ring of NUM entries, the driver's raw view, an in-flight buffer."""

    def __init__(self) -> None:
        self.guest = Guest(size=GUEST_SIZE, gpa=GUEST_GPA)
        self.addrs = VringAddrs.allocate(self.guest.allocator, NUM)
        self.raw = RawRing(self.guest, self.addrs)
        for head in range(NUM):
            self.raw.write_desc(head, DATA + 16 * head, 16)
        self.buffer = bytearray(queue_region_size(NUM))

    def journal(self) -> InflightJournal:
        return InflightJournal(memoryview(self.buffer), NUM)

    def device(self) -> DeviceVirtqueue:
        """A device that starts on this ring and buffer as a restarted one would."""
        journal = self.journal()
        recovery = journal.recover(self.raw.used[1], self.raw.avail[1])
        last_avail = 0 if recovery.last_avail is None else recovery.last_avail
        return DeviceVirtqueue(self.guest.memory, self.addrs, event_idx=False,
                               last_avail_idx=last_avail, used_idx=self.raw.used[1],
                               inflight=journal, resubmit=recovery.resubmit)

    def snapshot(self) -> tuple[bytes, bytes]:
        return bytes(self.guest.region.view), bytes(self.buffer)

    def restore(self, shot: tuple[bytes, bytes]) -> None:
        self.guest.region.view[:] = shot[0]
        self.buffer[:] = shot[1]

    def close(self) -> None:
        self.guest.close()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.close()


# The queue's code, the shared base of both device rings included.
_TRACED = {split_device.__file__, inflight_module.__file__, device_common.__file__}


class Driver:
    """The bookkeeping of a driver that hands out heads and reaps answers: which avail
    position each outstanding head was offered at."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.free = list(range(NUM))
        self.position: dict[int, int] = {}  # outstanding head -> avail position
        self.avail = 0
        self.used = 0

    def offer(self, count: int) -> None:
        heads, self.free = self.free[:count], self.free[count:]
        for head in heads:
            self.position[head] = self.avail
            self.avail += 1
        self.setup.raw.offer(*heads)

    def reap(self) -> None:
        raw = self.setup.raw
        published = raw.used[1]
        for head, _ in raw.used_entries(self.used, (published - self.used) & 0xFFFF):
            del self.position[head]
            self.free.append(head)
        self.used = published


def owed(shot: tuple[bytes, bytes], outstanding: dict[int, int], reaped: int,
         setup: Setup) -> None:
    """Recover a fresh device from ``shot`` and check it owes the driver exactly what the
    driver is waiting for: resubmitted (in pop order) or still in the avail ring.

    ``outstanding`` (head -> avail position) and ``reaped`` (the used idx the driver had
    read) are the driver's state before the step the shot was taken in; what the shot's
    used ring published since then is answered.  Outstanding heads are distinct, so a
    published entry naming one is its answer."""
    setup.restore(shot)
    raw = setup.raw
    used_idx, avail_idx = raw.used[1], raw.avail[1]
    answered = {head for head, _ in raw.used_entries(reaped, (used_idx - reaped) & 0xFFFF)}
    waiting = {head: pos for head, pos in outstanding.items() if head not in answered}
    journal = setup.journal()
    recovery = journal.recover(used_idx, avail_idx)
    last_avail = 0 if recovery.fresh else recovery.last_avail
    assert last_avail is not None
    again = [raw.avail[2 + pos % NUM] for pos in range(last_avail, avail_idx)]
    resubmit = list(recovery.resubmit)
    assert sorted(resubmit + again) == sorted(waiting), (resubmit, again, waiting)
    assert [waiting[head] for head in resubmit] == sorted(waiting[head] for head in resubmit)
    assert all(waiting[head] < last_avail for head in resubmit)
    # And a device started there answers every one of them, once.
    vq = DeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False,
                         last_avail_idx=last_avail, used_idx=used_idx, inflight=journal,
                         resubmit=resubmit)
    vq_used = vq.used_idx
    heads: list[int] = []
    while items := vq.pop_batch(NUM)[1]:
        heads += heads_of(items)
    assert sorted(heads) == sorted(waiting)
    vq.add_used_batch([x for head in heads for x in (head, 0)])
    vq.flush_used()
    assert raw.used[1] == (vq_used + len(heads)) & 0xFFFF
    assert journal.in_flight() == []
    assert journal.recover(raw.used[1], raw.avail[1]).resubmit == ()


Step = tuple[str, Any]


def heads_of(items: list[Triple | DescriptorChain | ChainError]) -> list[int]:
    """The heads of popped chains (every chain these tests offer is well formed)."""
    heads = []
    for item in items:
        assert not isinstance(item, ChainError), item
        heads.append(item.head)
    return heads


def take_snapshot(setup: Setup, shots: list[tuple[bytes, bytes]]) -> None:
    shots.append(setup.snapshot())


def play(setup: Setup, steps: list[Step], check_every_point: bool = True) -> int:
    """Run the device through ``steps`` and check recovery at every crash point; returns
    how many crash points were checked."""
    driver = Driver(setup)
    vq = setup.device()
    popped: list[int] = []
    checked = 0
    for kind, arg in steps:
        if kind == "offer":
            driver.offer(min(arg, len(driver.free)))
            continue
        shots: list[tuple[bytes, bytes]] = []
        before, reaped = dict(driver.position), driver.used
        with crash_points(functools.partial(take_snapshot, setup, shots), _TRACED):
            if kind == "pop":
                _, items = vq.pop_batch(arg)
                popped += heads_of(items)
            else:  # answer a selection of what is in flight, in up to two batches
                chosen = [popped[i % len(popped)] for i in arg] if popped else []
                chosen = list(dict.fromkeys(chosen))
                half = len(chosen) // 2
                for part in (chosen[:half], chosen[half:]):
                    vq.add_used_batch([x for head in part for x in (head, 0)])
                vq.flush_used()
                popped = [head for head in popped if head not in chosen]
        shots.append(setup.snapshot())
        final = shots[-1]
        for shot in shots if check_every_point else shots[-1:]:
            owed(shot, before, reaped, setup)
            checked += 1
        setup.restore(final)
        driver.reap()
    return checked


def test_a_crash_at_any_store_of_pop_answer_publish_is_recovered(setup: Setup) -> None:
    steps: list[Step] = [
        ("offer", 5), ("pop", 3), ("answer", [1]), ("pop", 4), ("answer", [0, 2, 3]),
        ("offer", 6), ("pop", 8), ("answer", [4, 0, 2]), ("answer", [0, 1, 2, 3, 4, 5]),
    ]
    assert play(setup, steps) > 100


def test_a_journal_taken_whole_resubmits_nothing(setup: Setup) -> None:
    play(setup, [("offer", 4), ("pop", 4), ("answer", [0, 1, 2, 3])])
    recovery = setup.journal().recover(setup.raw.used[1], setup.raw.avail[1])
    assert recovery == inflight_module.Recovery(False, 4, (), 0)


steps_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(1, NUM)),
        st.tuples(st.just("pop"), st.integers(1, NUM)),
        st.tuples(st.just("answer"), st.lists(st.integers(0, NUM - 1), max_size=NUM)),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_strategy)
def test_random_interleavings_recover_exactly(steps: list[Step]) -> None:
    s = Setup()
    try:
        play(s, steps)
    finally:
        s.close()


def test_resubmitted_requests_come_first_in_counter_order(setup: Setup) -> None:
    driver = Driver(setup)
    vq = setup.device()
    driver.offer(4)
    _, items = vq.pop_batch(4)
    assert heads_of(items) == [0, 1, 2, 3]
    vq.add_used_batch([2, 0])
    vq.flush_used()
    driver.reap()
    driver.offer(2)  # heads 4, 5: not popped before the "crash"
    restarted = setup.device()
    assert restarted.resubmit_pending == [0, 1, 3]
    assert restarted.last_avail_idx == 4
    _, items = restarted.pop_batch(8)
    assert heads_of(items) == [0, 1, 3]
    _, items = restarted.pop_batch(8)
    assert heads_of(items) == [4, 5]
    assert restarted.inflight is not None and restarted.inflight.counter == 6


# --------------------------------------------------------------------------- hostile buffers


def header(buffer: bytearray, *, version: int = 1, desc_num: int = NUM,
           last_batch_head: int = 0, used_idx: int = 0) -> None:
    struct.pack_into("<QHHHH", buffer, 0, 0, version, desc_num, last_batch_head, used_idx)


def flag(buffer: bytearray, head: int, value: int = 1, counter: int = 0,
         nxt: int = 0) -> None:
    struct.pack_into("<B5xHQ", buffer, 16 + 16 * head, value, nxt, counter)


def test_a_fresh_buffer_is_initialised_with_the_ring_s_used_idx() -> None:
    buffer = bytearray(b"\xff" * queue_region_size(NUM))
    struct.pack_into("<H", buffer, 8, 0)  # version 0: whatever else is there is garbage
    recovery = InflightJournal(memoryview(buffer), NUM).recover(7, 9)
    assert recovery.fresh and recovery.last_avail is None
    assert struct.unpack_from("<QHHHH", buffer) == (0, 1, NUM, 0, 7)
    assert bytes(buffer[16:]) == bytes(len(buffer) - 16)


@pytest.mark.parametrize(
    ("prepare", "used_idx", "avail_idx", "message"),
    [
        (lambda b: header(b, version=2), 0, 0, "version 2"),
        (lambda b: header(b, desc_num=16), 0, 0, "queue of 16 entries"),
        (lambda b: (header(b), flag(b, 3, value=2)), 0, 4, "flag 2"),
        (lambda b: (header(b), flag(b, 0), flag(b, 1)), 0, 1, "only 1 outstanding"),
        (lambda b: (header(b), flag(b, 0, counter=5), flag(b, 1, counter=5)), 0, 2,
         "same counter"),
        (lambda b: (header(b), flag(b, 0, counter=1 << 63)), 0, 1, "past 2\\^63"),
        (lambda b: header(b, used_idx=0, last_batch_head=3), NUM + 1, NUM + 1,
         "more than the queue holds"),
        (lambda b: header(b, used_idx=0, last_batch_head=200), 1, 1, "descriptor 200"),
        (lambda b: (header(b, last_batch_head=2), flag(b, 2, nxt=2)), 2, 2, "loops"),
    ],
)
def test_hostile_buffers_are_refused_untouched(
    prepare: Callable[[bytearray], object], used_idx: int, avail_idx: int, message: str
) -> None:
    buffer = bytearray(queue_region_size(NUM))
    prepare(buffer)
    before = bytes(buffer)
    with pytest.raises(InflightError, match=message):
        InflightJournal(memoryview(buffer), NUM).recover(used_idx, avail_idx)
    assert bytes(buffer) == before


def test_a_region_too_small_for_the_queue_is_refused() -> None:
    with pytest.raises(InflightError, match="needs 192"):
        InflightJournal(memoryview(bytearray(128)), NUM)


def test_a_journal_must_match_the_ring(setup: Setup) -> None:
    journal = InflightJournal(memoryview(bytearray(queue_region_size(16))), 16)
    with pytest.raises(RingError, match="journal for 16 entries"):
        DeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False, inflight=journal)
    with pytest.raises(RingError, match="resubmit"):
        DeviceVirtqueue(setup.guest.memory, setup.addrs, event_idx=False, resubmit=[NUM])


def test_a_half_recorded_last_batch_is_settled(setup: Setup) -> None:
    """Used idx 3 in the ring, 1 in the buffer: the two heads of the list from
    last_batch_head were answered; the third flagged head is resubmitted."""
    buffer = setup.buffer
    header(buffer, last_batch_head=5, used_idx=1)
    flag(buffer, 5, counter=2, nxt=4)
    flag(buffer, 4, counter=1, nxt=0)
    flag(buffer, 6, counter=3)
    recovery = setup.journal().recover(3, 4)
    assert recovery == inflight_module.Recovery(False, 4, (6,), 2)
    assert struct.unpack_from("<H", buffer, 14) == (3,)
    assert buffer[16 + 16 * 5] == 0 and buffer[16 + 16 * 4] == 0 and buffer[16 + 16 * 6] == 1


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(min_size=queue_region_size(NUM), max_size=queue_region_size(NUM)),
    version_one=st.booleans(),
    used_idx=st.integers(0, 0xFFFF),
    outstanding=st.integers(0, NUM + 2),
)
def test_any_buffer_recovers_sanely_or_is_refused(
    data: bytes, version_one: bool, used_idx: int, outstanding: int
) -> None:
    """Whatever the frontend hands over: a Recovery whose heads are in the queue, distinct
    and no more than the driver has outstanding, or InflightError; nothing else."""
    buffer = bytearray(data)
    if version_one:  # else random: mostly refused by the version check
        struct.pack_into("<HH", buffer, 8, 1, NUM)
        for head in range(NUM):  # flags of 0 or 1, as a real buffer has them
            buffer[16 + 16 * head] &= 1
    avail_idx = (used_idx + outstanding) & 0xFFFF
    journal = InflightJournal(memoryview(buffer), NUM)
    before = bytes(buffer)
    try:
        recovery = journal.recover(used_idx, avail_idx)
    except InflightError:
        assert bytes(buffer) == before  # refused untouched
        return
    if recovery.fresh:
        return
    heads = recovery.resubmit
    assert len(set(heads)) == len(heads) and all(0 <= h < NUM for h in heads)
    assert len(heads) <= outstanding
    assert recovery.last_avail == (used_idx + len(heads)) & 0xFFFF
    assert sorted(journal.in_flight()) == sorted(heads)
