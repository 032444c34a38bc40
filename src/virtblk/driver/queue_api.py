"""A queue-level API for speed, after libblkio's ``blkioq_*`` calls.

A :class:`QueueHandle` drives one hardware queue.  ``read``/``write``/``flush``/``discard``/
``write_zeroes`` only *enqueue* (nothing reaches the ring); :meth:`QueueHandle.do_io`
submits everything enqueued with one kick, then reaps completions, each a
:class:`Completion` carrying the caller's ``user_data`` and ``ret`` (0 or ``-errno``, as
``blkio_completion`` does).  Batching is therefore the caller's natural unit.

This is the fast path, built the way libblkio builds its queues:

* A handle *owns* its hardware queue (``HardwareQueue.claim``): one thread drives it, so it
  takes no lock at all.  Blocking ``Disk`` I/O uses the other queues meanwhile.
* Data buffers must come from :meth:`Disk.buffer` (shared memory): the device reads and
  writes them in place, and the disk already knows their guest address, so an I/O costs no
  address lookup; any other buffer is refused.  A request is at most
  :attr:`QueueHandle.max_transfer` bytes (one virtio request, no splitting: libblkio's
  ``max-transfer``).
* Each tag keeps its chain prepared on the ring (``DriverVirtqueue.prepare``): a tag that
  carries the same buffer again rewrites nothing but its 16-byte header.
* ``do_io(min_completions=N)`` sleeps until N completions are there and asks the device
  for no interrupt before that (``enable_cb(N - 1)``): a caller that waits for a batch is
  woken once per batch, not once per completion.

``poll=True`` makes a polling queue: device notifications stay disabled and ``do_io``
busy-reads the used ring instead of sleeping on the call eventfd, trading a CPU for the
wakeup latency (libblkio's poll queues, Linux's ``io_poll``).  ``poll_us`` is the middle
way, QEMU's adaptive polling: spin up to that long before sleeping, for as long as spinning
keeps finding completions in time.

With the disk's ``request_timeout``, a request the device keeps too long completes with
``ret = -ETIMEDOUT`` and the ring is reset (the other requests on it complete so too; see
``HardwareQueue.expire``): a deadline per ``do_io`` submission, one clock read per batch,
checked when the handle wakes.  ``do_io``'s own ``timeout`` is the caller's wait, and
raises ``TimeoutError`` with the requests still on the ring.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import time
from typing import Any, NamedTuple, NoReturn

from virtblk.driver.blkmq import SLOT, Batch, HardwareQueue, short_status
from virtblk.driver.disk import Disk
from virtblk.driver.requests import Buffer, Segments
from virtblk.errors import STATUS_TIMED_OUT, DeviceGoneError, status_error
from virtblk.spec import SECTOR_SHIFT, DiscardSegment, Feature, RequestHeader, RequestType, Status
from virtblk.virtio.polling import AdaptivePoll
from virtblk.virtio.split_driver import DeviceProtocolError

_OK = int(Status.OK)
_IN, _OUT = int(RequestType.IN), int(RequestType.OUT)
_STATUS_PENDING = 0xFF
_EVENTFD_ONE = (1).to_bytes(8, "little")
_pack_header = RequestHeader.FORMAT.pack_into
_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
_HANGUP_CHECK_EVERY = 4096
"""Empty polls between two looks at the vhost-user socket (a dead device never completes)."""
_CLOSE_TIMEOUT = 10.0
"""How long ``close`` waits for requests still on the ring (as ``Disk.close`` does)."""


class Completion(NamedTuple):
    """One finished request: ``ret`` is 0 or ``-errno`` (EIO, ENOTTY...); ``error_msg``
    says what failed, empty on success."""

    user_data: Any
    ret: int
    error_msg: str = ""


_new_completion = tuple.__new__


class QueueHandle:
    """One hardware queue of ``disk``, driven by batches (see the module docstring).

    Not thread-safe by design: one thread drives a handle.  Close it (or use ``with``) to
    give the queue back to the disk's blocking I/O.
    """

    __slots__ = (
        "_batch_of_tag", "_batches", "_bs_mask", "_buffers", "_closed", "_config_generation",
        "_dev", "_disable_cb",
        "_free", "_hangup", "_hdr_of_tag", "_in_flight", "_layout", "_max_segments",
        "_need_of_tag", "_pending", "_poll", "_q", "_read_only", "_ready", "_requests", "_seg_area",
        "_seg_of_tag", "_size", "_slots", "_sock_fd", "_staged", "_status_of_tag", "_type_of_tag",
        "_user_data", "_vq", "_waiter", "disk", "index", "max_transfer", "poll",
    )

    def __init__(
        self, disk: Disk, index: int = 0, *, poll: bool = False, poll_us: float = 0,
        disable_cb_while_draining: bool = True,
    ) -> None:
        """``disable_cb_while_draining=False`` keeps device notifications enabled while
        completions are reaped: the completion loop before the seed's commit "virtio_blk:
        Disable callback in virtblk_done()", kept to measure that commit."""
        queues = disk.device.queues
        if not 0 <= index < len(queues):
            raise ValueError(f"queue index {index} out of range: the disk has {len(queues)}")
        if poll_us < 0:
            raise ValueError(f"poll_us must be >= 0, got {poll_us}")
        q = queues[index]
        self.disk = disk
        self.index = index
        self.poll = poll
        self._poll = AdaptivePoll(int(poll_us * 1000), restart_after=1)  # QEMU's rule
        self._disable_cb = disable_cb_while_draining
        self._q: HardwareQueue = q
        # The disk's request rules, and what the enqueue path reads of them inline: the
        # limits and the block size (fixed), the size (refreshed when the config changes).
        self._requests = disk.requests
        self.max_transfer = self._requests.max_transfer
        """Largest read or write one request may carry, in bytes."""
        self._max_segments = disk.limits.max_segments
        self._bs_mask = disk.logical_block_size - 1
        self._size = disk.size
        self._dev = disk.device
        self._config_generation = self._dev.config_generation
        self._read_only = disk.read_only
        self._buffers = self._requests.buffers
        # Requests enqueued: on a tag already (staged) when one was free, else pending.
        self._pending: collections.deque[tuple[int, int, Segments, bool, Any]] = (
            collections.deque())
        self._staged: list[int] = []
        self._ready: collections.deque[Completion] = collections.deque()
        self._in_flight = 0
        self._closed = False
        depth = q.depth
        # One DISCARD / WRITE_ZEROES segment per tag, written when the tag is known.
        self._seg_area = disk.buffer(depth * DiscardSegment.SIZE)
        seg_gpa = disk.buffer_address(self._seg_area)
        assert seg_gpa is not None
        self._seg_of_tag: list[Segments] = [
            ((seg_gpa + tag * DiscardSegment.SIZE, DiscardSegment.SIZE),) for tag in range(depth)]
        self._sock_fd = disk.device.frontend.fileno()
        self._hangup = select.poll()
        self._hangup.register(self._sock_fd, select.POLLRDHUP)
        self._waiter = select.poll()
        self._waiter.register(q.call_fd, select.POLLIN)
        self._waiter.register(self._sock_fd, select.POLLRDHUP)
        q.claim(self)
        try:
            self._vq = q.vq
            self._slots, slots_gpa = q.slot_area
            self._hdr_of_tag = [((slots_gpa + tag * SLOT, RequestHeader.SIZE),)
                                for tag in range(depth)]
            self._status_of_tag = [((slots_gpa + tag * SLOT + 16, 1),) for tag in range(depth)]
            self._free: collections.deque[int] = collections.deque(range(depth))
            self._user_data: list[Any] = [None] * depth
            self._type_of_tag = [0] * depth
            # What each tag's prepared chain carries: (data segments, device writes them).
            self._layout: list[tuple[Segments, bool] | None] = [None] * depth
            # The used length a complete answer on each tag's chain has: its device-
            # writable data and the status byte (set with the chain, in ``_prepare``).
            self._need_of_tag = [1] * depth
            # request_timeout: the batches on the ring, oldest first, and each tag's.
            self._batches: collections.deque[Batch] | None = (
                None if q.request_timeout is None else collections.deque())
            self._batch_of_tag: list[Batch | None] = [None] * depth
            if poll:
                self._vq.disable_cb()
            disk._register_handle(self)
        except BaseException:
            q.release(self)
            raise

    # -- enqueue ----------------------------------------------------------------------------
    def read(self, offset: int, buf: Buffer, user_data: Any = None) -> None:
        """Enqueue a read of ``len(buf)`` bytes at ``offset`` into ``buf`` (from disk.buffer)."""
        self._enqueue(_IN, offset, buf, user_data)

    def write(self, offset: int, buf: Buffer, user_data: Any = None) -> None:
        """Enqueue a write of ``buf`` (from disk.buffer) at ``offset``."""
        if self._read_only or self._closed:
            self._check_writable("write")
        self._enqueue(_OUT, offset, buf, user_data)

    def _enqueue(self, rtype: int, offset: int, buf: Buffer, user_data: Any) -> None:
        """A read (``_IN``) or write (``_OUT``): onto a free tag at once when there is one
        (``_stage``: nothing on the ring before ``do_io``), else into the pending queue.
        The common case costs no lookup beyond the disk's own registry: a buffer as
        disk.buffer() made it, a size that is current, a tag whose chain already carries
        this buffer.  The registry lookup and the range test are the disk's
        ``RequestBuilder`` rules written inline (a call each would cost this path more
        than the rest of it); what they refuse is refused by the builder, with its
        message."""
        if self._closed:
            self._check_open()
        if self._dev.config_generation != self._config_generation:
            self._refresh_size()
        into = rtype == _IN
        entry = self._buffers.get(id(buf))
        if entry is not None and entry[0] is buf and len(entry[2]) <= self._max_segments:
            segs = entry[2]
            length = len(buf)
        else:
            segs, length = self._segments("read" if into else "write", buf, writable=into)
        if (offset | length) & self._bs_mask or offset < 0 or offset + length > self._size:
            self._check_range("read" if into else "write", offset, length)
        free = self._free
        if not free or self._pending:
            self._pending.append((rtype, offset >> SECTOR_SHIFT, segs, into, user_data))
            return
        self._stage(free.popleft(), rtype, offset >> SECTOR_SHIFT, segs, into, user_data)

    def flush(self, user_data: Any = None) -> None:
        """Enqueue a FLUSH.  In write-through mode (or without the FLUSH feature) writes are
        durable on completion, so, as in the seed, the request completes (ret 0) at the
        next ``do_io`` without reaching the device."""
        self._check_open()
        if not self._requests.flush_needed:
            self._ready.append(Completion(user_data, 0))
            return
        self._pending.append((int(RequestType.FLUSH), 0, (), False, user_data))

    def discard(self, offset: int, length: int, user_data: Any = None) -> None:
        """Enqueue a DISCARD of one range (at most ``max_discard_sectors``)."""
        self.disk.device.require(Feature.BLK_DISCARD, "discard")
        self._check_writable("discard")
        seg = self._range_segment(RequestType.DISCARD, offset, length, unmap=False)
        self._pending.append((int(RequestType.DISCARD), 0, (), False, (seg, user_data)))

    def write_zeroes(
        self, offset: int, length: int, user_data: Any = None, *, unmap: bool = False
    ) -> None:
        """Enqueue a WRITE_ZEROES of one range; ``unmap`` lets the device deallocate it."""
        self.disk.device.require(Feature.BLK_WRITE_ZEROES, "write_zeroes")
        self._check_writable("write_zeroes")
        seg = self._range_segment(RequestType.WRITE_ZEROES, offset, length, unmap=unmap)
        self._pending.append((int(RequestType.WRITE_ZEROES), 0, (), False, (seg, user_data)))

    def _check_writable(self, what: str) -> None:
        self._check_open()
        self._requests.check_writable(f"{self.disk.name}: {what}")

    def _segments(self, what: str, buf: Buffer, *, writable: bool) -> tuple[Segments, int]:
        """The slow path of ``read``/``write``: a buffer the disk did not hand out as is
        (a slice of one, say), or one that is refused with the reason."""
        self._check_open()
        view = memoryview(buf).cast("B")
        if writable and view.readonly:
            raise TypeError(f"{what}: the buffer must be writable")
        gpa = self._requests.address_of(view)
        if gpa is None:
            raise TypeError(
                f"{what}: the buffer is not in shared memory; allocate it with "
                "disk.buffer(size) (the queue API never copies)"
            )
        length = len(view)
        if length == 0:
            raise ValueError(f"{what}: empty buffer")
        if length > self.max_transfer:
            raise ValueError(
                f"{what}: {length} bytes exceed max_transfer ({self.max_transfer} bytes, "
                "the device's seg_max x size_max)"
            )
        return self._requests.segments(gpa, length), length

    def _refresh_size(self) -> None:
        """The device's config changed (a resize): take the new size."""
        self._config_generation = self.disk.device.config_generation
        self._size = self.disk.size

    def _check_range(self, what: str, offset: int, length: int) -> None:
        self._requests.check_range(offset, length, f"{self.disk.name}: {what}")

    def _range_segment(
        self, type_: RequestType, offset: int, length: int, *, unmap: bool
    ) -> DiscardSegment:
        """The one segment a DISCARD / WRITE_ZEROES carries here: a tag holds one, and a
        range the device would need split is refused (as ``max_transfer`` is)."""
        what = type_.name.lower()
        self._check_range(what, offset, length)
        sectors = length >> SECTOR_SHIFT
        if not sectors:
            raise ValueError(f"{what}: empty range")
        limit = self._requests.max_range_sectors(type_) or 0xFFFFFFFF  # a segment's u32
        if sectors > limit:
            raise ValueError(
                f"{what}: {sectors} sectors exceed the device's limit of {limit} per request")
        return DiscardSegment(offset >> SECTOR_SHIFT, sectors, 1 if unmap else 0)

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
        ready = self._ready
        limit = len(ready) + self._in_flight + len(self._pending) + len(self._staged)
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
        if self._vq is not self._q.vq:  # the disk reconnected to its device meanwhile
            self._adopt()
        if self._staged or self._pending:
            self._submit()
        if self._in_flight:
            self._reap()
        if len(ready) < min_completions:
            deadline = None if timeout is None else time.monotonic() + timeout
            if self.poll:
                self._spin(min_completions, deadline)
            else:
                self._sleep(min_completions, deadline)
        if len(ready) <= max_completions:
            done = list(ready)
            ready.clear()
            return done
        return [ready.popleft() for _ in range(max_completions)]

    def _stage(
        self, tag: int, rtype: int, sector: int, segs: Segments, into: bool, ud: Any
    ) -> None:
        """Make ``tag`` carry a request: its header and status byte written, its chain
        prepared (rewritten only when its buffers changed).  Nothing reaches the ring
        before ``_submit``."""
        if rtype <= _OUT:  # IN (0) or OUT (1), the only types whose buffers vary
            shape = self._layout[tag]
            if shape is None or shape[0] is not segs or shape[1] != into:
                self._prepare(tag, segs, into)
        else:
            ud = self._prepare_other(tag, rtype, ud)
        base = tag * SLOT
        slots = self._slots
        _pack_header(slots, base, rtype, 0, sector)
        slots[base + 16] = _STATUS_PENDING
        self._user_data[tag] = ud
        self._type_of_tag[tag] = rtype
        self._staged.append(tag)

    def _submit(self) -> None:
        """Put what is staged (and what is pending, as far as tags go) on the ring; one
        kick."""
        pending = self._pending
        free = self._free
        while pending and free:
            self._stage(free.popleft(), *pending.popleft())
        staged = self._staged
        if not staged:
            return
        vq = self._vq
        submitted = vq.add_prepared_batch(staged)
        if submitted and self._batches is not None:
            self._stamp(staged[:submitted])
        # A ring without indirect descriptors may run out of them: what did not fit stays
        # staged, in order, for when completions free some.
        del staged[:submitted]
        if submitted:
            self._in_flight += submitted
            q = self._q
            q.stats_submitted += submitted
            if vq.kick_prepare():
                q.stats_kicks += 1
                try:
                    os.write(q.kick_fd, _EVENTFD_ONE)
                except BlockingIOError:
                    pass  # the counter is saturated: the device has a wakeup pending anyway

    def _prepare(self, tag: int, segs: Segments, into: bool) -> None:
        """Write ``tag``'s chain for a read (``into``) or write of ``segs``."""
        try:
            if into:
                self._vq.prepare(tag, self._hdr_of_tag[tag], segs + self._status_of_tag[tag])
            else:
                self._vq.prepare(tag, self._hdr_of_tag[tag] + segs, self._status_of_tag[tag])
        except BaseException:
            self._layout[tag] = None
            raise
        self._layout[tag] = (segs, into)
        self._need_of_tag[tag] = 1 + sum(n for _, n in segs) if into else 1

    def _prepare_other(self, tag: int, rtype: int, ud: Any) -> Any:
        """FLUSH, DISCARD, WRITE_ZEROES: their chains (with the tag's segment for the last
        two); returns the caller's user data."""
        segs: Segments = ()
        if rtype != RequestType.FLUSH:
            seg, ud = ud
            base = tag * DiscardSegment.SIZE
            self._seg_area[base : base + DiscardSegment.SIZE] = seg.pack()
            segs = self._seg_of_tag[tag]
        self._layout[tag] = None
        self._need_of_tag[tag] = 1
        self._vq.prepare(tag, self._hdr_of_tag[tag] + segs, self._status_of_tag[tag])
        return ud

    def _reap(self) -> int:
        """Take what the device completed; each becomes a Completion in ``ready``."""
        vq = self._vq
        try:
            used = vq.get_used()
        except DeviceProtocolError as exc:
            self._q.fail(exc)
            self._complete(exc.completed)
            raise
        if used:
            self._complete(used)
        return len(used)

    def _complete(self, used: list[tuple[int, int]]) -> None:
        slots = self._slots
        user_data = self._user_data
        need = self._need_of_tag
        free = self._free
        ready = self._ready
        for tag, written in used:
            status = slots[tag * SLOT + 16]
            ud = user_data[tag]
            user_data[tag] = None
            free.append(tag)
            # An answer whose used length does not cover the data and the status byte is
            # not believed (``short_status``): the data would be what the buffer held.
            if status == _OK and written >= need[tag]:
                ready.append(_new_completion(Completion, (ud, 0, "")))
            else:
                ready.append(self._failed(tag, status, written, ud))
        self._in_flight -= len(used)
        if self._batches is not None:
            batch_of_tag = self._batch_of_tag
            for tag, _ in used:
                batch = batch_of_tag[tag]
                if batch is not None:
                    batch.outstanding -= 1
                    batch_of_tag[tag] = None

    # -- request timeout ---------------------------------------------------------------------
    def _stamp(self, tags: list[int]) -> None:
        """The tags just put on the ring are one batch, due ``request_timeout`` from now."""
        assert self._batches is not None and self._q.request_timeout is not None
        batch = Batch(time.monotonic() + self._q.request_timeout)
        batch.outstanding = len(tags)
        self._batches.append(batch)
        batch_of_tag = self._batch_of_tag
        for tag in tags:
            batch_of_tag[tag] = batch

    def _due(self) -> float | None:
        """When the oldest request on the ring is due (None: no request timeout, or none
        on the ring)."""
        batches = self._batches
        if batches is None:
            return None
        while batches and not batches[0].outstanding:
            batches.popleft()
        return batches[0].deadline if batches else None

    def _expire(self) -> None:
        """The oldest request is due: reset the ring (``HardwareQueue.reset_ring``); every
        request the device still held completes with -ETIMEDOUT.  A device that does not
        let the ring go is given up: the queue raises ``DeviceGoneError`` from then on."""
        q = self._q
        q.stats_timeouts += 1

        def reap() -> None:
            try:
                self._reap()
            except DeviceProtocolError:
                pass  # the queue is broken: the next wait raises that

        held, lost = q.reset_ring(reap)
        self._vq = q.vq
        self._layout = [None] * len(self._layout)  # the fresh ring has no chain prepared
        if self.poll:
            self._vq.disable_cb()
        user_data = self._user_data
        for tag in held:
            name = RequestType(self._type_of_tag[tag]).name.lower()
            exc = status_error(STATUS_TIMED_OUT, f"{self.disk.name}: {name}")
            self._ready.append(Completion(user_data[tag], -errno.ETIMEDOUT, str(exc.strerror)))
            user_data[tag] = None
            self._free.append(tag)
        self._in_flight -= len(held)
        assert self._batches is not None
        self._batches.clear()
        self._batch_of_tag = [None] * len(self._batch_of_tag)
        if lost is not None:
            q.fail(DeviceGoneError(
                errno.ETIMEDOUT, f"{q.name}: the device stopped answering after a request "
                f"timed out ({lost})"))

    def _failed(self, tag: int, status: int, written: int, ud: Any) -> Completion:
        name = RequestType(self._type_of_tag[tag]).name.lower()
        need = self._need_of_tag[tag]
        if written < need:
            status = short_status(status, written, need, f"{self._q.name} tag {tag}")
        exc = status_error(status, f"{self.disk.name}: {name}")
        assert exc.errno is not None
        return Completion(ud, -exc.errno, str(exc.strerror))

    def _spin(self, wanted: int, deadline: float | None) -> None:
        """Busy-poll the used ring; the call eventfd is never read."""
        idle = 0
        pending = self._vq.pending
        ready = self._ready
        while len(ready) < wanted:
            if pending():
                self._reap_and_refill()
                idle = 0
                continue
            idle += 1
            if idle % _HANGUP_CHECK_EVERY == 0:
                self._check_alive()
                pending = self._vq.pending  # a new ring after a reconnect
                due = self._due()
                if deadline is not None or due is not None:
                    now = time.monotonic()
                    if due is not None and now >= due:
                        self._expire()
                        pending = self._vq.pending
                    elif deadline is not None and now >= deadline:
                        self._timed_out(wanted)

    def _sleep(self, wanted: int, deadline: float | None) -> None:
        """Sleep on the call eventfd until ``wanted`` completions are ready, asking the
        device to signal only when the last of them completes (after polling up to the
        adaptive polling time, when there is one)."""
        q = self._q
        ready = self._ready
        clock = time.perf_counter_ns
        poll = self._poll
        while len(ready) < wanted:
            vq = self._vq  # a ring reset (request_timeout) replaces it
            if poll.max_ns:
                start = clock()
                if self._spin_until(start + poll.ns):
                    poll.adjust(clock() - start)
                    self._reap_and_refill()
                    continue
            # Ask for an interrupt when the last completion we need arrives, then look
            # again: the device may have completed them before it saw the request.
            need = min(wanted - len(ready), self._in_flight)
            if not vq.enable_cb(max(0, need - 1)):
                if self._disable_cb:
                    vq.disable_cb()
                self._reap_and_refill()
                continue
            due = None if self._batches is None else self._due()
            until = deadline
            if due is not None and (deadline is None or due < deadline):
                until = due
            timeout_ms = -1 if until is None else max(0, int((until - time.monotonic()) * 1000))
            start = clock()
            events = self._waiter.poll(timeout_ms)
            if poll.max_ns:
                poll.adjust(clock() - start)
            if self._disable_cb:
                vq.disable_cb()  # the seed's virtblk_done: drain without interrupts
            if not events and not vq.pending():
                if due is None:
                    self._timed_out(wanted)
                now = time.monotonic()
                if now >= due:
                    self._expire()
                    continue
                if deadline is not None and now >= deadline:
                    self._timed_out(wanted)
            for fd, mask in events:
                if fd == q.call_fd:
                    q.stats_interrupts += 1
                    try:
                        os.read(fd, 8)
                    except BlockingIOError:
                        pass
                elif mask & _HUNG_UP:
                    self._gone()
            if q.lost or self._vq is not q.vq:  # woken by a reconnect
                self._gone()
            vq = self._vq
            self._reap_and_refill()

    def _reap_and_refill(self) -> None:
        """Take the completions, then submit what they freed tags for (one kick)."""
        self._reap()
        if (self._pending and self._free) or self._staged:
            self._submit()

    def _spin_until(self, deadline_ns: int) -> bool:
        """Adaptive polling: True when a completion arrived before ``deadline_ns``."""
        pending = self._vq.pending
        clock = time.perf_counter_ns
        while clock() < deadline_ns:
            if pending():
                return True
        return False

    def _timed_out(self, wanted: int) -> NoReturn:
        raise TimeoutError(
            f"{self._q.name}: {len(self._ready)} of {wanted} completions before the timeout "
            f"({self._in_flight} still in flight)"
        )

    def _check_alive(self) -> None:
        q = self._q
        if q.broken is not None:
            raise q.broken
        if self._hangup.poll(0) or q.lost or self._vq is not q.vq:
            self._gone()

    def _gone(self) -> None:
        """The device went away: fail, or (a disk with ``reconnect_timeout``) wait for the
        reconnect and carry on on the new ring."""
        q = self._q
        if q.on_lost is None:
            exc = DeviceGoneError(errno.ECONNRESET, f"{q.name}: the device went away")
            q.fail(exc)
            raise exc
        q.on_lost(q)  # starts a reconnect, unless one runs or has replaced this connection
        q.wait_resumed()
        self._adopt()

    def _adopt(self) -> None:
        """Carry on after a reconnect: watch the new connection; unless the device
        resubmits from its in-flight buffer (the same ring), complete what the dead device
        published on the old ring, free it, and put what it left unanswered (in tag order)
        and what was staged onto the new ring, each tag's chain written afresh there."""
        q = self._q
        dev = self._dev
        fd = dev.frontend.fileno()
        for poller in (self._hangup, self._waiter):
            try:
                poller.unregister(self._sock_fd)
            except KeyError:
                pass
            poller.register(fd, select.POLLRDHUP)
        self._sock_fd = fd
        old = self._vq
        if old is q.vq:
            if self._batches is not None and q.request_timeout is not None:
                # The device resubmits them: the whole timeout again (the outage was the
                # reconnect's to bound).
                restart = time.monotonic() + q.request_timeout
                for batch in self._batches:
                    batch.deadline = max(batch.deadline, restart)
            return
        try:
            used = old.get_used()
        except DeviceProtocolError as exc:
            used = exc.completed
        self._complete(used)
        tags = sorted(old.detach_unused())
        self._in_flight -= len(tags)
        if self._batches is not None:
            batch_of_tag = self._batch_of_tag
            for tag in tags:  # stamped again when they go to the new ring
                was = batch_of_tag[tag]
                if was is not None:
                    was.outstanding -= 1
                    batch_of_tag[tag] = None
        q.stats_resubmitted += len(tags)
        with dev.alloc_lock:
            old.close()
            for gpa in (old.addrs.desc, old.addrs.avail, old.addrs.used):
                dev.allocator.free(gpa)
        self._vq = q.vq
        self._layout, layout = [None] * len(self._layout), self._layout
        slots = self._slots
        staged = tags + self._staged
        for tag in staged:
            slots[tag * SLOT + 16] = _STATUS_PENDING
            rtype = self._type_of_tag[tag]
            shape = layout[tag]
            if rtype <= _OUT and shape is not None:
                self._prepare(tag, *shape)
            elif rtype == RequestType.FLUSH:
                self._vq.prepare(tag, self._hdr_of_tag[tag], self._status_of_tag[tag])
            else:
                self._vq.prepare(tag, self._hdr_of_tag[tag] + self._seg_of_tag[tag],
                                 self._status_of_tag[tag])
        self._staged = staged
        if self.poll:
            self._vq.disable_cb()
        self._submit()

    # -- state ---------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests enqueued and not yet submitted."""
        return len(self._pending) + len(self._staged)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return self._in_flight

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._q.name}: the queue handle is closed")

    def close(self) -> None:
        """Wait (up to 10 s) for what is in flight, turn notifications back on and give the
        queue back to the disk.  Requests still enqueued are dropped."""
        if self._closed:
            return
        self._pending.clear()
        for tag in self._staged:
            self._user_data[tag] = None
            self._free.append(tag)
        self._staged.clear()
        q = self._q
        try:
            if q.broken is None and self._in_flight:
                deadline = time.monotonic() + _CLOSE_TIMEOUT
                while self._in_flight:
                    if self.poll:
                        self._spin(len(self._ready) + 1, deadline)
                    else:
                        self._sleep(len(self._ready) + 1, deadline)
        except (OSError, TimeoutError) as exc:
            q.fail(exc if isinstance(exc, OSError) else DeviceGoneError(
                errno.ETIMEDOUT, f"{q.name}: requests still in flight when the handle closed"))
        finally:
            self._closed = True
            if q.broken is None:
                self._vq.enable_cb()  # rearm notifications for blocking I/O
            q.release(self)
            self.disk._unregister_handle(self)
            self.disk.free_buffer(self._seg_area)

    def __enter__(self) -> QueueHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "poll" if self.poll else "interrupt"
        return (
            f"<QueueHandle {self._q.name} {mode} pending={self.pending} "
            f"in_flight={self._in_flight}>"
        )


def queues(disk: Disk, *, poll: bool = False) -> list[QueueHandle]:
    """A handle for each of the disk's hardware queues (libblkio's ``blkio_get_queue``)."""
    return [QueueHandle(disk, i, poll=poll) for i in range(disk.num_queues)]


__all__ = ["Completion", "QueueHandle", "queues"]
