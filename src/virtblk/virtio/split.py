"""Split virtqueues (VIRTIO 1.x section 2.7), both the driver and the device side.

A split virtqueue is three areas in guest memory: the descriptor table (16-byte
``addr, len, flags, next`` entries), the available ring the driver fills with chain heads,
and the used ring the device fills with ``(id, len)`` completions.  The two ends share
nothing else, so each side keeps its own shadow state and only the ring indices cross.

Rules both sides follow here:

* Ring indices, flags and event fields are accessed as ONE aligned 16-bit load or store
  (a ``memoryview.cast('H')``); byte-wise access tears under a concurrent peer.
* Entries are written before the index that publishes them (x86 keeps stores in order,
  and Python executes them in program order).  Where the spec needs a full barrier
  (publish an index, then read the peer's event/flags), an uncontended lock round trip
  provides one: it is a locked instruction on x86.
* The device side trusts nothing the driver wrote: ``DeviceVirtqueue.pop`` checks every
  index and address and raises only ``ChainError`` or ``RingError``.
"""

from __future__ import annotations

import array
import dataclasses
import struct
import threading
from collections.abc import Sequence
from typing import Final, NamedTuple, NoReturn

from virtblk.spec import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_ALIGN,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_ALIGN,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ALIGN,
    VRING_USED_ELEM_SIZE,
    VRING_USED_F_NO_NOTIFY,
)
from virtblk.virtio.memory import BufferAllocator, GuestMemory, GuestMemoryError, MemoryRegion

__all__ = [
    "ChainError",
    "DescriptorChain",
    "DeviceProtocolError",
    "DeviceVirtqueue",
    "DriverVirtqueue",
    "QueueFull",
    "RingError",
    "Triple",
    "VirtqueueError",
    "VringAddrs",
    "ring_sizes",
]

_DESC: Final = struct.Struct("<QIHH")
_TABLE3: Final = struct.Struct("<" + "QIHH" * 3)
_U16: Final = 0xFFFF
_NEXT: Final = VRING_DESC_F_NEXT
_NEXT_WRITE: Final = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE


class VirtqueueError(Exception):
    """Base of the errors a virtqueue raises about the peer's or the caller's misuse."""


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


class DeviceProtocolError(VirtqueueError):
    """The device broke the used-ring protocol; the driver queue is now broken.

    ``completed`` holds the valid ``(token, written_len)`` completions that the same
    ``get_used`` call read before the bad entry: the caller still owns completing them.
    """

    def __init__(self, message: str, completed: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.completed: list[tuple[int, int]] = completed or []


class QueueFull(VirtqueueError):
    """Not enough free descriptors for the chain; complete something and retry."""


def _check_num(num: int) -> None:
    if not 1 <= num <= VIRTQUEUE_MAX_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} must be a power of two in 1..{VIRTQUEUE_MAX_SIZE}")


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) for ``num`` entries.

    The avail and used sizes include the trailing ``used_event``/``avail_event`` fields,
    which exist in memory whether or not EVENT_IDX is negotiated.
    """
    _check_num(num)
    return VRING_DESC_SIZE * num, 6 + 2 * num, 6 + VRING_USED_ELEM_SIZE * num


@dataclasses.dataclass(frozen=True, slots=True)
class VringAddrs:
    """Where a queue's three areas live (guest-physical addresses) and its size."""

    num: int
    desc: int
    avail: int
    used: int

    @classmethod
    def allocate(cls, allocator: BufferAllocator, num: int) -> VringAddrs:
        """Carve the three areas out of ``allocator`` with the spec's alignments."""
        desc_size, avail_size, used_size = ring_sizes(num)
        return cls(
            num=num,
            desc=allocator.alloc(desc_size, VRING_DESC_ALIGN),
            avail=allocator.alloc(avail_size, VRING_AVAIL_ALIGN),
            used=allocator.alloc(used_size, VRING_USED_ALIGN),
        )


class _Barrier:
    """A full memory barrier: an uncontended lock round trip is a locked instruction."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> None:
        self._lock.acquire()
        self._lock.release()


# ---------------------------------------------------------------------------- driver


_TABLE_STRUCTS: dict[int, struct.Struct] = {}


def _table_struct(count: int) -> struct.Struct:
    packer = _TABLE_STRUCTS.get(count)
    if packer is None:
        packer = _TABLE_STRUCTS[count] = struct.Struct("<" + "QIHH" * count)
    return packer


class DriverVirtqueue:
    """The driver's end of a split virtqueue, like Linux ``virtio_ring.c``.

    Requests are identified by a caller-chosen ``token`` in ``range(max_tokens)`` (a
    blk-mq tag).  With ``indirect``, every token owns a preallocated indirect table of
    ``max_chain`` entries, so a multi-buffer request costs one ring descriptor and no
    allocation; ``prepare`` writes a token's chain once and ``add_prepared`` submits it
    again and again (a tag whose header and status never move).  ``add`` only fills the
    ring; ``kick_prepare`` publishes and says whether the device wants a notification, so
    the caller can batch.

    The constructor zeroes the three ring areas: create the queue before telling the
    device its addresses.  Not thread-safe: one thread owns a queue (a blk-mq hardware
    queue), as in Linux where the caller holds the queue lock.
    """

    def __init__(
        self,
        memory: GuestMemory,
        addrs: VringAddrs,
        *,
        event_idx: bool,
        indirect: bool,
        allocator: BufferAllocator,
        max_chain: int,
        max_tokens: int | None = None,
    ) -> None:
        """Set up shadow state; ``max_tokens`` defaults to the queue size."""
        num = addrs.num
        _check_num(num)
        if max_chain < 1:
            raise ValueError(f"max_chain {max_chain} must be at least 1")
        if max_tokens is None:
            max_tokens = num
        if max_tokens < 1:
            raise ValueError(f"max_tokens {max_tokens} must be at least 1")
        desc_size, avail_size, used_size = ring_sizes(num)
        self.addrs = addrs
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain = max_chain
        self.max_tokens = max_tokens
        self._mask = num - 1
        self._allocator = allocator
        self._desc = memory.view(addrs.desc, desc_size)
        avail = memory.view(addrs.avail, avail_size)
        used = memory.view(addrs.used, used_size)
        for area in (self._desc, avail, used):
            area[:] = bytes(len(area))
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[: 4 + VRING_USED_ELEM_SIZE * num].cast("I")
        self._used_event_i = 2 + num  # avail.used_event, in 16-bit units
        self._avail_event_i = 2 + 4 * num  # used.avail_event, in 16-bit units
        self._barrier = _Barrier()

        self._free: list[int] = list(range(num - 1, -1, -1))  # a stack: pop() gives 0 first
        self._token_of_head: list[int] = [-1] * num
        self._writable_of_head: list[int] = [0] * num
        self._chain_of_head: list[list[int] | None] = [None] * num
        self._token_busy = bytearray(max_tokens)
        self._in_flight = 0
        self._avail_shadow = 0
        self._num_added = 0
        self._last_used = 0
        self._broken: str | None = None

        self._table_stride = VRING_DESC_SIZE * max_chain
        # The spec bounds every chain, indirect ones included, by the queue size.
        self._table_limit = min(max_chain, num)
        self._prepared: list[tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...],
                                   int, int] | None] = [None] * max_tokens
        """Per token: (out, in, table entries or 0 for a direct chain, writable bytes)."""
        self._tables_base = 0  # gpa of token 0's indirect table
        self._tables = memoryview(b"")
        if indirect:
            self._tables_base = allocator.alloc(self._table_stride * max_tokens, VRING_DESC_ALIGN)
            self._tables = memory.view(self._tables_base, self._table_stride * max_tokens)

    # -- state

    @property
    def num_free(self) -> int:
        """Free descriptors in the ring."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned by ``get_used`` (nor detached)."""
        return self._in_flight

    @property
    def broken(self) -> bool:
        """True once the device broke the protocol; ``add`` then refuses."""
        return self._broken is not None

    # -- submission

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: int,
    ) -> None:
        """Queue one chain: ``out`` (device-readable) then ``in_`` (device-writable) buffers.

        Buffers are ``(gpa, length)``.  Not visible to the device until ``kick_prepare``.
        Raises ``QueueFull`` when descriptors run out (nothing is changed then).
        """
        # One struct call for the whole indirect table (``_write_table``, shared with ``prepare``).
        if self._broken is not None or not 0 <= token < self.max_tokens or self._token_busy[token]:
            self._reject_token(token)
        count = len(out) + len(in_)
        try:
            if count > 1 and self.indirect:
                if count > self._table_limit:
                    raise ValueError(
                        f"chain of {count} buffers exceeds max_chain {self.max_chain} "
                        f"or the queue size {self.num}"
                    )
                free = self._free
                if not free:
                    raise QueueFull("no free descriptor")
                written = self._write_table(token, out, in_, count)
                self._prepared[token] = None  # its table now holds this chain
                head = free.pop()
                _DESC.pack_into(
                    self._desc,
                    head * VRING_DESC_SIZE,
                    self._tables_base + token * self._table_stride,
                    count * VRING_DESC_SIZE,
                    VRING_DESC_F_INDIRECT,
                    0,
                )
                self._chain_of_head[head] = None
            elif count:
                head, written = self._add_direct(out, in_, count)
            else:
                raise ValueError("a chain needs at least one buffer")
        except struct.error as exc:
            raise ValueError(f"buffer address or length out of range: {exc}") from exc
        self._token_of_head[head] = token
        self._writable_of_head[head] = written
        self._token_busy[token] = 1
        self._in_flight += 1
        shadow = self._avail_shadow
        self._avail_h[2 + (shadow & self._mask)] = head
        self._avail_shadow = (shadow + 1) & _U16
        self._num_added += 1

    def _write_table(
        self, token: int, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]],
        count: int,
    ) -> int:
        """Write ``out`` then ``in_`` into ``token``'s indirect table, one struct call for
        the whole table; returns the writable bytes.  Raises ``struct.error`` for an
        address or length out of range (the caller says which chain)."""
        args: list[int] = []
        nxt = 1
        for gpa, length in out:
            args += (gpa, length, VRING_DESC_F_NEXT, nxt)
            nxt += 1
        written = 0
        for gpa, length in in_:
            args += (gpa, length, _NEXT_WRITE, nxt)
            written += length
            nxt += 1
        args[-2] -= VRING_DESC_F_NEXT  # the last entry ends the chain
        args[-1] = 0
        packer = _TABLE_STRUCTS.get(count) or _table_struct(count)
        packer.pack_into(self._tables, token * self._table_stride, *args)
        return written

    def _add_direct(
        self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], count: int
    ) -> tuple[int, int]:
        if count > self.num:
            raise ValueError(f"chain of {count} buffers exceeds the queue size {self.num}")
        free = self._free
        if len(free) < count:
            raise QueueFull(f"{count} descriptors needed, {len(free)} free")
        descs = free[-count:]
        n_out = len(out)
        written = 0
        table = self._desc
        for k in range(count):
            if k < n_out:
                gpa, length = out[k]
                flags = 0
            else:
                gpa, length = in_[k - n_out]
                flags = VRING_DESC_F_WRITE
                written += length
            last = k + 1 == count
            # A struct.error here leaves the free list untouched: descs are taken below.
            _DESC.pack_into(
                table,
                descs[k] * VRING_DESC_SIZE,
                gpa,
                length,
                flags if last else flags | VRING_DESC_F_NEXT,
                0 if last else descs[k + 1],
            )
        del free[-count:]
        head = descs[0]
        self._chain_of_head[head] = descs if count > 1 else None
        return head, written

    # -- prepared chains: a chain written once and submitted many times

    def prepare(
        self, token: int, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]]
    ) -> None:
        """Make ``out`` (device-readable) then ``in_`` (device-writable) the chain that
        ``token`` carries on each ``add_prepared`` from now on.

        With indirect descriptors the chain is written into the token's own table here, so
        submitting it later writes one ring descriptor and one avail entry, whatever its
        length (what a blk-mq tag with a fixed header and status needs).  Preparing the
        chain already prepared costs one comparison.  The bytes the buffers hold (a header,
        the data) stay the caller's to change between submissions.  Raises ValueError for
        a token in flight, a chain that no ``add`` would accept or an address out of range.
        """
        if not 0 <= token < self.max_tokens or self._token_busy[token]:
            self._reject_token(token)
        out = tuple(out)
        in_ = tuple(in_)
        cached = self._prepared[token]
        if cached is not None and cached[0] == out and cached[1] == in_:
            return
        self._prepared[token] = None
        count = len(out) + len(in_)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        if not self.indirect or count == 1:
            if count > self.num:
                raise ValueError(f"chain of {count} buffers exceeds the queue size {self.num}")
            written = sum(length for _, length in in_)
            self._prepared[token] = (out, in_, 0, written)  # direct: ``add`` at submit
            return
        if count > self._table_limit:
            raise ValueError(
                f"chain of {count} buffers exceeds max_chain {self.max_chain} "
                f"or the queue size {self.num}"
            )
        try:
            written = self._write_table(token, out, in_, count)
        except struct.error as exc:
            raise ValueError(f"buffer address or length out of range: {exc}") from exc
        self._prepared[token] = (out, in_, count, written)

    def add_prepared(self, token: int) -> None:
        """Queue the chain ``prepare`` gave ``token`` (not visible before ``kick_prepare``);
        raises ``QueueFull`` when no descriptor is free (nothing changes then)."""
        if not self.add_prepared_batch((token,)):
            raise QueueFull("no free descriptor")

    def add_prepared_batch(self, tokens: Sequence[int]) -> int:
        """Queue the prepared chains of ``tokens`` in order, as far as descriptors go;
        returns how many were queued (the rest are the caller's to retry).  One call per
        batch: what a queue handle submits with."""
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        free = self._free
        busy = self._token_busy
        prepared = self._prepared
        token_of_head = self._token_of_head
        writable_of_head = self._writable_of_head
        chain_of_head = self._chain_of_head
        avail_h = self._avail_h
        desc = self._desc
        pack = _DESC.pack_into
        tables_base = self._tables_base
        stride = self._table_stride
        mask = self._mask
        max_tokens = self.max_tokens
        shadow = self._avail_shadow
        added = 0
        direct = 0
        try:
            for token in tokens:
                if not 0 <= token < max_tokens or busy[token]:
                    self._reject_token(token)
                chain = prepared[token]
                if chain is None:
                    raise ValueError(f"token {token} has no prepared chain")
                out, in_, count, written = chain
                if not count:  # a direct chain: ``add`` takes its descriptors
                    self._avail_shadow = shadow
                    try:
                        self.add(out, in_, token)
                    except QueueFull:
                        break
                    finally:
                        shadow = self._avail_shadow
                    direct += 1
                    continue
                if not free:
                    break
                head = free.pop()
                pack(desc, head << 4, tables_base + token * stride, count << 4,
                     VRING_DESC_F_INDIRECT, 0)
                chain_of_head[head] = None
                token_of_head[head] = token
                writable_of_head[head] = written
                busy[token] = 1
                avail_h[2 + (shadow & mask)] = head
                shadow = (shadow + 1) & _U16
                added += 1
        finally:
            self._avail_shadow = shadow
            self._in_flight += added
            self._num_added += added
        return added + direct

    def _reject_token(self, token: int) -> NoReturn:
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        if not 0 <= token < self.max_tokens:
            raise ValueError(f"token {token} outside 0..{self.max_tokens - 1}")
        raise ValueError(f"token {token} is already in flight")

    def kick_prepare(self) -> bool:
        """Publish everything added so far; True if the device asked to be notified."""
        new = self._avail_shadow
        added = self._num_added
        self._avail_h[1] = new
        self._num_added = 0
        if not added:
            return False
        self._barrier()  # the device must see idx before we read its suppression state
        if self.event_idx:
            event = self._used_h[self._avail_event_i]
            return ((new - event - 1) & _U16) < added
        return not self._used_h[0] & VRING_USED_F_NO_NOTIFY

    # -- completion

    def pending(self) -> bool:
        """True when the device has used entries we have not read yet."""
        return self._used_h[1] != self._last_used

    def get_used(self, limit: int = 0) -> list[tuple[int, int]]:
        """Take new completions, ``(token, written_len)``, at most ``limit`` (0: all).

        Frees their descriptors.  Raises ``DeviceProtocolError`` (and breaks the queue)
        for an id outside the table or not in flight, a length above the chain's writable
        bytes, or a used idx that ran ahead of what is in flight.
        """
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        last = self._last_used
        new = self._used_h[1]
        n = (new - last) & _U16
        if not n:
            return []
        if n > self._in_flight:
            self._fail(f"used idx {new} is {n} entries past {last}, {self._in_flight} in flight")
        if limit and n > limit:
            n = limit
        num = self.num
        start = last & self._mask
        used_i = self._used_i
        if start + n <= num:
            vals = used_i[1 + 2 * start : 1 + 2 * (start + n)].tolist()
        else:
            vals = used_i[1 + 2 * start : 1 + 2 * num].tolist()
            vals += used_i[1 : 1 + 2 * (start + n - num)].tolist()
        token_of_head = self._token_of_head
        writable_of_head = self._writable_of_head
        chain_of_head = self._chain_of_head
        token_busy = self._token_busy
        free = self._free
        done: list[tuple[int, int]] = []
        for head, written in zip(vals[0::2], vals[1::2], strict=True):
            if head >= num:
                self._fail(f"used id {head} is outside the queue (size {num})", done)
            token = token_of_head[head]
            if token < 0:
                self._fail(f"used id {head} is not in flight", done)
            if written > writable_of_head[head]:
                self._fail(
                    f"used len {written} for id {head} exceeds the chain's "
                    f"{writable_of_head[head]} writable bytes",
                    done,
                )
            token_of_head[head] = -1
            chain = chain_of_head[head]
            if chain is None:
                free.append(head)
            else:
                free.extend(chain)
                chain_of_head[head] = None
            token_busy[token] = 0
            done.append((token, written))
        self._last_used = (last + n) & _U16
        self._in_flight -= n
        return done

    def _fail(self, reason: str, done: list[tuple[int, int]] | None = None) -> NoReturn:
        self._last_used = (self._last_used + len(done or ())) & _U16
        if done:
            self._in_flight -= len(done)
        self._broken = reason
        raise DeviceProtocolError(f"device protocol violation: {reason}", done)

    def detach_unused(self) -> list[int]:
        """Forget every chain still in flight and return their tokens (after a reset)."""
        tokens: list[int] = []
        for head, token in enumerate(self._token_of_head):
            if token < 0:
                continue
            tokens.append(token)
            self._token_of_head[head] = -1
            chain = self._chain_of_head[head]
            if chain is None:
                self._free.append(head)
            else:
                self._free.extend(chain)
                self._chain_of_head[head] = None
            self._token_busy[token] = 0
        self._in_flight = 0
        return tokens

    # -- interrupt suppression

    def disable_cb(self) -> None:
        """Ask the device not to interrupt (a hint: it may still do so)."""
        if self.event_idx:
            # As far from the in-flight window as a 16-bit index gets.
            self._avail_h[self._used_event_i] = (self._last_used + 0x8000) & _U16
        else:
            self._avail_h[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb(self, delay: int = 0) -> bool:
        """Ask for an interrupt at the next completion, or (with EVENT_IDX) only once
        ``delay`` more completions have come after that one: a caller that waits for a batch
        sleeps through the first ``delay`` completions instead of waking for each.

        Returns False when more than ``delay`` completions are already pending: the device
        may have passed the point we asked for before it saw the request, so the caller
        must drain again (``virtblk_done``).  Without EVENT_IDX ``delay`` cannot be
        expressed: any pending completion returns False.
        """
        if self.event_idx:
            self._avail_h[self._used_event_i] = (self._last_used + delay) & _U16
        else:
            self._avail_h[0] = 0
            delay = 0
        self._barrier()
        return ((self._used_h[1] - self._last_used) & _U16) <= delay

    def close(self) -> None:
        """Give the indirect tables back to the allocator (the rings belong to the caller)."""
        self._prepared = [None] * self.max_tokens
        if self.indirect and self._tables:
            self._tables.release()
            self._tables = memoryview(b"")
            self._allocator.free(self._tables_base)


# ---------------------------------------------------------------------------- device


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

_Region = tuple[int, int, memoryview, "MemoryRegion | None"]
_NO_REGION: _Region = (0, -1, memoryview(b""), None)


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


class DeviceVirtqueue:
    """The device's end of a split virtqueue, like rust-vmm's ``virtio-queue``.

    ``pop`` returns validated chains; ``add_used`` writes completions that only become
    visible to the driver at ``flush_used`` (one index store per batch); then
    ``needs_notification`` says whether to signal the call eventfd.  ``max_indirect``
    bounds an indirect table's entries (default: the queue size, as VIRTIO 1.0 says).
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
    ) -> None:
        """Attach to rings the driver set up; raises RingError if they are not in memory."""
        num = addrs.num
        if not 1 <= num <= VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two in 1..{VIRTQUEUE_MAX_SIZE}")
        for name, addr, align in (
            ("descriptor table", addrs.desc, VRING_DESC_ALIGN),
            ("avail ring", addrs.avail, VRING_AVAIL_ALIGN),
            ("used ring", addrs.used, VRING_USED_ALIGN),
        ):
            if addr % align:
                raise RingError(f"{name} at {addr:#x} is not {align}-byte aligned")
        if not 0 <= last_avail_idx <= _U16 or not 0 <= used_idx <= _U16:
            raise RingError(f"ring indices {last_avail_idx}, {used_idx} are not 16-bit")
        extra = 2 if event_idx else 0
        try:
            self._desc = memory.view(addrs.desc, VRING_DESC_SIZE * num)
            avail = memory.view(addrs.avail, 4 + 2 * num + extra)
            used = memory.view(addrs.used, 4 + VRING_USED_ELEM_SIZE * num + extra)
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        self.addrs = addrs
        self.num = num
        self.event_idx = event_idx
        self.max_indirect = num if max_indirect is None else max_indirect
        self._max_indirect_bytes = VRING_DESC_SIZE * self.max_indirect
        self._region: _Region = _NO_REGION
        self._memory = memory
        self._mask = num - 1
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[: 4 + VRING_USED_ELEM_SIZE * num].cast("I")
        self._used_event_i = 2 + num
        self._avail_event_i = 2 + 4 * num
        self._barrier = _Barrier()
        self._last_avail = last_avail_idx
        self._used_shadow = used_idx  # entries written by add_used
        self._used_published = used_idx  # the idx the driver can see
        self._signalled = used_idx  # used idx at the last notification decision
        self._signalled_before = False
        self._notify_enabled = True
        self._broken: str | None = None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory the rings and buffers live in."""
        return self._memory

    @property
    def last_avail_idx(self) -> int:
        """The next avail index to pop (vhost-user GET_VRING_BASE)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """The used index including entries not yet flushed."""
        return self._used_shadow

    def used_idx_in_memory(self) -> int:
        """The used index as published in guest memory (where a ring served by someone
        else, who can no longer say, got to)."""
        return int(self._used_h[1])

    @property
    def broken(self) -> bool:
        """True after a RingError: the queue serves nothing until it is recreated."""
        return self._broken is not None

    def avail_backlog(self) -> int:
        """How many chains the driver published that are not popped yet (never more than
        the queue size, which ``pop`` would refuse anyway)."""
        return min((self._avail_h[1] - self._last_avail) & _U16, self.num)

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
        """Consume up to ``limit`` avail entries with one avail idx load; their heads."""
        if self._broken is not None:
            raise RingError(f"queue is broken: {self._broken}")
        avail_h = self._avail_h
        avail_idx = avail_h[1]
        last = self._last_avail
        pending = (avail_idx - last) & _U16
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
        last = (last + n) & _U16
        self._last_avail = last
        if self.event_idx and self._notify_enabled:
            self._used_h[self._avail_event_i] = last
        return heads

    def _walk(self, head: int) -> DescriptorChain:
        """One chain: the flat fast path when it applies, else the careful walk."""
        flat = self._flat(head, self._region_for_batch())
        if flat is None:
            return self._walk_careful(head)
        return _chain_of(flat)

    def _region_for_batch(self) -> _Region:
        """The region the fast path tries first, checked once per batch against the
        memory table (a region the frontend removed must not be used any more)."""
        region = self._region
        regions = self._memory.regions
        if region[3] is None or region[3] not in regions:
            if not regions:
                region = _NO_REGION
            else:
                biggest = max(regions, key=lambda r: r.size)
                region = (biggest.guest_phys_addr, biggest.end, biggest.view, biggest)
            self._region = region
        return region

    def _flat(self, head: int, region: _Region) -> _FlatChain | None:
        """The chain at ``head`` as a :data:`_FlatChain`, or None when it is not the common
        shape (then ``_walk_careful`` decides, and names any error).

        Almost every request a driver sends is one INDIRECT descriptor whose table lists
        its buffers in order (``next = i + 1``), all in one memory region.  Such a table is
        read with a single unpack and checked entry by entry against the rules
        ``_walk_careful`` applies, so both accept exactly the same chains.
        """
        addr, length, flags, _ = _DESC.unpack_from(self._desc, head * VRING_DESC_SIZE)
        if flags != VRING_DESC_F_INDIRECT or length & 15:
            return None
        if not 0 < length <= self._max_indirect_bytes:
            return None
        base, end, view, _ = region
        if addr < base or addr + length > end:
            return None
        n = length >> 4
        vals = (_TABLE_STRUCTS.get(n) or _table_struct(n)).unpack_from(view, addr - base)
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
        unpack_desc = _DESC.unpack_from
        unpack3 = _TABLE3.unpack_from
        three_ok = self.max_indirect >= 3
        for head in heads:
            if head < num:
                addr, length, flags, _ = unpack_desc(table, head << 4)
                if (flags == VRING_DESC_F_INDIRECT and length == 48 and three_ok
                        and base <= addr and addr + 48 <= end):
                    a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack3(view, addr - base)
                    if (f0 == _NEXT and n0 == 1 and n1 == 2 and f2 == VRING_DESC_F_WRITE
                            and (f1 in (_NEXT_WRITE, _NEXT)) and l0 and l1 and l2
                            and base <= a0 and a0 + l0 <= end and base <= a1
                            and a1 + l1 <= end and base <= a2 and a2 + l2 <= end):
                        append(_new_triple(Triple, (head, a0 - base, l0, a1 - base, l1,
                                                    f1 == _NEXT_WRITE, a2 - base, l2)))
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
        unpack = _DESC.unpack_from
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

    def pop_many(self, limit: int) -> list[DescriptorChain | ChainError]:
        """Up to ``limit`` pops in one call; malformed chains come back as their ChainError
        (already consumed) so one bad request does not hide the good ones behind it.

        The avail index is read once and the heads are read as one slice: a batch costs
        one shared-memory index load, not one per request.
        """
        view, items = self.pop_batch(limit)
        return [x.chain(view) if isinstance(x, Triple) else x for x in items]

    def add_used(self, head: int, length: int) -> None:
        """Record a completion: ``length`` bytes written into the chain at ``head``.

        Not visible to the driver until ``flush_used``.
        """
        if not 0 <= head < self.num:
            raise ValueError(f"head {head} is outside the queue (size {self.num})")
        if not 0 <= length <= 0xFFFFFFFF:
            raise ValueError(f"used length {length} is not a 32-bit value")
        slot = 1 + 2 * (self._used_shadow & self._mask)
        self._used_i[slot] = head
        self._used_i[slot + 1] = length
        self._used_shadow = (self._used_shadow + 1) & _U16

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
        start = self._used_shadow & self._mask
        first = min(n, num - start)
        used_i = self._used_i
        used_i[1 + 2 * start : 1 + 2 * (start + first)] = array.array("I", used[: 2 * first])
        if first < n:
            used_i[1 : 1 + 2 * (n - first)] = array.array("I", used[2 * first :])
        self._used_shadow = (self._used_shadow + n) & _U16

    def flush_used(self) -> None:
        """Publish every completion added so far with one used idx store."""
        if self._used_published != self._used_shadow:
            self._used_h[1] = self._used_shadow
            self._used_published = self._used_shadow

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
            return ((new - event - 1) & _U16) < ((new - old) & _U16)
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
