"""``virtblk.aio``: the Disk for asyncio, thousands of requests in flight from one thread.

The blocking :class:`~virtblk.Disk` parks a thread per outstanding request in
``HardwareQueue.wait_for``.  Here the event loop does the waiting instead: each hardware
queue's call eventfd is registered with ``loop.add_reader``, and when the device signals it
the reader drains the used ring (the ``virtblk_done`` loop in ``process_completions``),
whose per-request callbacks copy bounce buffers back, return tags and resolve futures.

* Tags are a loop-side resource: when every tag of every queue is busy, a request awaits a
  future in a FIFO of waiters, woken one per freed tag; the loop never blocks.
* Submissions made during one loop iteration share one kick per queue (scheduled with
  ``call_soon``), the asyncio equivalent of blk-mq's ``bd->last``.
* A request is never larger than the device accepts in one go (``seg_max`` segments of
  ``size_max`` bytes) nor than :data:`~virtblk.driver.requests.CHUNK`; bigger I/O is split
  into such pieces, all in flight at once (the rules are the disk's
  :class:`~virtblk.driver.requests.RequestBuilder`, shared with ``Disk`` and the queue
  API).  Private buffers are staged through bounce buffers from the shared-memory
  allocator; buffers from :meth:`Disk.buffer` go to the device directly.
* The device hanging up is noticed through an epoll set watching the vhost-user socket for
  ``EPOLLRDHUP`` only, itself registered with the loop: every waiter gets
  :class:`~virtblk.errors.DeviceGoneError`.
* With a ``request_timeout`` (``AsyncDisk.connect(path, request_timeout=...)``) one loop
  timer, armed while requests are in flight, has each queue reset a ring whose oldest
  request is due (``HardwareQueue.expire``): those requests raise
  :class:`~virtblk.errors.RequestTimeoutError`.  The reset's vhost-user round trips run on
  the loop (microseconds; at most the reply timeout when the device is dead).
* A cancelled read or write never frees its bounce buffer early: the buffer is freed by the
  request's completion, whenever the device gives it back.

An ``AsyncDisk`` owns its ``Disk``: do not use the disk's blocking methods at the same time
(their waiters would drain completions on another thread).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import select
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from virtblk.driver.blkmq import HardwareQueue, Request, Segments
from virtblk.driver.disk import Disk
from virtblk.driver.requests import CHUNK, Buffer
from virtblk.errors import DeviceGoneError, status_error
from virtblk.spec import SECTOR_SHIFT, Feature, RequestType, Status

_OK = int(Status.OK)


class _Op:
    """What the completion callback needs to finish one request."""

    __slots__ = ("bounce", "dest", "fut", "queue", "what")

    def __init__(
        self,
        fut: asyncio.Future[None],
        queue: HardwareQueue,
        what: str,
        bounce: memoryview | None,
        dest: memoryview | None,
    ) -> None:
        self.fut = fut
        self.queue = queue
        self.what = what
        self.bounce = bounce
        self.dest = dest


class AsyncDisk:
    """A :class:`Disk` driven from an asyncio event loop.

    Create it inside a running loop (``AsyncDisk(disk)``, or the async constructors
    :meth:`connect` and :meth:`embedded`); use ``async with`` or :meth:`aclose`.
    """

    def __init__(self, disk: Disk, *, queues: Sequence[int] | None = None) -> None:
        """``queues`` limits the hardware queues used (all by default): a process forked
        per queue (``virtblk bench --numjobs``) must reap its own queue and no other."""
        self.disk = disk
        self._loop = asyncio.get_running_loop()
        all_queues = disk.device.queues
        if queues is None:
            queues = range(len(all_queues))
        for index in queues:
            if not 0 <= index < len(all_queues):
                raise ValueError(
                    f"queue index {index} out of range: the disk has {len(all_queues)}"
                )
        self._queues: list[HardwareQueue] = []
        try:
            for i in queues:  # refuses a queue a QueueHandle drives
                all_queues[i].listen(self, self._deliver)
                self._queues.append(all_queues[i])
        except ValueError:
            for q in self._queues:
                q.unlisten(self)
            raise
        self._requests = disk.requests
        self._bs = disk.logical_block_size
        self._max_piece = min(CHUNK, self._requests.max_transfer)
        self._tag_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._memory_waiters: list[asyncio.Future[None]] = []
        self._in_flight: set[_Op] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._kick_scheduled = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._timed = any(q.request_timeout is not None for q in self._queues)
        self._timer: asyncio.TimerHandle | None = None
        self._gone: BaseException | None = None
        self._closed = False
        for q in self._queues:
            self._loop.add_reader(q.call_fd, self._on_call, q)
        # EPOLLRDHUP only: the socket also carries replies to config requests, which must
        # not wake us; a peer that shuts down (or dies) does.
        self._hangup = select.epoll()
        self._sock_fd = disk.device.frontend.fileno()
        self._hangup.register(self._sock_fd, select.EPOLLRDHUP)
        self._loop.add_reader(self._hangup.fileno(), self._on_hangup)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    async def connect(cls, socket_path: str | os.PathLike[str], **options: Any) -> Self:
        """``Disk.connect(socket_path, **options)`` (probing runs in a worker thread);
        with ``reconnect_timeout`` a device restart costs the awaiting callers only time,
        as for the ``Disk``."""
        disk = await asyncio.to_thread(Disk.connect, socket_path, **options)
        return cls(disk)

    @classmethod
    async def embedded(
        cls,
        size: int = 64 << 20,
        backend: Literal["memory", "null", "file", "rbd", "nbd"] = "memory",
        path: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> Self:
        """``Disk.embedded(...)``: start our own device and connect to it."""
        disk = await asyncio.to_thread(Disk.embedded, size, backend, path, **options)
        return cls(disk)

    # -- properties -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.disk.size

    @property
    def logical_block_size(self) -> int:
        """The unit of I/O alignment."""
        return self._bs

    @property
    def ring(self) -> str:
        """The virtqueue layout in use, ``"packed"`` or ``"split"`` (``Disk.ring``)."""
        return self.disk.ring

    @property
    def read_only(self) -> bool:
        """Whether the device refuses writes."""
        return self.disk.read_only

    def in_flight(self) -> int:
        """Requests submitted and not completed yet (including ones whose caller gave up)."""
        return len(self._in_flight)

    # -- I/O ------------------------------------------------------------------------------------
    async def read(self, length: int, offset: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        out = bytearray(length)
        await self.readinto(out, offset)
        return bytes(out)

    async def readinto(self, buffer: Buffer, offset: int) -> int:
        """Read into ``buffer`` (zero-copy if it came from ``disk.buffer``); returns its size."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("readinto needs a writable buffer")
        return await self._rw(False, view, offset)

    async def write(self, data: Buffer, offset: int) -> int:
        """Write ``data`` at ``offset``; returns the bytes written."""
        self._check_writable("write")
        return await self._rw(True, memoryview(data).cast("B"), offset)

    async def flush(self) -> None:
        """FLUSH in write-back mode; in write-through (or without the FLUSH feature)
        writes are durable on completion and nothing is sent, as in the seed."""
        self._check_usable()
        if not self._requests.flush_needed:
            return
        fut = await self._start(RequestType.FLUSH, 0, (), (), f"{self.disk.name}: flush")
        await fut

    async def discard(self, offset: int, length: int) -> None:
        """DISCARD the range, split by the device's discard limits."""
        self.disk.device.require(Feature.BLK_DISCARD, "discard")
        self._check_writable("discard")
        await self._ranges(RequestType.DISCARD, offset, length, unmap=False)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """WRITE_ZEROES over the range; ``unmap`` lets the device deallocate it."""
        self.disk.device.require(Feature.BLK_WRITE_ZEROES, "write_zeroes")
        self._check_writable("write_zeroes")
        await self._ranges(RequestType.WRITE_ZEROES, offset, length, unmap=unmap)

    def _check_writable(self, what: str) -> None:
        self._requests.check_writable(f"{self.disk.name}: {what}")

    async def _rw(self, write: bool, view: memoryview, offset: int) -> int:
        what = f"{self.disk.name}: {'write' if write else 'read'}"
        total = len(view)
        self.disk.check_range(offset, total, what)
        self._check_usable()
        direct = self._requests.address_of(view)
        type_ = RequestType.OUT if write else RequestType.IN
        futs: list[asyncio.Future[None]] = []
        try:
            for pos in range(0, total, self._max_piece):
                n = min(self._max_piece, total - pos)
                piece = view[pos : pos + n]
                bounce = None
                if direct is not None:
                    gpa = direct + pos
                else:
                    bounce = await self._alloc(n)
                    gpa = self._address(bounce)
                    if write:
                        bounce[:] = piece
                segs = self._requests.segments(gpa, n)
                sector = (offset + pos) >> SECTOR_SHIFT
                out, in_ = (segs, ()) if write else ((), segs)
                dest = None if write or bounce is None else piece
                futs.append(await self._start(type_, sector, out, in_, what, bounce, dest))
        except BaseException:
            for fut in futs:
                fut.cancel()  # the caller gave up: nothing may land in its buffer later
            raise
        await self._gather(futs)
        return total

    async def _ranges(self, type_: RequestType, offset: int, length: int, *, unmap: bool) -> None:
        what = f"{self.disk.name}: {type_.name.lower()}"
        self.disk.check_range(offset, length, what)
        self._check_usable()
        futs: list[asyncio.Future[None]] = []
        for payload in self._requests.range_payloads(type_, offset, length, unmap=unmap):
            bounce = await self._alloc(len(payload))
            bounce[:] = payload
            seg = [(self._address(bounce), len(payload))]
            futs.append(await self._start(type_, 0, seg, (), what, bounce, None))
        await self._gather(futs)

    async def _gather(self, futs: list[asyncio.Future[None]]) -> None:
        """Wait for every piece (so none still writes into the caller's buffer), then
        raise the first failure."""
        results = await asyncio.gather(*futs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- requests ---------------------------------------------------------------------------
    async def _start(
        self,
        type_: int,
        sector: int,
        out: Segments,
        in_: Segments,
        what: str,
        bounce: memoryview | None = None,
        dest: memoryview | None = None,
    ) -> asyncio.Future[None]:
        """Take a tag (waiting on the loop if none is free) and queue one request; the
        returned future resolves when the device completes it."""
        try:
            q, req = await self._get_tag()
        except BaseException:
            if bounce is not None:
                self._free(bounce)
            raise
        fut: asyncio.Future[None] = self._loop.create_future()
        op = _Op(fut, q, what, bounce, dest)
        self._in_flight.add(op)
        q.submit(req, type_, sector, out, in_, callback=self._complete, user_data=op, last=False)
        if self._timed and self._timer is None:
            self._arm_timer(time.monotonic() + (q.request_timeout or 0))
        if not self._kick_scheduled:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)
        return fut

    async def _get_tag(self) -> tuple[HardwareQueue, Request]:
        woken = False
        while True:
            self._check_usable()
            # Requests that arrive while others wait queue behind them (FIFO, no starving).
            if woken or not self._tag_waiters:
                q = max(self._queues, key=lambda hq: hq.tags_free)
                if q.tags_free:
                    try:
                        return q, q.get_tag(timeout=0)
                    except TimeoutError:
                        pass  # a thread outside the loop took it
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._tag_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_tag_waiter()  # pass the tag we were given to the next one
                raise
            woken = True

    def _wake_tag_waiter(self) -> None:
        while self._tag_waiters:
            waiter = self._tag_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _kick(self) -> None:
        self._kick_scheduled = False
        for q in self._queues:
            q.kick()

    def _complete(self, req: Request) -> None:
        """Per-request completion, called from ``process_completions`` in the reader."""
        op: _Op = req.user_data
        status = req.status
        fut = op.fut
        if op.bounce is not None:
            if op.dest is not None and status == _OK and not fut.done():
                op.dest[:] = op.bounce
            self._free(op.bounce)
        req.user_data = None
        op.queue.put_tag(req)
        self._in_flight.discard(op)
        self._wake_tag_waiter()
        if not self._in_flight:
            _wake_all(self._idle_waiters)
        if fut.done():
            return  # cancelled by its caller
        if self._gone is not None:
            fut.set_exception(self._gone_error())
        elif status == _OK:
            fut.set_result(None)
        else:
            fut.set_exception(status_error(status, op.what))

    # -- shared memory -----------------------------------------------------------------------
    async def _alloc(self, size: int) -> memoryview:
        """A bounce buffer; when shared memory is exhausted, wait for in-flight requests to
        give theirs back (with nothing in flight, nothing will: MemoryError)."""
        while True:
            self._check_usable()
            try:
                return self.disk.buffer(size)
            except MemoryError:
                if not self._in_flight:
                    raise
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._memory_waiters.append(waiter)
            await waiter

    def _free(self, bounce: memoryview) -> None:
        self.disk.free_buffer(bounce)
        _wake_all(self._memory_waiters)

    def _address(self, view: memoryview) -> int:
        gpa = self._requests.address_of(view)
        assert gpa is not None, "Disk.buffer() returned memory outside the shared region"
        return gpa

    # -- loop callbacks -----------------------------------------------------------------------
    def _on_call(self, q: HardwareQueue) -> None:
        """The device signalled ``q``'s call eventfd: reset it and reap."""
        try:
            os.read(q.call_fd, 8)
        except BlockingIOError:
            pass  # already read (the device makes the fd nonblocking, so may we)
        try:
            q.process_completions()
        except Exception as exc:  # a device that broke the ring protocol
            self._fail(exc)

    def _arm_timer(self, due: float) -> None:
        self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        """Reset the rings whose oldest request is due, then sleep until the next is."""
        self._timer = None
        due: float | None = None
        for q in self._queues:
            try:
                next_due = q.expire()
            except Exception as exc:  # a device that broke the ring while we reaped it
                self._fail(exc)
                return
            if next_due is not None and (due is None or next_due < due):
                due = next_due
        if due is not None and self._gone is None and not self._closed:
            self._arm_timer(due)

    def _on_hangup(self) -> None:
        if not self._hangup.poll(0):
            return
        q = self._queues[0] if self._queues else None
        on_lost = None if q is None else q.on_lost
        if q is None or on_lost is None:
            self._fail(DeviceGoneError(errno.ECONNRESET, f"{self.disk.name}: the device went away"))
            return
        # The disk reconnects: stop watching the dead connection (it would wake us for
        # ever) and wait, off the loop, for the queues to resume; what is submitted
        # meanwhile is parked on them, what was on the rings goes out again.
        self._loop.remove_reader(self._hangup.fileno())
        self._hangup.unregister(self._sock_fd)
        # Kept: the loop holds only a weak reference to its tasks.
        self._reconnect_task = self._loop.create_task(self._await_reconnect(q, on_lost))

    async def _await_reconnect(
        self, q: HardwareQueue, on_lost: Callable[[HardwareQueue], None]
    ) -> None:
        try:
            await asyncio.to_thread(on_lost, q)
            for queue in self._queues:
                await asyncio.to_thread(queue.wait_resumed)
        except Exception as exc:  # no device came back, or one that differs
            self._fail(exc)
            return
        if self._closed or self._gone is not None:
            return
        self._sock_fd = self.disk.device.frontend.fileno()
        self._hangup.register(self._sock_fd, select.EPOLLRDHUP)
        self._loop.add_reader(self._hangup.fileno(), self._on_hangup)
        if self._timed and self._timer is None:
            self._on_timer()  # a timer that fired while the queues were lost found nothing

    def _deliver(self, completed: list[Request]) -> None:
        """Run completion callbacks on the loop (a reconnect completes requests the dead
        device had answered from its own thread)."""
        def run() -> None:
            for req in completed:
                if req.callback is not None:
                    req.callback(req)
        self._loop.call_soon_threadsafe(run)

    def _gone_error(self) -> BaseException:
        gone = self._gone
        assert gone is not None
        if isinstance(gone, DeviceGoneError):
            return DeviceGoneError(*gone.args)  # a fresh traceback per waiter, same message
        return gone

    def _fail(self, exc: BaseException) -> None:
        """The device is gone or broken: fail every request and every waiter."""
        if self._gone is not None:
            return
        self._gone = exc
        self._unregister()
        for q in self._queues:
            q.fail(exc)
            q.abort_all()  # completes each in-flight request through _complete
        for waiter in [*self._tag_waiters, *self._memory_waiters]:
            if not waiter.done():
                waiter.set_exception(self._gone_error())
        self._tag_waiters.clear()
        self._memory_waiters.clear()
        _wake_all(self._idle_waiters)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"I/O on closed disk {self.disk.name}")
        if self._gone is not None:
            raise self._gone_error()

    def _unregister(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in self._queues:
            self._loop.remove_reader(q.call_fd)
            q.unlisten(self)
        self._loop.remove_reader(self._hangup.fileno())

    # -- lifecycle ------------------------------------------------------------------------------
    async def aclose(self, *, close_disk: bool = True) -> None:
        """Wait for in-flight requests, then close the disk (and its embedded device);
        ``close_disk=False`` leaves the disk open for its owner (the bench engine)."""
        if self._closed:
            return
        while self._in_flight and self._gone is None:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        self._closed = True
        if self._gone is None:
            self._unregister()
        self._hangup.close()
        if close_disk:
            await asyncio.to_thread(self.disk.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncDisk {self.disk.name} in flight={len(self._in_flight)}>"


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    """Resolve (and forget) every waiter that is still waiting."""
    pending = list(waiters)
    waiters.clear()
    for waiter in pending:
        if not waiter.done():
            waiter.set_result(None)


__all__ = ["AsyncDisk"]
