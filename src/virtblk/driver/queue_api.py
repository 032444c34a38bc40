"""A queue-level API for speed, after libblkio's ``blkioq_*`` calls.

A :class:`QueueHandle` drives one hardware queue.  ``read``/``write``/``flush``/``discard``/
``write_zeroes`` only *enqueue* (nothing reaches the ring); :meth:`QueueHandle.do_io`
submits everything enqueued with one kick, then reaps completions, each a
:class:`Completion` carrying the caller's ``user_data`` and ``ret`` (0 or ``-errno``, as
``blkio_completion`` does).  Batching is therefore the caller's natural unit.

Data buffers must come from :meth:`Disk.buffer` (shared memory): the device reads and
writes them in place, so nothing is copied; any other buffer is refused.  A request is at
most :attr:`QueueHandle.max_transfer` bytes (one virtio request, no splitting: libblkio's
``max-transfer``).

``poll=True`` makes a polling queue: device notifications stay disabled (``disable_cb``) and
``do_io`` busy-reads the used ring instead of sleeping on the call eventfd, trading a CPU
for the wakeup latency (libblkio's poll queues, Linux's ``io_poll``).

A handle owns its hardware queue: don't mix it with the Disk's blocking I/O on the same
queue (a blocking waiter re-enables notifications and reaps on another thread).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import select
import time
from typing import Any

from virtblk.driver.blkmq import HardwareQueue, Request, Segments
from virtblk.driver.disk import Buffer, Disk
from virtblk.errors import BlockIOError, DeviceGoneError
from virtblk.spec import SECTOR_SHIFT, DiscardSegment, Feature, RequestType, Status

_OK = int(Status.OK)
_HANGUP_CHECK_EVERY = 4096
"""Empty polls between two looks at the vhost-user socket (a dead device never completes)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One finished request: ``ret`` is 0 or ``-errno`` (EIO, ENOTTY...); ``error_msg``
    says what failed, empty on success."""

    user_data: Any
    ret: int
    error_msg: str = ""


@dataclasses.dataclass(slots=True)
class _Queued:
    """A request enqueued and not submitted yet."""

    type: int
    sector: int
    out: Segments
    in_: Segments
    user_data: Any
    segment: DiscardSegment | None = None


class QueueHandle:
    """One hardware queue of ``disk``, driven by batches (see the module docstring)."""

    def __init__(self, disk: Disk, index: int = 0, *, poll: bool = False) -> None:
        queues = disk.device.queues
        if not 0 <= index < len(queues):
            raise ValueError(f"queue index {index} out of range: the disk has {len(queues)}")
        self.disk = disk
        self.index = index
        self.poll = poll
        self._q: HardwareQueue = queues[index]
        self._memory = disk.device.memory
        lim = disk.limits
        bs = disk.logical_block_size
        per_request = lim.max_segments * lim.max_segment_size
        self.max_transfer = per_request - per_request % bs
        """Largest read or write one request may carry, in bytes."""
        self._pending: collections.deque[_Queued] = collections.deque()
        self._ready: collections.deque[Completion] = collections.deque()
        self._in_flight = 0
        # One DISCARD / WRITE_ZEROES segment per tag, written when the tag is known.
        self._seg_area = disk.buffer(self._q.depth * DiscardSegment.SIZE)
        self._seg_gpa = self._address(self._seg_area)
        self._hangup = select.poll()
        self._hangup.register(disk.device.frontend.fileno(), select.POLLRDHUP)
        self._closed = False
        if poll:
            with self._q.cond:
                self._q.vq.disable_cb()

    # -- enqueue ----------------------------------------------------------------------------
    def read(self, offset: int, buf: Buffer, user_data: Any = None) -> None:
        """Enqueue a read of ``len(buf)`` bytes at ``offset`` into ``buf`` (from disk.buffer)."""
        segs = self._data_segments("read", offset, buf, writable=True)
        self._enqueue(_Queued(RequestType.IN, offset >> SECTOR_SHIFT, (), segs, user_data))

    def write(self, offset: int, buf: Buffer, user_data: Any = None) -> None:
        """Enqueue a write of ``buf`` (from disk.buffer) at ``offset``."""
        self._check_writable("write")
        segs = self._data_segments("write", offset, buf, writable=False)
        self._enqueue(_Queued(RequestType.OUT, offset >> SECTOR_SHIFT, segs, (), user_data))

    def flush(self, user_data: Any = None) -> None:
        """Enqueue a FLUSH.  Without the FLUSH feature writes are durable on completion, so
        the request completes (ret 0) at the next ``do_io`` without reaching the device."""
        self._check_open()
        if not self.disk.device.has(Feature.BLK_FLUSH):
            self._ready.append(Completion(user_data, 0))
            return
        self._enqueue(_Queued(RequestType.FLUSH, 0, (), (), user_data))

    def discard(self, offset: int, length: int, user_data: Any = None) -> None:
        """Enqueue a DISCARD of one range (at most ``max_discard_sectors``)."""
        self.disk.device.require(Feature.BLK_DISCARD, "discard")
        self._check_writable("discard")
        limit = self.disk.limits.max_discard_sectors
        seg = self._range_segment("discard", offset, length, limit, 0)
        self._enqueue(_Queued(RequestType.DISCARD, 0, (), (), user_data, seg))

    def write_zeroes(
        self, offset: int, length: int, user_data: Any = None, *, unmap: bool = False
    ) -> None:
        """Enqueue a WRITE_ZEROES of one range; ``unmap`` lets the device deallocate it."""
        self.disk.device.require(Feature.BLK_WRITE_ZEROES, "write_zeroes")
        self._check_writable("write_zeroes")
        limit = self.disk.limits.max_write_zeroes_sectors
        seg = self._range_segment("write_zeroes", offset, length, limit, int(unmap))
        self._enqueue(_Queued(RequestType.WRITE_ZEROES, 0, (), (), user_data, seg))

    def _check_writable(self, what: str) -> None:
        """Refuse changes to a read-only disk up front (EROFS), as ``Disk`` does."""
        if self.disk.read_only:
            raise BlockIOError(errno.EROFS, f"{self.disk.name}: {what}: the device is read-only")

    def _data_segments(
        self, what: str, offset: int, buf: Buffer, *, writable: bool
    ) -> list[tuple[int, int]]:
        self._check_open()
        view = memoryview(buf).cast("B")
        if writable and view.readonly:
            raise TypeError(f"{what}: the buffer must be writable")
        gpa = self._memory.guest_address_of(view)
        if gpa is None:
            raise TypeError(
                f"{what}: the buffer is not in shared memory; allocate it with "
                "disk.buffer(size) (the queue API never copies)"
            )
        length = len(view)
        self.disk.check_range(offset, length, f"{self.disk.name}: {what}")
        if length == 0:
            raise ValueError(f"{what}: empty buffer")
        if length > self.max_transfer:
            raise ValueError(
                f"{what}: {length} bytes exceed max_transfer ({self.max_transfer} bytes, "
                "the device's seg_max x size_max)"
            )
        (segs,) = self.disk.request_segments(gpa, length)
        return segs

    def _range_segment(
        self, what: str, offset: int, length: int, max_sectors: int, flags: int
    ) -> DiscardSegment:
        self.disk.check_range(offset, length, f"{self.disk.name}: {what}")
        sectors = length >> SECTOR_SHIFT
        if not sectors:
            raise ValueError(f"{what}: empty range")
        if max_sectors and sectors > max_sectors:
            raise ValueError(
                f"{what}: {sectors} sectors exceed the device's limit of {max_sectors} per request"
            )
        return DiscardSegment(offset >> SECTOR_SHIFT, sectors, flags)

    def _enqueue(self, item: _Queued) -> None:
        self._pending.append(item)

    # -- submit and reap ---------------------------------------------------------------------
    def do_io(
        self,
        min_completions: int = 0,
        max_completions: int | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Submit everything enqueued (one kick), then return between ``min_completions``
        and ``max_completions`` (None: no limit) completions.

        Waits (or, polling, spins) until ``min_completions`` are ready; ``timeout``
        (seconds, None: forever) bounds that wait with ``TimeoutError``, and completions
        not returned stay for the next call.  Requests beyond the free tags are submitted
        as completions free them.
        """
        self._check_open()
        limit = len(self._ready) + self._in_flight + len(self._pending)
        if min_completions > limit:
            # libblkio answers EINVAL too: the wait could never end.
            raise ValueError(
                f"min_completions {min_completions} exceeds the {limit} requests outstanding"
            )
        if max_completions is None:
            max_completions = limit
        if not 0 <= min_completions <= max_completions:
            raise ValueError(
                f"need 0 <= min_completions ({min_completions}) <= max_completions "
                f"({max_completions})"
            )
        self._submit()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.poll:
            self._spin(min_completions, deadline)
        else:
            self._sleep(min_completions, deadline)
        self._reap()
        self._submit()
        n = min(max_completions, len(self._ready))
        return [self._ready.popleft() for _ in range(n)]

    def _submit(self) -> None:
        q = self._q
        pending = self._pending
        submitted = 0
        while pending and q.tags_free:
            try:
                req = q.get_tag(timeout=0)
            except TimeoutError:
                break  # another thread took the last one
            item = pending.popleft()
            out = item.out
            if item.segment is not None:
                base = req.tag * DiscardSegment.SIZE
                self._seg_area[base : base + DiscardSegment.SIZE] = item.segment.pack()
                out = [(self._seg_gpa + base, DiscardSegment.SIZE)]
            q.submit(
                req,
                item.type,
                item.sector,
                out,
                item.in_,
                callback=self._complete,
                user_data=item.user_data,
                last=False,
            )
            submitted += 1
        if submitted:
            self._in_flight += submitted
            q.kick()

    def _reap(self) -> int:
        return self._q.process_completions(rearm=not self.poll)

    def _spin(self, wanted: int, deadline: float | None) -> None:
        """Busy-poll the used ring; the call eventfd is never read."""
        idle = 0
        q = self._q
        while len(self._ready) < wanted:
            # Peek at the used idx (one 16-bit load) before taking the queue lock.
            if q.vq.pending() and self._reap():
                self._submit()
                idle = 0
                continue
            idle += 1
            if idle % _HANGUP_CHECK_EVERY == 0:
                self._check_alive()
                if deadline is not None and time.monotonic() >= deadline:
                    self._timed_out(wanted)

    def _sleep(self, wanted: int, deadline: float | None) -> None:
        """Sleep on the call eventfd between completions."""
        q = self._q
        while len(self._ready) < wanted:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                q.wait_any(remaining)
            except TimeoutError:
                self._timed_out(wanted)
            self._submit()

    def _timed_out(self, wanted: int) -> None:
        raise TimeoutError(
            f"{self._q.name}: {len(self._ready)} of {wanted} completions before the timeout "
            f"({self._in_flight} still in flight)"
        )

    def _check_alive(self) -> None:
        if self._q.broken is not None:
            raise self._q.broken
        if self._hangup.poll(0):
            exc = DeviceGoneError(errno.ECONNRESET, f"{self._q.name}: the device went away")
            self._q.fail(exc)
            raise exc

    def _complete(self, req: Request) -> None:
        """Called by ``process_completions`` for each of our requests."""
        self._in_flight -= 1
        user_data = req.user_data
        status = req.status
        req.user_data = None
        self._q.put_tag(req)
        if status == _OK:
            self._ready.append(Completion(user_data, 0))
            return
        exc = req.error(f"{self.disk.name}: {RequestType(req.type).name.lower()}")
        assert exc is not None and exc.errno is not None
        self._ready.append(Completion(user_data, -exc.errno, str(exc.strerror)))

    # -- state ---------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests enqueued and not yet submitted."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return self._in_flight

    def _address(self, view: memoryview) -> int:
        gpa = self._memory.guest_address_of(view)
        assert gpa is not None, "Disk.buffer() returned memory outside the shared region"
        return gpa

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._q.name}: the queue handle is closed")

    def close(self) -> None:
        """Wait for what is in flight, turn notifications back on, free the handle's memory.
        Requests still enqueued are dropped."""
        if self._closed:
            return
        self._pending.clear()
        q = self._q
        if q.broken is None:
            try:
                while self._in_flight:
                    if self._reap():
                        continue
                    if self.poll:
                        self._check_alive()
                    else:
                        q.wait_any()
            finally:
                q.process_completions()  # rearms notifications for the next owner
        self._closed = True
        self.disk.free_buffer(self._seg_area)

    def __enter__(self) -> QueueHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "poll" if self.poll else "interrupt"
        return (
            f"<QueueHandle {self._q.name} {mode} pending={len(self._pending)} "
            f"in_flight={self._in_flight}>"
        )


def queues(disk: Disk, *, poll: bool = False) -> list[QueueHandle]:
    """A handle for each of the disk's hardware queues (libblkio's ``blkio_get_queue``)."""
    return [QueueHandle(disk, i, poll=poll) for i in range(disk.num_queues)]


__all__ = ["Completion", "QueueHandle", "queues"]
