"""The driver end of a packed virtqueue, against a hand-played device writing the raw ring."""

from __future__ import annotations

import itertools

import pytest
from packed_helpers import AVAIL, PDESC, USED, PackedRawRing, avail, used
from virtq_helpers import Guest

from virtblk.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from virtblk.virtio import packed_layout
from virtblk.virtio.packed_driver import DeviceProtocolError, PackedDriverVirtqueue, QueueFull

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def make(
    guest: Guest, num: int = 8, *, event_idx: bool = False, indirect: bool = False, **kw: int
) -> tuple[PackedDriverVirtqueue, PackedRawRing]:
    addrs = packed_layout.allocate(guest.allocator, num)
    vq = PackedDriverVirtqueue(
        guest.memory, addrs, event_idx=event_idx, indirect=indirect,
        allocator=guest.allocator, max_chain=kw.pop("max_chain", 4), **kw,
    )
    return vq, PackedRawRing(guest, addrs)


def test_ring_geometry() -> None:
    assert packed_layout.ring_sizes(256) == (4096, 4, 4)
    assert packed_layout.ring_sizes(3) == (48, 4, 4)  # any size, not a power of two
    for bad in (0, 32769):
        with pytest.raises(ValueError, match="not in 1"):
            packed_layout.ring_sizes(bad)


def test_allocate_respects_alignments(guest: Guest) -> None:
    addrs = packed_layout.allocate(guest.allocator, 100)
    assert addrs.desc % 16 == 0 and addrs.avail % 4 == 0 and addrs.used % 4 == 0
    spans = sorted([(addrs.desc, 1600), (addrs.avail, 4), (addrs.used, 4)])
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))


def test_direct_chain_layout_and_publication_at_kick(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([(0x1000, 16), (0x2000, 512)], [(0x3000, 1)], token=5)
    assert vq.num_free == 5 and vq.in_flight == 1
    bid = raw.read_desc(0)[2]
    # Every descriptor carries the id; all but the first are available already ...
    assert raw.read_desc(1) == (0x2000, 512, bid, NEXT | avail(True))
    assert raw.read_desc(2) == (0x3000, 1, bid, WRITE | avail(True))
    assert raw.read_desc(0) == (0x1000, 16, bid, 0)  # ... the first not before the kick
    assert vq.kick_prepare() is True
    assert raw.read_desc(0) == (0x1000, 16, bid, NEXT | avail(True))


def test_indirect_chain_uses_one_ring_descriptor(guest: Guest) -> None:
    vq, raw = make(guest, indirect=True, max_chain=4, max_tokens=3)
    vq.add([(0x1000, 16)], [(0x2000, 4096), (0x3000, 1)], token=2)
    vq.kick_prepare()
    assert vq.num_free == 7
    addr, length, bid, flags = raw.read_desc(0)
    assert flags == INDIRECT | avail(True) and length == 48
    table = guest.memory.view(addr, length)
    # In a table only WRITE is a flag; the id is reserved there.
    assert [PDESC.unpack_from(table, 16 * i) for i in range(3)] == [
        (0x1000, 16, 0, 0), (0x2000, 4096, 0, WRITE), (0x3000, 1, 0, WRITE)]
    vq.add([], [(0x4000, 8)], token=0)  # a single buffer needs no table
    vq.kick_prepare()
    assert raw.read_desc(1)[0:2] == (0x4000, 8) and raw.read_desc(1)[3] == WRITE | avail(True)
    assert raw.read_desc(1)[2] != bid


def test_buffer_ids_come_from_a_free_list_not_the_position(guest: Guest) -> None:
    vq, raw = make(guest, num=4)
    for token in range(3):
        vq.add([(0x1000, 1)], [], token=token)
    vq.kick_prepare()
    ids = [raw.read_desc(i)[2] for i in range(3)]
    assert sorted(ids) == [0, 1, 2]
    raw.mark_used(0, True, ids[1], 0)  # the middle one completes first
    assert vq.get_used() == [(1, 0)]
    vq.add([(0x1000, 1)], [], token=1)
    vq.kick_prepare()
    assert raw.read_desc(3)[2] == ids[1]  # at the next position, with the freed id


def test_a_chain_across_the_ring_end_is_made_available_lap_by_lap(guest: Guest) -> None:
    vq, raw = make(guest, num=3)
    vq.add([(0x1000, 1), (0x1000, 1)], [], token=0)
    vq.kick_prepare()
    raw.mark_used(0, True, raw.read_desc(1)[2], 0)
    assert vq.get_used() == [(0, 0)]
    vq.add([(0x1000, 1)], [(0x2000, 1), (0x3000, 1)], token=1)  # positions 2, 0, 1
    vq.kick_prepare()
    assert raw.read_desc(2)[3] == NEXT | avail(True)
    assert raw.read_desc(0)[3] == NEXT | WRITE | avail(False)
    assert raw.read_desc(1)[3] == WRITE | avail(False)
    raw.mark_used(2, True, raw.read_desc(1)[2], 2)
    assert vq.get_used() == [(1, 2)]
    vq.add([(0x1000, 1)], [], token=2)
    vq.kick_prepare()
    assert raw.read_desc(2)[3] == avail(False)  # the second lap
    raw.mark_used(2, False, raw.read_desc(2)[2], 0)
    assert vq.get_used() == [(2, 0)] and vq.num_free == 3


def test_a_prepared_chain_is_written_once_and_submitted_again(guest: Guest) -> None:
    vq, raw = make(guest, indirect=True, max_chain=4)
    chain = ([(0x1000, 16)], [(0x2000, 512), (0x3000, 1)])
    vq.prepare(1, *chain)
    for round_ in range(2):
        vq.add_prepared(1)
        vq.kick_prepare()
        addr, length, bid, flags = raw.read_desc(round_)
        assert (length, flags) == (48, INDIRECT | avail(True))
        table = guest.memory.view(addr, length)
        assert [PDESC.unpack_from(table, 16 * i) for i in range(3)] == [
            (0x1000, 16, 0, 0), (0x2000, 512, 0, WRITE), (0x3000, 1, 0, WRITE)]
        with pytest.raises(ValueError, match="already in flight"):
            vq.prepare(1, *chain)
        with pytest.raises(ValueError, match="already in flight"):
            vq.add_prepared(1)
        raw.mark_used(round_, True, bid, 513)
        assert vq.get_used() == [(1, 513)]
    table[:16] = bytes(16)
    vq.prepare(1, *chain)  # the same chain again: a comparison, nothing rewritten
    assert bytes(table[:16]) == bytes(16)
    vq.prepare(1, [(0x1000, 16), (0x4000, 1024)], [(0x3000, 1)])  # a write: rewritten
    vq.add_prepared(1)
    vq.kick_prepare()
    assert [PDESC.unpack_from(table, 16 * i) for i in range(3)] == [
        (0x1000, 16, 0, 0), (0x4000, 1024, 0, 0), (0x3000, 1, 0, WRITE)]
    raw.mark_used(2, True, raw.read_desc(2)[2], 2)  # more than the one writable byte
    with pytest.raises(DeviceProtocolError, match="exceeds the chain's 1 writable"):
        vq.get_used()


def test_add_prepared_batch_stops_when_descriptors_run_out(guest: Guest) -> None:
    vq, raw = make(guest, num=3, indirect=True, max_chain=4, max_tokens=6)
    for token in range(6):
        vq.prepare(token, [(0x1000, 16)], [(0x3000 + token, 1)])
    assert vq.add_prepared_batch([0, 1, 2, 3]) == 3
    assert vq.num_free == 0
    with pytest.raises(QueueFull):
        vq.add_prepared(3)
    assert vq.kick_prepare() is True
    assert [raw.read_desc(i)[3] for i in range(3)] == [INDIRECT | avail(True)] * 3


def test_prepare_refuses_what_add_refuses(guest: Guest) -> None:
    vq, _ = make(guest, indirect=True, max_chain=3)
    with pytest.raises(ValueError, match="no prepared chain"):
        vq.add_prepared(0)
    with pytest.raises(ValueError, match="max_chain 3"):
        vq.prepare(0, [(0x1000, 1)] * 4, [])
    with pytest.raises(ValueError, match="out of range"):
        vq.prepare(0, [(-1, 16)], [(0x3000, 1)])
    with pytest.raises(ValueError, match="no prepared chain"):
        vq.add_prepared(0)  # a failed prepare leaves nothing half-written behind
    with pytest.raises(ValueError, match="outside"):
        vq.prepare(vq.max_tokens, [(0x1000, 16)], [(0x3000, 1)])


def test_queue_full_and_token_misuse(guest: Guest) -> None:
    vq, raw = make(guest, num=4, max_tokens=8)
    vq.add([(0x1000, 1), (0x1000, 1), (0x1000, 1)], [], token=0)
    with pytest.raises(QueueFull):
        vq.add([(0x1000, 1)], [(0x2000, 1)], token=1)
    assert vq.num_free == 1 and vq.in_flight == 1  # the failed add changed nothing
    with pytest.raises(ValueError, match="already in flight"):
        vq.add([(0x1000, 1)], [], token=0)
    with pytest.raises(ValueError, match="outside"):
        vq.add([(0x1000, 1)], [], token=8)
    with pytest.raises(ValueError, match="at least one buffer"):
        vq.add([], [], token=1)
    with pytest.raises(ValueError, match="out of range"):
        vq.add([(-1, 1)], [], token=1)
    with pytest.raises(ValueError, match="exceeds the queue size"):
        vq.add([(0x1000, 1)] * 5, [], token=1)
    assert vq.num_free == 1
    vq.add([(0x1000, 1)], [], token=1)  # the failed adds took no position
    vq.kick_prepare()
    assert raw.read_desc(3)[3] == avail(True)


def test_an_indirect_chain_is_bounded_by_the_queue_size_too(guest: Guest) -> None:
    vq, _ = make(guest, num=2, indirect=True, max_chain=8)
    with pytest.raises(ValueError, match="queue size 2"):
        vq.add([(0x1000, 1)] * 3, [], token=0)
    vq.add([(0x1000, 1)] * 2, [], token=0)


def test_get_used_returns_tokens_and_skips_each_chain(guest: Guest) -> None:
    vq, raw = make(guest, num=8, max_tokens=8)
    vq.add([(0x1000, 16)], [(0x2000, 100)], token=7)  # positions 0, 1
    vq.add([(0x1000, 16)], [(0x3000, 1)], token=3)  # positions 2, 3
    vq.kick_prepare()
    ids = [raw.read_desc(0)[2], raw.read_desc(2)[2]]
    assert vq.num_free == 4 and not vq.pending()
    raw.mark_used(0, True, ids[1], 1)  # completion order: token 3 first
    raw.mark_used(2, True, ids[0], 100)  # the next used descriptor: 2 past the first
    assert vq.pending() and vq.next_used == (0, True)
    assert vq.get_used(limit=1) == [(3, 1)]
    assert vq.next_used == (2, True)  # past the first chain's two descriptors
    assert vq.get_used() == [(7, 100)]
    assert vq.get_used() == []
    assert vq.num_free == 8 and vq.in_flight == 0 and vq.next_used == (4, True)


def test_kick_without_event_idx_follows_the_device_flags(guest: Guest) -> None:
    vq, raw = make(guest)
    assert vq.kick_prepare() is False  # nothing added
    vq.add([(0x1000, 1)], [], token=0)
    raw.device_event[1] = RING_EVENT_FLAGS_DISABLE
    assert vq.kick_prepare() is False
    assert raw.read_desc(0)[3] == avail(True)  # still made available
    raw.device_event[1] = RING_EVENT_FLAGS_DESC  # not negotiated: taken as "enabled"
    vq.add([(0x1000, 1)], [], token=1)
    assert vq.kick_prepare() is True


def test_kick_with_event_idx_follows_the_device_event(guest: Guest) -> None:
    vq, raw = make(guest, num=4, event_idx=True)
    raw.device_event[0] = 1 | 1 << 15  # a kick once position 1 of lap 1 is available
    raw.device_event[1] = RING_EVENT_FLAGS_DESC
    vq.add([(0x1000, 1)], [], token=0)
    assert vq.kick_prepare() is False  # position 0 only
    vq.add([(0x1000, 1)], [], token=1)
    vq.add([(0x1000, 1)], [], token=2)
    assert vq.kick_prepare() is True  # positions 1, 2 cover it
    vq.add([(0x1000, 1)], [], token=3)
    assert vq.kick_prepare() is False  # event behind us
    for pos in range(4):
        raw.mark_used(pos, True, raw.read_desc(pos)[2], 0)
    assert len(vq.get_used()) == 4
    raw.device_event[0] = 3  # position 3 of the previous lap: long passed
    vq.add([(0x1000, 1)], [], token=0)
    assert vq.kick_prepare() is False
    raw.device_event[0] = 1  # position 1 of lap 0, the one we are in
    vq.add([(0x1000, 1)], [], token=1)
    assert vq.kick_prepare() is True
    raw.device_event[1] = RING_EVENT_FLAGS_ENABLE
    vq.add([(0x1000, 1)], [], token=2)
    assert vq.kick_prepare() is True


def test_callback_suppression_without_event_idx(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.disable_cb()
    assert raw.driver_event[1] == RING_EVENT_FLAGS_DISABLE
    assert vq.enable_cb() is True
    assert raw.driver_event[1] == RING_EVENT_FLAGS_ENABLE
    vq.add([], [(0x1000, 1)], token=0)
    vq.kick_prepare()
    raw.mark_used(0, True, raw.read_desc(0)[2], 1)
    assert vq.enable_cb() is False  # a completion slipped in: drain again
    assert not vq.enable_cb(5)  # a delay cannot be expressed without EVENT_IDX
    assert vq.get_used() == [(0, 1)]
    assert vq.enable_cb() is True


def test_callback_suppression_with_event_idx(guest: Guest) -> None:
    vq, raw = make(guest, num=4, event_idx=True, indirect=True)
    for token in range(3):
        vq.add([], [(0x1000, 1)], token=token)
    vq.kick_prepare()
    for pos in range(3):
        raw.mark_used(pos, True, raw.read_desc(pos)[2], 1)
    assert vq.get_used() == [(0, 1), (1, 1), (2, 1)]
    vq.disable_cb()
    assert raw.driver_event[1] == RING_EVENT_FLAGS_DISABLE
    assert vq.enable_cb() is True
    assert list(raw.driver_event) == [3 | 1 << 15, RING_EVENT_FLAGS_DESC]  # the next one
    assert vq.enable_cb(2) is True
    assert raw.driver_event[0] == 1  # two further on: position 1 of the next lap


def test_a_delayed_callback_counts_completions_already_there(guest: Guest) -> None:
    vq, raw = make(guest, num=8, event_idx=True, indirect=True)
    for token in range(4):
        vq.add([], [(0x1000, 1)], token=token)
    vq.kick_prepare()
    raw.mark_used(0, True, raw.read_desc(0)[2], 1)
    assert vq.enable_cb(2) is True  # one there, two more to wait for
    assert raw.driver_event[0] == 2 | 1 << 15  # where the second of those two goes
    raw.mark_used(1, True, raw.read_desc(1)[2], 1)
    raw.mark_used(2, True, raw.read_desc(2)[2], 1)
    assert vq.enable_cb(1) is False  # three there: more than the delay


def test_a_delayed_callback_over_chains_of_different_lengths(guest: Guest) -> None:
    """An event is a ring position: with chains of one and three descriptors in flight,
    the position asked for assumes the shortest, and a completion that already covers it
    (a long chain answered first) sends the caller back to draining, not to sleep."""
    vq, raw = make(guest, num=8, event_idx=True)
    vq.add([(0x1000, 1)], [(0x2000, 1), (0x3000, 1)], token=0)  # positions 0-2
    vq.add([], [(0x4000, 1)], token=1)  # position 3
    vq.add([], [(0x4000, 1)], token=2)  # position 4
    vq.kick_prepare()
    assert vq.enable_cb(1) is True
    assert raw.driver_event[0] == 1 | 1 << 15  # one more completion of the shortest kind
    raw.mark_used(0, True, raw.read_desc(0)[2], 2)  # the long chain: next used at 3
    assert vq.enable_cb(1) is True  # one there; the next one wakes us
    assert raw.driver_event[0] == 3 | 1 << 15
    assert vq.enable_cb(0) is False  # one there: more than no delay


def test_detach_unused_returns_in_flight_tokens_and_unkicked_chains(guest: Guest) -> None:
    vq, raw = make(guest, num=8, indirect=True)
    for token in (4, 1, 6):
        vq.add([(0x1000, 1)], [(0x2000, 1)], token=token)
    vq.kick_prepare()
    raw.mark_used(0, True, raw.read_desc(1)[2], 1)  # token 1 done
    assert vq.get_used() == [(1, 1)]
    vq.add([(0x1000, 1)], [(0x2000, 1)], token=2)  # added, never kicked
    assert sorted(vq.detach_unused()) == [2, 4, 6]
    assert vq.in_flight == 0 and vq.num_free == 8 and vq.detach_unused() == []
    vq.add([(0x1000, 1)], [], token=2)  # the un-kicked chain's position is reused
    vq.kick_prepare()
    assert raw.read_desc(3)[0:2] == (0x1000, 1) and raw.read_desc(3)[3] == avail(True)
    assert not vq.pending()
    raw.mark_used(3, True, raw.read_desc(3)[2], 0)
    assert vq.get_used() == [(2, 0)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((8, 0), "used id 8 is outside the queue"),
        ((5, 0), "used id 5 is not in flight"),
        (("second", 2), "exceeds the chain's 1 writable bytes"),
    ],
)
def test_a_misbehaving_device_breaks_the_queue(
    guest: Guest, entry: tuple[object, int], message: str
) -> None:
    vq, raw = make(guest, num=8, indirect=True)
    vq.add([(0x1000, 16)], [(0x2000, 1)], token=0)
    vq.add([(0x1000, 16)], [(0x2000, 1)], token=1)
    vq.kick_prepare()
    bad_id = raw.read_desc(1)[2] if entry[0] == "second" else entry[0]
    assert isinstance(bad_id, int)
    raw.mark_used(0, True, raw.read_desc(0)[2], 1)
    raw.mark_used(1, True, bad_id, entry[1])
    with pytest.raises(DeviceProtocolError, match=message) as info:
        vq.get_used()
    assert info.value.completed == [(0, 1)]  # the good completion before it is not lost
    assert vq.broken
    with pytest.raises(DeviceProtocolError, match="broken"):
        vq.add([(0x1000, 1)], [], token=2)
    with pytest.raises(DeviceProtocolError, match="broken"):
        vq.get_used()
    assert vq.detach_unused() == [1]


def test_a_used_descriptor_with_nothing_in_flight(guest: Guest) -> None:
    vq, raw = make(guest)
    raw.mark_used(0, True, 0, 0)
    with pytest.raises(DeviceProtocolError, match="position 0 with nothing in flight"):
        vq.get_used()


def test_a_duplicate_completion_is_not_in_flight(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)
    vq.add([], [(0x2000, 1)], token=1)
    vq.kick_prepare()
    bid = raw.read_desc(0)[2]
    raw.mark_used(0, True, bid, 1)
    raw.mark_used(1, True, bid, 1)
    with pytest.raises(DeviceProtocolError, match="not in flight"):
        vq.get_used()


def test_a_completion_for_a_chain_never_made_available(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)  # not kicked: the device cannot know it
    raw.mark_used(0, True, raw.read_desc(0)[2], 1)
    with pytest.raises(DeviceProtocolError, match="never made available"):
        vq.get_used()


@pytest.mark.parametrize("bits", [AVAIL, USED, used(False)])
def test_flags_that_do_not_say_used_are_not_a_completion(guest: Guest, bits: int) -> None:
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)
    vq.kick_prepare()
    raw.flags[7] = bits
    assert not vq.pending() and vq.get_used() == []


def test_close_returns_the_indirect_tables(guest: Guest) -> None:
    before = guest.allocator.free_bytes
    vq, _ = make(guest, indirect=True, max_chain=16, max_tokens=64)
    rings = 16 * 8 + 16 + 16  # the descriptors, both event structures (16-byte units)
    assert guest.allocator.free_bytes == before - rings - 16 * 16 * 64
    vq.close()
    assert guest.allocator.free_bytes == before - rings


class _Recorder:
    """Stands in for the ring's 16-bit view, recording the stores."""

    def __init__(self, inner: memoryview, log: list[tuple[int, int]]) -> None:
        self.inner = inner
        self.log = log

    def __getitem__(self, index: int) -> int:
        return int(self.inner[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.log.append((index, value))
        self.inner[index] = value


def test_a_kick_makes_the_batch_available_first_chain_last(guest: Guest) -> None:
    """The device polls the first chain's first descriptor: storing its flags last makes
    the whole batch visible at once, and each chain's first flags come after its others."""
    vq, _raw = make(guest)
    log: list[tuple[int, int]] = []
    vq._desc_h = _Recorder(vq._desc_h, log)  # type: ignore[assignment]
    vq.add([(0x1000, 1)], [(0x2000, 1)], token=0)  # positions 0, 1
    vq.add([(0x1000, 1)], [], token=1)  # position 2
    vq.add([(0x1000, 1)], [], token=2)  # position 3
    assert log == [(8 * 1 + 7, WRITE | avail(True))]  # only a chain's second descriptor
    del log[:]
    vq.kick_prepare()
    assert log == [(8 * 3 + 7, avail(True)), (8 * 2 + 7, avail(True)),
                   (8 * 0 + 7, NEXT | avail(True))]


def test_add_prepared_batch_mixes_direct_and_indirect_chains(guest: Guest) -> None:
    """A one-buffer chain goes direct, the others through their tables, in token order."""
    vq, raw = make(guest, num=4, indirect=True, max_chain=4, max_tokens=6)
    vq.prepare(0, [(0x1000, 16)], [(0x3000, 1)])
    vq.prepare(1, [], [(0x4000, 8)])  # one buffer: a direct descriptor
    vq.prepare(2, [(0x1000, 16)], [(0x3002, 1)])
    assert vq.add_prepared_batch([0, 1, 2]) == 3
    assert vq.in_flight == 3 and vq.num_free == 1
    vq.kick_prepare()
    assert [raw.read_desc(i)[3] for i in range(3)] == [
        INDIRECT | avail(True), WRITE | avail(True), INDIRECT | avail(True)]
    for pos in range(3):
        raw.mark_used(pos, True, raw.read_desc(pos)[2], 1)
    assert vq.get_used() == [(0, 1), (1, 1), (2, 1)]
    assert vq.num_free == 4 and vq.in_flight == 0


def test_a_limit_stops_before_what_lies_beyond_it(guest: Guest) -> None:
    """``get_used(limit)`` reads no further than asked; a used descriptor past everything
    in flight is refused when it is reached."""
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)
    vq.kick_prepare()
    raw.mark_used(0, True, raw.read_desc(0)[2], 1)
    raw.mark_used(1, True, 3, 0)  # nothing is in flight there
    assert vq.get_used(limit=1) == [(0, 1)]
    with pytest.raises(DeviceProtocolError, match="position 1 with nothing in flight"):
        vq.get_used(limit=1)
