"""The device's end of a packed virtqueue (VIRTIO 1.1+ section 2.8), like QEMU's
``virtqueue_packed_pop``/``virtqueue_packed_fill`` but trusting nothing.

Same interface as ``split_device.DeviceVirtqueue``, so the device's request handling
serves either ring: ``pop``/``pop_batch`` give the same ``DescriptorChain``, ``Triple`` and
``ChainError`` items, whose ``head`` is here the chain's buffer id, the value
``add_used`` takes back.  Every descriptor the driver wrote is hostile until checked: a
descriptor whose AVAIL/USED bits do not say "available" under our wrap counter is simply
not available yet; a malformed chain is consumed (as far as it reaches) and raised as a
``PackedChainError`` naming its ring position and buffer id, and the queue goes on; a
ring that can no longer be served raises ``RingError``.  The layout is in
``packed_layout``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from virtblk.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
)
from virtblk.virtio.device_common import NO_REGION, DeviceQueueBase, Region
from virtblk.virtio.inflight_packed import PackedInflightJournal, RecoveredChain
from virtblk.virtio.memory import GuestMemory, GuestMemoryError
from virtblk.virtio.packed_layout import (
    AVAIL_USED,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    HEAD,
    RING_AREAS,
    PackedRingBase,
    avail_bits,
    encode_off_wrap,
    encode_vring_base,
    need_event,
    ring_sizes,
    used_bits,
)
from virtblk.virtio.split_device import ChainError, DescriptorChain, RingError, Triple
from virtblk.virtio.split_layout import DESC, Barrier, VirtqueueError, VringAddrs

__all__ = ["PackedChainError", "PackedDeviceVirtqueue"]

_TABLE3: Final = struct.Struct("<" + "QIHH" * 3)
"""An indirect table of three entries (``addr, len, id, flags`` each): the request shape."""
_U32: Final = 0xFFFF_FFFF
_new_triple = tuple.__new__
"""Builds a Triple from a tuple without the generated ``__new__``'s call (the hot path)."""



class PackedChainError(ChainError):
    """One malformed chain of a packed ring, consumed; the queue still works.

    ``head`` is the chain's buffer id, to answer with ``add_used(err.head, 0)``; None when
    the id cannot be answered (outside the queue, or already in flight).  ``position`` is
    where the chain starts in the ring; None for a chain resubmitted from the in-flight
    journal (its ring slots are long overwritten; positions in ``reason`` then count
    descriptors within the chain).
    """

    def __init__(self, head: int | None, position: int | None, reason: str) -> None:
        self.head = head
        self.reason = reason
        self.position = position
        what = "an id that cannot be answered" if head is None else f"buffer id {head}"
        where = ("resubmitted chain" if position is None
                 else f"chain at ring position {position}")
        # Not ChainError's message ("chain at head N"): a packed chain has a position and an
        # id, and the reader needs both.
        VirtqueueError.__init__(self, f"{where} ({what}): {reason}")


class _Malformed(Exception):
    """Why a chain's buffers are refused (becomes a ``PackedChainError``)."""


def _check_total(total: int) -> None:
    """A chain's lengths must sum to what a 32-bit used length can report (checked before
    any address, as rust-vmm's ``checked_add`` bounds a chain)."""
    if total > _U32:
        raise _Malformed(f"descriptor lengths sum to {total}, past 2^32 - 1")


class PackedDeviceVirtqueue(DeviceQueueBase):
    """The device's end of a packed virtqueue; the interface of ``DeviceVirtqueue``.

    The ring's state is two positions with their wrap counters: the next descriptor to
    read (``last_avail_idx``, ``avail_wrap_counter``) and the next to write a used
    descriptor into (``used_idx``, ``used_wrap_counter``); ``vring_base`` encodes both for
    vhost-user GET_VRING_BASE and ``packed_layout.decode_vring_base`` reads SET_VRING_BASE.
    Each chain popped holds its buffer id until answered; ``add_used`` writes the used
    descriptor but for its flags, ``flush_used`` stores the flags, the batch's first last,
    so the driver sees the batch whole.  ``max_indirect`` bounds an indirect table's
    entries (default: the queue size).

    With an ``inflight`` journal (vhost-user INFLIGHT_SHMFD, ``inflight_packed``), every
    chain popped is recorded whole, and answered ones are linked before ``flush_used``
    stores the flags that publish them and settled after, so a device started after this
    one was killed knows what to resubmit; ``resubmit`` are the chains such a recovery
    found (with its positions), served before any new descriptor, oldest first.
    Not thread-safe: one worker thread owns a queue.
    """

    def __init__(
        self,
        memory: GuestMemory,
        addrs: VringAddrs,
        *,
        event_idx: bool,
        last_avail_idx: int = 0,
        avail_wrap_counter: bool = True,
        used_idx: int = 0,
        used_wrap_counter: bool = True,
        max_indirect: int | None = None,
        inflight: PackedInflightJournal | None = None,
        resubmit: Sequence[RecoveredChain] = (),
    ) -> None:
        """Attach to a ring the driver set up; raises RingError if it is not in memory or
        the positions are impossible (the used position must be at most a lap behind),
        or the journal and the chains to resubmit do not fit the ring."""
        num = addrs.num
        if inflight is not None and inflight.num != num:
            raise RingError(f"in-flight journal for {inflight.num} entries, ring of {num}")
        try:
            sizes = ring_sizes(num)
        except ValueError as exc:
            raise RingError(str(exc)) from None
        starts = (addrs.desc, addrs.avail, addrs.used)
        for (name, align), addr in zip(RING_AREAS, starts, strict=True):
            if addr % align:
                raise RingError(f"{name} at {addr:#x} is not {align}-byte aligned")
        if not 0 <= last_avail_idx < num or not 0 <= used_idx < num:
            raise RingError(f"ring positions {last_avail_idx}, {used_idx} are not in a ring "
                            f"of {num}")
        outstanding = last_avail_idx - used_idx
        if avail_wrap_counter != used_wrap_counter:
            outstanding += num
        if not 0 <= outstanding <= num:
            raise RingError(
                f"used position {used_idx} (wrap {int(used_wrap_counter)}) is not within a "
                f"lap behind avail position {last_avail_idx} (wrap {int(avail_wrap_counter)})")
        if sum(len(chain.descs) for chain in resubmit) > outstanding:
            raise RingError(f"chains to resubmit hold more descriptors than the "
                            f"{outstanding} between the used and avail positions")
        try:
            self._desc, driver, device = (memory.view(addr, size)
                                          for addr, size in zip(starts, sizes, strict=True))
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        self.addrs = addrs
        self.num = num
        self.event_idx = event_idx
        self.max_indirect = num if max_indirect is None else max_indirect
        self.inflight = inflight
        self._resubmit = list(resubmit)
        self._entries = [0] * num  # per buffer id in flight: its head entry in the journal
        self._pending_heads: list[int] = []  # journal heads of used descriptors not flushed
        self._memory = memory
        self._region: Region = NO_REGION
        self._desc_h = self._desc.cast("H")
        self._desc_i = self._desc.cast("I")
        self._driver_h = driver.cast("H")  # the driver's: when it wants an interrupt
        self._device_h = device.cast("H")  # ours: when we want a kick
        self._barrier = Barrier()
        self._avail_pos = last_avail_idx
        self._avail_wrap = avail_wrap_counter
        self._used_pos = used_idx  # where add_used writes next
        self._used_wrap = used_wrap_counter
        self._published_pos = used_idx  # after the last used descriptor the driver can see
        self._published_wrap = used_wrap_counter
        self._outstanding = outstanding  # descriptors consumed and not yet answered
        self._ndescs = [0] * num  # per buffer id in flight: the descriptors it consumed
        self._pending_used: list[int] = []  # ``slot, flags`` of used descriptors not flushed
        self._unflushed = 0  # descriptors they cover
        self._since_signal = 0  # descriptors published since the last notification decision
        self._signalled_before = False
        self._notify_enabled = True
        self._broken: str | None = None
        self._arm_kicks()

    # -- state

    @property
    def last_avail_idx(self) -> int:
        """The ring position of the next descriptor to read."""
        return self._avail_pos

    @property
    def avail_wrap_counter(self) -> bool:
        """The wrap counter a descriptor at ``last_avail_idx`` is made available with."""
        return self._avail_wrap

    @property
    def used_idx(self) -> int:
        """The ring position the next used descriptor goes to (after those not flushed)."""
        return self._used_pos

    @property
    def used_wrap_counter(self) -> bool:
        """The wrap counter the descriptor at ``used_idx`` will be marked used with."""
        return self._used_wrap

    @property
    def vring_base(self) -> int:
        """Both positions and wrap counters as vhost-user GET_VRING_BASE answers them."""
        return encode_vring_base(PackedRingBase(self._avail_pos, self._avail_wrap,
                                                self._used_pos, self._used_wrap))

    @property
    def resubmit_pending(self) -> list[int]:
        """Buffer ids recovered from the in-flight journal and not served yet."""
        return [chain.id for chain in self._resubmit]

    @property
    def resubmit_chains(self) -> list[RecoveredChain]:
        """The recovered chains not served yet, whole (a copy): what a queue served by
        another process must be given, with the journal's counter, to take over."""
        return list(self._resubmit)

    def avail_pending(self) -> bool:
        """True when the next descriptor is available, or a recovered chain waits (one
        16-bit load: what a polling worker spins on)."""
        if self._resubmit:
            return True
        flags = self._desc_h[(self._avail_pos << 3) + 7]
        return flags & AVAIL_USED == avail_bits(self._avail_wrap)

    def avail_backlog(self) -> int:
        """How many chains are available in a row from the next descriptor (descriptors
        without NEXT in that run; at most the queue size), and the chains still to
        resubmit."""
        desc_h = self._desc_h
        num = self.num
        pos = self._avail_pos
        pattern = avail_bits(self._avail_wrap)
        chains = len(self._resubmit)
        for _ in range(num):
            flags = desc_h[(pos << 3) + 7]
            if flags & AVAIL_USED != pattern:
                break
            if not flags & VRING_DESC_F_NEXT:
                chains += 1
            pos += 1
            if pos == num:
                pos = 0
                pattern ^= AVAIL_USED
        return chains

    # -- taking chains

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None when none is available.

        Raises ``PackedChainError`` (a ``ChainError``) for a malformed chain, consumed:
        answer it with ``add_used(err.head, 0)`` when ``err.head`` is not None, then pop
        again; ``RingError`` when the ring cannot be served (then broken until recreated).
        """
        if self._broken is not None:
            raise RingError(f"queue is broken: {self._broken}")
        if self._resubmit:
            return self._take_resubmitted()
        start = (self._avail_pos, self._avail_wrap)
        try:
            return self._take()
        finally:
            if (self._avail_pos, self._avail_wrap) != start:
                self._track_avail()

    def pop_batch(
        self, limit: int
    ) -> tuple[memoryview, list[Triple | DescriptorChain | ChainError]]:
        """Up to ``limit`` available chains, validated, in ring order: ``(view, items)``.

        A chain of the usual request shape (one INDIRECT descriptor whose table holds
        three non-empty buffers in one memory region, readable, either, writable) comes
        back as a :class:`Triple` of offsets into ``view``; any other valid chain as a
        ``DescriptorChain``; a malformed one as its ``PackedChainError``, consumed.  Raises
        ``RingError`` when the ring cannot be served and nothing was taken (when chains
        were taken first, they are returned and the next call raises).
        """
        if self._broken is not None:
            raise RingError(f"queue is broken: {self._broken}")
        base, end, view, _ = self._region_for_batch()
        items: list[Triple | DescriptorChain | ChainError] = []
        append = items.append
        if self._resubmit:  # in flight already: served alone, as the split ring does
            while self._resubmit and len(items) < limit:
                try:
                    append(self._take_resubmitted())
                except ChainError as exc:
                    append(exc)
            return view, items
        journal = self.inflight
        entries = self._entries
        num = self.num
        desc = self._desc
        desc_h = self._desc_h
        ndescs = self._ndescs
        unpack_head = HEAD.unpack_from
        unpack3 = _TABLE3.unpack_from
        three_ok = self.max_indirect >= 3
        both, indirect, write, u32 = AVAIL_USED, VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE, _U32
        new_triple = _new_triple
        triple = Triple
        pos = self._avail_pos
        pattern = avail_bits(self._avail_wrap)
        room = num - self._outstanding  # descriptors we may take before the ring is full
        taken = 0
        while taken < limit:
            flags = desc_h[(pos << 3) + 7]
            if flags & both != pattern:
                break
            taken += 1
            if flags ^ pattern == indirect and three_ok and room:
                addr, length, bid = unpack_head(desc, pos << 4)
                if (length == 48 and bid < num and not ndescs[bid]
                        and base <= addr and addr + 48 <= end):
                    a0, l0, _, f0, a1, l1, _, f1, a2, l2, _, f2 = unpack3(view, addr - base)
                    if (not f0 and f2 == write and f1 in (0, write)
                            and l0 and l1 and l2 and l0 + l1 + l2 <= u32
                            and base <= a0 and a0 + l0 <= end and base <= a1
                            and a1 + l1 <= end and base <= a2 and a2 + l2 <= end):
                        ndescs[bid] = 1
                        if journal is not None:
                            entries[bid] = journal.mark(bid, ((addr, 48, flags),))
                        room -= 1
                        append(new_triple(triple, (bid, a0 - base, l0, a1 - base, l1,
                                                   f1 == write, a2 - base, l2)))
                        pos += 1
                        if pos == num:
                            pos = 0
                            pattern ^= both
                            self._avail_wrap = not self._avail_wrap
                        continue
            self._avail_pos = pos
            self._outstanding = num - room
            try:
                chain = self._take()
            except ChainError as exc:
                append(exc)
            except RingError:
                if not items:
                    raise
                break  # the queue is broken now: the next call says so
            else:
                assert chain is not None  # the descriptor at ``pos`` is available
                append(chain)
            pos = self._avail_pos
            pattern = avail_bits(self._avail_wrap)
            room = num - self._outstanding
        self._avail_pos = pos
        self._outstanding = num - room
        if items:
            self._track_avail()
        return view, items

    def _track_avail(self) -> None:
        """With EVENT_IDX and kicks wanted, ask for a kick at the next descriptor."""
        if self.event_idx and self._notify_enabled:
            self._device_h[EVENT_OFF_WRAP] = encode_off_wrap(self._avail_pos, self._avail_wrap)

    def _take(self) -> DescriptorChain | None:
        """Consume the chain at the next position and check it: the careful walk, which
        every chain the fast path does not take goes through, and the reference for it.

        The chain's extent is found first (descriptors while NEXT is set, each of them
        available under the wrap counter of its lap), so a malformed chain is consumed
        whole and the next chain is found where the driver put it; then its buffers are
        checked; then its buffer id, which the spec puts in the last descriptor.
        """
        desc = self._desc
        desc_h = self._desc_h
        num = self.num
        start = pos = self._avail_pos
        wrap = self._avail_wrap
        flags = desc_h[(pos << 3) + 7]
        if flags & AVAIL_USED != avail_bits(wrap):
            return None
        entries: list[tuple[int, int, int, int]] = []  # addr, len, flags, position
        reason = ""
        bid = 0
        while True:
            addr, length, bid = HEAD.unpack_from(desc, pos << 4)
            entries.append((addr, length, flags, pos))
            pos += 1
            if pos == num:
                pos = 0
                wrap = not wrap
            if not flags & VRING_DESC_F_NEXT:
                break
            if len(entries) == num:
                reason = f"chain never ends: all {num} descriptors of the ring have NEXT"
                break
            flags = desc_h[(pos << 3) + 7]
            if flags & AVAIL_USED != avail_bits(wrap):
                reason = (f"chain runs off the available descriptors: descriptor at "
                          f"position {pos} is not available (flags {flags:#06x})")
                break
        count = len(entries)
        if self._outstanding + count > num:
            self._broken = (
                f"{count} descriptors at position {start} make more than the queue size "
                f"{num} in flight ({self._outstanding} not yet answered)")
            raise RingError(self._broken)
        self._avail_pos = pos
        self._avail_wrap = wrap
        self._outstanding += count
        # Consumed: recorded whole, even malformed or unanswerable, so a recovery resumes
        # after it and finds it again as it is found now.
        journal = self.inflight
        head = 0 if journal is None else journal.mark(bid, [e[:3] for e in entries])
        return self._claim(bid, count, entries, head, start, reason)

    def _take_resubmitted(self) -> DescriptorChain:
        """The oldest chain recovered from the in-flight journal, checked again as the
        driver wrote it (its descriptors come from the journal: the ring slots are
        overwritten), or its ``PackedChainError``."""
        chain = self._resubmit.pop(0)
        entries = [(addr, length, flags, i) for i, (addr, length, flags)
                   in enumerate(chain.descs)]
        # A chain that ran off the available descriptors (or never ended) was consumed
        # as far as it reached, its last descriptor still saying NEXT: refused again.
        reason = ("chain ends on a descriptor with NEXT (it ran off the available "
                  "descriptors)" if entries[-1][2] & VRING_DESC_F_NEXT else "")
        return self._claim(chain.id, len(entries), entries, chain.entry, None, reason)

    def _claim(self, bid: int, count: int, entries: list[tuple[int, int, int, int]],
               head: int, start: int | None, reason: str = "") -> DescriptorChain:
        """Check a consumed chain's buffers, then take its buffer id in flight (``head``:
        its journal entry); raises ``PackedChainError`` for a malformed chain or an id
        that cannot be answered."""
        chain: DescriptorChain | None = None
        if not reason:
            try:
                chain = self._buffers(entries)
            except _Malformed as exc:
                reason = str(exc)
        num = self.num
        if bid >= num or self._ndescs[bid]:
            why = (f"buffer id {bid} is outside the queue (size {num})" if bid >= num
                   else f"buffer id {bid} is already in flight")
            raise PackedChainError(None, start, f"{why}; {reason}" if reason else why)
        self._ndescs[bid] = count
        self._entries[bid] = head
        if chain is None:
            raise PackedChainError(bid, start, reason)
        chain.head = bid
        return chain

    def _buffers(self, entries: list[tuple[int, int, int, int]]) -> DescriptorChain:
        """The buffers of a chain's descriptors (from the ring, or from the one indirect
        table it is); raises ``_Malformed`` naming the first rule broken."""
        if len(entries) == 1 and entries[0][2] & VRING_DESC_F_INDIRECT:
            return self._indirect(*entries[0])
        _check_total(sum(length for _, length, _, _ in entries))
        chain = DescriptorChain(0, [], [], 0, 0)
        seen_write = False
        for addr, length, flags, pos in entries:
            if flags & VRING_DESC_F_INDIRECT:
                if flags & VRING_DESC_F_NEXT:
                    raise _Malformed(f"descriptor at position {pos} has both INDIRECT and NEXT")
                raise _Malformed(f"INDIRECT descriptor at position {pos} ends a chain of "
                                 f"{len(entries)} descriptors: a table must stand alone")
            seen_write = self._add_buffer(chain, addr, length, bool(flags & VRING_DESC_F_WRITE),
                                          seen_write, f"descriptor at position {pos}")
        return chain

    def _indirect(self, addr: int, length: int, _flags: int, pos: int) -> DescriptorChain:
        """The buffers listed in an indirect table: every entry counts (its NEXT, like
        every flag but WRITE, is reserved and ignored there), none may be INDIRECT."""
        if length == 0 or length % VRING_DESC_SIZE:
            raise _Malformed(f"indirect table length {length} is not a non-zero multiple of 16")
        entries = length // VRING_DESC_SIZE
        if entries > self.max_indirect:
            raise _Malformed(f"indirect table of {entries} entries exceeds {self.max_indirect}")
        try:
            table = self._memory.view(addr, length)
        except GuestMemoryError as exc:
            raise _Malformed(f"indirect table: {exc}") from None
        descs = [DESC.unpack_from(table, i * VRING_DESC_SIZE) for i in range(entries)]
        _check_total(sum(length for _, length, _, _ in descs))
        chain = DescriptorChain(0, [], [], 0, 0)
        seen_write = False
        for i, (buf, buf_len, _, flags) in enumerate(descs):
            if flags & VRING_DESC_F_INDIRECT:
                raise _Malformed(f"INDIRECT descriptor inside the indirect table (entry {i})")
            seen_write = self._add_buffer(chain, buf, buf_len, bool(flags & VRING_DESC_F_WRITE),
                                          seen_write, f"indirect entry {i}")
        return chain

    def _add_buffer(self, chain: DescriptorChain, addr: int, length: int, write: bool,
                    seen_write: bool, where: str) -> bool:
        """Append one buffer to ``chain``: readable ones before writable ones (even empty
        ones), every non-empty buffer inside one memory region.  Returns whether a
        writable descriptor has been seen."""
        if write:
            chain.writable_len += length
        elif seen_write:
            raise _Malformed(f"{where}: device-readable descriptor after a device-writable one")
        else:
            chain.readable_len += length
        if length:
            try:
                view = self._memory.view(addr, length)
            except GuestMemoryError as exc:
                raise _Malformed(f"{where}: buffer: {exc}") from None
            (chain.writable if write else chain.readable).append(view)
        return write or seen_write

    # -- answering

    def add_used(self, head: int, length: int) -> None:
        """Record a completion: ``length`` bytes written into buffer ``head`` (its id).

        Writes the used descriptor at the used position but for its flags: not visible
        to the driver until ``flush_used``.
        """
        self.add_used_batch([head, length])

    def add_used_batch(self, used: list[int]) -> None:
        """Record completions given flat, ``[id, length, id, length, ...]``; all are checked
        (an id in flight, once; a 32-bit length) before any is written."""
        ids = used[0::2]
        lengths = used[1::2]
        if not ids:
            return
        ndescs = self._ndescs
        num = self.num
        if min(ids) < 0 or max(ids) >= num or not all(map(ndescs.__getitem__, ids)):
            raise ValueError(f"buffer ids {ids} are not all in flight")
        if len(set(ids)) != len(ids):
            raise ValueError(f"buffer ids {ids} answer one buffer twice")
        if min(lengths) < 0 or max(lengths) > _U32:
            raise ValueError(f"used lengths {lengths} are not all 32-bit values")
        if self.inflight is not None:
            entries = self._entries  # taken now: an id answered can be popped again
            self._pending_heads += [entries[bid] for bid in ids]
        desc_h = self._desc_h
        desc_i = self._desc_i
        pending = self._pending_used
        pos = self._used_pos
        wrap = self._used_wrap
        bits = used_bits(wrap)
        covered = 0
        for bid, length in zip(ids, lengths, strict=True):
            n = ndescs[bid]
            ndescs[bid] = 0
            covered += n
            desc_h[(pos << 3) + 6] = bid
            desc_i[(pos << 2) + 2] = length
            # WRITE in a used descriptor says the device wrote something (spec 2.8.4).
            pending += ((pos << 3) + 7, bits | VRING_DESC_F_WRITE if length else bits)
            pos += n
            if pos >= num:
                pos -= num
                wrap = not wrap
                bits = used_bits(wrap)
        self._used_pos = pos
        self._used_wrap = wrap
        self._outstanding -= covered
        self._unflushed += covered

    def flush_used(self) -> None:
        """Mark used every descriptor ``add_used`` wrote: the flags of all but the first,
        a barrier, the first's, so the driver (polling the first) sees the batch whole."""
        pending = self._pending_used
        if not pending:
            return
        journal = self.inflight
        if journal is not None:  # recorded as answered before the driver can see it
            journal.link(self._pending_heads, self._used_pos, self._used_wrap)
            self._pending_heads.clear()
        desc_h = self._desc_h
        for k in range(2, len(pending), 2):
            desc_h[pending[k]] = pending[k + 1]
        self._barrier()
        desc_h[pending[0]] = pending[1]
        pending.clear()
        if journal is not None:
            journal.settle()
        self._since_signal += self._unflushed
        self._unflushed = 0
        self._published_pos = self._used_pos
        self._published_wrap = self._used_wrap

    # -- notifications

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what ``flush_used`` published since
        the last call (False when nothing new was published)."""
        count = self._since_signal
        if not count:
            return False
        self._barrier()  # our used flags must be visible before we read the driver's wishes
        self._since_signal = 0
        first = not self._signalled_before
        self._signalled_before = True
        flags = self._driver_h[EVENT_FLAGS]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True  # ENABLE, the reserved value 3, or DESC the driver may not use
        if first:
            # No earlier decision to count from (fresh or reconnected queue): a spurious
            # interrupt is harmless, a missed one hangs the driver.
            return True
        return need_event(self._driver_h[EVENT_OFF_WRAP], self._published_pos,
                          self._published_wrap, count, self.num)

    def _arm_kicks(self) -> None:
        """Our event suppression structure as it is when kicks are wanted."""
        if self.event_idx:
            self._device_h[EVENT_OFF_WRAP] = encode_off_wrap(self._avail_pos, self._avail_wrap)
            self._device_h[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        else:
            self._device_h[EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we are polling anyway (a hint)."""
        self._notify_enabled = False
        self._device_h[EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True when more is already available (pop again first)."""
        self._notify_enabled = True
        self._arm_kicks()
        self._barrier()
        return self.avail_pending()
