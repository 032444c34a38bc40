"""The in-flight journal of a packed virtqueue: what a restarted device must resubmit.

The packed layout of vhost-user's in-flight buffer (vhost-user.rst, "Inflight I/O
tracking"; DPDK's ``rte_vhost_inflight_info_packed``), per queue::

    u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
    u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
    u8 padding[7];                                   /* desc[] starts at byte 32 */
    DescStatePacked desc[desc_num];  /* u8 inflight; u8 pad; u16 next; u16 last; u16 num;
                                        u64 counter; u16 id; u16 flags; u32 len; u64 addr */

A packed ring keeps no copy of what it made available: the used descriptors the device
writes overwrite the ring slots of chains still in flight.  So a chain is recorded whole
(``mark``): its descriptors (addr, len, flags, buffer id) in entries taken from a free
list and linked by ``next``, its head entry holding ``num``, ``last`` and ``counter``,
then the head's ``inflight`` flag, the commit point.  Answering a batch (``link``, all
done before the first used descriptor's flags make the batch visible) pushes its chains
back on the free list (``free_head``) and moves ``used_idx``/``used_wrap_counter``;
``settle`` (after the flags store) clears the heads' flags, then copies ``free_head``
first and the used position after into the ``old_*`` fields.

``recover`` reads the buffer back.  Used position equal to the old one: settled, the
flags are the truth.  Different, with ``free_head == old_free_head``: a settle got past
its flags, finish it.  Different otherwise: a batch was linked; whether the driver saw it
is read where it would have seen it, the ring descriptor at the old used position (still
"available in the old lap" unless our flags store happened, and the driver cannot write
it again before that).  Published: its chains (walked from ``free_head`` to
``old_free_head``) are settled; not: the used position rolls back and they stay in
flight.  The free list is then rebuilt from the flags, and the avail position to resume
at is the used position plus the descriptors in flight.  (DPDK decides the same question
from ``desc[old_used_idx].inflight``, an entry index that is not the answered chain's;
reading the ring needs no such guess.)

Sans-IO: the journal is a memoryview, every 16-bit field one 16-bit access.  The buffer
comes from the frontend and is hostile until ``recover`` checked it whole: an
``InflightError`` says what is wrong and nothing is written to a buffer it refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final, NamedTuple

from virtblk.virtio.inflight import (
    INFLIGHT_VERSION,
    MAX_COUNTER,
    InflightError,
    queue_region_size,
    region_bytes,
)
from virtblk.virtio.memory import MemoryRegion
from virtblk.virtio.packed_layout import AVAIL_USED, FLAGS_SLOT, PackedRingBase, avail_bits

__all__ = [
    "PackedInflightJournal",
    "PackedRecovery",
    "RecoveredChain",
    "inflight_region_size",
    "packed_queue_region_size",
]

_HEADER: Final = 32  # 29 bytes of fields, desc[] aligned to its u64s
_DESC_STATE: Final = 32  # DescStatePacked
# Header fields: u16 ('H') slots and u8 ('B') offsets.
_VERSION_H: Final = 4
_DESC_NUM_H: Final = 5
_FREE_HEAD_H: Final = 6
_OLD_FREE_HEAD_H: Final = 7
_USED_IDX_H: Final = 8
_OLD_USED_IDX_H: Final = 9
_USED_WRAP_B: Final = 20
_OLD_USED_WRAP_B: Final = 21


def packed_queue_region_size(queue_size: int) -> int:
    """Bytes of one packed queue's region: the 32-byte header and one 32-byte
    DescStatePacked per ring descriptor, rounded up to 64 (DPDK's
    ``get_pervq_shm_size_packed`` gives the same)."""
    return region_bytes(_HEADER, _DESC_STATE, queue_size)


def inflight_region_size(queue_size: int, *, packed: bool) -> int:
    """Bytes of one queue's region in the layout the negotiated ring uses: what a backend
    multiplies by the queue count for GET_INFLIGHT_FD's ``mmap_size`` (QEMU sends
    SET_FEATURES first so the backend knows; it allocates nothing itself, it maps what
    the backend returns) and what SET_INFLIGHT_FD's buffer must hold."""
    return packed_queue_region_size(queue_size) if packed else queue_region_size(queue_size)


class RecoveredChain(NamedTuple):
    """A chain the journal holds in flight: its head ``entry`` in the journal (what
    ``link`` takes back), its buffer ``id`` and its ring descriptors ``(addr, len,
    flags)``, as the driver wrote them and the device must check them again."""

    entry: int
    id: int
    descs: tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PackedRecovery:
    """What ``PackedInflightJournal.recover`` found.

    ``fresh``: the buffer was new (version 0) and is now initialised; ``base`` is None
    (the frontend's SET_VRING_BASE holds).  Otherwise ``base`` is where to resume (avail
    and used positions with their wrap counters: the journal's, whatever the frontend
    said, since nothing in a packed ring's memory tells them), ``resubmit`` the chains to
    serve first, oldest first, and ``settled`` how many chains of a half-recorded last
    batch were found published and settled.
    """

    fresh: bool
    base: PackedRingBase | None
    resubmit: tuple[RecoveredChain, ...]
    settled: int


class PackedInflightJournal:
    """One packed queue's region of the in-flight buffer, and the order it is written in.

    ``mark`` (a chain popped), ``link`` (chains answered, before the flags store that
    publishes them) and ``settle`` (after it) are the hot path.  The free list is kept in
    memory and mirrored into the buffer, never read back from it while serving (the
    frontend can write the buffer at any time).  ``in_flight`` are the chains a
    ``recover`` in another journal over the same bytes left in flight (a queue taken over
    by another process).  Not thread-safe: the thread that owns the queue owns it.
    """

    __slots__ = (
        "_addrs",
        "_b",
        "_batch",
        "_chains",
        "_counters",
        "_dflags",
        "_flags",
        "_free",
        "_h",
        "_ids",
        "_lasts",
        "_lens",
        "_nexts",
        "_nums",
        "counter",
        "num",
        "offset",
        "region",
    )

    def __init__(self, view: memoryview, num: int, *, counter: int = 0,
                 in_flight: Sequence[RecoveredChain] = ()) -> None:
        """Journal over ``view`` for a queue of ``num`` entries; ``counter`` is the next
        chain's (``recover`` sets it; give it, and ``in_flight``, when taking over a
        recovered journal)."""
        size = packed_queue_region_size(num)
        if view.nbytes < size:
            raise InflightError(
                f"in-flight region of {view.nbytes} bytes; a packed queue of {num} needs "
                f"{size}")
        view = view.cast("B")[:size]
        self._b = view
        h = self._h = view.cast("H")
        q = view.cast("Q")
        # Strided views of DescStatePacked's fields, indexed by entry: one access each.
        self._flags = view[_HEADER::_DESC_STATE]  # inflight (u8)
        self._nexts = h[(_HEADER + 2) // 2 :: _DESC_STATE // 2]
        self._lasts = h[(_HEADER + 4) // 2 :: _DESC_STATE // 2]
        self._nums = h[(_HEADER + 6) // 2 :: _DESC_STATE // 2]
        self._counters = q[(_HEADER + 8) // 8 :: _DESC_STATE // 8]
        self._ids = h[(_HEADER + 16) // 2 :: _DESC_STATE // 2]
        self._dflags = h[(_HEADER + 18) // 2 :: _DESC_STATE // 2]
        self._lens = view.cast("I")[(_HEADER + 20) // 4 :: _DESC_STATE // 4]
        self._addrs = q[(_HEADER + 24) // 8 :: _DESC_STATE // 8]
        self.num = num
        self.counter = counter
        self._chains: dict[int, list[int]] = {}  # head entry -> its entries, in flight
        self._free: list[int] = []  # free entries, the next to take last
        self._batch: list[int] = []  # heads linked, not settled
        self._adopt(self._walk(in_flight))
        self.region: MemoryRegion | None = None
        """The mapping the journal lies in, when made by ``in_region``."""
        self.offset = 0
        """Where in ``region`` the journal starts."""

    @classmethod
    def in_region(cls, region: MemoryRegion, offset: int, num: int, *, counter: int = 0,
                  in_flight: Sequence[RecoveredChain] = ()) -> PackedInflightJournal:
        """A journal at ``offset`` of a mapped buffer, which it remembers, so that a
        queue served by another process can map the same bytes (its ``fd``)."""
        journal = cls(region.view[offset : offset + packed_queue_region_size(num)], num,
                      counter=counter, in_flight=in_flight)
        journal.region = region
        journal.offset = offset
        return journal

    def _walk(self, chains: Sequence[RecoveredChain]) -> dict[int, list[int]]:
        """The entries of chains ``recover`` left in flight, as the buffer links them."""
        taken: dict[int, list[int]] = {}
        owned: set[int] = set()
        for chain in chains:
            entries = [chain.entry]
            for _ in range(len(chain.descs) - 1):
                entries.append(int(self._nexts[entries[-1]]))
            if any(not 0 <= e < self.num for e in entries) or owned & set(entries):
                raise InflightError(f"chain at entry {chain.entry} is not where recovery "
                                    "left it")
            owned.update(entries)
            taken[chain.entry] = entries
        return taken

    def _adopt(self, chains: dict[int, list[int]]) -> None:
        """Take ``chains`` (head entry: its entries) as in flight and every other entry as
        free, lowest entry first, as ``_write_free_list`` lays the free list out."""
        owned = {entry for entries in chains.values() for entry in entries}
        self._chains = chains
        self._free = [e for e in range(self.num - 1, -1, -1) if e not in owned]
        self._batch.clear()

    # ------------------------------------------------------------------ hot path

    def mark(self, bid: int, descs: Sequence[tuple[int, int, int]]) -> int:
        """Record a chain popped, ``descs`` its ring descriptors ``(addr, len, flags)``
        with buffer id ``bid``: each descriptor into an entry, the chain's links, the
        head's ``num``/``last``/``counter``, then its flag; the free list heads after.
        Returns the head entry, what ``link`` takes when the chain is answered."""
        free = self._free
        count = len(descs)
        if count > len(free):
            raise InflightError(f"a chain of {count} descriptors with {len(free)} entries "
                                "free: the ring holds more in flight than its size")
        entries = free[-count:]
        entries.reverse()
        del free[-count:]
        addrs, lens, dflags, ids = self._addrs, self._lens, self._dflags, self._ids
        nexts = self._nexts
        prev = -1
        for entry, (addr, length, flags) in zip(entries, descs, strict=True):
            addrs[entry] = addr
            lens[entry] = length
            dflags[entry] = flags
            ids[entry] = bid
            if prev >= 0:
                nexts[prev] = entry
            prev = entry
        head = entries[0]
        self._nums[head] = count
        self._lasts[head] = prev
        self._counters[head] = self.counter
        self._flags[head] = 1  # the commit point: recorded whole, or not at all
        self.counter += 1
        self._chains[head] = entries
        top = free[-1] if free else self.num
        h = self._h
        h[_FREE_HEAD_H] = top
        h[_OLD_FREE_HEAD_H] = top
        return head

    def link(self, heads: Sequence[int], used_idx: int, used_wrap: bool) -> None:
        """Chains about to be published (before the flags store): pushed back on the free
        list, and the used position they take the ring to (``used_idx``, ``used_wrap``)
        recorded, ``free_head`` first (``recover`` relies on that order)."""
        nexts = self._nexts
        free = self._free
        top = free[-1] if free else self.num
        for head in heads:
            entries = self._chains.pop(head)
            nexts[entries[-1]] = top
            top = head
            free += reversed(entries)
        h = self._h
        h[_FREE_HEAD_H] = top
        h[_USED_IDX_H] = used_idx
        self._b[_USED_WRAP_B] = used_wrap
        self._batch += heads

    def settle(self) -> None:
        """The flags store that published the linked chains happened: clear their flags,
        then copy ``free_head`` and the used position into the ``old_*`` fields, in that
        order (``free_head`` first: ``recover`` relies on it)."""
        flags = self._flags
        for head in self._batch:
            flags[head] = 0
        self._batch.clear()
        h = self._h
        b = self._b
        h[_OLD_FREE_HEAD_H] = h[_FREE_HEAD_H]
        b[_OLD_USED_WRAP_B] = b[_USED_WRAP_B]
        h[_OLD_USED_IDX_H] = h[_USED_IDX_H]

    # ------------------------------------------------------------------ recovery

    def in_flight(self) -> list[int]:
        """Head entries flagged in flight, in entry order (for inspection and tests)."""
        flags = self._flags
        return [entry for entry in range(self.num) if flags[entry]]

    def recover(self, ring: memoryview, base: PackedRingBase) -> PackedRecovery:
        """Read the buffer back when the ring starts: ``ring`` is the descriptor ring as
        it is in guest memory now, ``base`` what SET_VRING_BASE said (only used to lay
        out a fresh buffer).

        A buffer of version 0 is initialised (nothing to resume).  Otherwise it is checked
        whole before anything is written: ``InflightError`` for a version or size we do
        not know, positions outside the ring, a flag that is neither 0 nor 1, chains that
        leave the table, overlap or disagree with their ``last``, a batch list that does
        not lead back to ``old_free_head``, counters that repeat or are absurd, more
        descriptors in flight than the ring holds, or a ring whose descriptor at the used
        position is not available while the journal says something is in flight.
        """
        num = self.num
        ring_h = ring.cast("B").cast("H")
        if len(ring_h) < 8 * num:
            raise InflightError(f"descriptor ring of {ring.nbytes} bytes for {num} entries")
        h = self._h
        b = self._b
        version = int(h[_VERSION_H])
        if version == 0:
            if base.used_idx >= num:
                raise InflightError(f"ring base used position {base.used_idx} is not in a "
                                    f"ring of {num}")
            self._initialise(base)
            return PackedRecovery(True, None, (), 0)
        if version != INFLIGHT_VERSION:
            raise InflightError(f"version {version}; only {INFLIGHT_VERSION} is defined")
        desc_num = int(h[_DESC_NUM_H])
        if desc_num != num:
            raise InflightError(f"made for a queue of {desc_num} entries, the ring has {num}")
        free_head, old_free_head = int(h[_FREE_HEAD_H]), int(h[_OLD_FREE_HEAD_H])
        used, old_used = int(h[_USED_IDX_H]), int(h[_OLD_USED_IDX_H])
        wrap, old_wrap = int(b[_USED_WRAP_B]), int(b[_OLD_USED_WRAP_B])
        if used >= num or old_used >= num:
            raise InflightError(f"used positions {used}, {old_used} are not in a ring of {num}")
        if wrap > 1 or old_wrap > 1:
            raise InflightError(f"used wrap counters {wrap}, {old_wrap} are not 0 or 1")
        if free_head > num or old_free_head > num:
            raise InflightError(f"free list heads {free_head}, {old_free_head} are outside "
                                f"the table ({num} entries)")
        chains = self._chains_in_flight()
        batch: list[int] = []
        rollback = False
        pending = (used, wrap) != (old_used, old_wrap)
        if pending and free_head != old_free_head:
            flags = int(ring_h[8 * old_used + FLAGS_SLOT])
            if flags & AVAIL_USED == avail_bits(bool(old_wrap)):
                rollback = True  # the driver never saw the batch: it stays in flight
                used, wrap = old_used, old_wrap
            else:
                batch = self._last_batch(chains, free_head, old_free_head)
        answered = set(batch)
        in_flight = [head for head in chains if head not in answered]
        counters = {head: int(self._counters[head]) for head in in_flight}
        if len(set(counters.values())) != len(in_flight):
            raise InflightError("two chains in flight have the same counter")
        if any(counter >= MAX_COUNTER for counter in counters.values()):
            raise InflightError("a chain in flight has a counter past 2^63")
        outstanding = sum(len(chains[head]) for head in in_flight)
        if outstanding:
            flags = int(ring_h[8 * used + FLAGS_SLOT])
            if flags & AVAIL_USED != avail_bits(bool(wrap)):
                raise InflightError(
                    f"{len(in_flight)} chains ({outstanding} descriptors) in flight, but "
                    f"the ring's descriptor at used position {used} is not available in "
                    f"lap {wrap} (flags {flags:#06x})")
        # Checked: now write, in an order that leaves the same work to a recovery that
        # this one's crash would hand over to.
        if rollback:
            h[_USED_IDX_H] = used
            b[_USED_WRAP_B] = wrap
        elif pending:
            for head in batch:
                self._flags[head] = 0
            h[_OLD_FREE_HEAD_H] = free_head
            b[_OLD_USED_WRAP_B] = wrap
            h[_OLD_USED_IDX_H] = used
        resubmit = tuple(sorted(
            (RecoveredChain(head, int(self._ids[chains[head][-1]]),
                            tuple((int(self._addrs[e]), int(self._lens[e]),
                                   int(self._dflags[e])) for e in chains[head]))
             for head in in_flight),
            key=lambda chain: counters[chain.entry]))
        self._adopt({chain.entry: chains[chain.entry] for chain in resubmit})
        self._write_free_list()
        self.counter = counters[resubmit[-1].entry] + 1 if resubmit else 0
        avail, avail_wrap = used + outstanding, bool(wrap)
        if avail >= num:
            avail -= num
            avail_wrap = not avail_wrap
        return PackedRecovery(False, PackedRingBase(avail, avail_wrap, used, bool(wrap)),
                              resubmit, len(batch))

    def _chains_in_flight(self) -> dict[int, list[int]]:
        """Every flagged head's entries (``num`` of them along ``next``, ending at its
        ``last``), checked: inside the table, no entry in two chains."""
        num = self.num
        flags = self._flags[:num].tolist()
        odd = [(entry, flag) for entry, flag in enumerate(flags) if flag > 1]
        if odd:
            entry, flag = odd[0]
            raise InflightError(f"entry {entry} has in-flight flag {flag}, not 0 or 1")
        nexts = self._nexts[:num].tolist()
        owner: dict[int, int] = {}
        chains: dict[int, list[int]] = {}
        total = 0
        for head in (entry for entry, flag in enumerate(flags) if flag):
            count = int(self._nums[head])
            total += count
            if not 1 <= count <= num or total > num:
                raise InflightError(
                    f"chain at entry {head} has {count} descriptors; with the others in "
                    f"flight that is not within the ring's {num}")
            entries = [head]
            for _ in range(count - 1):
                nxt = nexts[entries[-1]]
                if nxt >= num:
                    raise InflightError(f"chain at entry {head} leaves the table at {nxt}")
                entries.append(nxt)
            for entry in entries:
                if entry in owner:
                    raise InflightError(f"entry {entry} belongs to the chains at entries "
                                        f"{owner[entry]} and {head}")
                owner[entry] = head
            if int(self._lasts[head]) != entries[-1]:
                raise InflightError(f"chain at entry {head} ends at {entries[-1]} but says "
                                    f"its last entry is {self._lasts[head]}")
            chains[head] = entries
        return chains

    def _last_batch(self, chains: dict[int, list[int]], free_head: int,
                    old_free_head: int) -> list[int]:
        """The heads ``link`` pushed on the free list since the last settle that are still
        flagged: from ``free_head``, chain by chain (a head's ``last``, then its ``next``),
        to ``old_free_head``.  Heads a settle already cleared are passed over (their
        ``last`` still says where their chain ends)."""
        num = self.num
        heads: list[int] = []
        seen: set[int] = set()
        node = free_head
        while node != old_free_head:
            if node >= num or node in seen:
                raise InflightError(
                    f"last batch list reaches entry {node} (outside the table, or a second "
                    f"time) before the old free head {old_free_head}")
            seen.add(node)
            if node in chains:
                heads.append(node)
                last = chains[node][-1]
            else:
                last = int(self._lasts[node])
                if last >= num:
                    raise InflightError(f"last batch list: entry {node} says its chain "
                                        f"ends at entry {last}, outside the table")
            node = int(self._nexts[last])
        return heads

    def _write_free_list(self) -> None:
        """Lay the in-memory free list into the buffer (each free entry's ``next``, then
        both free list heads).  Only run when the used position equals the old one, so a
        crash half way leaves a buffer that is settled and rebuilt again."""
        nexts = self._nexts
        free = self._free
        top = self.num
        for entry in free:  # the next to take last: link from the far end
            nexts[entry] = top
            top = entry
        h = self._h
        h[_FREE_HEAD_H] = top
        h[_OLD_FREE_HEAD_H] = top

    def _initialise(self, base: PackedRingBase) -> None:
        """Lay out a fresh region at the frontend's used position; the version goes last,
        so a crash before it leaves a buffer that is initialised again."""
        b = self._b
        b[:] = bytes(len(b))  # features: none defined; version 0 until the end
        h = self._h
        h[_DESC_NUM_H] = self.num
        h[_USED_IDX_H] = base.used_idx
        h[_OLD_USED_IDX_H] = base.used_idx
        b[_USED_WRAP_B] = base.used_wrap_counter
        b[_OLD_USED_WRAP_B] = base.used_wrap_counter
        self._adopt({})
        self._write_free_list()
        self.counter = 0
        h[_VERSION_H] = INFLIGHT_VERSION
