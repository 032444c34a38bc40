"""Guest memory: shared regions, address translation and a buffer allocator.

Both ends of a vhost-user connection see the same memory through memfd mappings.  The
driver creates the regions (``MemoryRegion.create``) and tells the device about them; the
device maps the fds it receives (``MemoryRegion.map_fd``).  Every address the peer sends is
hostile, so ``GuestMemory.view`` is the single place that turns an address into bytes and it
checks bounds every time.

Three address spaces meet here:

* guest-physical (``gpa``): what descriptors carry;
* frontend user (``uva``): what the vhost-user frontend reports in ``SET_MEM_TABLE`` and
  ``SET_VRING_ADDR`` (for us as a driver, the real address of our own mapping);
* this process's own virtual addresses (``MemoryRegion.address``), used to recognise a
  caller's buffer that already lies in guest memory so it need not be copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "BufferAllocator",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
]

_PAGE_SIZE = mmap.PAGESIZE


class GuestMemoryError(ValueError):
    """An address or length outside guest memory, or regions that overlap."""


def _buffer_address(buffer: Buffer) -> tuple[int, int] | None:
    """(process address, length) of a writable C-contiguous buffer, else None.

    ctypes needs a writable buffer to give its address; read-only buffers (``bytes``)
    can never be guest memory handed to the device for writing anyway.
    """
    try:
        mv = memoryview(buffer)
    except TypeError:
        return None
    with mv:
        if mv.readonly or not mv.c_contiguous or mv.nbytes == 0:
            return None
        flat = mv.cast("B")
        with flat:
            anchor = ctypes.c_char.from_buffer(flat)
            address = ctypes.addressof(anchor)
            del anchor
            return address, flat.nbytes


def sealed_against_shrinking(fd: int) -> bool:
    """Whether nobody can make ``fd``'s file shorter (a memfd with ``F_SEAL_SHRINK``)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd, or a file system without seals: nothing stops a truncate
        return False
    return bool(seals & fcntl.F_SEAL_SHRINK)


class MemoryRegion:
    """One shared mapping of guest memory.

    ``view`` is a writable memoryview of exactly ``size`` bytes starting at
    ``guest_phys_addr``; ``address`` is the process address of ``view[0]``.
    """

    def __init__(
        self,
        *,
        mm: mmap.mmap,
        fd: int,
        size: int,
        delta: int,
        guest_phys_addr: int,
        user_addr: int | None,
        mmap_offset: int,
    ) -> None:
        """Wrap an existing mapping; use ``create`` or ``map_fd`` instead of this."""
        self._mm = mm
        self.fd = fd
        self.size = size
        self.guest_phys_addr = guest_phys_addr
        self.mmap_offset = mmap_offset
        anchor = ctypes.c_char.from_buffer(mm)
        base = ctypes.addressof(anchor)
        del anchor  # a live ctypes export would make mmap.close() fail
        self.address = base + delta
        self.user_addr = self.address if user_addr is None else user_addr
        self.view = memoryview(mm)[delta : delta + size]
        self._closed = False

    @classmethod
    def create(
        cls,
        size: int,
        *,
        guest_phys_addr: int = 0,
        name: str = "virtblk-guest-memory",
        user_addr: int | None = None,
    ) -> MemoryRegion:
        """Driver side: a new anonymous shared region (memfd) that a device can map.

        ``user_addr`` defaults to the mapping's real address, which is what a vhost-user
        frontend reports to the backend as the region's user address.
        """
        if size <= 0:
            raise GuestMemoryError(f"region size {size} must be positive")
        if guest_phys_addr < 0:
            raise GuestMemoryError(f"guest physical address {guest_phys_addr:#x} is negative")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The device gets this file: sealed against resizing (as QEMU seals its memfd
            # memory), so a device that truncates it cannot kill us with SIGBUS at our
            # next ring access, nor swap our data for zeros.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            mm=mm,
            fd=fd,
            size=size,
            delta=0,
            guest_phys_addr=guest_phys_addr,
            user_addr=user_addr,
            mmap_offset=0,
        )

    @classmethod
    def map_fd(
        cls,
        fd: int,
        *,
        size: int,
        mmap_offset: int,
        guest_phys_addr: int,
        user_addr: int,
        require_sealed: bool = False,
    ) -> MemoryRegion:
        """Device side: map a region the frontend sent (``SET_MEM_TABLE``/``ADD_MEM_REG``).

        Takes ownership of ``fd``: it is closed with the region, or at once if mapping
        fails.  ``mmap_offset`` need not be page aligned: we map from the page below it.
        ``require_sealed`` refuses a file not sealed against shrinking: a frontend that
        truncated it would kill this process with SIGBUS at its next access.
        """
        try:
            if require_sealed and not sealed_against_shrinking(fd):
                raise GuestMemoryError(
                    "the region's file is not sealed against shrinking (F_SEAL_SHRINK): a "
                    "frontend that truncated it would kill the device with SIGBUS; seal it "
                    "(QEMU's memory-backend-memfd does, seal=on) or let the device accept "
                    "unsealed memory"
                )
            if size <= 0:
                raise GuestMemoryError(f"region size {size} must be positive")
            if mmap_offset < 0 or guest_phys_addr < 0 or user_addr < 0:
                raise GuestMemoryError(
                    f"negative region field: mmap_offset={mmap_offset:#x} "
                    f"guest_phys_addr={guest_phys_addr:#x} user_addr={user_addr:#x}"
                )
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and mmap_offset + size > info.st_size:
                raise GuestMemoryError(
                    f"region of {size:#x} bytes at file offset {mmap_offset:#x} runs past "
                    f"the end of its fd ({info.st_size:#x} bytes)"
                )
            aligned = mmap_offset - mmap_offset % _PAGE_SIZE
            delta = mmap_offset - aligned
            try:
                mm = mmap.mmap(
                    fd,
                    delta + size,
                    mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=aligned,
                )
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(
                    f"cannot map {size:#x} bytes at offset {mmap_offset:#x}: {exc}"
                ) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(
            mm=mm,
            fd=fd,
            size=size,
            delta=delta,
            guest_phys_addr=guest_phys_addr,
            user_addr=user_addr,
            mmap_offset=mmap_offset,
        )

    @property
    def end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_phys_addr + self.size

    @property
    def closed(self) -> bool:
        """True after ``close``."""
        return self._closed

    def close(self) -> None:
        """Unmap and close the fd (idempotent).

        If views into the region are still alive elsewhere (slices, numpy arrays), the
        mapping cannot be unmapped without making them dangle; it then stays mapped until
        the last of them is garbage collected, and only the fd is closed now.
        """
        if self._closed:
            return
        self._closed = True
        # Live exports (slices, numpy arrays) make these raise; the mmap object then
        # unmaps itself when the last of them is gone.
        with contextlib.suppress(BufferError):
            self.view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self.fd)

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(gpa={self.guest_phys_addr:#x}, size={self.size:#x}, "
            f"user_addr={self.user_addr:#x}, mmap_offset={self.mmap_offset:#x}, fd={self.fd})"
        )


class GuestMemory:
    """The set of regions that make up guest memory, with bounds-checked translation.

    Lookups cache the last region hit: queues touch one or two regions over and over.
    """

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        """Start with ``regions`` (checked for overlap like ``add``)."""
        self._regions: list[MemoryRegion] = []
        self._last: MemoryRegion | None = None
        # The last region hit, unpacked so the fast path of ``view`` reads three slots.
        self._hit_start = 0
        self._hit_size = -1
        self._hit_view = memoryview(b"")
        for region in regions:
            self.add(region)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, ordered by guest-physical address."""
        return tuple(self._regions)

    def add(self, region: MemoryRegion) -> None:
        """Add a region; its guest-physical and user ranges must not overlap any other."""
        for other in self._regions:
            if region.guest_phys_addr < other.end and other.guest_phys_addr < region.end:
                raise GuestMemoryError(
                    f"region gpa {region.guest_phys_addr:#x}+{region.size:#x} overlaps "
                    f"region gpa {other.guest_phys_addr:#x}+{other.size:#x}"
                )
            if (
                region.user_addr < other.user_addr + other.size
                and other.user_addr < region.user_addr + region.size
            ):
                raise GuestMemoryError(
                    f"region user address {region.user_addr:#x}+{region.size:#x} overlaps "
                    f"region user address {other.user_addr:#x}+{other.size:#x}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.guest_phys_addr)

    def remove(self, guest_phys_addr: int, size: int) -> MemoryRegion:
        """Detach and return the region with exactly this address and size (not closed)."""
        for i, region in enumerate(self._regions):
            if region.guest_phys_addr == guest_phys_addr and region.size == size:
                del self._regions[i]
                if self._last is region:
                    self._remember(None)
                return region
        raise GuestMemoryError(
            f"no region at gpa {guest_phys_addr:#x} with size {size:#x} to remove"
        )

    def _find(self, gpa: int, length: int) -> MemoryRegion:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"gpa {gpa:#x} length {length:#x}: negative value")
        end = gpa + length
        for region in self._regions:
            if region.guest_phys_addr <= gpa and end <= region.end:
                self._remember(region)
                return region
        raise GuestMemoryError(
            f"gpa {gpa:#x} length {length:#x}: not inside one guest memory region"
        )

    def _remember(self, region: MemoryRegion | None) -> None:
        self._last = region
        if region is None:
            self._hit_start, self._hit_size, self._hit_view = 0, -1, memoryview(b"")
        else:
            self._hit_start, self._hit_size = region.guest_phys_addr, region.size
            self._hit_view = region.view

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)``, which must lie inside one region."""
        start = gpa - self._hit_start
        if start >= 0 and length >= 0 and start + length <= self._hit_size:
            return self._hit_view[start : start + length]
        region = self._find(gpa, length)
        start = gpa - region.guest_phys_addr
        return region.view[start : start + length]

    def user_to_guest(self, uva: int, length: int) -> int:
        """Translate a frontend user address range (inside one region) to a gpa."""
        if uva < 0 or length < 0:
            raise GuestMemoryError(f"user address {uva:#x} length {length:#x}: negative value")
        for region in self._regions:
            if region.user_addr <= uva and uva + length <= region.user_addr + region.size:
                return region.guest_phys_addr + (uva - region.user_addr)
        raise GuestMemoryError(
            f"user address {uva:#x} length {length:#x}: not inside one guest memory region"
        )

    def guest_address_of(self, buffer: Buffer) -> int | None:
        """The gpa of a writable buffer lying entirely inside one region, else None.

        This is how zero-copy is detected: a caller may pass a slice of a region's view
        (or a numpy array over it) as an I/O buffer, and the driver then hands its gpa to
        the device instead of bouncing the data.
        """
        located = _buffer_address(buffer)
        if located is None:
            return None
        address, length = located
        for region in self._regions:
            if region.address <= address and address + length <= region.address + region.size:
                return region.guest_phys_addr + (address - region.address)
        return None

    def close(self) -> None:
        """Close every region and forget them."""
        regions, self._regions = self._regions, []
        self._remember(None)
        for region in regions:
            region.close()


class BufferAllocator:
    """A binary buddy allocator over one region, handing out guest-physical addresses.

    Blocks are powers of two aligned to their size in guest-physical address space, so any
    power-of-two alignment up to the block size comes for free; allocation and free are
    O(log size).  Used for vrings, indirect tables, request headers, status bytes and
    bounce buffers, all of which live as long as the request or the queue.
    """

    MIN_ORDER = 4  # 16 bytes: a descriptor

    def __init__(self, region: MemoryRegion) -> None:
        """Manage all of ``region``."""
        self.region = region
        self._free: list[set[int]] = [set() for _ in range(64)]
        self._allocated: dict[int, int] = {}
        self._free_bytes = 0
        cursor = _align_up(region.guest_phys_addr, 1 << self.MIN_ORDER)
        end = region.end
        while cursor + (1 << self.MIN_ORDER) <= end:
            order = self.MIN_ORDER
            while cursor % (2 << order) == 0 and cursor + (2 << order) <= end:
                order += 1
            self._free[order].add(cursor)
            self._free_bytes += 1 << order
            cursor += 1 << order

    @property
    def free_bytes(self) -> int:
        """Bytes in free blocks (not all usable by one allocation: fragmentation)."""
        return self._free_bytes

    def alloc(self, size: int, align: int = 64) -> int:
        """A gpa of at least ``size`` bytes aligned to ``align`` (a power of two)."""
        if size <= 0:
            raise ValueError(f"allocation size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        order = max(self.MIN_ORDER, (max(size, align) - 1).bit_length())
        found = order
        while found < len(self._free) and not self._free[found]:
            found += 1
        if found >= len(self._free):
            raise MemoryError(
                f"guest memory exhausted: no free block of {1 << order} bytes "
                f"({self._free_bytes} bytes free in fragments)"
            )
        gpa = self._free[found].pop()
        while found > order:
            found -= 1
            self._free[found].add(gpa + (1 << found))
        self._allocated[gpa] = order
        self._free_bytes -= 1 << order
        return gpa

    def free(self, gpa: int) -> None:
        """Return a block from ``alloc``; merges it with its free buddies."""
        order = self._allocated.pop(gpa, None)
        if order is None:
            raise ValueError(f"gpa {gpa:#x} is not an allocated block")
        self._free_bytes += 1 << order
        while True:
            buddy = gpa ^ (1 << order)
            siblings = self._free[order]
            if buddy not in siblings:
                siblings.add(gpa)
                return
            siblings.discard(buddy)
            gpa = min(gpa, buddy)
            order += 1

    def view(self, gpa: int, length: int) -> memoryview:
        """Bytes of an allocated block (bounds-checked against the region)."""
        start = gpa - self.region.guest_phys_addr
        if start < 0 or length < 0 or start + length > self.region.size:
            raise GuestMemoryError(f"gpa {gpa:#x} length {length:#x}: outside the region")
        return self.region.view[start : start + length]


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
