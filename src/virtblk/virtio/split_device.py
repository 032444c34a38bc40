"""The device's end of a split virtqueue (VIRTIO 1.x section 2.7), like rust-vmm's
``virtio-queue``.

Every index and address the driver wrote is hostile until checked: ``pop`` and
``pop_batch`` walk each chain against the queue size and the guest memory table and raise
only ``ChainError`` (one bad chain, consumed) or ``RingError`` (the ring is unusable).
The layout both ends share is in ``split_layout``.
"""

from __future__ import annotations

import array
import dataclasses
import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from virtblk.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ELEM_SIZE,
    VRING_USED_F_NO_NOTIFY,
    vring_need_event,
)
from virtblk.virtio.device_common import NO_REGION, DeviceQueueBase, Region
from virtblk.virtio.inflight import InflightJournal
from virtblk.virtio.memory import GuestMemory, GuestMemoryError
from virtblk.virtio.split_layout import (
    DESC,
    NEXT_WRITE,
    RING_AREAS,
    TABLE_STRUCTS,
    U16,
    Barrier,
    VirtqueueError,
    VringAddrs,
    avail_event_slot,
    ring_sizes,
    table_struct,
    used_event_slot,
)

__all__ = ["ChainError", "DescriptorChain", "DeviceVirtqueue", "RingError", "Triple"]

_TABLE3: Final = struct.Struct("<" + "QIHH" * 3)
"""An indirect table of three descriptors: the request shape ``pop_batch`` reads at once."""
_NEXT: Final = VRING_DESC_F_NEXT


class ChainError(VirtqueueError):
    """One malformed descriptor chain; its avail entry is consumed, the queue still works.

    ``head`` is the chain's head index, to return with ``add_used(head, 0)``; it is None
    when the avail entry held an index outside the descriptor table, which cannot be
    returned to the driver at all.
    """

    def __init__(self, head: int | None, reason: str) -> None:
        self.head = head
        self.reason = reason
        where = "avail entry" if head is None else f"chain at head {head}"
        super().__init__(f"{where}: {reason}")


class RingError(VirtqueueError):
    """The ring itself is unusable (e.g. avail idx ran ahead); broken until reset."""


@dataclasses.dataclass(slots=True)
class DescriptorChain:
    """One validated request: device-readable buffers, then device-writable ones.

    Zero-length descriptors are dropped from the lists (they carry no bytes).
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int


class Triple(NamedTuple):
    """A validated chain of the shape nearly every request has: one indirect table of
    three non-empty buffers in one memory region, the first device-readable, the second
    readable or writable, the third device-writable (a virtio-blk header, data, status).

    The fields are offsets and lengths in the batch's region view (see ``pop_batch``), so
    taking a request apart costs no memoryview per buffer.  Everything is checked as
    ``_walk_careful`` would: a chain that is not exactly this shape is never a Triple.
    """

    head: int
    first: int
    first_len: int
    second: int
    second_len: int
    second_writable: bool
    third: int
    third_len: int

    def chain(self, view: memoryview) -> DescriptorChain:
        """The same chain as a ``DescriptorChain`` over ``view`` (for the general path)."""
        first = view[self.first : self.first + self.first_len]
        second = view[self.second : self.second + self.second_len]
        third = view[self.third : self.third + self.third_len]
        if self.second_writable:
            return DescriptorChain(
                self.head, [first], [second, third], self.first_len,
                self.second_len + self.third_len)
        return DescriptorChain(
            self.head, [first, second], [third], self.first_len + self.second_len,
            self.third_len)


_new_triple = tuple.__new__
"""Builds a Triple from a tuple without the generated ``__new__``'s call (the hot path)."""


_FlatChain = tuple[int, memoryview, int, tuple[int, ...]]
"""A validated chain of the common shape, unsliced: ``(head, view, base, table)``.

``table`` is the indirect table's raw ``addr, len, flags, next`` values, flattened; every
buffer lies inside ``view``, which maps guest-physical ``base``: buffer ``i`` is
``view[table[4*i] - base :][: table[4*i + 1]]``.  Device-readable entries come first.
"""



def _chain_of(flat: _FlatChain) -> DescriptorChain:
    """The ``DescriptorChain`` of a flat chain (zero-length buffers dropped, as ``pop`` does)."""
    head, view, base, vals = flat
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    readable_len = 0
    writable_len = 0
    for k in range(0, len(vals), 4):
        length = vals[k + 1]
        if not length:
            continue
        start = vals[k] - base
        if vals[k + 2] & VRING_DESC_F_WRITE:
            writable.append(view[start : start + length])
            writable_len += length
        else:
            readable.append(view[start : start + length])
            readable_len += length
    return DescriptorChain(head, readable, writable, readable_len, writable_len)


class DeviceVirtqueue(DeviceQueueBase):
    """The device's end of a split virtqueue, like rust-vmm's ``virtio-queue``.

    ``pop`` returns validated chains; ``add_used`` writes completions that only become
    visible to the driver at ``flush_used`` (one index store per batch); then
    ``needs_notification`` says whether to signal the call eventfd.  ``max_indirect``
    bounds an indirect table's entries (default: the queue size, as VIRTIO 1.0 says).

    With an ``inflight`` journal (vhost-user INFLIGHT_SHMFD), popped heads are recorded
    in flight and answered ones settled around the used idx store, so a device started
    after this one was killed knows what to resubmit; ``resubmit`` are the heads such a
    recovery found, served before any new avail entry, oldest first.
    Not thread-safe: one worker thread owns a queue.
    """

    def __init__(
        self,
        memory: GuestMemory,
        addrs: VringAddrs,
        *,
        event_idx: bool,
        last_avail_idx: int = 0,
        used_idx: int = 0,
        max_indirect: int | None = None,
        inflight: InflightJournal | None = None,
        resubmit: Sequence[int] = (),
    ) -> None:
        """Attach to rings the driver set up; raises RingError if they are not in memory
        (or the journal is not for a queue of this size)."""
        num = addrs.num
        if inflight is not None and inflight.num != num:
            raise RingError(f"in-flight journal for {inflight.num} entries, ring of {num}")
        if any(not 0 <= head < num for head in resubmit):
            raise RingError(f"heads to resubmit {list(resubmit)} are not all in the queue")
        try:
            sizes = ring_sizes(num, event_idx=event_idx)
        except ValueError as exc:
            raise RingError(str(exc)) from None
        starts = (addrs.desc, addrs.avail, addrs.used)
        for (name, align), addr in zip(RING_AREAS, starts, strict=True):
            if addr % align:
                raise RingError(f"{name} at {addr:#x} is not {align}-byte aligned")
        if not 0 <= last_avail_idx <= U16 or not 0 <= used_idx <= U16:
            raise RingError(f"ring indices {last_avail_idx}, {used_idx} are not 16-bit")
        try:
            self._desc, avail, used = (memory.view(addr, size)
                                       for addr, size in zip(starts, sizes, strict=True))
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        self.addrs = addrs
        self.num = num
        self.event_idx = event_idx
        self.max_indirect = num if max_indirect is None else max_indirect
        self._max_indirect_bytes = VRING_DESC_SIZE * self.max_indirect
        self._region: Region = NO_REGION
        self._memory = memory
        self._mask = num - 1
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[: 4 + VRING_USED_ELEM_SIZE * num].cast("I")
        self._used_event_i = used_event_slot(num)
        self._avail_event_i = avail_event_slot(num)
        self._barrier = Barrier()
        self._last_avail = last_avail_idx
        self._used_shadow = used_idx  # entries written by add_used
        self._used_published = used_idx  # the idx the driver can see
        self._signalled = used_idx  # used idx at the last notification decision
        self._signalled_before = False
        self._notify_enabled = True
        self._broken: str | None = None
        self.inflight = inflight
        self._resubmit = list(resubmit)

    @property
    def resubmit_pending(self) -> list[int]:
        """Heads recovered from the in-flight journal and not served yet (a copy)."""
        return list(self._resubmit)

    @property
    def last_avail_idx(self) -> int:
        """The next avail index to pop (vhost-user GET_VRING_BASE)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """The used index including entries not yet flushed."""
        return self._used_shadow

    @property
    def vring_base(self) -> int:
        """What vhost-user GET_VRING_BASE answers for a split ring: the next avail index
        (``PackedDeviceVirtqueue.vring_base`` is the packed ring's)."""
        return self._last_avail

    def used_idx_in_memory(self) -> int:
        """The used index as published in guest memory (where a ring served by someone
        else, who can no longer say, got to)."""
        return int(self._used_h[1])

    def avail_backlog(self) -> int:
        """How many chains the driver published that are not popped yet (never more than
        the queue size, which ``pop`` would refuse anyway), and the heads still to
        resubmit."""
        return min((self._avail_h[1] - self._last_avail) & U16, self.num) + len(self._resubmit)

    def avail_pending(self) -> bool:
        """True when the driver published chains not popped yet (one 16-bit load: what a
        polling worker spins on)."""
        return self._avail_h[1] != self._last_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None when the ring is empty.

        Raises ``ChainError`` for a malformed chain (its entry is consumed: answer it with
        ``add_used(err.head, 0)`` when ``err.head`` is not None, then pop again) and
        ``RingError`` when the avail index is impossible (the queue is then broken).
        """
        heads = self._take_heads(1)
        if not heads:
            return None
        head = heads[0]
        if head >= self.num:
            raise ChainError(None, f"head index {head} is outside the queue (size {self.num})")
        return self._walk(head)

    def _take_heads(self, limit: int) -> list[int]:
        """Consume up to ``limit`` avail entries with one avail idx load; their heads
        (recorded in flight when there is a journal).  Heads to resubmit come first: they
        are in flight already."""
        if self._broken is not None:
            raise RingError(f"queue is broken: {self._broken}")
        if self._resubmit:
            heads = self._resubmit[:limit]
            del self._resubmit[:limit]
            return heads
        avail_h = self._avail_h
        avail_idx = avail_h[1]
        last = self._last_avail
        pending = (avail_idx - last) & U16
        if not pending:
            return []
        if pending > self.num:
            self._broken = (
                f"avail idx {avail_idx} is {pending} entries past {last}, more than the "
                f"queue size {self.num}"
            )
            raise RingError(self._broken)
        n = pending if pending < limit else limit
        start = 2 + (last & self._mask)
        end = start + n
        if end <= 2 + self.num:
            heads = avail_h[start:end].tolist()
        else:
            heads = avail_h[start : 2 + self.num].tolist() + avail_h[2 : end - self.num].tolist()
        last = (last + n) & U16
        self._last_avail = last
        if self.event_idx and self._notify_enabled:
            self._used_h[self._avail_event_i] = last
        if self.inflight is not None:
            self.inflight.mark(heads)
        return heads

    def _walk(self, head: int) -> DescriptorChain:
        """One chain: the flat fast path when it applies, else the careful walk."""
        flat = self._flat(head, self._region_for_batch())
        if flat is None:
            return self._walk_careful(head)
        return _chain_of(flat)

    def _flat(self, head: int, region: Region) -> _FlatChain | None:
        """The chain at ``head`` as a :data:`_FlatChain`, or None when it is not the common
        shape (then ``_walk_careful`` decides, and names any error).

        Almost every request a driver sends is one INDIRECT descriptor whose table lists
        its buffers in order (``next = i + 1``), all in one memory region.  Such a table is
        read with a single unpack and checked entry by entry against the rules
        ``_walk_careful`` applies, so both accept exactly the same chains.
        """
        addr, length, flags, _ = DESC.unpack_from(self._desc, head * VRING_DESC_SIZE)
        if flags != VRING_DESC_F_INDIRECT or length & 15:
            return None
        if not 0 < length <= self._max_indirect_bytes:
            return None
        base, end, view, _ = region
        if addr < base or addr + length > end:
            return None
        n = length >> 4
        vals = (TABLE_STRUCTS.get(n) or table_struct(n)).unpack_from(view, addr - base)
        last = 4 * n - 4
        seen_write = False
        k = 0
        while True:
            flags = vals[k + 2]
            if k != last:
                if vals[k + 3] != (k >> 2) + 1 or not flags & VRING_DESC_F_NEXT:
                    return None
                flags ^= VRING_DESC_F_NEXT
            if flags == VRING_DESC_F_WRITE:
                seen_write = True
            elif flags or seen_write:
                return None  # unknown flags, or readable after writable
            addr = vals[k]
            if addr < base or addr + vals[k + 1] > end:
                return None
            if k == last:
                return head, view, base, vals
            k += 4

    def pop_batch(
        self, limit: int
    ) -> tuple[memoryview, list[Triple | DescriptorChain | ChainError]]:
        """Up to ``limit`` available chains, validated, in ring order, with one avail idx
        load: ``(view, items)``.

        Chains of the usual request shape come back as a :class:`Triple` whose offsets
        index ``view``; any other valid chain as a ``DescriptorChain``; a malformed one
        as its ``ChainError`` (already consumed).  Raises ``RingError`` when the ring
        itself is unusable.
        """
        items: list[Triple | DescriptorChain | ChainError] = []
        heads = self._take_heads(limit)
        region = self._region_for_batch()
        base, end, view, _ = region
        if not heads:
            return view, items
        append = items.append
        num = self.num
        table = self._desc
        unpack_desc = DESC.unpack_from
        unpack3 = _TABLE3.unpack_from
        three_ok = self.max_indirect >= 3
        for head in heads:
            if head < num:
                addr, length, flags, _ = unpack_desc(table, head << 4)
                if (flags == VRING_DESC_F_INDIRECT and length == 48 and three_ok
                        and base <= addr and addr + 48 <= end):
                    a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack3(view, addr - base)
                    if (f0 == _NEXT and n0 == 1 and n1 == 2 and f2 == VRING_DESC_F_WRITE
                            and (f1 in (NEXT_WRITE, _NEXT)) and l0 and l1 and l2
                            and base <= a0 and a0 + l0 <= end and base <= a1
                            and a1 + l1 <= end and base <= a2 and a2 + l2 <= end):
                        append(_new_triple(Triple, (head, a0 - base, l0, a1 - base, l1,
                                                    f1 == NEXT_WRITE, a2 - base, l2)))
                        continue
                flat = self._flat(head, region)
                if flat is not None:
                    append(_chain_of(flat))
                    continue
                try:
                    append(self._walk_careful(head))
                except ChainError as exc:
                    append(exc)
            else:
                append(ChainError(None, f"head index {head} is outside the queue (size {num})"))
        return view, items

    def _walk_careful(self, head: int) -> DescriptorChain:
        """Follow and check one chain; every descriptor is read exactly once."""
        view = self._memory.view
        unpack = DESC.unpack_from
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = 0
        writable_len = 0
        seen_write = False
        table = self._desc
        limit = self.num
        in_indirect = False
        index = head
        count = 0
        while True:
            count += 1
            if count > limit:
                what = "indirect table" if in_indirect else "chain"
                raise ChainError(head, f"{what} loops or is longer than {limit} descriptors")
            addr, length, flags, nxt = unpack(table, index * VRING_DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if in_indirect:
                    raise ChainError(head, "INDIRECT descriptor inside an indirect table")
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError(head, f"descriptor {index} has both INDIRECT and NEXT")
                if length == 0 or length % VRING_DESC_SIZE:
                    raise ChainError(
                        head, f"indirect table length {length} is not a non-zero multiple of 16"
                    )
                entries = length // VRING_DESC_SIZE
                if entries > self.max_indirect:
                    raise ChainError(
                        head,
                        f"indirect table of {entries} entries exceeds {self.max_indirect}",
                    )
                try:
                    table = view(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(head, f"indirect table: {exc}") from None
                in_indirect = True
                limit = entries
                index = 0
                count = 0
                continue
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                if length:
                    try:
                        writable.append(view(addr, length))
                    except GuestMemoryError as exc:
                        raise ChainError(head, f"buffer: {exc}") from None
                    writable_len += length
            else:
                if seen_write:
                    raise ChainError(
                        head, "device-readable descriptor after a device-writable one"
                    )
                if length:
                    try:
                        readable.append(view(addr, length))
                    except GuestMemoryError as exc:
                        raise ChainError(head, f"buffer: {exc}") from None
                    readable_len += length
            if not flags & VRING_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_len, writable_len)
            if nxt >= limit:
                what = "indirect table" if in_indirect else "queue"
                raise ChainError(head, f"next index {nxt} is outside the {what} (size {limit})")
            index = nxt

    def add_used(self, head: int, length: int) -> None:
        """Record a completion: ``length`` bytes written into the chain at ``head``.

        Not visible to the driver until ``flush_used``.
        """
        if not 0 <= head < self.num:
            raise ValueError(f"head {head} is outside the queue (size {self.num})")
        if not 0 <= length <= 0xFFFFFFFF:
            raise ValueError(f"used length {length} is not a 32-bit value")
        if self.inflight is not None:
            self.inflight.link((head,))
        slot = 1 + 2 * (self._used_shadow & self._mask)
        self._used_i[slot] = head
        self._used_i[slot + 1] = length
        self._used_shadow = (self._used_shadow + 1) & U16

    def add_used_batch(self, used: list[int]) -> None:
        """Record completions given flat, ``[head, length, head, length, ...]``, with one
        slice store per ring wrap (the batch form of ``add_used``, same checks)."""
        n = len(used) >> 1
        if not n:
            return
        num = self.num
        if min(used) < 0 or max(used[0::2]) >= num or max(used[1::2]) > 0xFFFFFFFF:
            raise ValueError(f"used entries {used} name a head outside the queue (size "
                             f"{num}) or a length that is not a 32-bit value")
        if self.inflight is not None:
            self.inflight.link(used[0::2])
        start = self._used_shadow & self._mask
        first = min(n, num - start)
        used_i = self._used_i
        used_i[1 + 2 * start : 1 + 2 * (start + first)] = array.array("I", used[: 2 * first])
        if first < n:
            used_i[1 : 1 + 2 * (n - first)] = array.array("I", used[2 * first :])
        self._used_shadow = (self._used_shadow + n) & U16

    def flush_used(self) -> None:
        """Publish every completion added so far with one used idx store (then, with a
        journal, record them as no longer in flight)."""
        if self._used_published != self._used_shadow:
            self._used_h[1] = self._used_shadow
            self._used_published = self._used_shadow
            if self.inflight is not None:
                self.inflight.settle(self._used_shadow)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what ``flush_used`` published since
        the last call (False when nothing new was published)."""
        new = self._used_published
        old = self._signalled
        if old == new:
            return False
        self._barrier()  # the used idx store must be visible before we read used_event
        self._signalled = new
        if self.event_idx:
            if not self._signalled_before:
                # No earlier decision to compare with (fresh or reconnected queue): a
                # spurious interrupt is harmless, a missed one hangs the driver.
                self._signalled_before = True
                return True
            event = self._avail_h[self._used_event_i]
            return vring_need_event(event, new, old)
        return not self._avail_h[0] & VRING_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we are polling anyway (a hint)."""
        self._notify_enabled = False
        if not self.event_idx:
            self._used_h[0] = VRING_USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True when more is already available (pop again first)."""
        self._notify_enabled = True
        if self.event_idx:
            self._used_h[self._avail_event_i] = self._last_avail
        else:
            self._used_h[0] = 0
        self._barrier()
        return self._avail_h[1] != self._last_avail

