"""The split virtqueue's layout (VIRTIO 1.x section 2.7): the one place that knows it.

A split virtqueue is three areas in guest memory: the descriptor table (16-byte
``addr, len, flags, next`` entries), the available ring the driver fills with chain heads,
and the used ring the device fills with ``(id, len)`` completions.  The two ends share
nothing else, so each side (``split_driver``, ``split_device``) keeps its own shadow state
and only the ring indices cross.  What both ends must agree on lives here: the sizes and
alignments of the areas, the descriptor's wire struct, where the event fields sit, and the
memory-ordering rules.

Rules both sides follow:

* Ring indices, flags and event fields are accessed as ONE aligned 16-bit load or store
  (a ``memoryview.cast('H')``); byte-wise access tears under a concurrent peer.
* Entries are written before the index that publishes them (x86 keeps stores in order,
  and Python executes them in program order).  Where the spec needs a full barrier
  (publish an index, then read the peer's event/flags), an uncontended lock round trip
  (``Barrier``) provides one: it is a locked instruction on x86.
* The device side trusts nothing the driver wrote: ``DeviceVirtqueue.pop`` checks every
  index and address and raises only ``ChainError`` or ``RingError``.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from typing import Final

from virtblk.spec import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_ALIGN,
    VRING_DESC_ALIGN,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ALIGN,
    VRING_USED_ELEM_SIZE,
)
from virtblk.virtio.memory import BufferAllocator

__all__ = [
    "DESC",
    "NEXT_WRITE",
    "TABLE_STRUCTS",
    "U16",
    "Barrier",
    "VirtqueueError",
    "VringAddrs",
    "avail_event_slot",
    "check_queue_size",
    "ring_sizes",
    "table_struct",
    "used_event_slot",
]

DESC: Final = struct.Struct("<QIHH")
"""One descriptor: ``addr, len, flags, next``."""
U16: Final = 0xFFFF
"""Ring indices are free-running 16-bit counters: every index sum is masked with this."""
NEXT_WRITE: Final = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE

TABLE_STRUCTS: dict[int, struct.Struct] = {}
"""A struct per table length, to pack or unpack a whole descriptor table in one call."""


def table_struct(count: int) -> struct.Struct:
    """The struct of a table of ``count`` descriptors (hot paths look in ``TABLE_STRUCTS``
    first and call this only on a miss)."""
    packer = TABLE_STRUCTS.get(count)
    if packer is None:
        packer = TABLE_STRUCTS[count] = struct.Struct("<" + "QIHH" * count)
    return packer


def used_event_slot(num: int) -> int:
    """Where ``avail.used_event`` sits, in 16-bit units from the avail ring's start."""
    return 2 + num


def avail_event_slot(num: int) -> int:
    """Where ``used.avail_event`` sits, in 16-bit units from the used ring's start."""
    return 2 + 4 * num


class VirtqueueError(Exception):
    """Base of the errors a virtqueue raises about the peer's or the caller's misuse."""


def check_queue_size(num: int) -> None:
    """Raise ValueError unless ``num`` is a queue size the spec allows."""
    if not 1 <= num <= VIRTQUEUE_MAX_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} must be a power of two in 1..{VIRTQUEUE_MAX_SIZE}")


RING_AREAS: tuple[tuple[str, int], ...] = (
    ("descriptor table", VRING_DESC_ALIGN),
    ("avail ring", VRING_AVAIL_ALIGN),
    ("used ring", VRING_USED_ALIGN),
)
"""The three areas of a split ring, in the order :func:`ring_sizes` gives their sizes, with
the alignment the spec requires of each."""


def ring_sizes(num: int, *, event_idx: bool = True) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring) for ``num`` entries.

    With ``event_idx`` (what a driver allocates and a frontend's mapping must cover), the
    avail and used sizes include the trailing ``used_event``/``avail_event`` fields; without
    it, only what a device that did not negotiate EVENT_IDX may touch.
    """
    check_queue_size(num)
    extra = 2 if event_idx else 0
    return VRING_DESC_SIZE * num, 4 + 2 * num + extra, 4 + VRING_USED_ELEM_SIZE * num + extra


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
        desc, avail, used = (allocator.alloc(size, align) for size, (_, align)
                             in zip(ring_sizes(num), RING_AREAS, strict=True))
        return cls(num=num, desc=desc, avail=avail, used=used)


class Barrier:
    """A full memory barrier: an uncontended lock round trip is a locked instruction."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self) -> None:
        self._lock.acquire()
        self._lock.release()
