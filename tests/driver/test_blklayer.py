"""The block layer's request path: plugging, sorting, merging, splitting, fan-out of
completions, BUSY with a tiny ring, and data integrity against a bytearray model."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers.faulty import faulty_disk
from virtblk import Disk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.driver.blklayer import Bio, Plug, PluggedQueue, QueueLimits
from virtblk.driver.virtio_blk import VirtioBlk
from virtblk.spec import Feature, Status
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.vhost_user.server import serve_connected

MiB = 1 << 20
BS = 4096
SPB = BS // 512  # sectors per 4 KiB block


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    with Disk.embedded(size=4 * MiB, mode="thread") as d:
        yield d


def gpa(d: Disk, buf: memoryview) -> int:
    g = d.device.memory.guest_address_of(buf)
    assert g is not None
    return g


def separate_buffers(d: Disk, n: int, size: int = BS) -> list[memoryview]:
    """``n`` buffers of which no two touch in memory (so no segment coalescing)."""
    bufs = [d.buffer(size * 2) for _ in range(n)]
    return [b[:size] for b in bufs]


def test_adjacent_bios_merge_in_order_and_out_of_order(disk: Disk) -> None:
    q = disk.device.queues[0]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        bufs = separate_buffers(disk, 4)
        for i, b in enumerate(bufs):
            b[:] = bytes([0x10 + i + order[0]]) * BS
        ended: list[Bio] = []
        bios = [Bio(True, 64 + i * SPB, [(gpa(disk, bufs[i]), BS)], end_io=ended.append)
                for i in range(4)]
        before = q.stats_submitted
        with disk.plug() as plug:
            for i in order:
                plug.add(bios[i])
        plug.wait(bios)
        assert q.stats_submitted - before == 1
        assert plug.stats.bios == 4 and plug.stats.requests == 1 and plug.stats.merges == 3
        assert len(ended) == 4 and all(b.status == Status.OK for b in ended)
        data = disk.pread(4 * BS, 64 * 512)
        assert data == b"".join(bytes([0x10 + i + order[0]]) * BS for i in range(4))


def test_no_merge_across_direction_fua_or_gap() -> None:
    with Disk.embedded(size=4 * MiB, mode="thread", experimental_fua=True, fua=True) as disk:
        _no_merge_across_direction_fua_or_gap(disk)


def _no_merge_across_direction_fua_or_gap(disk: Disk) -> None:
    bufs = separate_buffers(disk, 4)
    bios = [
        Bio(False, 0, [(gpa(disk, bufs[0]), BS)]),
        Bio(True, SPB, [(gpa(disk, bufs[1]), BS)]),  # adjacent, other direction
        Bio(True, 3 * SPB, [(gpa(disk, bufs[2]), BS)]),  # a gap after the write
        Bio(True, 2 * SPB, [(gpa(disk, bufs[3]), BS)], fua=True),  # adjacent, FUA differs
    ]
    plug = disk.plug()
    for b in bios:
        plug.add(b)
    assert plug.flush() == 4
    plug.wait(bios)
    assert plug.stats.merges == 0
    assert all(b.status == Status.OK for b in bios)


def test_merge_stops_at_the_segment_limit() -> None:
    with Disk.embedded(size=4 * MiB, mode="thread", seg_max=2) as d:
        q = d.device.queues[0]
        bufs = separate_buffers(d, 6)
        bios = [Bio(False, i * SPB, [(gpa(d, b), BS)]) for i, b in enumerate(bufs)]
        plug = d.plug()
        for b in bios:
            plug.add(b)
        before = q.stats_submitted
        assert plug.flush() == 3  # two segments per request
        plug.wait(bios)
        assert q.stats_submitted - before == 3
        assert all(b.status == Status.OK for b in bios)


def test_merge_stops_at_the_request_size_cap(disk: Disk) -> None:
    bufs = separate_buffers(disk, 6)
    bios = [Bio(False, i * SPB, [(gpa(disk, b), BS)]) for i, b in enumerate(bufs)]
    capped = Plug(disk.device.queues[0],
                  QueueLimits(max_segments=126, max_segment_size=MiB, max_bytes=3 * BS))
    for b in bios:
        capped.add(b)
    assert capped.flush() == 2
    capped.wait(bios)
    assert capped.stats.merges == 4
    assert all(b.status == Status.OK for b in bios)


def test_bios_touching_in_memory_coalesce_into_one_segment() -> None:
    # seg_max=1: only a request whose buffers join into one segment can merge.
    with Disk.embedded(size=4 * MiB, mode="thread", seg_max=1) as d:
        buf = d.buffer(4 * BS)
        buf[:] = os.urandom(4 * BS)
        base = gpa(d, buf)
        bios = [Bio(True, i * SPB, [(base + i * BS, BS)]) for i in range(4)]
        plug = d.plug()
        for b in reversed(bios):
            plug.add(b)
        assert plug.flush() == 1
        plug.wait(bios)
        assert d.pread(4 * BS, 0) == bytes(buf)


def test_merged_completion_fans_the_status_out_to_every_bio() -> None:
    with faulty_disk(bad_sector=8 * SPB) as (d, _device, _sock):
        bufs = separate_buffers(d, 3)
        statuses: dict[int, int] = {}

        def end(bio: Bio) -> None:
            statuses[bio.sector] = bio.status

        # 8 and 9 merge into one request at the bad sector: both fail; 11 stands alone.
        bios = [Bio(False, s * SPB, [(gpa(d, b), BS)], end_io=end)
                for s, b in zip((9, 8, 11), bufs, strict=True)]
        plug = d.plug()
        for b in bios:
            plug.add(b)
        assert plug.flush() == 2
        plug.wait(bios)
        assert statuses == {8 * SPB: Status.IOERR, 9 * SPB: Status.IOERR, 11 * SPB: Status.OK}
        with pytest.raises(OSError):
            d.pread(2 * BS, 8 * BS)


def test_split_bio_ends_once_with_the_first_error() -> None:
    with faulty_disk(bad_sector=2 * SPB, seg_max=1, size_max=BS) as (d, _device, _sock):
        buf = d.buffer(4 * BS)
        ended: list[Bio] = []
        whole = Bio(False, 0, [(gpa(d, buf), 4 * BS)], end_io=ended.append)
        plug = d.plug()
        plug.add(whole)
        assert plug.stats.splits == 3
        assert plug.flush() == 4
        plug.wait([whole])
        assert ended == [whole] and whole.status == Status.IOERR
        ok = Bio(False, 4 * SPB, [(gpa(d, buf), 4 * BS)], end_io=ended.append)
        plug.add(ok)
        plug.wait([ok])
        assert ended == [whole, ok] and ok.status == Status.OK


def test_split_refuses_a_piece_off_the_block_boundary(disk: Disk) -> None:
    plug = Plug(disk.device.queues[0], QueueLimits(max_segments=1, max_segment_size=MiB))
    with pytest.raises(ValueError, match="logical block boundary"):
        plug.add(Bio(False, 0, [(0x1000, 100), (0x2000, 412)]))


@pytest.fixture()
def tiny_ring() -> Iterator[Disk]:
    """Our device, negotiated without indirect descriptors on a 4-entry ring: a request
    takes 3 descriptors, so only one fits and the others wait BUSY."""
    device = BlkDevice(MemoryBackend(MiB))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    thread.start()
    dev = VirtioBlk(ours, queue_size=4, queue_depth=4,
                    exclude_features=Feature.RING_INDIRECT_DESC.mask)
    d = Disk(dev)
    try:
        yield d
    finally:
        d.close()
        thread.join(10)


def test_busy_requests_go_out_when_the_ring_has_room(tiny_ring: Disk) -> None:
    d = tiny_ring
    q = d.device.queues[0]
    bufs = separate_buffers(d, 12)
    for i, b in enumerate(bufs):
        b[:] = bytes([i + 1]) * BS
    # Every other block: no merging, 12 requests for 4 tags and a ring that holds one.
    bios = [Bio(True, 2 * i * SPB, [(gpa(d, b), BS)]) for i, b in enumerate(bufs)]
    busy = q.stats_busy
    plug = d.plug()
    for b in bios:
        plug.add(b)
    assert plug.flush() == 12
    plug.wait(bios)
    assert q.stats_busy > busy
    assert all(b.status == Status.OK for b in bios)
    for i in range(12):
        assert d.pread(BS, 2 * i * BS) == bytes([i + 1]) * BS
    assert q.tags_free == q.depth


def test_pwritev_of_many_buffers_is_one_request(disk: Disk) -> None:
    q = disk.device.queues[0]
    bufs = separate_buffers(disk, 16)
    for b in bufs:
        b[:] = os.urandom(BS)
    before = q.stats_submitted
    assert disk.pwritev(bufs, 0) == 16 * BS
    assert q.stats_submitted - before == 1
    assert disk.pread(16 * BS, 0) == b"".join(bytes(b) for b in bufs)


def test_large_io_is_split_at_the_request_cap(disk: Disk) -> None:
    q = disk.device.queues[0]
    data = os.urandom(3 * MiB)
    before = q.stats_submitted
    disk.pwrite(data, 0)
    cap = disk.queue_limits.max_bytes
    assert q.stats_submitted - before == -(-len(data) // cap)
    assert disk.pread(len(data), 0) == data


def test_bench_request_path_merges_sequential_io(disk: Disk) -> None:
    q = disk.device.queues[0]
    before = q.stats_submitted
    result = run_bench(disk, BenchConfig(rw="read", iodepth=8, runtime=0.3, path="request",
                                         size=MiB))
    assert result.errors == 0 and result.ios > 0
    assert q.stats_submitted - before < result.ios
    assert result.summary()["path"] == "request"


def test_plugged_queue_reaps_ended_bios(disk: Disk) -> None:
    pq = PluggedQueue(disk.device.queues[0], disk.queue_limits)
    bufs = separate_buffers(disk, 3)
    bios = [pq.bio(False, [(gpa(disk, b), BS)], user_data=i) for i, b in enumerate(bufs)]
    for i, b in enumerate(bios):
        b.sector = 100 * i
    pq.submit_batch(bios)
    got: list[Bio] = []
    while len(got) < 3:
        got += pq.reap(timeout=10)
    assert sorted(b.user_data for b in got) == [0, 1, 2]


BLOCKS = 64
SECTOR_BLOCK = 512


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[bool, int, list[int]]]:
    """A plug's worth of bios over disjoint ranges: (write, first block, buffer sizes in
    blocks); a bio may carry several buffers."""
    starts = sorted(draw(st.sets(st.integers(0, BLOCKS - 1), min_size=1, max_size=12)))
    out = []
    for i, s in enumerate(starts):
        room = (starts[i + 1] if i + 1 < len(starts) else BLOCKS) - s
        n = draw(st.integers(1, min(room, 6)))
        parts: list[int] = []
        while n:
            p = draw(st.integers(1, n))
            parts.append(p)
            n -= p
        out.append((draw(st.booleans()), s, parts))
    return draw(st.permutations(out))


@pytest.fixture(scope="module")
def small_disk() -> Iterator[Disk]:
    with Disk.embedded(size=BLOCKS * SECTOR_BLOCK, mode="thread", seg_max=3) as d:
        d.pwrite(bytes(BLOCKS * SECTOR_BLOCK), 0)
        yield d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(batches(), min_size=1, max_size=4), data=st.data())
def test_request_path_matches_a_bytearray_model(
    small_disk: Disk, plan: list[list[tuple[bool, int, list[int]]]], data: st.DataObject
) -> None:
    d = small_disk
    model = bytearray(d.pread(BLOCKS * SECTOR_BLOCK, 0))
    limits = QueueLimits(max_segments=3, max_segment_size=MiB, max_bytes=4 * SECTOR_BLOCK)
    for batch in plan:
        plug = Plug(d.device.queues[0], limits)
        staged: list[tuple[Bio, list[memoryview], int]] = []
        for write, start, parts in batch:
            bufs = [d.buffer(p * SECTOR_BLOCK) for p in parts]
            if write:
                for b in bufs:
                    b[:] = data.draw(st.binary(min_size=len(b), max_size=len(b)))
            bio = Bio(write, start, [(gpa(d, b), len(b)) for b in bufs])
            staged.append((bio, bufs, start))
            plug.add(bio)
        plug.wait([s[0] for s in staged], timeout=30)
        for bio, bufs, start in staged:
            assert bio.status == Status.OK
            got = b"".join(bytes(b) for b in bufs)
            lo = start * SECTOR_BLOCK
            if bio.write:
                model[lo : lo + len(got)] = got
            else:
                assert got == model[lo : lo + len(got)]
            for b in bufs:
                d.free_buffer(b)
    assert d.pread(BLOCKS * SECTOR_BLOCK, 0) == bytes(model)
