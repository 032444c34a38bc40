"""Helpers for the virtqueue tests: a real memfd guest memory and raw ring access."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.split_layout import VringAddrs

REGION_GPA = 0x10_0000
REGION_SIZE = 1 << 20
DESC = struct.Struct("<QIHH")


class Guest:
    """A guest memory of one region with an allocator: what both queue ends share.

    ``adjacent`` adds a second region of that many bytes right after the first (the
    allocator stays in the first): a buffer may lie in either, never across both.
    """

    def __init__(self, size: int = REGION_SIZE, gpa: int = REGION_GPA, adjacent: int = 0) -> None:
        self.region = MemoryRegion.create(size, guest_phys_addr=gpa)
        regions = [self.region]
        if adjacent:
            regions.append(MemoryRegion.create(adjacent, guest_phys_addr=gpa + size))
        self.memory = GuestMemory(regions)
        self.allocator = BufferAllocator(self.region)

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawRing:
    """Direct access to ring memory, playing a hand-written driver or device."""

    def __init__(self, guest: Guest, addrs: VringAddrs) -> None:
        self.guest = guest
        self.addrs = addrs
        num = addrs.num
        self.desc = guest.memory.view(addrs.desc, 16 * num)
        self.avail = guest.memory.view(addrs.avail, 6 + 2 * num).cast("H")
        used = guest.memory.view(addrs.used, 6 + 8 * num)
        self.used = used.cast("H")
        self.used_i = used[: 4 + 8 * num].cast("I")

    # driver's view
    @staticmethod
    def write_desc_into(
        table: memoryview, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0
    ) -> None:
        DESC.pack_into(table, 16 * index, addr, length, flags, nxt)

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.write_desc_into(self.desc, index, addr, length, flags, nxt)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.desc, 16 * index)  # type: ignore[no-any-return]

    def offer(self, *heads: int) -> None:
        """Put heads in the avail ring and publish them."""
        idx = self.avail[1]
        for head in heads:
            self.avail[2 + idx % self.addrs.num] = head
            idx = (idx + 1) & 0xFFFF
        self.avail[1] = idx

    @property
    def used_event(self) -> int:
        return self.avail[2 + self.addrs.num]

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.avail[2 + self.addrs.num] = value

    # device's view
    def complete(self, *entries: tuple[int, int]) -> None:
        """Write used elements and publish them."""
        idx = self.used[1]
        for head, length in entries:
            slot = idx % self.addrs.num
            self.used_i[1 + 2 * slot] = head
            self.used_i[2 + 2 * slot] = length
            idx = (idx + 1) & 0xFFFF
        self.used[1] = idx

    def used_entries(self, start: int, count: int) -> list[tuple[int, int]]:
        out = []
        for k in range(count):
            slot = (start + k) % self.addrs.num
            out.append((self.used_i[1 + 2 * slot], self.used_i[2 + 2 * slot]))
        return out

    @property
    def avail_event(self) -> int:
        return self.used[2 + 4 * self.addrs.num]

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        self.used[2 + 4 * self.addrs.num] = value


@contextmanager
def crash_points(take: Callable[[], None], traced: Collection[str]) -> Iterator[None]:
    """Call ``take`` before every line (and at every return) that code in the ``traced``
    files runs: each call is a point where the process could die (the in-flight tests
    copy ring and buffer there and recover a fresh device from each copy)."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event in ("line", "return"):
            take()
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename in traced:
            return local
        return None

    old = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(old)
