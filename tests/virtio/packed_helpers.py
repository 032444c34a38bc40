"""Raw access to a packed ring, playing a hand-written (often hostile) driver or device."""

from __future__ import annotations

import struct

from virtq_helpers import Guest

from virtblk.spec import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
from virtblk.virtio.split_layout import VringAddrs

PDESC = struct.Struct("<QIHH")
"""A packed descriptor: ``addr, len, id, flags``."""
AVAIL, USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED


def avail(wrap: bool) -> int:
    """The AVAIL/USED bits that make a descriptor available in lap ``wrap``."""
    return AVAIL if wrap else USED


def used(wrap: bool) -> int:
    """The AVAIL/USED bits that mark a descriptor used in lap ``wrap``."""
    return AVAIL | USED if wrap else 0


class PackedRawRing:
    """A packed ring's memory: the descriptors and both event suppression structures."""

    def __init__(self, guest: Guest, addrs: VringAddrs) -> None:
        self.guest = guest
        self.num = addrs.num
        self.desc = guest.memory.view(addrs.desc, 16 * addrs.num)
        self.flags = self.desc.cast("H")
        self.driver_event = guest.memory.view(addrs.avail, 4).cast("H")  # off_wrap, flags
        self.device_event = guest.memory.view(addrs.used, 4).cast("H")

    def write_desc(self, pos: int, addr: int, length: int, bid: int, flags: int) -> None:
        """Write one descriptor whole (its flags too)."""
        PDESC.pack_into(self.desc, 16 * pos, addr, length, bid, 0)
        self.flags[8 * pos + 7] = flags

    def read_desc(self, pos: int) -> tuple[int, int, int, int]:
        return PDESC.unpack_from(self.desc, 16 * pos)  # type: ignore[no-any-return]

    def offer(self, pos: int, wrap: bool, *descs: tuple[int, int, int, int]) -> tuple[int, bool]:
        """Make a chain available as a driver must: ``(addr, len, id, flags)`` descriptors
        from ``pos`` on, AVAIL/USED bits added for each one's lap, the first one's flags
        stored last.  Returns the position and wrap counter after the chain."""
        first = (pos, wrap)
        for k, (addr, length, bid, flags) in enumerate(descs):
            PDESC.pack_into(self.desc, 16 * pos, addr, length, bid, 0)
            if k:
                self.flags[8 * pos + 7] = flags | avail(wrap)
            pos += 1
            if pos == self.num:
                pos, wrap = 0, not wrap
        self.flags[8 * first[0] + 7] = descs[0][3] | avail(first[1])
        return pos, wrap

    def mark_used(self, pos: int, wrap: bool, bid: int, length: int) -> None:
        """Write a used descriptor as a device does (id, len, then flags)."""
        self.flags[8 * pos + 6] = bid
        self.desc.cast("I")[4 * pos + 2] = length
        self.flags[8 * pos + 7] = used(wrap) | (2 if length else 0)
