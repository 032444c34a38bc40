"""Our device with injected faults, for driver error paths no healthy device produces.

A real ``BlkDevice`` over a real vhost-user session (in a thread, on a socketpair); only
``execute`` is overridden: requests at ``bad_sector`` answer IOERR, FLUSH answers UNSUPP
when asked to, and a request at ``slow_sector`` is held until ``release`` is set
(``holding`` is set once it is: a test waits on that, not on a guess of how long its
thread takes to get there).  Requests whose type is in ``short_answers`` (a set a test may
change between requests) are answered status OK with used length 1: the status byte and
not one byte of the data the request asked for.

A held request blocks its queue's worker thread, so the device answers no GET_VRING_BASE
for that ring until it is released (stopping a ring waits for its worker): the device
that "also ignores GET_VRING_BASE".  A request at ``lost_sector`` is different: it is
never completed at all (no used entry, ever), while the queue serves the others and the
device answers every control message: the silent device a request timeout is for.
``lost`` counts them, ``lost_seen`` is set at the first.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from virtblk import Disk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.request import BlkRequest, ChainLike
from virtblk.spec import RequestType, Status
from virtblk.vhost_user.server import serve_connected


class FaultyDevice(BlkDevice):
    """``BlkDevice`` with the faults described in the module docstring."""

    def __init__(
        self,
        size: int,
        *,
        bad_sector: int | None = None,
        slow_sector: int | None = None,
        unsupp_flush: bool = False,
        short_answers: Collection[int] = (),
        lost_sector: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(MemoryBackend(size), **options)
        self.bad_sector = bad_sector
        self.slow_sector = slow_sector
        self.unsupp_flush = unsupp_flush
        self.short_answers = set(short_answers)
        self.release = threading.Event()
        self.holding = threading.Event()
        self.lost_sector = lost_sector
        self.lost = 0
        self.lost_seen = threading.Event()
        self._losing = threading.local()  # the chain being answered is to be lost
        self._lost_heads: set[int] = set()

    def process(self, chain: ChainLike, queue: int = 0) -> int:
        self._losing.flag = False
        used = super().process(chain, queue)
        if self._losing.flag:
            self._lost_heads.add(chain.head)
        return used

    def execute_batch(self, view: memoryview, items: Any, queue: int = 0,
                      offload: Any = None) -> list[int]:
        used = super().execute_batch(view, items, queue, offload)
        if not self._lost_heads:
            return used
        kept: list[int] = []
        for i in range(0, len(used), 2):
            if used[i] in self._lost_heads:
                self._lost_heads.discard(used[i])
                self.lost += 1
                self.lost_seen.set()
            else:
                kept += used[i : i + 2]
        return kept

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        if req.type in (RequestType.IN, RequestType.OUT) and req.sector == self.lost_sector:
            self._losing.flag = True
            return int(Status.OK), 1  # never seen by the driver: the used entry is dropped
        if req.type in self.short_answers:
            return int(Status.OK), 1
        if req.type == RequestType.FLUSH and self.unsupp_flush:
            return int(Status.UNSUPP), 1
        if req.type in (RequestType.IN, RequestType.OUT):
            if req.sector == self.bad_sector:
                return int(Status.IOERR), 1
            if req.sector == self.slow_sector:
                self.holding.set()
                self.release.wait(30)
        return super().execute(req)


@contextmanager
def faulty_disk(
    size: int = 1 << 20, disk_options: dict[str, Any] | None = None, **options: Any
) -> Iterator[tuple[Disk, FaultyDevice, socket.socket]]:
    """A Disk (``Disk.from_socket`` with ``disk_options``) on a FaultyDevice; yields
    (disk, device, the device's end of the socket)."""
    device = FaultyDevice(size, **options)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    thread.start()
    disk = Disk.from_socket(ours, **(disk_options or {}))
    try:
        yield disk, device, theirs
    finally:
        device.release.set()
        disk.close()
        thread.join(10)
