"""What the device's end of a split and of a packed virtqueue do alike, apart from the ring.

``DeviceQueueBase`` holds the guest memory a queue reads buffers from, the region its fast
path tries first (checked once per batch) and the broken state; ``split_device`` and
``packed_device`` add the ring.  Each ring's ``pop_batch`` and ``add_used_batch`` stay whole
in its own module: they are the hot path, written out for one layout.
"""

from __future__ import annotations

from virtblk.virtio.memory import GuestMemory, MemoryRegion

__all__ = ["NO_REGION", "DeviceQueueBase", "Region"]

Region = tuple[int, int, memoryview, "MemoryRegion | None"]
"""The fast path's region: ``(guest-physical start, end, view, the MemoryRegion)``."""
NO_REGION: Region = (0, -1, memoryview(b""), None)
"""No region: every buffer misses it, so the fast path falls back to the memory table."""


class DeviceQueueBase:
    """Memory, fast-path region and broken state both rings' device ends share.

    A subclass sets ``_memory``, ``_region`` (``NO_REGION`` at first) and ``_broken`` in its
    constructor.
    """

    _memory: GuestMemory
    _region: Region
    _broken: str | None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory the ring and buffers live in."""
        return self._memory

    @property
    def broken(self) -> bool:
        """True after a RingError: the queue serves nothing until it is recreated."""
        return self._broken is not None

    def _region_for_batch(self) -> Region:
        """The region the fast path tries first, checked once per batch against the
        memory table (a region the frontend removed must not be used any more)."""
        region = self._region
        regions = self._memory.regions
        if region[3] is None or region[3] not in regions:
            if not regions:
                region = NO_REGION
            else:
                biggest = max(regions, key=lambda r: r.size)
                region = (biggest.guest_phys_addr, biggest.end, biggest.view, biggest)
            self._region = region
        return region
