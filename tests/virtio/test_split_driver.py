"""The driver end of a split virtqueue, against a hand-played device writing raw rings."""

from __future__ import annotations

import itertools

import pytest
from virtq_helpers import DESC, Guest, RawRing

from virtblk.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from virtblk.virtio.split_driver import DeviceProtocolError, DriverVirtqueue, QueueFull
from virtblk.virtio.split_layout import VringAddrs, ring_sizes

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def make(
    guest: Guest, num: int = 8, *, event_idx: bool = False, indirect: bool = False, **kw: int
) -> tuple[DriverVirtqueue, RawRing]:
    addrs = VringAddrs.allocate(guest.allocator, num)
    vq = DriverVirtqueue(
        guest.memory,
        addrs,
        event_idx=event_idx,
        indirect=indirect,
        allocator=guest.allocator,
        max_chain=kw.pop("max_chain", 4),
        **kw,
    )
    return vq, RawRing(guest, addrs)


def test_ring_geometry() -> None:
    assert ring_sizes(256) == (4096, 6 + 512, 6 + 2048)
    for bad in (0, 3, 65536, 100):
        with pytest.raises(ValueError, match="power of two"):
            ring_sizes(bad)


def test_allocate_respects_alignments(guest: Guest) -> None:
    addrs = VringAddrs.allocate(guest.allocator, 128)
    assert addrs.num == 128
    assert addrs.desc % 16 == 0 and addrs.avail % 2 == 0 and addrs.used % 4 == 0
    spans = sorted(zip((addrs.desc, addrs.avail, addrs.used), ring_sizes(128), strict=True))
    for (a, size), (b, _) in itertools.pairwise(spans):
        assert a + size <= b


def test_direct_chain_layout_and_publication_at_kick(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([(0x1000, 16), (0x2000, 512)], [(0x3000, 1)], token=5)
    assert vq.num_free == 5 and vq.in_flight == 1
    assert raw.avail[1] == 0  # not visible before kick_prepare
    assert vq.kick_prepare() is True
    assert raw.avail[1] == 1
    head = raw.avail[2]
    first = raw.read_desc(head)
    assert first[:3] == (0x1000, 16, NEXT)
    second = raw.read_desc(first[3])
    assert second[:3] == (0x2000, 512, NEXT)
    assert raw.read_desc(second[3]) == (0x3000, 1, WRITE, 0)


def test_indirect_chain_uses_one_ring_descriptor(guest: Guest) -> None:
    vq, raw = make(guest, indirect=True, max_chain=4, max_tokens=3)
    vq.add([(0x1000, 16)], [(0x2000, 4096), (0x3000, 1)], token=2)
    vq.kick_prepare()
    assert vq.num_free == 7
    addr, length, flags, _ = raw.read_desc(raw.avail[2])
    assert flags == INDIRECT and length == 48
    table = guest.memory.view(addr, length)
    assert [DESC.unpack_from(table, 16 * i) for i in range(3)] == [
        (0x1000, 16, NEXT, 1),
        (0x2000, 4096, NEXT | WRITE, 2),
        (0x3000, 1, WRITE, 0),
    ]
    # A single buffer needs no table.
    vq.add([], [(0x4000, 8)], token=0)
    vq.kick_prepare()
    assert raw.read_desc(raw.avail[3]) == (0x4000, 8, WRITE, 0)


def test_a_prepared_chain_is_written_once_and_submitted_again(guest: Guest) -> None:
    vq, raw = make(guest, indirect=True, max_chain=4)
    chain = ([(0x1000, 16)], [(0x2000, 512), (0x3000, 1)])
    vq.prepare(1, *chain)
    for round_ in range(2):
        vq.add_prepared(1)
        vq.kick_prepare()
        head = raw.avail[2 + round_]
        addr, length, flags, _ = raw.read_desc(head)
        assert (length, flags) == (48, INDIRECT)
        table = guest.memory.view(addr, length)
        assert [DESC.unpack_from(table, 16 * i) for i in range(3)] == [
            (0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WRITE, 2), (0x3000, 1, WRITE, 0)]
        with pytest.raises(ValueError, match="already in flight"):
            vq.prepare(1, *chain)
        with pytest.raises(ValueError, match="already in flight"):
            vq.add_prepared(1)
        raw.complete((head, 513))
        assert vq.get_used() == [(1, 513)]
    table[:16] = bytes(16)
    vq.prepare(1, *chain)  # the same chain again: a comparison, nothing rewritten
    assert bytes(table[:16]) == bytes(16)
    vq.prepare(1, [(0x1000, 16), (0x4000, 1024)], [(0x3000, 1)])  # a write: rewritten
    vq.add_prepared(1)
    vq.kick_prepare()
    assert [DESC.unpack_from(table, 16 * i) for i in range(3)] == [
        (0x1000, 16, NEXT, 1), (0x4000, 1024, NEXT, 2), (0x3000, 1, WRITE, 0)]
    raw.complete((raw.avail[4], 2))  # more than the one writable byte
    with pytest.raises(DeviceProtocolError, match="exceeds the chain's 1 writable"):
        vq.get_used()


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
    vq, _ = make(guest, num=4, max_tokens=8)
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


def test_indirect_chain_limits(guest: Guest) -> None:
    vq, _ = make(guest, num=4, indirect=True, max_chain=3, max_tokens=5)
    with pytest.raises(ValueError, match="max_chain 3"):
        vq.add([(0x1000, 1)] * 4, [], token=0)
    for token in range(4):
        vq.add([(0x1000, 1)] * 3, [], token=token)  # one ring descriptor each
    with pytest.raises(QueueFull):
        vq.add([(0x1000, 1)] * 2, [], token=4)


def test_an_indirect_chain_is_bounded_by_the_queue_size_too(guest: Guest) -> None:
    vq, _ = make(guest, num=2, indirect=True, max_chain=8)
    with pytest.raises(ValueError, match="queue size 2"):
        vq.add([(0x1000, 1)] * 3, [], token=0)
    vq.add([(0x1000, 1)] * 2, [], token=0)


def test_get_used_returns_tokens_and_frees_descriptors(guest: Guest) -> None:
    vq, raw = make(guest, num=4, max_tokens=8)
    vq.add([(0x1000, 16)], [(0x2000, 100)], token=7)
    vq.add([(0x1000, 16)], [(0x3000, 1)], token=3)
    vq.kick_prepare()
    heads = [raw.avail[2], raw.avail[3]]
    assert vq.num_free == 0 and not vq.pending()
    raw.complete((heads[1], 1), (heads[0], 100))
    assert vq.pending()
    assert vq.get_used(limit=1) == [(3, 1)]
    assert vq.get_used() == [(7, 100)]
    assert vq.get_used() == []
    assert vq.num_free == 4 and vq.in_flight == 0
    vq.add([(0x1000, 1)], [], token=7)  # the token is free again


def test_notification_without_event_idx_follows_no_notify(guest: Guest) -> None:
    vq, raw = make(guest)
    assert vq.kick_prepare() is False  # nothing added
    vq.add([(0x1000, 1)], [], token=0)
    raw.used[0] = VRING_USED_F_NO_NOTIFY
    assert vq.kick_prepare() is False
    assert raw.avail[1] == 1  # still published
    raw.used[0] = 0
    vq.add([(0x1000, 1)], [], token=1)
    assert vq.kick_prepare() is True


def test_notification_with_event_idx_follows_avail_event(guest: Guest) -> None:
    vq, raw = make(guest, event_idx=True)
    raw.avail_event = 1  # the device wants a kick once entry 1 is published
    vq.add([(0x1000, 1)], [], token=0)
    assert vq.kick_prepare() is False  # published [0, 1): entry 1 not yet
    vq.add([(0x1000, 1)], [], token=1)
    vq.add([(0x1000, 1)], [], token=2)
    assert vq.kick_prepare() is True  # published [1, 3) covers 1
    vq.add([(0x1000, 1)], [], token=3)
    assert vq.kick_prepare() is False  # event 1 is behind us


def test_callback_suppression_without_event_idx(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.disable_cb()
    assert raw.avail[0] == VRING_AVAIL_F_NO_INTERRUPT
    assert vq.enable_cb() is True
    assert raw.avail[0] == 0
    vq.add([], [(0x1000, 1)], token=0)
    vq.kick_prepare()
    raw.complete((raw.avail[2], 1))
    assert vq.enable_cb() is False  # a completion slipped in: drain again
    assert vq.get_used() == [(0, 1)]
    assert vq.enable_cb() is True


def test_callback_suppression_with_event_idx(guest: Guest) -> None:
    vq, raw = make(guest, event_idx=True)
    for token in range(3):
        vq.add([], [(0x1000, 1)], token=token)
    vq.kick_prepare()
    raw.complete(*[(raw.avail[2 + i], 1) for i in range(3)])
    assert vq.get_used() == [(0, 1), (1, 1), (2, 1)]
    vq.disable_cb()
    assert raw.used_event == 3 + 0x8000  # far outside any in-flight window
    assert vq.enable_cb() is True
    assert raw.used_event == 3  # interrupt at the very next completion
    assert raw.avail[0] == 0


def test_detach_unused_returns_in_flight_tokens(guest: Guest) -> None:
    vq, raw = make(guest, num=8, indirect=True)
    for token in (4, 1, 6):
        vq.add([(0x1000, 1)], [(0x2000, 1)], token=token)
    vq.kick_prepare()
    raw.complete((raw.avail[3], 1))  # token 1 done
    assert vq.get_used() == [(1, 1)]
    assert sorted(vq.detach_unused()) == [4, 6]
    assert vq.in_flight == 0 and vq.num_free == 8
    assert vq.detach_unused() == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((8, 0), "outside the queue"),
        ((5, 0), "not in flight"),
        (("head", 2), "exceeds the chain's 1 writable bytes"),
    ],
)
def test_a_misbehaving_device_breaks_the_queue(
    guest: Guest, entry: tuple[object, int], message: str
) -> None:
    vq, raw = make(guest, num=8)
    vq.add([(0x1000, 16)], [(0x2000, 1)], token=0)
    vq.add([(0x1000, 16)], [(0x2000, 1)], token=1)
    vq.kick_prepare()
    good = raw.avail[2]
    bad_head = raw.avail[3] if entry[0] == "head" else entry[0]
    assert isinstance(bad_head, int)
    raw.complete((good, 1), (bad_head, entry[1]))
    with pytest.raises(DeviceProtocolError, match=message) as info:
        vq.get_used()
    assert info.value.completed == [(0, 1)]  # the good completion before it is not lost
    assert vq.broken
    with pytest.raises(DeviceProtocolError, match="broken"):
        vq.add([(0x1000, 1)], [], token=2)
    with pytest.raises(DeviceProtocolError, match="broken"):
        vq.get_used()
    assert vq.detach_unused() == [1]


def test_a_duplicate_completion_is_not_in_flight(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)
    vq.add([], [(0x2000, 1)], token=1)
    vq.kick_prepare()
    head = raw.avail[2]
    raw.complete((head, 1), (head, 1))
    with pytest.raises(DeviceProtocolError, match="not in flight"):
        vq.get_used()


def test_used_idx_running_ahead_breaks_the_queue(guest: Guest) -> None:
    vq, raw = make(guest)
    vq.add([], [(0x2000, 1)], token=0)
    vq.kick_prepare()
    raw.used[1] = 2  # two completions for one request
    with pytest.raises(DeviceProtocolError, match="2 entries past 0, 1 in flight"):
        vq.get_used()
    assert vq.broken


def test_close_returns_the_indirect_tables(guest: Guest) -> None:
    before = guest.allocator.free_bytes
    vq, _ = make(guest, indirect=True, max_chain=16, max_tokens=64)
    rings = sum(1 << max(4, (size - 1).bit_length()) for size in ring_sizes(8))
    assert guest.allocator.free_bytes == before - rings - 16 * 16 * 64
    vq.close()
    assert guest.allocator.free_bytes == before - rings


def test_a_delay_cannot_be_asked_without_event_idx(guest: Guest) -> None:
    """Flags-based suppression has no ``used_event``: any completion pending means drain."""
    vq, raw = make(guest, event_idx=False, indirect=True)
    vq.add([(0x1000, 16)], [(0x3000, 1)], 0)
    vq.kick_prepare()
    assert vq.enable_cb(5)
    raw.complete((raw.avail[2], 1))
    assert not vq.enable_cb(5)
