"""What a request may be on one disk, written once for the three ways of submitting one.

``Disk`` (blocking calls), ``AsyncDisk`` (asyncio) and ``QueueHandle`` (libblkio-style
batches) wait for completions differently, but they build the same requests by the same
rules, and those rules live here:

* the range check: aligned to the logical block size, inside the disk (ValueError);
* refusing changes to a read-only disk up front (EROFS), as Linux's block layer does;
* where a buffer lies in shared memory: the registry of the buffers ``Disk.buffer`` handed
  out (their address and segments known, no lookup), else a search of the memory;
* splitting by the device's limits: segments of at most ``size_max`` bytes, at most
  ``seg_max`` of them per request, so ``max_transfer`` bytes per read or write;
* the DISCARD / WRITE_ZEROES / SECURE_ERASE payloads: segments split by the device's
  sector limit, packed ``max_*_seg`` to a request;
* whether a FLUSH goes to the device at all (write-back only, as in the seed).

``QueueHandle`` keeps its own inline copy of the two steps it takes per I/O (the registry
lookup and a one-expression range test) and calls these only on the path that raises or
on a buffer the registry does not know: a method call per I/O would cost the fast path
more than the rest of its enqueue does.
"""

from __future__ import annotations

import errno

from virtblk.driver.blklayer import QueueLimits
from virtblk.driver.virtio_blk import VirtioBlk
from virtblk.errors import BlockIOError
from virtblk.spec import SECTOR_SHIFT, DiscardSegment, Feature, RequestType

Buffer = bytes | bytearray | memoryview
Segments = tuple[tuple[int, int], ...]
"""A request's data as (guest-physical address, length) pairs."""

CHUNK = 4 << 20
"""Bytes staged through shared memory per round when the caller's buffers are private."""


class RequestBuilder:
    """The request rules of the disk driven through ``dev`` (see the module docstring).

    The limits and the block size are the probe's (they do not change while the rings
    live); the size and the cache mode are read from the device each time, since a config
    change moves them."""

    __slots__ = ("_dev", "_limits", "buffers", "max_transfer", "queue_limits")

    def __init__(self, dev: VirtioBlk) -> None:
        self._dev = dev
        # Worked out once: building them from the config costs about 6 us, which a
        # pread/pwrite would otherwise pay on every call.
        lim = self._limits = dev.limits
        per_request = lim.max_segments * lim.max_segment_size
        self.max_transfer = per_request - per_request % dev.logical_block_size
        """The most bytes one read or write request carries: ``seg_max`` segments of
        ``size_max`` bytes, in whole logical blocks (libblkio's ``max-transfer``)."""
        self.queue_limits = QueueLimits.from_limits(lim, dev.logical_block_size)
        """What one request may carry, for the block layer's merging and splitting: the
        device's seg_max and size_max, Linux's default cap on a request's size, the
        logical block size."""
        self.buffers: dict[int, tuple[memoryview, int, Segments]] = {}
        """``Disk.buffer``'s buffers: id -> (the view, its address, its segments).  The
        fast paths read it directly (an entry counts only when its view ``is`` the
        buffer: an id may be reused once a view is gone)."""

    # -- buffers -------------------------------------------------------------------------------
    def register(self, view: memoryview, gpa: int) -> None:
        """Remember a buffer handed out at ``gpa``, with its segments."""
        self.buffers[id(view)] = (view, gpa, self.segments(gpa, len(view)))

    def unregister(self, buf: Buffer) -> None:
        """Forget a buffer given back (nothing when it was never registered)."""
        entry = self.buffers.get(id(buf))
        if entry is not None and entry[0] is buf:
            del self.buffers[id(buf)]

    def address_of(self, buf: Buffer) -> int | None:
        """The guest-physical address of a buffer in shared memory (a registered one, or
        part of one), else None."""
        entry = self.buffers.get(id(buf))
        if entry is not None and entry[0] is buf:
            return entry[1]
        return self._dev.memory.guest_address_of(buf)

    # -- checks --------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int, what: str) -> None:
        """Refuse a negative, misaligned or out-of-bounds range (ValueError); ``what``
        starts the message (``"vda: write"``)."""
        bs = self._dev.logical_block_size
        if offset < 0 or length < 0:
            raise ValueError(f"{what}: negative offset or length ({offset}, {length})")
        if offset % bs or length % bs:
            raise ValueError(
                f"{what}: offset {offset} and length {length} must be multiples of the "
                f"logical block size {bs}"
            )
        size = self._dev.size
        if offset + length > size:
            raise ValueError(
                f"{what}: {length} bytes at offset {offset} end past the end of the disk "
                f"({size} bytes)"
            )

    def check_writable(self, what: str) -> None:
        """A VIRTIO_BLK_F_RO disk is refused up front, as Linux's block layer does (EROFS).
        A device made read-only at run time cannot say so (the bit is fixed at
        negotiation): its writes fail with EIO instead."""
        if self._dev.read_only:
            raise BlockIOError(errno.EROFS, f"{what}: the device is read-only")

    @property
    def flush_needed(self) -> bool:
        """Whether a flush must reach the device.  The seed gives the block layer flush
        support only in write-back mode (``virtblk_update_cache_mode``): in write-through
        every completed write is durable already, so a flush completes at once.  The mode
        is the driver's current view: the probe's, a ``cache_type`` store, and (unlike the
        seed, which keeps the probe's flush support until a store) a host's change read
        on a config change, so a host that turns its cache on gets our flushes."""
        dev = self._dev
        return dev.writeback and dev.has(Feature.BLK_FLUSH)

    # -- splitting by the limits -----------------------------------------------------------------
    def segments(self, gpa: int, length: int) -> Segments:
        """One contiguous buffer as segments no larger than the device's ``size_max``
        (one request's worth when ``length <= max_transfer``)."""
        step = self._limits.max_segment_size
        end = gpa + length
        return tuple((a, min(step, end - a)) for a in range(gpa, end, step))

    # -- DISCARD, WRITE_ZEROES, SECURE_ERASE ------------------------------------------------------
    def range_segments(
        self, type_: RequestType, offset: int, length: int, *, unmap: bool = False
    ) -> list[DiscardSegment]:
        """The segments covering a checked range, each within the device's sector limit
        for ``type_`` (none for an empty range)."""
        max_sectors = self._range_limits(type_)[0] or 0xFFFFFFFF
        flags = 1 if unmap else 0
        sector = offset >> SECTOR_SHIFT
        remaining = length >> SECTOR_SHIFT
        segs: list[DiscardSegment] = []
        while remaining:
            n = min(remaining, max_sectors)
            segs.append(DiscardSegment(sector, n, flags))
            sector += n
            remaining -= n
        return segs

    def range_payloads(
        self, type_: RequestType, offset: int, length: int, *, unmap: bool = False
    ) -> list[bytes]:
        """The payloads (packed segments) of the requests covering a checked range, at most
        the device's ``max_*_seg`` segments each."""
        segs = self.range_segments(type_, offset, length, unmap=unmap)
        per = self._range_limits(type_)[1]  # at least 1: VirtioBlk.limits raises a 0
        return [b"".join(s.pack() for s in segs[i : i + per]) for i in range(0, len(segs), per)]

    def max_range_sectors(self, type_: RequestType) -> int:
        """Sectors one segment of ``type_`` may cover (0: no limit)."""
        return self._range_limits(type_)[0]

    def _range_limits(self, type_: RequestType) -> tuple[int, int]:
        lim = self._limits
        if type_ == RequestType.DISCARD:
            return lim.max_discard_sectors, lim.max_discard_seg
        if type_ == RequestType.WRITE_ZEROES:
            return lim.max_write_zeroes_sectors, lim.max_write_zeroes_seg
        if type_ == RequestType.SECURE_ERASE:
            return lim.max_secure_erase_sectors, lim.max_secure_erase_seg
        raise ValueError(f"{type_.name} carries no range segments")
