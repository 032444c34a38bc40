"""A device that breaks the used-ring protocol (here: a used length larger than the chain's
writable bytes) fails the requests it stranded with ``DeviceProtocolError``, while the
completions it published before the bad entry still complete: no caller hangs, none loses
a good result."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.request import BlkRequest
from virtblk.spec import RequestType, Status
from virtblk.vhost_user.server import serve_connected
from virtblk.virtio.split_driver import DeviceProtocolError

LIAR = 64  # reads of this sector report more bytes written than the driver offered


class OverlongDevice(BlkDevice):
    """Our device, but a read at ``LIAR`` answers a used length 4096 bytes too large,
    once ``gate`` is set (it is, unless a test clears it)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(1 << 20))
        self.gate = threading.Event()
        self.gate.set()

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        status, used = super().execute(req)
        self.gate.wait(10)
        if req.type == RequestType.IN and req.sector == LIAR:
            return status, used + 4096
        return status, used


@contextmanager
def overlong_disk(device: OverlongDevice | None = None) -> Iterator[Disk]:
    ours, theirs = socket.socketpair()
    device = device or OverlongDevice()
    t = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    t.start()
    disk = Disk.from_socket(ours, num_queues=1)
    try:
        yield disk
    finally:
        device.gate.set()
        disk.close()
        t.join(10)


def test_good_completion_before_a_bad_one_completes_and_the_bad_one_fails() -> None:
    with overlong_disk() as disk:
        q = disk.device.queues[0]
        buf = disk.buffer(1024)
        gpa = disk.device.memory.guest_address_of(buf)
        assert gpa is not None
        good, bad = q.get_tag(), q.get_tag()
        for req, sector, off in ((good, 0, 0), (bad, LIAR, 512)):
            req.type = int(RequestType.IN)
            req.sector = sector
            req.out_bufs = ()
            req.in_bufs = [(gpa + off, 512)]
            req.callback = None
        q.submit_batch([good, bad])  # one kick: the device answers both in one batch
        q.wait_for(good, timeout=5)
        assert good.status == Status.OK
        with pytest.raises(DeviceProtocolError, match="exceeds the chain's"):
            q.wait_for(bad, timeout=5)
        assert isinstance(q.broken, DeviceProtocolError)


def test_a_waiter_asleep_behind_the_poller_is_woken_with_the_error() -> None:
    device = OverlongDevice()
    device.gate.clear()  # the device holds the first read until both readers wait
    with overlong_disk(device) as disk:
        q = disk.device.queues[0]
        errors: list[BaseException] = []

        def read_liar() -> None:
            try:
                disk.pread(512, LIAR * 512)
            except BaseException as exc:
                errors.append(exc)

        # The first reader polls the call eventfd, the second sleeps on the condition
        # behind it; then the device answers the first with a used length too large.
        threads = [threading.Thread(target=read_liar, daemon=True) for _ in range(2)]
        for n, t in enumerate(threads, 1):
            t.start()
            deadline = time.monotonic() + 5
            while q.in_flight() < n and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.2)
        device.gate.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a reader hangs"
        assert len(errors) == 2
        assert all(isinstance(e, DeviceProtocolError) for e in errors)


def test_aio_good_completion_before_a_bad_one_is_not_lost() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        t = threading.Thread(target=serve_connected, args=(theirs, OverlongDevice()),
                             daemon=True)
        t.start()
        disk = await asyncio.to_thread(Disk.from_socket, ours, num_queues=1)
        adisk = AsyncDisk(disk)
        try:
            good, bad = await asyncio.wait_for(
                asyncio.gather(adisk.read(512, 0), adisk.read(512, LIAR * 512),
                               return_exceptions=True),
                10,
            )
            assert good == bytes(512)
            assert isinstance(bad, DeviceProtocolError)
        finally:
            await adisk.aclose()
            t.join(10)

    asyncio.run(main())
