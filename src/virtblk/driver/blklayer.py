"""Bios, plugging, merging and splitting: the request path of the block layer.

The seed offers two ways into the device (its "bio-based IO path" commit):

* the **bio path**: each I/O goes straight to the device as one virtio request, no request
  allocated by the block layer, nothing merged: the least CPU and latency per I/O, which is
  what a fast device wants;
* the **request path**: I/Os (bios) pass through the block layer, which holds them while the
  submitter is *plugged*, sorts them, **merges** adjacent ones into one request and
  **splits** any that exceed the device's limits: sequential I/O becomes fewer, larger
  device requests (a win when the device is slow per request), at some CPU cost per I/O.

In virtblk the bio path is :class:`~virtblk.driver.blkmq.HardwareQueue` used directly
(``submit``/``submit_batch``); this module is the request path on top of it.  A
:class:`Plug` belongs to one hardware queue (the submitting context's, see
``Disk.plug()``): :meth:`Plug.add` queues a :class:`Bio`, :meth:`Plug.flush` (or leaving the
``with`` block, ``blk_finish_plug``) sorts what is queued by sector, merges, takes one tag
per resulting request and submits them all with a single kick (``bd->last`` on the last
one).  A merged request's completion fans out to each of its bios with the request's
status; a split bio completes when its last piece does, with the first error any piece
saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from virtblk.driver.blkmq import HardwareQueue, Request
from virtblk.errors import status_error
from virtblk.spec import SECTOR_SHIFT, SECTOR_SIZE, RequestType, Status

if TYPE_CHECKING:
    from virtblk.driver.virtio_blk import Limits

BioEndIO = Callable[["Bio"], None]

BLK_DEF_MAX_SECTORS = 2560
"""Linux's default cap on a request built by merging (``max_sectors``, 1.25 MiB): large
enough that merging pays, small enough that one request does not hog the device."""

BLK_MAX_REQUEST_COUNT = 32
"""A plug flushes itself once it holds this many bios, as Linux's does, so that a
submitter that never unplugs still gets its I/O to the device."""

_PENDING = 0xFF  # as blkmq: not a valid status byte


class Bio:
    """One I/O as its submitter sees it: a direction, a start sector and buffers in guest
    memory.  ``end_io(bio)`` runs when it completes, with ``status`` set (a virtio status
    byte); ``user_data`` is the submitter's.  Reusable: add it again once it has ended.
    """

    __slots__ = ("_parent", "_pending", "done", "end_io", "fua", "length", "nseg", "sector",
                 "segments", "status", "user_data", "write")

    def __init__(
        self,
        write: bool,
        sector: int,
        segments: Sequence[tuple[int, int]],
        *,
        end_io: BioEndIO | None = None,
        user_data: Any = None,
        fua: bool = False,
    ) -> None:
        self.write = write
        self.fua = fua
        self.sector = sector
        self.segments = segments
        self.end_io = end_io
        self.user_data = user_data
        self.status = _PENDING
        self.done = False
        self.length = 0
        self.nseg = 0
        self._parent: Bio | None = None
        self._pending = 0

    @property
    def type(self) -> int:
        """The virtio request type this bio becomes."""
        if not self.write:
            return int(RequestType.IN)
        return int(RequestType.OUT_FUA if self.fua else RequestType.OUT)

    def error(self, what: str) -> OSError | None:
        """The OSError this bio's status maps to, or None when it succeeded."""
        if self.status == Status.OK:
            return None
        return status_error(self.status, what)

    def _end(self, status: int) -> None:
        self.status = status
        self.done = True
        parent = self._parent
        if parent is not None:
            # A piece of a split bio: the first error wins, the last piece ends the parent.
            self._parent = None
            if status != Status.OK and parent.status == _PENDING:
                parent.status = status
            parent._pending -= 1
            if parent._pending == 0:
                parent._end(Status.OK if parent.status == _PENDING else parent.status)
            return
        if self.end_io is not None:
            self.end_io(self)


@dataclasses.dataclass(frozen=True)
class QueueLimits:
    """What one request may carry (``struct queue_limits``): segments per request, bytes
    per segment, bytes per request; and the logical block size splits respect."""

    max_segments: int
    max_segment_size: int
    max_bytes: int = BLK_DEF_MAX_SECTORS << SECTOR_SHIFT
    logical_block_size: int = SECTOR_SIZE

    @classmethod
    def from_limits(
        cls, limits: Limits, logical_block_size: int = SECTOR_SIZE,
        max_bytes: int = BLK_DEF_MAX_SECTORS << SECTOR_SHIFT,
    ) -> QueueLimits:
        """The limits a probed device advertises (seg_max, size_max), plus ``max_bytes``."""
        return cls(limits.max_segments, limits.max_segment_size, max_bytes, logical_block_size)


@dataclasses.dataclass
class PlugStats:
    """Counters since the plug was made: ``requests / bios`` is what merging saved."""

    bios: int = 0
    requests: int = 0
    merges: int = 0
    splits: int = 0


class Plug:
    """Bios held back for sorting and merging before they reach one hardware queue.

    Not thread-safe: a plug belongs to one submitting context, as ``current->plug`` does.
    Completions may arrive on any thread that reaps the queue.
    """

    def __init__(
        self,
        queue: HardwareQueue,
        limits: QueueLimits,
        *,
        merge: bool = True,
        max_count: int = BLK_MAX_REQUEST_COUNT,
    ) -> None:
        self.queue = queue
        self.limits = limits
        self.merge = merge
        self.max_count = max_count
        self.stats = PlugStats()
        self._list: list[Bio] = []
        self._seg_step = limits.max_segment_size
        if self._seg_step >= limits.logical_block_size:
            self._seg_step -= self._seg_step % limits.logical_block_size

    # -- blk_start_plug / blk_finish_plug ------------------------------------------------------
    def __enter__(self) -> Plug:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()

    def __len__(self) -> int:
        return len(self._list)

    def add(self, bio: Bio) -> None:
        """Queue ``bio`` (``submit_bio`` while plugged); split it first if it exceeds the
        limits.  Flushes by itself once ``max_count`` bios wait."""
        segs = bio.segments
        if not segs:
            raise ValueError("a bio needs at least one segment")
        length = 0
        big = False
        step = self._seg_step
        for _, n in segs:
            length += n
            if n > step:
                big = True
        bio.length = length
        bio.nseg = len(segs)
        bio.status = _PENDING
        bio.done = False
        bio._parent = None
        self.stats.bios += 1
        lim = self.limits
        if big or bio.nseg > lim.max_segments or length > lim.max_bytes:
            self._list.extend(self._split(bio))
        else:
            self._list.append(bio)
        if len(self._list) >= self.max_count:
            self.flush()

    def _split(self, bio: Bio) -> list[Bio]:
        """``bio_split_to_limits``: pieces within the limits, each ending on a logical
        block boundary, completing ``bio`` when the last one ends."""
        lim = self.limits
        # A segment may be cut at max_segment_size, and at max_bytes when larger still.
        step = min(self._seg_step, lim.max_bytes)
        if step >= lim.logical_block_size:
            step -= step % lim.logical_block_size
        chopped: list[tuple[int, int]] = []
        for gpa, n in bio.segments:
            chopped.extend((a, min(step, gpa + n - a)) for a in range(gpa, gpa + n, step))
        pieces: list[Bio] = []
        cur: list[tuple[int, int]] = []
        cur_len = 0
        sector = bio.sector
        for seg in chopped:
            if cur and (len(cur) == lim.max_segments or cur_len + seg[1] > lim.max_bytes):
                pieces.append(self._piece(bio, sector, cur, cur_len))
                sector += cur_len >> SECTOR_SHIFT
                cur, cur_len = [], 0
            cur.append(seg)
            cur_len += seg[1]
        pieces.append(self._piece(bio, sector, cur, cur_len))
        bio._pending = len(pieces)
        self.stats.splits += len(pieces) - 1
        return pieces

    def _piece(self, bio: Bio, sector: int, segs: list[tuple[int, int]], length: int) -> Bio:
        if length % self.limits.logical_block_size:
            raise ValueError(
                f"cannot split a {bio.length}-byte bio at sector {bio.sector} on a logical "
                f"block boundary ({self.limits.logical_block_size}) within the limits")
        piece = Bio(bio.write, sector, segs, fua=bio.fua)
        piece.length = length
        piece.nseg = len(segs)
        piece._parent = bio
        return piece

    def flush(self) -> int:
        """Sort, merge, and submit everything queued with one kick; returns how many
        requests went to the device (``blk_mq_flush_plug_list``)."""
        bios = self._list
        if not bios:
            return 0
        self._list = []
        if self.merge and len(bios) > 1:
            bios.sort(key=_by_sector)
            groups = self._merge(bios)
        else:
            groups = [[b] for b in bios]
        q = self.queue
        reqs: list[Request] = []
        submitted = 0
        try:
            for group in groups:
                try:
                    req = q.get_tag(timeout=0)
                except TimeoutError:
                    # Out of tags: send what is built (so that completions can come), then
                    # wait for a tag, as blk-mq dispatches and then sleeps in its allocator.
                    q.submit_batch(reqs)
                    submitted += len(reqs)
                    reqs = []
                    req = q.get_tag()
                first = group[0]
                req.type = first.type
                req.sector = first.sector
                if len(group) == 1:
                    segs: Sequence[tuple[int, int]] = first.segments
                else:
                    segs = _coalesce(group, self.limits.max_segment_size)
                if first.write:
                    req.out_bufs, req.in_bufs = segs, ()
                else:
                    req.out_bufs, req.in_bufs = (), segs
                req.callback = self._complete
                req.user_data = group
                reqs.append(req)
            q.submit_batch(reqs)
        except BaseException:
            # What was not submitted goes back: its tags to the queue, its bios to the plug.
            # An interrupt may land anywhere, even just after ``submit_batch`` handed a
            # request over: its own flag says so, and then its completion ends its bios.
            unqueued = {id(req) for req in q.put_unqueued(reqs)}
            left: list[Bio] = []
            for i, group in enumerate(groups[submitted:]):
                if i < len(reqs) and id(reqs[i]) not in unqueued:
                    submitted += 1
                else:
                    left.extend(group)
            self._list = left + self._list
            self.stats.requests += submitted
            raise
        submitted += len(reqs)
        self.stats.requests += submitted
        return submitted

    def abandon(self) -> None:
        """End every bio still held (never submitted) with IOERR: its submitter gave up.
        A split bio whose other pieces are on the ring ends when they complete."""
        held = self._list
        self._list = []
        for bio in held:
            bio._end(int(Status.IOERR))

    def wait(self, bios: Sequence[Bio], timeout: float | None = None) -> None:
        """Flush, then block until every one of ``bios`` has ended (``submit_bio_wait``)."""
        self.flush()
        self.queue.wait_until(lambda: all(b.done for b in bios), timeout)

    def _merge(self, bios: list[Bio]) -> list[list[Bio]]:
        """Back merges over sorted bios: same type, the next starts where the group ends,
        and the group stays within max_segments and max_bytes (segments that touch in
        memory count once, as Linux coalesces them)."""
        lim = self.limits
        max_seg = lim.max_segments
        max_bytes = lim.max_bytes
        max_seg_size = lim.max_segment_size
        groups: list[list[Bio]] = []
        group: list[Bio] = []
        end = -1
        type_ = -1
        nseg = 0
        nbytes = 0
        last_gpa = last_len = 0
        merges = 0
        for bio in bios:
            t = bio.type
            if group and t == type_ and bio.sector == end and nbytes + bio.length <= max_bytes:
                add = bio.nseg
                g0, n0 = bio.segments[0]
                if last_gpa + last_len == g0 and last_len + n0 <= max_seg_size:
                    add -= 1
                if nseg + add <= max_seg:
                    group.append(bio)
                    nseg += add
                    nbytes += bio.length
                    end += bio.length >> SECTOR_SHIFT
                    if bio.nseg == 1 and add == 0:
                        last_len += n0  # the group's last segment grew
                    else:
                        last_gpa, last_len = bio.segments[-1]
                    merges += 1
                    continue
            group = [bio]
            groups.append(group)
            type_ = t
            end = bio.sector + (bio.length >> SECTOR_SHIFT)
            nseg = bio.nseg
            nbytes = bio.length
            last_gpa, last_len = bio.segments[-1]
        self.stats.merges += merges
        return groups

    def _complete(self, req: Request) -> None:
        """A request completed: each of its bios ends with its status, then its tag is
        returned (the queue's lock is reentrant; this runs inside its completion loop)."""
        group: list[Bio] = req.user_data
        status = req.status
        req.user_data = None
        self.queue.put_tag(req)
        for bio in group:
            bio._end(status)


def _by_sector(bio: Bio) -> int:
    return bio.sector


def _coalesce(group: list[Bio], max_segment_size: int) -> list[tuple[int, int]]:
    """The merged request's segments: the bios' in order, neighbours that touch in memory
    joined while within ``max_segment_size`` (the rule ``_merge`` counted with)."""
    out: list[tuple[int, int]] = []
    for bio in group:
        for gpa, n in bio.segments:
            if out:
                pg, pn = out[-1]
                if pg + pn == gpa and pn + n <= max_segment_size:
                    out[-1] = (pg, pn + n)
                    continue
            out.append((gpa, n))
    return out


class PluggedQueue:
    """The request path with the shape of a hardware queue's fast path: ``submit_batch``
    of bios (through a plug, one flush, one kick) and ``reap`` of the bios that ended.

    What ``virtblk bench --path request`` drives where ``--path bio`` drives the
    :class:`~virtblk.driver.blkmq.HardwareQueue` itself.
    """

    def __init__(self, queue: HardwareQueue, limits: QueueLimits) -> None:
        self.queue = queue
        self.plug = Plug(queue, limits, max_count=1 << 30)
        self._ended: list[Bio] = []

    def bio(self, write: bool, segments: Sequence[tuple[int, int]], *,
            fua: bool = False, user_data: Any = None) -> Bio:
        """A bio whose completion this queue's :meth:`reap` returns."""
        return Bio(write, 0, segments, end_io=self._end_io, fua=fua, user_data=user_data)

    def _end_io(self, bio: Bio) -> None:
        self._ended.append(bio)

    def submit_batch(self, bios: Sequence[Bio]) -> None:
        """Plug, add ``bios`` (their ``sector`` set by the caller), unplug."""
        add = self.plug.add
        for bio in bios:
            add(bio)
        self.plug.flush()

    def reap(self, timeout: float | None = None) -> list[Bio]:
        """Wait for completions (or the timeout) and return the bios that ended since the
        last call."""
        if not self._ended:
            self.queue.reap(timeout)
        ended = self._ended
        self._ended = []
        return ended
