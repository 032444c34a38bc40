"""A hand-played driver of one packed ring, for the hostile packed checks.

The driver's ``PackedDriverVirtqueue`` only ever writes well-formed descriptors; the
checks need to write what no driver should (bits that contradict the wrap counter, a
buffer id outside the queue, a chain that never ends) and then see what the device does
with the ring.  So this negotiates VERSION_1 and RING_PACKED by hand, sets up one ring of
``QUEUE_SIZE`` in memory of its own, and writes every descriptor itself through
``packed_layout``'s constants: a descriptor's flags last, as one 16-bit store.
"""

from __future__ import annotations

import os
import time
from typing import Self

from virtblk import unixsock
from virtblk.spec import (
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Feature,
    RequestHeader,
    RequestType,
    has_feature,
)
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature
from virtblk.virtio import packed_layout
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.packed_layout import (
    AVAIL_USED,
    FLAGS_SLOT,
    HEAD,
    PackedRingBase,
    avail_bits,
    encode_vring_base,
    used_bits,
)

QUEUE_SIZE = 16
"""Small, so that a chain of every descriptor is short and a lap is quick."""

DATA_SIZE = 4096
"""What one read asks for: a multiple of every logical block size up to 4 KiB."""

_PROTOCOL = ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.MQ.mask
_POLL_INTERVAL = 0.002


class RawPackedRing:
    """Ring 0 of the device at ``path``, packed, driven descriptor by descriptor.

    Positions and wrap counters are the driver's as the spec keeps them (``avail_pos``,
    ``avail_wrap``, ``used_pos``, ``used_wrap``); ``place`` writes descriptors at the
    avail position and advances it, ``publish`` stores a head's flags, ``kick`` notifies,
    ``wait_used`` polls the used position for the device's next used descriptor.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.timeout = timeout
        self.fe = VhostUserFrontend(unixsock.connect(path, timeout), timeout=timeout)
        self.region = MemoryRegion.create(1 << 20, name="virtblk-check-packed")
        self._fds: list[int] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        fe = self.fe
        fe.set_owner()
        offered = fe.get_features()
        vhost_bit = offered & Feature.VHOST_USER_PROTOCOL_FEATURES.mask
        if vhost_bit:
            fe.set_protocol_features(fe.get_protocol_features() & _PROTOCOL)
        fe.set_features(Feature.VERSION_1.mask | Feature.RING_PACKED.mask | vhost_bit)
        self.memory = GuestMemory([self.region])
        allocator = BufferAllocator(self.region)
        fe.set_mem_table([self.region])
        self.addrs = packed_layout.allocate(allocator, QUEUE_SIZE)
        for addr, size in zip((self.addrs.desc, self.addrs.avail, self.addrs.used),
                              packed_layout.ring_sizes(QUEUE_SIZE), strict=True):
            self.memory.view(addr, size)[:] = bytes(size)
        self.desc = self.memory.view(self.addrs.desc, QUEUE_SIZE * 16)
        self.desc_h = self.desc.cast("H")
        self.header = allocator.alloc(RequestHeader.SIZE)
        self.data = allocator.alloc(DATA_SIZE)
        self.status = allocator.alloc(1)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(self.kick_fd)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(call)
        uva = self.region.user_addr - self.region.guest_phys_addr
        fe.set_vring_num(0, QUEUE_SIZE)
        fe.set_vring_base(0, encode_vring_base(PackedRingBase(0, True, 0, True)))
        fe.set_vring_addr(0, desc_uva=self.addrs.desc + uva, used_uva=self.addrs.used + uva,
                          avail_uva=self.addrs.avail + uva)
        fe.set_vring_call(0, call)
        fe.set_vring_kick(0, self.kick_fd)
        if vhost_bit:
            fe.set_vring_enable(0, True)
        self.avail_pos, self.avail_wrap = 0, True
        self.used_pos, self.used_wrap = 0, True
        self.ndescs: dict[int, int] = {}  # buffer id -> descriptors its chain took

    @staticmethod
    def offered(path: str, timeout: float) -> bool:
        """Whether the device at ``path`` offers VIRTIO_F_RING_PACKED."""
        with VhostUserFrontend(unixsock.connect(path, timeout), timeout=timeout) as fe:
            fe.set_owner()
            return has_feature(fe.get_features(), Feature.RING_PACKED)

    # -- writing descriptors ----------------------------------------------------------------
    def place(self, addr: int, length: int, bid: int, flags: int) -> tuple[int, int]:
        """Write a descriptor at the avail position without its AVAIL/USED bits' store
        (``flags`` are its NEXT/WRITE bits); returns ``(position, flags with the bits of
        the current lap)`` for ``publish`` and advances the position."""
        pos = self.avail_pos
        HEAD.pack_into(self.desc, pos * 16, addr, length, bid)
        full = flags | avail_bits(self.avail_wrap)
        self.avail_pos += 1
        if self.avail_pos == QUEUE_SIZE:
            self.avail_pos = 0
            self.avail_wrap = not self.avail_wrap
        return pos, full

    def publish(self, pos: int, flags: int) -> None:
        """Store descriptor ``pos``'s flags: one 16-bit store, the publication."""
        self.desc_h[pos * 8 + FLAGS_SLOT] = flags

    def flags(self, pos: int) -> int:
        """Descriptor ``pos``'s flags as in memory now."""
        return int(self.desc_h[pos * 8 + FLAGS_SLOT])

    def read_request(self, bid: int, *, head_bits: int | None = None) -> int:
        """A read of ``DATA_SIZE`` bytes at sector 0 as buffer ``bid`` (header, data,
        status), every descriptor but the head published; the head is published too
        unless ``head_bits`` replaces its AVAIL/USED bits (a head the device must not
        take).  Returns the head's position."""
        self.memory.view(self.header, RequestHeader.SIZE)[:] = RequestHeader(
            RequestType.IN, 0, 0).pack()
        self.memory.view(self.status, 1)[0] = 0xFF
        head, head_flags = self.place(self.header, RequestHeader.SIZE, bid, VRING_DESC_F_NEXT)
        for what in (self.place(self.data, DATA_SIZE, bid, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
                     self.place(self.status, 1, bid, VRING_DESC_F_WRITE)):
            self.publish(*what)
        self.ndescs[bid] = 3
        if head_bits is not None:
            head_flags = head_flags & ~AVAIL_USED | head_bits
        self.publish(head, head_flags)
        return head

    def kick(self) -> None:
        """Notify the device (its kick eventfd)."""
        os.eventfd_write(self.kick_fd, 1)

    @property
    def status_byte(self) -> int:
        """The status byte of the last read (0xFF until the device writes it)."""
        return int(self.memory.view(self.status, 1)[0])

    # -- reading what the device used ----------------------------------------------------------
    def wait_used(self, timeout: float) -> tuple[int, int] | None:
        """The next used descriptor's ``(buffer id, length)``, polled for up to
        ``timeout`` seconds (None: nothing was used); the used position moves past the
        chain of that id (by one descriptor for an id we did not submit)."""
        deadline = time.monotonic() + timeout
        want = used_bits(self.used_wrap)
        while self.flags(self.used_pos) & AVAIL_USED != want:
            if time.monotonic() > deadline:
                return None
            time.sleep(_POLL_INTERVAL)
        _addr, length, bid = HEAD.unpack_from(self.desc, self.used_pos * 16)
        self.used_pos += self.ndescs.pop(bid, 1)
        if self.used_pos >= QUEUE_SIZE:
            self.used_pos -= QUEUE_SIZE
            self.used_wrap = not self.used_wrap
        return bid, length

    def close(self) -> None:
        """Hang up (the device resets its rings) and free the memory."""
        self.fe.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.region.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
