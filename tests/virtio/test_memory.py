"""Guest memory: regions shared through memfd, bounds-checked translation, the allocator."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtq_helpers import REGION_GPA, REGION_SIZE, Guest

from virtblk.virtio.memory import GuestMemory, GuestMemoryError, MemoryRegion

PAGE = mmap.PAGESIZE


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class TestMemoryRegion:
    def test_create_is_a_shared_memfd_at_its_real_address(self) -> None:
        region = MemoryRegion.create(3 * PAGE, guest_phys_addr=0x4000)
        try:
            assert region.size == 3 * PAGE == len(region.view)
            assert region.guest_phys_addr == 0x4000 and region.end == 0x4000 + 3 * PAGE
            assert region.user_addr == region.address
            region.view[10:15] = b"hello"
            assert os.pread(region.fd, 5, 10) == b"hello"  # the fd sees the mapping
            assert ctypes.string_at(region.address + 10, 5) == b"hello"
        finally:
            region.close()
        assert region.closed and not fd_is_open(region.fd)

    def test_a_device_cannot_resize_the_memory_we_create(self) -> None:
        """A device holds our memfd (SET_MEM_TABLE passes it); truncating it would kill us
        with SIGBUS at our next ring access. The region is sealed against shrinking and
        growing, as QEMU seals its memfd memory. Run in a child, which such a crash kills."""
        script = (
            "import os\n"
            "from virtblk.virtio.memory import MemoryRegion\n"
            "region = MemoryRegion.create(4 * 4096)\n"
            "region.view[8192] = 7\n"
            "device_fd = os.dup(region.fd)  # what a device holds\n"
            "for size in (0, 8 * 4096):\n"
            "    try:\n"
            "        os.ftruncate(device_fd, size)\n"
            "        print('resized to', size)\n"
            "    except PermissionError:\n"
            "        print('refused', size)\n"
            "print('read', region.view[8192])\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        assert done.stdout.split("\n")[:3] == ["refused 0", f"refused {8 * 4096}", "read 7"]

    def test_create_rejects_an_empty_region(self) -> None:
        with pytest.raises(GuestMemoryError, match="positive"):
            MemoryRegion.create(0)

    def test_map_fd_at_an_unaligned_offset_sees_the_same_bytes(self) -> None:
        driver = MemoryRegion.create(4 * PAGE)
        device = MemoryRegion.map_fd(
            os.dup(driver.fd),
            size=PAGE,
            mmap_offset=PAGE + 100,
            guest_phys_addr=0x9000,
            user_addr=0x7F00_0000,
        )
        try:
            assert device.user_addr == 0x7F00_0000 and device.mmap_offset == PAGE + 100
            driver.view[PAGE + 100 : PAGE + 104] = b"ping"
            assert bytes(device.view[:4]) == b"ping"
            device.view[PAGE - 4 :] = b"pong"
            assert bytes(driver.view[2 * PAGE + 96 : 2 * PAGE + 100]) == b"pong"
            assert len(device.view) == PAGE
        finally:
            device.close()
            driver.close()

    def test_map_fd_past_the_end_of_the_file_fails_and_closes_the_fd(self) -> None:
        driver = MemoryRegion.create(PAGE)
        try:
            fd = os.dup(driver.fd)
            with pytest.raises(GuestMemoryError, match="runs past the end"):
                MemoryRegion.map_fd(fd, size=PAGE, mmap_offset=8, guest_phys_addr=0, user_addr=0)
            assert not fd_is_open(fd)
            fd = os.dup(driver.fd)
            with pytest.raises(GuestMemoryError, match="positive"):
                MemoryRegion.map_fd(fd, size=0, mmap_offset=0, guest_phys_addr=0, user_addr=0)
            assert not fd_is_open(fd)
        finally:
            driver.close()

    def test_close_with_live_views_keeps_them_valid(self) -> None:
        region = MemoryRegion.create(PAGE)
        piece = region.view[:8]
        array = np.frombuffer(region.view, dtype=np.uint8)
        region.close()
        piece[:] = b"still ok"  # the mapping survives until its last view is gone
        assert bytes(array[:8]) == b"still ok"
        region.close()  # idempotent


class TestGuestMemory:
    def test_view_inside_one_region(self, guest: Guest) -> None:
        view = guest.memory.view(REGION_GPA + 16, 32)
        view[:] = b"x" * 32
        assert bytes(guest.region.view[16:48]) == b"x" * 32
        assert len(guest.memory.view(REGION_GPA + REGION_SIZE, 0)) == 0  # empty at the end
        assert len(guest.memory.view(REGION_GPA, REGION_SIZE)) == REGION_SIZE

    @pytest.mark.parametrize(
        ("gpa", "length"),
        [
            (REGION_GPA - 1, 1),  # starts before
            (REGION_GPA + REGION_SIZE - 1, 2),  # runs past the end
            (REGION_GPA + REGION_SIZE, 1),  # just after
            (REGION_GPA, -1),  # negative length
            (-16, 32),  # negative address
            (REGION_GPA, 1 << 64),  # overflowing length
            ((1 << 64) - 1, 2),  # wraps in 64 bits
            (0, 0),  # empty, but nowhere near memory
        ],
    )
    def test_view_outside_memory_is_refused(self, guest: Guest, gpa: int, length: int) -> None:
        guest.memory.view(REGION_GPA, 8)  # warm the last-hit cache: it must not bypass checks
        with pytest.raises(GuestMemoryError) as info:
            guest.memory.view(gpa, length)
        assert f"{gpa:#x}" in str(info.value) and f"{length:#x}" in str(info.value)

    def test_a_range_spanning_two_adjacent_regions_is_refused(self) -> None:
        first = MemoryRegion.create(PAGE, guest_phys_addr=0)
        second = MemoryRegion.create(PAGE, guest_phys_addr=PAGE)
        memory = GuestMemory([first, second])
        try:
            assert len(memory.view(PAGE - 8, 8)) == 8
            assert len(memory.view(PAGE, 8)) == 8
            with pytest.raises(GuestMemoryError, match="one guest memory region"):
                memory.view(PAGE - 8, 16)
            memory.view(PAGE, 8)[:] = b"second!!"
            assert bytes(second.view[:8]) == b"second!!"
        finally:
            memory.close()

    def test_overlapping_regions_are_refused(self) -> None:
        base = MemoryRegion.create(2 * PAGE, guest_phys_addr=0x10000)
        memory = GuestMemory([base])
        gpa_clash = MemoryRegion.create(PAGE, guest_phys_addr=0x10000 + PAGE)
        uva_clash = MemoryRegion.create(PAGE, guest_phys_addr=0x80000, user_addr=base.user_addr)
        try:
            with pytest.raises(GuestMemoryError, match=r"gpa .* overlaps"):
                memory.add(gpa_clash)
            with pytest.raises(GuestMemoryError, match=r"user address .* overlaps"):
                memory.add(uva_clash)
            assert memory.regions == (base,)
        finally:
            gpa_clash.close()
            uva_clash.close()
            memory.close()

    def test_remove_detaches_the_region(self, guest: Guest) -> None:
        extra = MemoryRegion.create(PAGE, guest_phys_addr=0)
        guest.memory.add(extra)
        assert guest.memory.regions == (extra, guest.region)  # ordered by gpa
        guest.memory.view(0, 8)
        assert guest.memory.remove(0, PAGE) is extra
        with pytest.raises(GuestMemoryError):
            guest.memory.view(0, 8)  # the last-hit cache forgot it too
        with pytest.raises(GuestMemoryError, match="no region"):
            guest.memory.remove(0, PAGE)
        assert not extra.closed
        extra.close()

    def test_user_to_guest(self) -> None:
        region = MemoryRegion.create(2 * PAGE, guest_phys_addr=0x20000, user_addr=0x7000_0000)
        memory = GuestMemory([region])
        try:
            assert memory.user_to_guest(0x7000_0000, 16) == 0x20000
            assert memory.user_to_guest(0x7000_0000 + 100, 2 * PAGE - 100) == 0x20000 + 100
            for uva, length in [(0x7000_0000 - 1, 2), (0x7000_0000 + 2 * PAGE - 1, 2), (-1, 1)]:
                with pytest.raises(GuestMemoryError):
                    memory.user_to_guest(uva, length)
        finally:
            memory.close()

    def test_guest_address_of_recognises_buffers_in_guest_memory(self, guest: Guest) -> None:
        memory = guest.memory
        assert memory.guest_address_of(guest.region.view[100:200]) == REGION_GPA + 100
        assert memory.guest_address_of(memory.view(REGION_GPA + 4096, 10)) == REGION_GPA + 4096
        array = np.frombuffer(guest.region.view, dtype=np.uint8)[64:128]
        assert memory.guest_address_of(array) == REGION_GPA + 64
        assert memory.guest_address_of(bytearray(100)) is None
        assert memory.guest_address_of(b"read only") is None
        assert memory.guest_address_of(guest.region.view[:0]) is None
        assert memory.guest_address_of(guest.region.view[::2]) is None  # not contiguous
        assert memory.guest_address_of(42) is None  # type: ignore[arg-type]
        del array


class TestBufferAllocator:
    def test_alignment_and_bounds(self, guest: Guest) -> None:
        alloc = guest.allocator
        for size, align in [(1, 1), (16, 16), (100, 64), (4096, 4096), (3000, 2), (1, 1024)]:
            gpa = alloc.alloc(size, align)
            assert gpa % align == 0
            assert gpa >= REGION_GPA and gpa + size <= REGION_GPA + REGION_SIZE

    def test_exhaustion_raises_memory_error(self) -> None:
        with Guest(size=PAGE, gpa=0) as small:
            small.allocator.alloc(PAGE)
            with pytest.raises(MemoryError, match="exhausted"):
                small.allocator.alloc(16)

    def test_free_of_unknown_or_freed_block_raises(self, guest: Guest) -> None:
        gpa = guest.allocator.alloc(64)
        with pytest.raises(ValueError, match="not an allocated block"):
            guest.allocator.free(gpa + 16)
        guest.allocator.free(gpa)
        with pytest.raises(ValueError, match="not an allocated block"):
            guest.allocator.free(gpa)

    @pytest.mark.parametrize(("size", "align"), [(0, 16), (-1, 16), (16, 3), (16, 0)])
    def test_bad_requests(self, guest: Guest, size: int, align: int) -> None:
        with pytest.raises(ValueError):
            guest.allocator.alloc(size, align)

    def test_an_odd_sized_unaligned_region_is_still_usable(self) -> None:
        with Guest(size=3 * PAGE + 48, gpa=0x1230) as odd:
            total = odd.allocator.free_bytes
            assert 3 * PAGE <= total <= 3 * PAGE + 48
            gpa = odd.allocator.alloc(2 * PAGE, 16)
            assert gpa >= 0x1230 and gpa + 2 * PAGE <= 0x1230 + 3 * PAGE + 48

    @settings(max_examples=60, deadline=None)
    @given(
        ops=st.lists(
            st.tuples(
                st.booleans(), st.integers(1, 20000), st.sampled_from([1, 2, 16, 64, 4096])
            ),
            max_size=80,
        )
    )
    def test_random_alloc_free_never_overlaps_and_coalesces(
        self, ops: list[tuple[bool, int, int]]
    ) -> None:
        with Guest(size=1 << 18, gpa=0x40000) as g:
            alloc = g.allocator
            initial = alloc.free_bytes
            live: dict[int, int] = {}
            for do_free, size, align in ops:
                if do_free and live:
                    gpa = sorted(live)[size % len(live)]
                    del live[gpa]
                    alloc.free(gpa)
                    continue
                try:
                    gpa = alloc.alloc(size, align)
                except MemoryError:
                    continue
                assert gpa % align == 0 and gpa >= 0x40000 and gpa + size <= 0x40000 + (1 << 18)
                for other, other_size in live.items():
                    assert gpa + size <= other or other + other_size <= gpa
                live[gpa] = size
            for gpa in live:
                alloc.free(gpa)
            assert alloc.free_bytes == initial
            alloc.alloc(1 << 18)  # everything merged back into one block
