"""The driver's end of a split virtqueue (VIRTIO 1.x section 2.7), like Linux ``virtio_ring.c``.

Only this module writes descriptors: blk-mq and the queue API hand it ``(gpa, length)``
buffers and tokens, and get tokens back.  The layout both ends share is in
``split_layout``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NoReturn

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
from virtblk.virtio.driver_common import DeviceProtocolError, DriverQueueBase, QueueFull
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.split_layout import (
    DESC,
    NEXT_WRITE,
    TABLE_STRUCTS,
    U16,
    Barrier,
    VringAddrs,
    avail_event_slot,
    check_queue_size,
    ring_sizes,
    table_struct,
    used_event_slot,
)

__all__ = ["DeviceProtocolError", "DriverVirtqueue", "QueueFull"]


class DriverVirtqueue(DriverQueueBase):
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
        check_queue_size(num)
        self._init_tokens(addrs, event_idx=event_idx, indirect=indirect, allocator=allocator,
                          max_chain=max_chain, max_tokens=max_tokens)
        desc_size, avail_size, used_size = ring_sizes(num)
        self._mask = num - 1
        self._desc = memory.view(addrs.desc, desc_size)
        avail = memory.view(addrs.avail, avail_size)
        used = memory.view(addrs.used, used_size)
        for area in (self._desc, avail, used):
            area[:] = bytes(len(area))
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[: 4 + VRING_USED_ELEM_SIZE * num].cast("I")
        self._used_event_i = used_event_slot(num)
        self._avail_event_i = avail_event_slot(num)
        self._barrier = Barrier()

        self._free: list[int] = list(range(num - 1, -1, -1))  # a stack: pop() gives 0 first
        self._token_of_head: list[int] = [-1] * num
        self._writable_of_head: list[int] = [0] * num
        self._chain_of_head: list[list[int] | None] = [None] * num
        self._avail_shadow = 0
        self._num_added = 0
        self._last_used = 0
        self._init_tables(memory)

    # -- state

    @property
    def num_free(self) -> int:
        """Free descriptors in the ring."""
        return len(self._free)

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
                DESC.pack_into(
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
        self._avail_shadow = (shadow + 1) & U16
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
            args += (gpa, length, NEXT_WRITE, nxt)
            written += length
            nxt += 1
        args[-2] -= VRING_DESC_F_NEXT  # the last entry ends the chain
        args[-1] = 0
        packer = TABLE_STRUCTS.get(count) or table_struct(count)
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
            DESC.pack_into(
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

    # -- prepared chains (``prepare``, ``add_prepared``: ``DriverQueueBase``)

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
        pack = DESC.pack_into
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
                shadow = (shadow + 1) & U16
                added += 1
        finally:
            self._avail_shadow = shadow
            self._in_flight += added
            self._num_added += added
        return added + direct

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
            return vring_need_event(event, new, (new - added) & U16)
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
        n = (new - last) & U16
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
        self._last_used = (last + n) & U16
        self._in_flight -= n
        return done

    def _fail(self, reason: str, done: list[tuple[int, int]] | None = None) -> NoReturn:
        self._last_used = (self._last_used + len(done or ())) & U16
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
            self._avail_h[self._used_event_i] = (self._last_used + 0x8000) & U16
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
            self._avail_h[self._used_event_i] = (self._last_used + delay) & U16
        else:
            self._avail_h[0] = 0
            delay = 0
        self._barrier()
        return ((self._used_h[1] - self._last_used) & U16) <= delay

    def close(self) -> None:
        """Give the indirect tables back to the allocator and let go of the ring memory (it
        belongs to the caller): a live view would keep the whole guest memory mapped, and
        its fd open, after the disk is closed.  Idempotent; a closed ring is used no more."""
        self._release_tables()
        for view in (self._desc, self._avail_h, self._used_h, self._used_i):
            view.release()
