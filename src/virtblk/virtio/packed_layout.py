"""The packed virtqueue's layout (VIRTIO 1.1+ section 2.8): the one place that knows it.

A packed virtqueue is one ring of 16-byte descriptors (``addr u64, len u32, id u16,
flags u16``) that both ends write, plus two 4-byte event suppression structures
(``off_wrap u16, flags u16``): the driver's, which the device reads to decide whether to
interrupt, and the device's, which the driver reads to decide whether to kick.  The
vhost-user addresses keep their split names: ``VringAddrs.desc`` is the descriptor ring,
``avail`` the driver area (driver event suppression), ``used`` the device area (device
event suppression).

Neither end publishes an index.  Each keeps a position in the ring and a one-bit wrap
counter (1 at start, flipped each time its position passes the ring's end): the driver
makes a descriptor available by setting its AVAIL bit to its wrap counter and its USED
bit to the inverse; the device marks one used by setting both bits to its own wrap
counter.  So a descriptor is available to the device when AVAIL matches the device's
avail wrap counter and USED does not, and used for the driver when both match the
driver's used wrap counter; any other combination is simply not that (yet).

Rules both sides follow (as for the split ring, ``split_layout``):

* A descriptor's ``flags`` is the publication: it is read and written as ONE aligned
  16-bit access (a ``memoryview.cast('H')``), after the rest of the descriptor is written
  (x86 keeps stores in order and Python executes them in program order, so this is the
  spec's write barrier) and before the rest is read.  ``struct`` never touches a flags
  field or an event suppression field: it accesses memory a byte at a time.
* A chain's first descriptor is made available (or a batch's first used descriptor is
  marked used) after all the others, so the peer, who polls one position only, sees the
  whole chain (the whole batch) or nothing.
* Where the spec needs a full barrier (publish, then read the peer's event suppression),
  ``split_layout.Barrier`` provides one.
* The device side trusts nothing the driver wrote: ``PackedDeviceVirtqueue`` checks every
  descriptor and address and raises only ``ChainError`` or ``RingError``.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from virtblk.spec import (
    RING_EVENT_WRAP_SHIFT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQUEUE_PACKED_MAX_SIZE,
    VRING_DESC_ALIGN,
    VRING_DESC_SIZE,
    VRING_PACKED_EVENT_ALIGN,
    VRING_PACKED_EVENT_SIZE,
    vring_need_event,
)
from virtblk.virtio.memory import BufferAllocator
from virtblk.virtio.split_layout import VringAddrs

__all__ = [
    "AVAIL_USED",
    "EVENT_FLAGS",
    "EVENT_OFF_WRAP",
    "FLAGS_SLOT",
    "HEAD",
    "ID_SLOT",
    "LEN_SLOT",
    "RING_AREAS",
    "PackedRingBase",
    "allocate",
    "avail_bits",
    "check_queue_size",
    "decode_vring_base",
    "encode_off_wrap",
    "encode_vring_base",
    "need_event",
    "ring_sizes",
    "used_bits",
]

HEAD: Final = struct.Struct("<QIH")
"""A descriptor without its flags: ``addr, len, id`` (the flags are a 16-bit access of their
own, see the module's rules)."""
FLAGS_SLOT: Final = 7
"""Where ``flags`` sits in a descriptor, in 16-bit units (descriptor ``i``: ``8 * i + 7``)."""
ID_SLOT: Final = 6
"""Where ``id`` sits in a descriptor, in 16-bit units."""
LEN_SLOT: Final = 2
"""Where ``len`` sits in a descriptor, in 32-bit units (descriptor ``i``: ``4 * i + 2``)."""
AVAIL_USED: Final = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
"""The two bits that say who owns a descriptor."""
EVENT_OFF_WRAP: Final = 0
"""An event suppression structure's ``off_wrap``, in 16-bit units from its start."""
EVENT_FLAGS: Final = 1
"""An event suppression structure's ``flags``, in 16-bit units from its start."""
_OFF_MASK: Final = (1 << RING_EVENT_WRAP_SHIFT) - 1


def avail_bits(wrap: bool) -> int:
    """The AVAIL/USED bits of a descriptor made available with wrap counter ``wrap``."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def used_bits(wrap: bool) -> int:
    """The AVAIL/USED bits of a descriptor marked used with wrap counter ``wrap``."""
    return AVAIL_USED if wrap else 0


def check_queue_size(num: int) -> None:
    """Raise ValueError unless ``num`` is a packed queue size (any size up to 2^15: unlike
    the split ring's, it need not be a power of two)."""
    if not 1 <= num <= VIRTQUEUE_PACKED_MAX_SIZE:
        raise ValueError(f"packed queue size {num} is not in 1..{VIRTQUEUE_PACKED_MAX_SIZE}")


RING_AREAS: tuple[tuple[str, int], ...] = (
    ("descriptor ring", VRING_DESC_ALIGN),
    ("driver event suppression", VRING_PACKED_EVENT_ALIGN),
    ("device event suppression", VRING_PACKED_EVENT_ALIGN),
)
"""The three areas of a packed ring in ``VringAddrs`` order (desc, avail, used), with the
alignment the spec requires of each."""


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver event suppression, device event suppression)."""
    check_queue_size(num)
    return VRING_DESC_SIZE * num, VRING_PACKED_EVENT_SIZE, VRING_PACKED_EVENT_SIZE


def allocate(allocator: BufferAllocator, num: int) -> VringAddrs:
    """Carve a packed ring's three areas out of ``allocator`` with the spec's alignments."""
    desc, driver, device = (allocator.alloc(size, align) for size, (_, align)
                            in zip(ring_sizes(num), RING_AREAS, strict=True))
    return VringAddrs(num=num, desc=desc, avail=driver, used=device)


def encode_off_wrap(position: int, wrap: bool) -> int:
    """An event suppression ``off_wrap``: a ring position and the wrap counter it is
    expected with."""
    return position | (wrap << RING_EVENT_WRAP_SHIFT)


def need_event(off_wrap: int, new: int, wrap: bool, count: int, num: int) -> bool:
    """Whether the ``count`` descriptors just published, which end at position ``new`` of
    lap ``wrap``, passed the event descriptor ``off_wrap`` the peer asked for: the one
    statement of the packed event rule, for both ends.

    Positions are made linear as Linux's ``virtqueue_kick_prepare_packed`` does: an event
    whose wrap counter is not the current one lies in the previous lap (``off - num``),
    and the split ring's ``vring_need_event`` decides.  More than a lap published passes
    every position.
    """
    if count >= num:
        return True
    off = off_wrap & _OFF_MASK
    if bool(off_wrap >> RING_EVENT_WRAP_SHIFT) != wrap:
        off -= num
    return vring_need_event(off & 0xFFFF, new, (new - count) & 0xFFFF)


class PackedRingBase(NamedTuple):
    """Where the device is in a packed ring: what vhost-user SET/GET_VRING_BASE carry.

    The field names are ``PackedDeviceVirtqueue``'s keywords, so a decoded base builds a
    queue with ``PackedDeviceVirtqueue(..., **base._asdict())``.
    """

    last_avail_idx: int
    avail_wrap_counter: bool
    used_idx: int
    used_wrap_counter: bool


def encode_vring_base(base: PackedRingBase) -> int:
    """The 32-bit ``num`` of SET/GET_VRING_BASE for a packed ring, as QEMU and the
    vhost-user spec lay it out: bits 0-14 the next avail position, bit 15 its wrap
    counter, bits 16-30 the next used position, bit 31 its wrap counter.  A fresh ring
    is ``encode_vring_base(PackedRingBase(0, True, 0, True)) == 0x80008000``."""
    for name, position in (("last avail", base.last_avail_idx), ("used", base.used_idx)):
        if not 0 <= position <= _OFF_MASK:
            raise ValueError(f"{name} position {position} is not a 15-bit ring position")
    return (encode_off_wrap(base.last_avail_idx, base.avail_wrap_counter)
            | encode_off_wrap(base.used_idx, base.used_wrap_counter) << 16)


def decode_vring_base(value: int) -> PackedRingBase:
    """The positions and wrap counters in a SET/GET_VRING_BASE ``num`` (see
    ``encode_vring_base``); the queue checks them against its size."""
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"vring base {value:#x} is not a 32-bit value")
    return PackedRingBase(value & _OFF_MASK, bool(value >> 15 & 1),
                          value >> 16 & _OFF_MASK, bool(value >> 31))
