"""The driver's end of a packed virtqueue (VIRTIO 1.1+ section 2.8), like Linux
``virtio_ring.c``'s ``*_packed`` functions.

Same interface as ``split_driver.DriverVirtqueue``, so blk-mq and the queue API drive
either ring: tokens in, ``(token, written_len)`` out, ``DeviceProtocolError`` for a device
that breaks the protocol.  What differs is inside: a chain takes consecutive descriptors
at the ring's current position and a buffer id from a free-id list (the id, not a
descriptor index, is what the device returns), and completions are found by polling the
next descriptor's flags against the used wrap counter.  The layout is in ``packed_layout``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from virtblk.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from virtblk.virtio.driver_common import DeviceProtocolError, DriverQueueBase, QueueFull
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.packed_layout import (
    AVAIL_USED,
    EVENT_FLAGS,
    EVENT_OFF_WRAP,
    HEAD,
    avail_bits,
    check_queue_size,
    encode_off_wrap,
    need_event,
    ring_sizes,
)
from virtblk.virtio.split_layout import TABLE_STRUCTS, Barrier, VringAddrs, table_struct

__all__ = ["DeviceProtocolError", "PackedDriverVirtqueue", "QueueFull"]


class PackedDriverVirtqueue(DriverQueueBase):
    """The driver's end of a packed virtqueue; the interface of ``DriverVirtqueue``.

    Requests are identified by a caller-chosen ``token`` in ``range(max_tokens)``; each
    chain in flight also holds a buffer id in ``range(num)`` from a free-id list, which is
    what the device writes back, in whatever order it completes.  With ``indirect``, every
    token owns a preallocated indirect table of ``max_chain`` entries (a multi-buffer
    chain costs one ring descriptor), and ``prepare``/``add_prepared`` submit a token's
    chain again and again without rewriting it.  ``add`` writes the descriptors but keeps
    each chain's first flags back; ``kick_prepare`` stores them, the batch's first chain
    last, so the device sees the whole batch at once, and says whether to notify.

    The constructor zeroes the ring areas: create the queue before telling the device its
    addresses.  Not thread-safe: one thread owns a queue.
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
        desc_size, driver_size, device_size = ring_sizes(num)
        self._desc = memory.view(addrs.desc, desc_size)
        driver = memory.view(addrs.avail, driver_size)
        device = memory.view(addrs.used, device_size)
        for area in (self._desc, driver, device):
            area[:] = bytes(len(area))
        self._desc_h = self._desc.cast("H")
        self._desc_i = self._desc.cast("I")
        self._driver_h = driver.cast("H")  # ours: when the device should interrupt us
        self._device_h = device.cast("H")  # the device's: when it wants a kick
        self._barrier = Barrier()

        self._free_ids: list[int] = list(range(num - 1, -1, -1))  # a stack: 0 first
        self._num_free = num  # free descriptors
        self._token_of_id: list[int] = [-1] * num
        self._ndescs: list[int] = [0] * num  # ring descriptors each id's chain holds
        self._writable: list[int] = [0] * num
        self._next_avail = 0
        self._avail_wrap = True
        self._last_used = 0
        self._used_wrap = True
        self._unpublished: list[int] = []
        """Chains added since the last kick: ``slot, flags, id`` of each first descriptor
        (``slot`` indexes ``_desc_h``), flattened."""
        self._num_added = 0  # descriptors added since the last kick
        self._event: int | None = None
        """The ``off_wrap`` an ``enable_cb`` armed and no completion has passed yet."""
        self._init_tables(memory)

    # -- state

    @property
    def num_free(self) -> int:
        """Free descriptors in the ring."""
        return self._num_free

    @property
    def next_used(self) -> tuple[int, bool]:
        """The position the driver reaps next and its used wrap counter.  A packed ring has
        no used index in memory, so this is what a reconnecting driver announces as the
        ring's base (the device's in-flight journal, when it has one, says the rest)."""
        return self._last_used, self._used_wrap

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
        if self._broken is not None or not 0 <= token < self.max_tokens or self._token_busy[token]:
            self._reject_token(token)
        count = len(out) + len(in_)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        try:
            if count > 1 and self.indirect:
                if count > self._table_limit:
                    raise ValueError(
                        f"chain of {count} buffers exceeds max_chain {self.max_chain} "
                        f"or the queue size {self.num}"
                    )
                if not self._num_free:
                    raise QueueFull("no free descriptor")
                written = self._write_table(token, out, in_, count)
                self._prepared[token] = None  # its table now holds this chain
                self._add_indirect(token, count, written)
            else:
                self._add_direct(out, in_, count, token)
        except struct.error as exc:
            raise ValueError(f"buffer address or length out of range: {exc}") from exc

    def _write_table(
        self, token: int, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]],
        count: int,
    ) -> int:
        """Write ``out`` then ``in_`` into ``token``'s indirect table (one struct call; the
        table is not in the ring, so ``struct`` may write it); returns the writable bytes.
        Only WRITE is set in a table entry: the spec reserves every other flag there, the
        buffer id included."""
        args: list[int] = []
        for gpa, length in out:
            args += (gpa, length, 0, 0)
        written = 0
        for gpa, length in in_:
            args += (gpa, length, 0, VRING_DESC_F_WRITE)
            written += length
        packer = TABLE_STRUCTS.get(count) or table_struct(count)
        packer.pack_into(self._tables, token * self._table_stride, *args)
        return written

    def _add_indirect(self, token: int, count: int, written: int) -> None:
        """One ring descriptor pointing at ``token``'s table of ``count`` entries."""
        bid = self._free_ids.pop()
        pos = self._next_avail
        HEAD.pack_into(self._desc, pos << 4, self._tables_base + token * self._table_stride,
                       count << 4, bid)
        self._commit(token, bid, pos, VRING_DESC_F_INDIRECT | avail_bits(self._avail_wrap),
                     1, written)

    def _add_direct(
        self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], count: int,
        token: int,
    ) -> None:
        """``count`` consecutive ring descriptors from the current position, each carrying
        the buffer id (the spec needs it in the last; Linux writes it in all, and so do
        we).  Every descriptor but the first is made available here, the first at the
        kick, after them."""
        num = self.num
        if count > num:
            raise ValueError(f"chain of {count} buffers exceeds the queue size {num}")
        if self._num_free < count:
            raise QueueFull(f"{count} descriptors needed, {self._num_free} free")
        bid = self._free_ids[-1]
        n_out = len(out)
        written = 0
        desc = self._desc
        desc_h = self._desc_h
        start = pos = self._next_avail
        wrap = self._avail_wrap
        head_flags = 0
        for k in range(count):
            if k < n_out:
                gpa, length = out[k]
                flags = 0
            else:
                gpa, length = in_[k - n_out]
                flags = VRING_DESC_F_WRITE
                written += length
            if k + 1 < count:
                flags |= VRING_DESC_F_NEXT
            flags |= avail_bits(wrap)
            # A struct.error here changes no state: the positions are free and unpublished.
            HEAD.pack_into(desc, pos << 4, gpa, length, bid)
            if k:
                desc_h[(pos << 3) + 7] = flags
            else:
                head_flags = flags
            pos += 1
            if pos == num:
                pos = 0
                wrap = not wrap
        self._free_ids.pop()
        self._commit(token, bid, start, head_flags, count, written)

    def _commit(self, token: int, bid: int, pos: int, head_flags: int, ndescs: int,
                written: int) -> None:
        """Record a chain written at ``pos`` under buffer id ``bid`` (already taken off the
        free list); its first flags wait for the kick."""
        self._token_of_id[bid] = token
        self._ndescs[bid] = ndescs
        self._writable[bid] = written
        self._token_busy[token] = 1
        self._in_flight += 1
        self._num_free -= ndescs
        self._unpublished += ((pos << 3) + 7, head_flags, bid)
        self._num_added += ndescs
        pos += ndescs
        if pos >= self.num:
            pos -= self.num
            self._avail_wrap = not self._avail_wrap
        self._next_avail = pos

    # -- prepared chains (``prepare``, ``add_prepared``: ``DriverQueueBase``)

    def add_prepared_batch(self, tokens: Sequence[int]) -> int:
        """Queue the prepared chains of ``tokens`` in order, as far as descriptors go;
        returns how many were queued (the rest are the caller's to retry).  One call per
        batch: what a queue handle submits with (``_add_indirect``, written out here)."""
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        busy = self._token_busy
        prepared = self._prepared
        max_tokens = self.max_tokens
        free_ids = self._free_ids
        token_of_id = self._token_of_id
        ndescs = self._ndescs
        writable = self._writable
        unpublished = self._unpublished
        desc = self._desc
        pack = HEAD.pack_into
        tables_base = self._tables_base
        stride = self._table_stride
        num = self.num
        pos = self._next_avail
        flags = VRING_DESC_F_INDIRECT | avail_bits(self._avail_wrap)
        added = 0  # one-descriptor chains written here and not yet counted (``_account``)
        queued = 0
        try:
            for token in tokens:
                if not 0 <= token < max_tokens or busy[token]:
                    self._reject_token(token)
                chain = prepared[token]
                if chain is None:
                    raise ValueError(f"token {token} has no prepared chain")
                _, _, count, written = chain
                if not count:  # a direct chain: ``add`` takes its descriptors
                    self._next_avail = pos
                    self._account(added)
                    added = 0
                    try:
                        self.add(chain[0], chain[1], token)
                    except QueueFull:
                        break
                    finally:
                        pos = self._next_avail
                        flags = VRING_DESC_F_INDIRECT | avail_bits(self._avail_wrap)
                    queued += 1
                    continue
                if self._num_free == added:
                    break
                bid = free_ids.pop()
                pack(desc, pos << 4, tables_base + token * stride, count << 4, bid)
                unpublished += ((pos << 3) + 7, flags, bid)
                token_of_id[bid] = token
                ndescs[bid] = 1
                writable[bid] = written
                busy[token] = 1
                added += 1
                queued += 1
                pos += 1
                if pos == num:
                    pos = 0
                    self._avail_wrap = not self._avail_wrap
                    flags = VRING_DESC_F_INDIRECT | avail_bits(self._avail_wrap)
        finally:
            self._next_avail = pos
            self._account(added)
        return queued

    def _account(self, added: int) -> None:
        """Count ``added`` one-descriptor chains ``add_prepared_batch`` wrote."""
        self._in_flight += added
        self._num_free -= added
        self._num_added += added

    def kick_prepare(self) -> bool:
        """Make everything added so far available; True if the device asked to be notified.

        The first flags of each chain are stored now, the earliest chain's last: the device
        polls only its next position, so it sees the batch whole or not at all.
        """
        unpublished = self._unpublished
        if unpublished:
            desc_h = self._desc_h
            for k in range(len(unpublished) - 3, -1, -3):
                desc_h[unpublished[k]] = unpublished[k + 1]
            unpublished.clear()
        added = self._num_added
        self._num_added = 0
        if not added:
            return False
        self._barrier()  # our flags must be visible before we read the device's wishes
        flags = self._device_h[EVENT_FLAGS]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        return need_event(self._device_h[EVENT_OFF_WRAP], self._next_avail, self._avail_wrap,
                          added, self.num)

    # -- completion

    def pending(self) -> bool:
        """True when the device has marked used a descriptor we have not read yet."""
        flags = self._desc_h[(self._last_used << 3) + 7]
        return flags & AVAIL_USED == (AVAIL_USED if self._used_wrap else 0)

    def get_used(self, limit: int = 0) -> list[tuple[int, int]]:
        """Take new completions, ``(token, written_len)``, at most ``limit`` (0: all).

        Frees their ids and descriptors.  Raises ``DeviceProtocolError`` (and breaks the
        queue) for a used descriptor with nothing in flight, an id outside the queue, not
        in flight or never made available, or a length above the chain's writable bytes;
        ``completed`` carries the good completions read before it.

        The length is taken whatever the used descriptor's WRITE flag says, as Linux does
        (QEMU's device never sets it); the bound on it still holds.
        """
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        desc_h = self._desc_h
        desc_i = self._desc_i
        num = self.num
        token_of_id = self._token_of_id
        ndescs = self._ndescs
        writable = self._writable
        free_ids = self._free_ids
        busy = self._token_busy
        unpublished = self._unpublished
        both = AVAIL_USED
        pos = self._last_used
        wrap = self._used_wrap
        pattern = both if wrap else 0
        done: list[tuple[int, int]] = []
        append = done.append
        freed = 0
        reason = ""
        # At most what is in flight, and at most ``limit``: one more is a protocol error.
        room = self._in_flight if not limit or limit > self._in_flight else limit
        while True:
            slot = pos << 3
            if desc_h[slot + 7] & both != pattern:
                break
            if not room:
                if not limit or len(done) < limit:
                    reason = f"used descriptor at position {pos} with nothing in flight"
                break
            bid = desc_h[slot + 6]
            written = desc_i[(pos << 2) + 2]
            if bid >= num:
                reason = f"used id {bid} is outside the queue (size {num})"
                break
            token = token_of_id[bid]
            if token < 0:
                reason = f"used id {bid} is not in flight"
                break
            if unpublished and bid in unpublished[2::3]:
                reason = f"used id {bid} was never made available"
                break
            if written > writable[bid]:
                reason = (f"used len {written} for id {bid} exceeds the chain's "
                          f"{writable[bid]} writable bytes")
                break
            token_of_id[bid] = -1
            free_ids.append(bid)
            n = ndescs[bid]
            ndescs[bid] = 0
            freed += n
            busy[token] = 0
            append((token, written))
            room -= 1
            pos += n
            if pos >= num:
                pos -= num
                wrap = not wrap
                pattern ^= both
        self._last_used = pos
        self._used_wrap = wrap
        self._num_free += freed
        if self._event is not None and freed and need_event(self._event, pos, wrap, freed, num):
            self._disarm()
        self._in_flight -= len(done)
        if reason:
            self._broken = reason
            raise DeviceProtocolError(f"device protocol violation: {reason}", done)
        return done

    def detach_unused(self) -> list[int]:
        """Forget every chain still in flight and return their tokens (after a reset).

        Chains not yet kicked are taken back from the ring too, so the ring stays whole:
        positions restart where the first of them was, and the next completion is looked
        for there."""
        unpublished = self._unpublished
        if unpublished:
            self._next_avail = unpublished[0] >> 3
            self._avail_wrap = bool(unpublished[1] & VIRTQ_DESC_F_AVAIL)
            unpublished.clear()
            self._num_added = 0
        tokens: list[int] = []
        for bid, token in enumerate(self._token_of_id):
            if token < 0:
                continue
            tokens.append(token)
            self._token_of_id[bid] = -1
            self._ndescs[bid] = 0
            self._token_busy[token] = 0
        self._free_ids = list(range(self.num - 1, -1, -1))
        self._num_free = self.num
        self._in_flight = 0
        self._last_used = self._next_avail
        self._used_wrap = self._avail_wrap
        return tokens

    # -- interrupt suppression

    def disable_cb(self) -> None:
        """Ask the device not to interrupt (a hint: it may still do so)."""
        self._event = None
        self._driver_h[EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE

    def _disarm(self) -> None:
        """Make an event ``get_used`` took the completion of one-shot, as the split ring's
        ``used_event`` is: a packed event position names a slot, not an index, so left
        armed it would interrupt again every second lap (when the device's wrap counter
        matches it again) while the driver drains without sleeping."""
        self._event = None
        self._driver_h[EVENT_FLAGS] = RING_EVENT_FLAGS_DISABLE

    def enable_cb(self, delay: int = 0) -> bool:
        """Ask for an interrupt at the next completion, or (with EVENT_IDX) only once
        ``delay`` more completions have come after that one.

        Returns False when more than ``delay`` completions are already pending, or when one
        was published over the descriptor we asked to be woken at before the device could
        see the request: the caller must drain again.  The event is a ring position, and a
        completion's used descriptor moves the position by its chain's length, so the
        position asked for assumes the shortest chain in flight: the interrupt may come
        early, never late.  The event is one-shot, as the split ring's ``used_event`` is:
        ``get_used`` disarms it once it takes the completion at it, and a False return
        leaves nothing armed, so a driver that drains without sleeping is not interrupted
        (tests/virtio/test_packed_notifications.py plays both rings step for step).
        Without EVENT_IDX ``delay`` cannot be expressed: any pending completion returns
        False.
        """
        if not self.event_idx:
            self._driver_h[EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE
            self._barrier()
            return not self.pending()
        num = self.num
        seen, pos, wrap = self._scan_used(self._last_used, self._used_wrap, delay + 1)
        if seen > delay:
            # As the split ring's event, which would now lie behind the completions:
            # nothing armed, the caller drains (arming the next slot here would interrupt
            # a driver that is not going to sleep).
            self._disarm()
            return False
        step = 1 if self.indirect else min((n for n in self._ndescs if n), default=1)
        ahead = min(max(0, delay - seen) * step, num - 1)
        event, event_wrap = pos + ahead, wrap
        if event >= num:
            event -= num
            event_wrap = not wrap
        self._event = encode_off_wrap(event, event_wrap)
        self._driver_h[EVENT_OFF_WRAP] = self._event
        self._driver_h[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        self._barrier()  # the device must see the event before we look at the ring again
        more, end, end_wrap = self._scan_used(pos, wrap, delay - seen + 1)
        if seen + more > delay:
            return False
        covered = end - pos + (num if end_wrap != wrap else 0)
        return covered <= ahead

    def _scan_used(self, pos: int, wrap: bool, most: int) -> tuple[int, int, bool]:
        """Count used descriptors from ``pos`` (at most ``most``) without taking them;
        returns the count and the position after them.  An id ``get_used`` would refuse
        counts as ``most``: the caller drains, and ``get_used`` says what is wrong."""
        desc_h = self._desc_h
        num = self.num
        pattern = AVAIL_USED if wrap else 0
        count = 0
        while count < most:
            slot = pos << 3
            if desc_h[slot + 7] & AVAIL_USED != pattern:
                break
            bid = desc_h[slot + 6]
            if bid >= num or self._token_of_id[bid] < 0:
                return most, pos, wrap
            count += 1
            pos += self._ndescs[bid]
            if pos >= num:
                pos -= num
                wrap = not wrap
                pattern ^= AVAIL_USED
        return count, pos, wrap

    def close(self) -> None:
        """Give the indirect tables back to the allocator and let go of the ring memory (it
        belongs to the caller).  Idempotent; a closed ring is used no more."""
        self._release_tables()
        for view in (self._desc_h, self._desc_i, self._driver_h, self._device_h, self._desc):
            view.release()
