"""HardwareQueue's batch path: submit_batch, reap and the per-tag prebuilt indirect tables,
against our real device (memory backend) in a child process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtblk import Disk
from virtblk.driver.blkmq import HardwareQueue, Request
from virtblk.spec import RequestType, Status

MiB = 1 << 20


@pytest.fixture
def disk() -> Iterator[Disk]:
    d = Disk.embedded(size=4 * MiB, backend="memory", queue_depth=8)
    try:
        yield d
    finally:
        d.close()


def _gpa(disk: Disk, buf: memoryview) -> int:
    gpa = disk.device.memory.guest_address_of(buf)
    assert gpa is not None
    return gpa


def _reap_all(q: HardwareQueue, n: int) -> list[Request]:
    done: list[Request] = []
    while len(done) < n:
        done += q.reap(timeout=10)
    return done


def test_batch_write_then_reuse_requests_to_read_back(disk: Disk) -> None:
    q = disk.device.queues[0]
    bufs = [disk.buffer(4096) for _ in range(4)]
    reqs = [q.get_tag() for _ in range(4)]
    for i, (r, b) in enumerate(zip(reqs, bufs, strict=True)):
        b[:] = bytes([i + 1]) * 4096
        r.type, r.sector = RequestType.OUT, 8 * i
        r.out_bufs, r.in_bufs = [(_gpa(disk, b), 4096)], ()
    q.submit_batch(reqs)
    done = _reap_all(q, 4)
    assert sorted(r.tag for r in done) == sorted(r.tag for r in reqs)
    assert all(r.done and r.status == Status.OK for r in done)

    # Resubmit the same requests as reads into the same buffers (so the tables are
    # rewritten for the new direction), after clearing the buffers.
    for r, b in zip(reqs, bufs, strict=True):
        b[:] = bytes(4096)
        r.type, r.in_bufs, r.out_bufs = RequestType.IN, r.out_bufs, ()
    q.submit_batch(reqs)
    _reap_all(q, 4)
    assert [bytes(b[:1]) for b in bufs] == [b"\x01", b"\x02", b"\x03", b"\x04"]
    assert all(r.written == 4097 for r in reqs)

    # Same buffers, new sectors: only the header changes (the table is reused).
    reqs[0].sector, reqs[1].sector = 8 * 3, 8 * 2
    q.submit_batch(reqs[:2])
    _reap_all(q, 2)
    assert bytes(bufs[0][:1]) == b"\x04" and bytes(bufs[1][:1]) == b"\x03"
    for r in reqs:
        q.put_tag(r)
    for b in bufs:
        disk.free_buffer(b)


def test_buffers_changed_in_place_are_noticed(disk: Disk) -> None:
    """The table cache compares buffer lists by value, so a list the caller edits in
    place between submissions still reaches the device as edited."""
    q = disk.device.queues[0]
    a, b = disk.buffer(4096), disk.buffer(4096)
    a[:] = b"A" * 4096
    b[:] = b"B" * 4096
    r = q.get_tag()
    segs = [(_gpa(disk, a), 4096)]
    r.type, r.sector, r.out_bufs, r.in_bufs = RequestType.OUT, 0, segs, ()
    q.submit_batch([r])
    _reap_all(q, 1)
    segs[0] = (_gpa(disk, b), 4096)  # same list object, new buffer
    r.sector = 8
    q.submit_batch([r])
    _reap_all(q, 1)
    assert disk.pread(8192, 0) == b"A" * 4096 + b"B" * 4096
    q.put_tag(r)


def test_a_device_error_status_reaches_the_request(disk: Disk) -> None:
    q = disk.device.queues[0]
    buf = disk.buffer(4096)
    r = q.get_tag()
    r.type, r.sector = RequestType.IN, disk.size // 512  # just past the end
    r.out_bufs, r.in_bufs = (), [(_gpa(disk, buf), 4096)]
    q.submit_batch([r])
    [done] = _reap_all(q, 1)
    assert done is r and r.status == Status.IOERR
    assert r.error("read") is not None
    q.put_tag(r)
