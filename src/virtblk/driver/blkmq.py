"""The queueing layer between the ``Disk`` and the virtqueues: tags, hardware queues, BUSY.

This is the part of blk-mq the seed driver leans on.  A :class:`HardwareQueue` owns one
virtqueue and a fixed set of tags.  Each tag has a request header and a status byte in
shared memory, allocated once, so submitting a request writes 17 bytes and a descriptor
chain and allocates nothing.  Submission and completion follow ``virtio_queue_rq`` and
``virtblk_done``:

* a request that does not fit in the ring is parked (BUSY) and resubmitted, in order, when
  completions free descriptors (the seed stops the hardware queue and restarts it from
  ``virtblk_done``);
* the device is notified only for the last request of a batch (``bd->last``), and only when
  ``kick_prepare`` says it wants to be;
* completions are drained with callbacks disabled, then re-enabled with a race check;
* with a ``request_timeout``, a request the device keeps too long fails with ETIMEDOUT and
  the ring is reset (:meth:`HardwareQueue.expire`), the job of blk-mq's timeout handler.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from virtblk.errors import STATUS_TIMED_OUT, DeviceGoneError, status_error
from virtblk.spec import ZONE_REPORT_HEADER, RequestHeader, RequestType, Status
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.split_driver import DeviceProtocolError, DriverVirtqueue, QueueFull

DriverRing = DriverVirtqueue | PackedDriverVirtqueue
"""The driver's end of either ring layout: the two share one interface, so a queue does not
care which it drives (``VirtioBlk`` picks one at negotiation)."""

Segments = Sequence[tuple[int, int]]
"""Buffers in guest memory as ``(guest physical address, length)`` pairs."""

CompletionCallback = Callable[["Request"], None]

SLOT = 32
"""Bytes of a tag's shared area: its 16-byte header, the status byte at 16, padding."""
_EVENTFD_ONE = (1).to_bytes(8, "little")
_IOERR = int(Status.IOERR)
_ZONE_REPORT = int(RequestType.ZONE_REPORT)
_HEADER = RequestHeader.FORMAT
_STATUS_PENDING = 0xFF  # not a valid status: a device that completes without writing one shows
_OK = int(Status.OK)
log = logging.getLogger("virtblk.driver")


def short_status(status: int, written: int, need: int, where: str) -> int:
    """The status of a request whose used length ``written`` is short of the ``need``
    bytes it gave the device to write (its data, then the status byte).

    The spec lets a driver trust no byte beyond the used length (VIRTIO 1.2, 2.7.8.2), so
    an OK there is not believed: its data would be whatever the buffer held before (a
    bounce buffer: another request's data).  It fails with IOERR.  A failure status is
    kept (a device may answer a failed read with used length 1, as ours does),
    and a used length of 0 (the chain rejected) is IOERR, as the status byte is unwritten.
    Both completion loops (``HardwareQueue``'s and ``QueueHandle``'s) call this, only
    when the one comparison they make per completion finds a short used length.
    """
    if written and status != _OK:
        return status
    if written:
        log.warning("%s: the device answered OK with used length %d, short of the %d bytes "
                    "it had to write: the request fails with EIO", where, written, need)
    return _IOERR


class RingControl(Protocol):
    """What a queue needs of the device to reset its ring (``VirtioBlk`` provides it)."""

    def stop_ring(self, index: int) -> None:
        """Stop ring ``index`` on the device (GET_VRING_BASE): once this returns, the device
        touches neither the ring nor the buffers of the chains it still held."""

    def start_ring(self, index: int, depth: int) -> DriverRing:
        """A fresh ring for queue ``index``, announced to the device."""

    def ring_lost(self, index: int, exc: BaseException) -> None:
        """The device did not let ring ``index`` be stopped or restarted (``exc``): the
        connection is dead and memory the device may still write must never be reused."""


class Batch:
    """The requests of one submission batch still on the ring, and when they are due: one
    clock read per batch, not per request (``request_timeout``)."""

    __slots__ = ("deadline", "outstanding")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.outstanding = 0


class Request:
    """One in-flight virtio-blk request, reused per tag (no per-I/O object churn).

    ``status`` and ``written`` are valid once ``done`` is true; ``user_data`` is the caller's.
    ``need`` is the used length a complete answer has: the bytes of ``in_bufs`` and the
    status byte (for a zone report, its header and the status byte).  ``batch`` is the
    submission batch it went to the ring with, when the queue has a request timeout.
    ``queued`` is set when it is handed to the queue (ring or BUSY list), so a submitter
    interrupted anywhere (Ctrl-C) can tell whether its tag comes back by the completion.
    """

    __slots__ = (
        "batch",
        "callback",
        "done",
        "in_bufs",
        "need",
        "out_bufs",
        "queued",
        "sector",
        "seq",
        "status",
        "tag",
        "type",
        "user_data",
        "written",
    )

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self.type = 0
        self.sector = 0
        self.out_bufs: Segments = ()
        self.in_bufs: Segments = ()
        self.need = 1
        self.seq = 0  # when it went on the ring: resubmitted in this order after a reconnect
        self.user_data: Any = None
        self.callback: CompletionCallback | None = None
        self.status = _STATUS_PENDING
        self.written = 0
        self.done = False
        self.queued = False
        self.batch: Batch | None = None

    def error(self, what: str) -> OSError | None:
        """The OSError this request's status maps to (the seed's ``virtblk_result``), or None."""
        if self.status == Status.OK:
            return None
        return status_error(self.status, what)


class HardwareQueue:
    """One virtqueue with its tags, notification fds and completion handling.

    Thread-safe: any number of threads may submit and wait; one of the waiters polls the
    call eventfd at a time and completes requests for everyone.

    ``request_timeout`` (seconds, None: wait forever) bounds how long the device may keep
    a request; ``rings`` is what resets the ring when it does not (see :meth:`expire`).
    """

    # Slots, not a dict: every request reads a dozen of these, and CPython 3.11 shares (and
    # specializes the loads of) an instance dict's keys only up to 30 attributes; past
    # that each load takes the slow path (measured: +3% instructions per blocking read
    # when this class grew from 26 to 31 attributes).  A new attribute must be added here.
    __slots__ = (
        "_allocator", "_batches", "_busy", "_deliver", "_free_tags", "_frozen", "_hangup_fd",
        "_listeners", "_memory", "_open_batch", "_owner", "_poll", "_poller_active",
        "_requests", "_rings", "_seq", "_slots", "_slots_gpa", "_stopped", "_unkicked",
        "broken", "call_fd", "cond", "depth", "index", "kick_fd", "lost", "name", "on_lost",
        "request_timeout", "stats_busy", "stats_interrupts", "stats_kicks",
        "stats_resubmitted", "stats_submitted", "stats_timeouts", "vq",
    )

    def __init__(
        self,
        index: int,
        vq: DriverRing,
        memory: GuestMemory,
        allocator: BufferAllocator,
        *,
        depth: int,
        kick_fd: int,
        call_fd: int,
        hangup_fd: int | None = None,
        rings: RingControl | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.index = index
        self.name = f"req.{index}"
        self.vq = vq
        self.depth = depth
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self._memory = memory
        self._allocator = allocator
        self._slots_gpa = allocator.alloc(depth * SLOT, align=64)
        self._slots = memory.view(self._slots_gpa, depth * SLOT)
        self._requests = [Request(tag) for tag in range(depth)]
        self._free_tags = list(range(depth - 1, -1, -1))
        self._busy: collections.deque[Request] = collections.deque()
        self._unkicked = False
        self._frozen = False
        self._stopped = False  # frozen and drained: the ring is the device's no more
        self.cond = threading.Condition()
        self._poller_active = False
        self._owner: object | None = None  # a QueueHandle driving the ring itself
        self._listeners: set[int] = set()  # ids of those reaping from the call eventfd
        self._deliver: Callable[[list[Request]], None] | None = None  # see ``listen``
        self.broken: BaseException | None = None
        self.lost = False
        """True from the device going away (``suspend``) to ``resume`` (or ``give_up``):
        a plain attribute, read by a queue handle at every wakeup."""
        self.on_lost: Callable[[HardwareQueue], None] | None = None
        """Called (without the queue's lock) when the device hangs up, instead of failing
        the queue: the disk reconnects (``VirtioBlk`` with a ``reconnect_timeout``)."""
        self._seq = 0
        self._hangup_fd = hangup_fd
        self.stats_resubmitted = 0
        self.stats_submitted = 0
        self.stats_busy = 0
        self.stats_kicks = 0
        self.stats_interrupts = 0
        self.vq = vq
        self._poll = select.poll()
        self._poll.register(call_fd, select.POLLIN)
        if hangup_fd is not None:
            self._poll.register(hangup_fd, select.POLLRDHUP)
        self._rings = rings
        self.request_timeout: float | None = None
        self._batches: collections.deque[Batch] | None = None  # None: no request timeout
        self._open_batch: Batch | None = None
        self.stats_timeouts = 0
        self.set_request_timeout(request_timeout)

    # -- a queue handle's exclusive use -----------------------------------------------------
    @property
    def slot_area(self) -> tuple[memoryview, int]:
        """The per-tag request area in shared memory and its gpa: tag ``t``'s 16-byte header
        is at ``SLOT * t``, its status byte 16 bytes further."""
        return self._slots, self._slots_gpa

    @property
    def owner(self) -> object | None:
        """The queue handle driving this queue's ring directly, if any."""
        return self._owner

    def claim(self, owner: object) -> None:
        """Hand the ring to ``owner`` (a ``QueueHandle``), which then submits and reaps on
        it without this queue's lock; tags, blocking I/O and freeze are refused meanwhile.
        The queue must be idle."""
        with self.cond:
            self._check_broken()
            if self._owner is not None:
                raise ValueError(f"{self.name} is already driven by {self._owner!r}")
            if self._listeners:
                raise ValueError(f"{self.name} is in use by an AsyncDisk, which reaps its "
                                 "completions; close it first")
            if self._frozen:
                raise ValueError(f"{self.name} is frozen")
            if self.in_flight() or self.vq.in_flight:
                raise ValueError(f"{self.name} has requests in flight; claim it idle")
            self._owner = owner

    def listen(
        self, listener: object, deliver: Callable[[list[Request]], None] | None = None
    ) -> None:
        """``listener`` (an ``AsyncDisk``) reaps this queue from its call eventfd: no queue
        handle may claim it meanwhile, and it may not be claimed now.  ``deliver`` runs
        the callbacks of requests a reconnect completes (``salvage``, on the reconnect's
        thread) where the listener wants them run: its event loop."""
        with self.cond:
            self._check_unowned()
            self._listeners.add(id(listener))
            if deliver is not None:
                self._deliver = deliver

    def unlisten(self, listener: object) -> None:
        """``listener`` reaps this queue no more."""
        with self.cond:
            self._listeners.discard(id(listener))
            if not self._listeners:
                self._deliver = None

    def release(self, owner: object) -> None:
        """End ``owner``'s claim; blocking I/O may use the queue again."""
        with self.cond:
            if self._owner is owner:
                self._owner = None
                self.cond.notify_all()

    def _check_unowned(self) -> None:
        if self._owner is not None:
            raise ValueError(f"{self.name} is driven by {self._owner!r}; close it first")

    # -- tags ---------------------------------------------------------------------------
    def get_tag(self, timeout: float | None = None) -> Request:
        """Take a free tag, waiting for completions when all are in use (blk-mq sleeps too)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._check_unowned()
            while not self._free_tags:
                self._check_broken()
                self._wait_locked(deadline)
            req = self._requests[self._free_tags.pop()]
        req.queued = False
        req.done = False
        req.status = _STATUS_PENDING
        req.written = 0
        return req

    def put_tag(self, req: Request) -> None:
        """Return a completed request's tag."""
        with self.cond:
            self._free_tags.append(req.tag)
            self.cond.notify_all()

    def put_unqueued(self, reqs: Sequence[Request]) -> list[Request]:
        """A submitter gave up (an exception, Ctrl-C) between taking tags and submitting:
        return the tags of those of ``reqs`` never handed to the queue, and return them.
        The others are on the ring or parked: their completion returns their tags."""
        with self.cond:
            unqueued = [req for req in reqs if not req.queued]
            self._free_tags.extend(req.tag for req in unqueued)
            self.cond.notify_all()
        return unqueued

    @property
    def tags_free(self) -> int:
        """How many tags are not in use."""
        return len(self._free_tags)

    # -- submission -----------------------------------------------------------------------
    def submit(
        self,
        req: Request,
        type_: int,
        sector: int,
        out_bufs: Segments = (),
        in_bufs: Segments = (),
        *,
        callback: CompletionCallback | None = None,
        user_data: Any = None,
        last: bool = True,
    ) -> None:
        """Queue ``req`` on the ring; notify the device if ``last`` (end of a batch).

        ``out_bufs`` are data the device reads (after the header), ``in_bufs`` data it
        writes (before the status byte).  A ring that is full parks the request (BUSY); it
        goes out, in order, as completions free room.
        """
        req.type = type_
        req.sector = sector
        req.out_bufs = out_bufs
        req.in_bufs = in_bufs
        req.callback = callback
        req.user_data = user_data
        base = req.tag * SLOT
        RequestHeader.FORMAT.pack_into(self._slots, base, type_, 0, sector)
        self._slots[base + 16] = _STATUS_PENDING
        with self.cond:
            self._check_broken()
            req.queued = True  # before: an interrupt in between leaks the tag, never reuses it
            if self._frozen or self._busy or not self._add_locked(req):
                self._busy.append(req)
                self.stats_busy += 1
            if last:
                self._kick_locked()

    def kick(self) -> None:
        """Notify the device of everything queued since the last kick, if it wants it."""
        with self.cond:
            self._kick_locked()

    def submit_batch(self, reqs: Sequence[Request]) -> None:
        """Queue requests whose ``type``, ``sector``, ``out_bufs``, ``in_bufs`` and
        ``callback`` the caller set, under one lock acquisition and with one kick.

        The libblkio way to keep a queue busy: a completed request may be resubmitted as
        it is (change only ``sector``), no ``put_tag``/``get_tag`` round trip needed.
        """
        slots = self._slots
        pack = _HEADER.pack_into
        for req in reqs:
            base = req.tag * SLOT
            pack(slots, base, req.type, 0, req.sector)
            slots[base + 16] = _STATUS_PENDING
            req.done = False
            req.status = _STATUS_PENDING
            req.written = 0
        with self.cond:
            self._check_broken()
            self._check_unowned()
            busy = self._busy
            for req in reqs:
                req.queued = True
                if self._frozen or busy or not self._add_locked(req):
                    busy.append(req)
                    self.stats_busy += 1
            self._kick_locked()

    def _add_locked(self, req: Request) -> bool:
        """Put ``req`` on the ring as its tag's prepared chain (header, data, status): the
        ring rewrites the tag's table only when the buffers differ from its last request,
        so a benchmark or a reused buffer rewrites nothing.  False when the ring is full."""
        hdr = self._slots_gpa + req.tag * SLOT
        vq = self.vq
        in_bufs = req.in_bufs
        vq.prepare(req.tag, ((hdr, RequestHeader.SIZE), *req.out_bufs),
                   (*in_bufs, (hdr + 16, 1)))
        if req.type == _ZONE_REPORT:
            # A report fills as many descriptors as there are zones, not its whole buffer:
            # the header is what a complete answer must cover (the reader trusts no
            # descriptor past the used length).
            req.need = 1 + ZONE_REPORT_HEADER.size
        else:
            need = 1
            for _, length in in_bufs:
                need += length
            req.need = need
        try:
            vq.add_prepared(req.tag)
        except QueueFull:
            return False
        req.seq = self._seq
        self._seq += 1
        self.stats_submitted += 1
        self._unkicked = True
        if self._batches is not None:
            self._stamp(req)
        return True

    def _send_parked_locked(self) -> None:
        """Put what was parked (BUSY, frozen) on the ring, in order, as far as it fits, and
        notify the device."""
        while self._busy and self._add_locked(self._busy[0]):
            self._busy.popleft()
        self._kick_locked()

    def _kick_locked(self) -> None:
        self._open_batch = None  # what is added after this kick is another batch
        if not self._unkicked:
            return
        self._unkicked = False
        if self.vq.kick_prepare():
            self.stats_kicks += 1
            try:
                os.write(self.kick_fd, _EVENTFD_ONE)
            except BlockingIOError:
                pass  # the counter is saturated: the device has a wakeup pending anyway

    # -- completion -------------------------------------------------------------------------
    def process_completions(self, *, rearm: bool = True) -> int:
        """Drain the used ring (``virtblk_done``); returns how many requests completed.

        ``rearm=False`` leaves device notifications disabled afterwards: a polling queue
        (libblkio's poll queues) reaps by reading the used ring, so the device need not
        signal the call eventfd at all.
        """
        with self.cond:
            return len(self._drain_locked(rearm))

    def _finish(self, used: list[tuple[int, int]], completed: list[Request]) -> None:
        """Mark the requests of the used entries ``used`` done with their status, and
        append them to ``completed`` (callbacks are the caller's to run)."""
        requests = self._requests
        slots = self._slots
        for tag, written in used:
            req = requests[tag]
            req.written = written
            status = slots[tag * SLOT + 16]
            if written < req.need:  # the answer does not cover the data and status
                status = short_status(status, written, req.need, f"{self.name} tag {tag}")
            req.status = status
            req.done = True
            completed.append(req)

    def _drain_locked(self, rearm: bool = True) -> list[Request]:
        if self._stopped or self._owner is not None:
            return []  # a queue handle owns the used ring: it reaps its own completions
        completed: list[Request] = []
        vq = self.vq
        error: DeviceProtocolError | None = None
        while True:
            vq.disable_cb()
            try:
                used = vq.get_used()
            except DeviceProtocolError as exc:
                # The device broke the ring: what it completed before the bad entry is
                # real; every other request on this queue fails with ``exc`` (the wait
                # loops raise ``broken``), so no waiter sleeps on a ring nobody reaps.
                error = exc
                used = exc.completed
                self.fail(exc)
            self._finish(used, completed)
            if error is not None or not rearm or vq.enable_cb():
                break
        if self._batches is not None:
            _retire(completed)
        if error is not None:
            for req in completed:
                if req.callback is not None:
                    req.callback(req)
            self.cond.notify_all()
            raise error
        if completed:
            # In case the queue is stopped waiting for ring space (the seed restarts it);
            # frozen, what is parked waits for thaw.
            while not self._frozen and self._busy and self._add_locked(self._busy[0]):
                self._busy.popleft()
            self._kick_locked()
            for req in completed:
                if req.callback is not None:
                    req.callback(req)
            self.cond.notify_all()
        return completed

    def wait_for(self, req: Request, timeout: float | None = None) -> None:
        """Block until ``req`` completes (any waiter may complete it for us)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not req.done:
                self._check_broken()
                self._wait_locked(deadline)

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Block until ``done()`` holds, completing requests meanwhile: how a layer above
        (the block layer's bios, whose completion is not one request's) waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not done():
                self._check_broken()
                self._wait_locked(deadline)

    def wait_any(self, timeout: float | None = None) -> int:
        """Wait for at least one completion (or the timeout); returns how many completed."""
        return len(self.reap(timeout))

    def reap(self, timeout: float | None = None) -> list[Request]:
        """Wait for at least one completion (or the timeout) and return the requests this
        call completed (callbacks have run).  With several threads waiting on one queue,
        each sees only what it drained itself: use callbacks or ``wait_for`` there."""
        with self.cond:
            completed = self._drain_locked()
            if completed:
                return completed
            self._check_broken()
            deadline = None if timeout is None else time.monotonic() + timeout
            return self._wait_locked(deadline)

    def _wait_locked(self, deadline: float | None) -> list[Request]:
        """Poll the call eventfd once (as the poller) or wait for the current poller.

        ``deadline`` is the caller's own (``TimeoutError``: the requests stay on the ring).
        With a request timeout the wait also ends when the oldest batch on the ring is
        due, and the ring is reset then (:meth:`expire`): one clock read per wakeup."""
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{self.name}: no completion before the timeout")
        until = deadline
        if self._batches is not None and not self.lost:
            # While the device is lost the requests wait for the reconnect, not for it.
            due = self._due()
            if due is not None:
                if time.monotonic() >= due:
                    self._expire_locked()
                    return []
                if until is None or due < until:
                    until = due
        if self._poller_active or self.lost:  # lost: ``resume`` or ``fail`` wakes us
            remaining = None if until is None else max(0.0, until - time.monotonic())
            self.cond.wait(remaining)
            return []
        self._poller_active = True
        self.cond.release()
        try:
            events = self._poll_once(until)
        finally:
            self.cond.acquire()
            self._poller_active = False
            # Whatever ends our poll (even an exception), a waiter asleep behind us takes
            # over polling once we release the lock.
            self.cond.notify_all()
        if events:
            self.stats_interrupts += 1
        try:
            completed = self._drain_locked()
        except DeviceProtocolError:
            completed = []  # the queue is broken: the callers' wait loops raise it
        return completed

    def _poll_once(self, deadline: float | None) -> bool:
        timeout_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        got_call = False
        for fd, ev in self._poll.poll(timeout_ms):
            if fd == self.call_fd:
                got_call = True
                try:
                    os.read(self.call_fd, 8)
                except BlockingIOError:
                    pass  # the device made the fd nonblocking and someone read it first
            elif ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                if self.on_lost is not None:
                    self.on_lost(self)
                else:
                    self.fail(DeviceGoneError(errno.ECONNRESET,
                                              f"{self.name}: the device went away"))
        return got_call

    # -- request timeout (blk-mq's timeout handler) ------------------------------------------
    def set_request_timeout(self, seconds: float | None) -> None:
        """Fail requests the device keeps longer than ``seconds`` with ETIMEDOUT and reset
        the ring (None: wait forever, at no cost per request).  Set it while idle."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"request_timeout must be a positive number of seconds, not "
                             f"{seconds!r}")
        if seconds is not None and self._rings is None:
            raise ValueError(f"{self.name}: a request timeout needs a way to reset the ring")
        with self.cond:
            self.request_timeout = seconds
            self._batches = None if seconds is None else collections.deque()
            self._open_batch = None
            for req in self._requests:
                req.batch = None

    def _stamp(self, req: Request) -> None:
        """Count ``req`` in the open batch, opening one (and reading the clock) when the
        last kick closed the previous one."""
        batch = self._open_batch
        if batch is None:
            assert self._batches is not None and self.request_timeout is not None
            batch = self._open_batch = Batch(time.monotonic() + self.request_timeout)
            self._batches.append(batch)
        batch.outstanding += 1
        req.batch = batch

    def _due(self) -> float | None:
        """When the oldest request on the ring is due (None: none is on it).  Batches are
        opened in time order, so the first one not yet empty is the oldest."""
        batches = self._batches
        assert batches is not None
        while batches and not batches[0].outstanding:
            batches.popleft()
        return batches[0].deadline if batches else None

    def expire(self) -> float | None:
        """Reset the ring if its oldest request is due; returns when the next one will be
        (None: nothing on the ring).  The blocking waits do this themselves when they wake;
        a caller that waits on an event loop (``AsyncDisk``) calls it from a timer.

        A request that stayed on the ring past its deadline makes the queue take the ring
        back from the device and start it afresh, so the queue is not left half-used:

        * The device is told to stop the ring (GET_VRING_BASE, bounded by the frontend's
          reply timeout); what it completed until then completes as usual.
        * Every request it still held fails with ETIMEDOUT, not only the ones due: none of
          them is known to be done, and the caller learns it at once instead of each
          waiting out its own deadline.  They are not resubmitted: the device just showed
          it does not serve them, and a write resent behind the caller's back could land
          after a newer one the caller issues on seeing the error (resubmitting what a
          device *lost* is the ``reconnect`` option's job).
        * Their buffers are free again, since the device answered that it stopped.
          Requests parked (BUSY, or frozen) were not on the ring: they go to the fresh one.
        * A device that does not answer that stop (or the fresh ring's setup) is dead: the
          connection is given up (:meth:`RingControl.ring_lost`: the socket is shut down,
          so every queue sees the hang-up, and nothing freed is reused), the requests fail
          with ETIMEDOUT and the queue with ``DeviceGoneError`` from then on.
        """
        with self.cond:
            if self._batches is None or self._stopped or self._owner is not None:
                return None
            due = self._due()
            if due is not None and time.monotonic() >= due:
                self._expire_locked()
                due = self._due()
            return due

    def _expire_locked(self) -> None:
        """The oldest request is due: reset the ring as :meth:`expire` describes."""
        self.stats_timeouts += 1
        frozen = self._frozen
        self._frozen = True  # what the drain frees goes to the fresh ring, not the old one

        def reap() -> None:
            try:
                self._drain_locked(rearm=False)
            except DeviceProtocolError:
                pass  # the queue is broken: its waiters raise that, not a timeout

        held_tags, lost = self.reset_ring(reap)
        held = [self._requests[tag] for tag in held_tags]
        log.warning("%s: %d request(s) not completed within %g s; %s", self.name, len(held),
                    self.request_timeout or 0,
                    "the ring was reset" if lost is None else f"the device is gone ({lost})")
        for req in held:
            req.status = STATUS_TIMED_OUT
            req.done = True
            req.batch = None
        if self._batches is not None:
            self._batches.clear()
        self._open_batch = None
        if lost is not None:
            self.fail(DeviceGoneError(
                errno.ETIMEDOUT, f"{self.name}: the device stopped answering after a request "
                f"timed out ({lost})"))
        self._frozen = frozen
        if self.broken is None and not frozen:
            self._send_parked_locked()
        for req in held:
            if req.callback is not None:
                req.callback(req)
        self.cond.notify_all()

    def reset_ring(self, reap: Callable[[], object]) -> tuple[list[int], BaseException | None]:
        """Take the ring back from the device and set it up afresh; returns the tags the
        device still held (their requests are over, their buffers ours again) and, when the
        device would not let go, why (then there is no fresh ring and the connection was
        given up with :meth:`RingControl.ring_lost` before this returns, so that nothing
        the device may still write is reused).

        ``reap`` takes what the device completed before it stopped, from ``self.vq``:
        the queue's own drain, or its owner's (a ``QueueHandle``).  The caller holds the
        queue's lock, or owns the queue."""
        assert self._rings is not None
        old = self.vq
        try:
            self._rings.stop_ring(self.index)
        except Exception as exc:  # no answer, a refusal, a closed socket: all the same here
            self._rings.ring_lost(self.index, exc)
            return old.detach_unused(), exc
        reap()
        held = old.detach_unused()
        if self.broken is not None:
            return held, None  # a broken ring stays so: its waiters raise why
        old.close()
        try:
            self.vq = self._rings.start_ring(self.index, self.depth)
        except Exception as exc:
            self._rings.ring_lost(self.index, exc)
            return held, exc
        return held, None

    # -- freeze and restore -----------------------------------------------------------------
    def freeze(self, timeout: float | None = None) -> None:
        """Stop issuing requests and wait for those on the ring to complete.

        Requests submitted while frozen are parked, as BUSY ones are, and go out on
        :meth:`thaw`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._check_unowned()
            self._frozen = True
            self._kick_locked()
            while self.vq.in_flight:
                self._check_broken()
                self._wait_locked(deadline)
            # From here until thaw the ring memory is rebuilt under us: reap nothing.
            self._stopped = True

    def thaw(self, vq: DriverRing) -> None:
        """Resume on ``vq`` (a fresh ring after a device reset) and send what was parked."""
        with self.cond:
            self.vq = vq
            self._frozen = False
            self._stopped = False
            self._send_parked_locked()
            self.cond.notify_all()

    # -- reconnect ---------------------------------------------------------------------------
    # The device went away and the disk dials it again (``VirtioBlk``'s reconnect).  The
    # queue is frozen meanwhile, as by ``freeze``, but without waiting for the ring (nobody
    # will complete it): what is submitted is parked, waiters sleep on the condition.
    # Then either the device resubmits from its in-flight buffer (``resume`` on the same
    # ring) or the driver does (``salvage``, then ``resume`` on a fresh ring).
    def suspend(self) -> None:
        """The device is gone: stop reaping and submitting until ``resume``."""
        with self.cond:
            self.lost = True
            self._frozen = True
            self._stopped = True
            self.cond.notify_all()
        self._wake_owner()

    def salvage(self) -> DriverRing:
        """Complete what the dead device published in the used ring, then take every
        request still on the ring off it and park it ahead of those that waited, in the
        order it was first submitted: ``resume`` on a fresh ring sends them again.
        Returns the old ring, for the caller to close (under the allocator's lock).
        The driver's own resubmission, for a device without the in-flight buffer."""
        with self.cond:
            # The used ring read as ``_drain_locked`` reads it, but the callbacks of an
            # AsyncDisk's requests must run on its event loop, not on this thread.
            try:
                used = self.vq.get_used()
            except DeviceProtocolError as exc:
                used = exc.completed  # what it published before the bad entry is real
                self.fail(exc)
            completed: list[Request] = []
            self._finish(used, completed)
            if self._batches is not None:
                _retire(completed)
            if self._deliver is not None:
                self._deliver(completed)
            else:
                for req in completed:
                    if req.callback is not None:
                        req.callback(req)
            self.cond.notify_all()
            if self.broken is not None:
                return self.vq  # the ring is broken: the waiters raise why
            outstanding = sorted((self._requests[tag] for tag in self.vq.detach_unused()),
                                 key=_by_seq)
            for req in outstanding:
                self._slots[req.tag * SLOT + 16] = _STATUS_PENDING
            if self._batches is not None:
                _retire(outstanding)  # stamped again when they go to the fresh ring
            self._busy.extendleft(reversed(outstanding))
            self.stats_resubmitted += len(outstanding)
            return self.vq

    def resume(self, vq: DriverRing, hangup_fd: int | None) -> None:
        """The device is back: serve ``vq`` (a fresh ring after ``salvage``, or the same
        one, which the device resubmits from its in-flight buffer), watch ``hangup_fd``
        (the new connection) and send what was parked."""
        with self.cond:
            if self._hangup_fd is not None:
                self._poll.unregister(self._hangup_fd)
            self._hangup_fd = hangup_fd
            if hangup_fd is not None:
                self._poll.register(hangup_fd, select.POLLRDHUP)
            self.lost = False
            if self._batches is not None and self.request_timeout is not None:
                # What the device resubmits from its in-flight buffer has the whole timeout
                # again: the outage was the reconnect's to bound, not the requests'.
                restart = time.monotonic() + self.request_timeout
                for batch in self._batches:
                    batch.deadline = max(batch.deadline, restart)
        self.thaw(vq)
        self._wake_owner()

    def _wake_owner(self) -> None:
        """A queue handle asleep on the call eventfd looks at the queue again."""
        try:
            os.write(self.call_fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: it is being woken anyway

    def wait_resumed(self) -> None:
        """Wait until a reconnect ends; raise what failed the queue if it failed."""
        with self.cond:
            while self.lost and self.broken is None:
                self.cond.wait()
            self._check_broken()

    def give_up(self, exc: BaseException) -> None:
        """No device came back (or one that differs): fail the queue with ``exc`` and wake
        every waiter, parked requests' too, to raise it."""
        with self.cond:
            self.fail(exc)
            self.cond.notify_all()
        self._wake_owner()

    # -- failure and teardown -------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Mark the queue broken: every waiter and every later call raises ``exc``."""
        if self.broken is None:
            self.broken = exc

    def _check_broken(self) -> None:
        if self.broken is not None:
            raise self.broken

    def in_flight(self) -> int:
        """Requests submitted (or parked as BUSY) and not yet completed."""
        return self.depth - len(self._free_tags)

    def abort_all(self) -> None:
        """Complete every request still in flight with IOERR, for good (the queue is being
        torn down): the ring is reaped no more, and a waiter asleep in poll is woken.  A
        request that comes later (from a thread racing the teardown) fails at once."""
        with self.cond:
            self._stopped = True
            self.fail(ValueError(f"I/O on closed queue {self.name}"))
            for tag in self.vq.detach_unused():
                req = self._requests[tag]
                req.status = Status.IOERR
                req.done = True
                if req.callback is not None:
                    req.callback(req)
            while self._busy:
                req = self._busy.popleft()
                req.status = Status.IOERR
                req.done = True
                if req.callback is not None:
                    req.callback(req)
            self.cond.notify_all()
        try:
            os.write(self.call_fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the poller is being woken anyway

    def close(self) -> None:
        """Release the shared slots and the ring's views of shared memory; the fds belong to
        the caller that created them."""
        self._poll.unregister(self.call_fd)
        self._slots.release()
        self._allocator.free(self._slots_gpa)
        self.vq.close()


def _by_seq(req: Request) -> int:
    return req.seq


def _retire(completed: list[Request]) -> None:
    """Take completed requests out of their batches' counts (``request_timeout`` only)."""
    for req in completed:
        batch = req.batch
        if batch is not None:
            batch.outstanding -= 1
            req.batch = None


def raise_for(req: Request, what: str) -> None:
    """Raise the request's error, if it failed."""
    exc = req.error(what)
    if exc is not None:
        raise exc
