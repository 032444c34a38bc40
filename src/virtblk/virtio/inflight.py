"""The in-flight journal of a split virtqueue: what a restarted device must resubmit.

vhost-user's ``INFLIGHT_SHMFD`` (vhost-user.rst, "Inflight I/O tracking") gives the
device a buffer that outlives it: the frontend keeps it and hands it to the next device
process.  Per queue it holds ``QueueRegionSplit``::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    DescStateSplit desc[desc_num];   /* u8 inflight; u8 pad[5]; u16 next; u64 counter */

The device writes it in an order that leaves it recoverable whatever store a SIGKILL
lands after (``InflightJournal``): when popping, each head's ``counter`` then its
``inflight`` flag, in avail order; when completing, each head is linked into the
batch list (``next``, ``last_batch_head``) before the used idx is published, and the
flags are cleared and ``used_idx`` copied after.  ``recover`` reads it back: a batch whose
used idx reached the ring but not the buffer is settled, and what is still flagged is
resubmitted in ``counter`` order; the next avail index is ``used idx + in flight`` (as
libvhost-user's ``vu_check_queue_inflights``).

Sans-IO: the journal is a memoryview; the buffer comes from the frontend and is hostile
until ``recover`` checked it (``InflightError`` says what is wrong, nothing is written to a
buffer it refuses).  Every 16-bit field is one 16-bit access (``cast("H")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from virtblk.virtio.memory import MemoryRegion
from virtblk.virtio.split_layout import U16, VirtqueueError

__all__ = [
    "INFLIGHT_VERSION",
    "MAX_COUNTER",
    "InflightError",
    "InflightJournal",
    "Recovery",
    "queue_region_size",
    "region_bytes",
]

INFLIGHT_VERSION: Final = 1
"""The one layout version the spec defines; 0 marks a buffer nobody initialised."""
_HEADER: Final = 16  # features u64, version, desc_num, last_batch_head, used_idx u16
_DESC_STATE: Final = 16  # DescStateSplit
_ALIGN: Final = 64
# Field positions in the casts of one queue region: bytes ('B'), u16 ('H'), u64 ('Q').
_VERSION_H: Final = 4
_DESC_NUM_H: Final = 5
_LAST_BATCH_HEAD_H: Final = 6
_USED_IDX_H: Final = 7
MAX_COUNTER: Final = 1 << 63
"""Counters at or past this make no sense (ours count requests from 0): refused."""


def region_bytes(header: int, entry: int, queue_size: int) -> int:
    """Bytes of one queue's region of either layout: its header and one descriptor state
    per entry, rounded up to 64 (libvhost-user, DPDK and QEMU round the same way)."""
    raw = header + entry * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


def queue_region_size(queue_size: int) -> int:
    """Bytes of one split queue's region: header and one DescStateSplit per entry."""
    return region_bytes(_HEADER, _DESC_STATE, queue_size)


class InflightError(VirtqueueError):
    """The in-flight buffer cannot be trusted (wrong size, version, count or list)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Recovery:
    """What ``InflightJournal.recover`` found.

    ``fresh``: the buffer was new (version 0) and is now initialised; nothing is known of
    earlier requests and ``last_avail`` is None (the frontend's SET_VRING_BASE holds).
    Otherwise ``last_avail`` is where to take new avail entries, ``resubmit`` the heads to
    serve first, oldest first, and ``settled`` how many entries of a half-recorded last
    batch were found published and cleared.
    """

    fresh: bool
    last_avail: int | None
    resubmit: tuple[int, ...]
    settled: int


class InflightJournal:
    """One split queue's region of the in-flight buffer, and the order it is written in.

    ``mark`` (heads popped), ``link`` (heads answered, before the used idx is published)
    and ``settle`` (after it is) are the hot path: a few stores per request.  Not
    thread-safe: the thread that owns the queue owns its journal.
    """

    __slots__ = (
        "_b",
        "_batch",
        "_counters",
        "_flags",
        "_h",
        "_last_head",
        "_nexts",
        "_q",
        "counter",
        "num",
        "offset",
        "region",
    )

    def __init__(self, view: memoryview, num: int, *, counter: int = 0) -> None:
        """Journal over ``view`` for a queue of ``num`` entries; ``counter`` is the next
        request's (``recover`` sets it; give it when taking over a recovered journal)."""
        size = queue_region_size(num)
        if view.nbytes < size:
            raise InflightError(
                f"in-flight region of {view.nbytes} bytes; a queue of {num} needs {size}")
        view = view.cast("B")[:size]
        self._b = view
        self._h = view.cast("H")
        self._q = view.cast("Q")
        # Strided views of the descriptor states' fields, indexed by head: one store each.
        self._flags = view[_HEADER::_DESC_STATE]  # DescStateSplit.inflight (u8)
        self._nexts = self._h[(_HEADER + 6) // 2 :: _DESC_STATE // 2]  # .next (u16)
        self._counters = self._q[(_HEADER + 8) // 8 :: _DESC_STATE // 8]  # .counter (u64)
        self.num = num
        self.counter = counter
        self._batch: list[int] = []  # linked, not settled
        self._last_head = int(self._h[_LAST_BATCH_HEAD_H])
        self.region: MemoryRegion | None = None
        """The mapping the journal lies in, when made by ``in_region``."""
        self.offset = 0
        """Where in ``region`` the journal starts."""

    @classmethod
    def in_region(
        cls, region: MemoryRegion, offset: int, num: int, *, counter: int = 0
    ) -> InflightJournal:
        """A journal at ``offset`` of a mapped buffer, which it remembers, so that a
        queue served by another process can map the same bytes (its ``fd``)."""
        journal = cls(region.view[offset : offset + queue_region_size(num)], num,
                      counter=counter)
        journal.region = region
        journal.offset = offset
        return journal

    # ------------------------------------------------------------------ hot path

    def mark(self, heads: Sequence[int]) -> None:
        """Record popped heads as in flight, in avail order: each head's counter, then its
        flag (a flag is never set over a stale counter).  Heads outside the queue (a
        broken avail entry, never answered) are not recorded."""
        flags = self._flags
        counters = self._counters
        num = self.num
        counter = self.counter
        for head in heads:
            if head < num:
                counters[head] = counter
                flags[head] = 1
                counter += 1
        self.counter = counter

    def link(self, heads: Sequence[int]) -> None:
        """Chain heads about to be answered onto the batch list (before the used idx that
        publishes them is stored): ``recover`` walks it to settle a batch the driver saw
        but the buffer did not record."""
        nexts = self._nexts
        last = self._last_head
        for head in heads:
            nexts[head] = last
            last = head
        self._h[_LAST_BATCH_HEAD_H] = last
        self._last_head = last
        self._batch += heads

    def settle(self, used_idx: int) -> None:
        """The used idx ``used_idx`` was stored: the linked heads are no longer in flight."""
        flags = self._flags
        for head in self._batch:
            flags[head] = 0
        self._h[_USED_IDX_H] = used_idx
        self._batch.clear()

    # ------------------------------------------------------------------ recovery

    def in_flight(self) -> list[int]:
        """Heads flagged in flight, in table order (for inspection and tests)."""
        flags = self._flags
        return [head for head in range(self.num) if flags[head]]

    def recover(self, used_idx: int, avail_idx: int) -> Recovery:
        """Read the buffer back when the ring starts: ``used_idx`` and ``avail_idx`` are
        the ring's, as they are in guest memory now.

        A buffer of version 0 is initialised (nothing to resume).  Otherwise it is checked
        whole before anything is written: ``InflightError`` for a version or size we do
        not know, a flag that is neither 0 nor 1, a last-batch list that leaves the queue
        or loops, more in flight than the driver has outstanding, or counters that repeat
        or are absurd.  Then the last batch is settled if the used idx got ahead of the
        buffer's, and the rest is as described in ``Recovery``.
        """
        if not 0 <= used_idx <= U16 or not 0 <= avail_idx <= U16:
            raise InflightError(f"ring indices {used_idx}, {avail_idx} are not 16-bit")
        h = self._h
        version = int(h[_VERSION_H])
        if version == 0:
            self._initialise(used_idx)
            return Recovery(True, None, (), 0)
        if version != INFLIGHT_VERSION:
            raise InflightError(f"version {version}; only {INFLIGHT_VERSION} is defined")
        num = self.num
        desc_num = int(h[_DESC_NUM_H])
        if desc_num != num:
            raise InflightError(f"made for a queue of {desc_num} entries, the ring has {num}")
        flags = self._flags[:num].tolist()
        odd = [(head, flag) for head, flag in enumerate(flags) if flag > 1]
        if odd:
            head, flag = odd[0]
            raise InflightError(f"descriptor {head} has in-flight flag {flag}, not 0 or 1")
        last_batch = self._last_batch(used_idx)
        for head in last_batch:
            flags[head] = 0
        heads = [head for head, flag in enumerate(flags) if flag]
        outstanding = (avail_idx - used_idx) & U16
        if len(heads) > outstanding:
            raise InflightError(
                f"{len(heads)} requests in flight, but the driver has only {outstanding} "
                f"outstanding (avail idx {avail_idx}, used idx {used_idx})")
        counters = {head: int(self._counters[head]) for head in heads}
        if len(set(counters.values())) != len(heads):
            raise InflightError("two requests in flight have the same counter")
        if any(counter >= MAX_COUNTER for counter in counters.values()):
            raise InflightError("a request in flight has a counter past 2^63")
        # Checked: now settle the last batch (flags first, then the used idx, so a crash
        # here leaves the same work to the next recovery).
        for head in last_batch:
            self._flags[head] = 0
        h[_USED_IDX_H] = used_idx
        self._batch.clear()
        resubmit = tuple(sorted(heads, key=counters.__getitem__))
        self.counter = counters[resubmit[-1]] + 1 if resubmit else 0
        return Recovery(False, (used_idx + len(heads)) & U16, resubmit, len(last_batch))

    def _last_batch(self, used_idx: int) -> list[int]:
        """The heads of a batch published (used idx stored) but not recorded as answered."""
        h = self._h
        recorded = int(h[_USED_IDX_H])
        count = (used_idx - recorded) & U16
        if not count:
            return []
        if count > self.num:
            raise InflightError(
                f"used idx {used_idx} is {count} entries past the buffer's {recorded}, more "
                f"than the queue holds ({self.num})")
        heads: list[int] = []
        seen: set[int] = set()
        head = int(h[_LAST_BATCH_HEAD_H])
        for _ in range(count):
            if head >= self.num:
                raise InflightError(f"last batch list names descriptor {head}, outside the "
                                    f"queue ({self.num})")
            if head in seen:
                raise InflightError(f"last batch list loops at descriptor {head}")
            seen.add(head)
            heads.append(head)
            head = int(self._nexts[head])
        return heads

    def _initialise(self, used_idx: int) -> None:
        """Lay out a fresh region; the version goes last, so a crash before it leaves a
        buffer that is initialised again."""
        b = self._b
        b[_HEADER:] = bytes(len(b) - _HEADER)
        self._q[0] = 0
        h = self._h
        h[_DESC_NUM_H] = self.num
        h[_LAST_BATCH_HEAD_H] = 0
        h[_USED_IDX_H] = used_idx
        h[_VERSION_H] = INFLIGHT_VERSION
        self._last_head = 0
        self._batch.clear()
        self.counter = 0
