"""The engines (``ioengine``) that drive a job's I/O through the driver, and the run of
one job from its timed phase to its verify read-back."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from virtblk.driver.blklayer import PluggedQueue
from virtblk.driver.disk import Disk
from virtblk.driver.queue_api import QueueHandle
from virtblk.spec import SECTOR_SHIFT, Status
from virtblk.tools.bench.config import BenchConfig
from virtblk.tools.bench.results import JobResult
from virtblk.tools.bench.workload import READ, WRITE, Clock, Job, MarkingClock

_OK = int(Status.OK)


class Resources:
    """What a job needs, allocated in the parent before any fork."""

    def __init__(self, disk: Disk, cfg: BenchConfig, index: int) -> None:
        self.disk = disk
        self.queue_index = cfg.queue + index
        self.queue = disk.device.queues[self.queue_index]
        self.bufs = [disk.buffer(cfg.bs) for _ in range(cfg.depth)]
        self.handle: QueueHandle | None = None
        if cfg.ioengine == "poll" or (cfg.ioengine == "queue" and cfg.path == "bio"):
            self.handle = QueueHandle(
                disk, self.queue_index, poll=cfg.ioengine == "poll", poll_us=cfg.poll_us,
                disable_cb_while_draining=cfg.disable_cb_while_draining)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
        for b in self.bufs:
            self.disk.free_buffer(b)


def _engine_handle(res: Resources, job: Job, deadline: int | None, clock: Clock) -> None:
    """The ``queue`` and ``poll`` engines: a :class:`QueueHandle`, the public fast path.

    Each slot keeps its buffer for the whole run; ``do_io`` submits what was enqueued
    with one kick and returns at least ``batch_complete_min`` completions, whose slots are
    aimed again at once.  Without verify the per-I/O bookkeeping is inlined: this loop is
    what the headline figure measures."""
    h = res.handle
    assert h is not None
    cfg = job.cfg
    bufs = res.bufs
    start = [0] * len(bufs)
    slot_write = job.slot_write
    lat = job.lat
    fast = job.verifier is None
    take = job.take
    read, write = h.read, h.write
    do_io = h.do_io
    batch_min = max(1, min(cfg.batch_complete_min, len(bufs)))
    writes_only = cfg.writes and not cfg.mixed
    if not cfg.mixed:
        slot_write[:] = [writes_only] * len(bufs)

    def issue(slots: list[int], now: int) -> int:
        if deadline is not None and now >= deadline:
            return 0
        if fast:
            # Fewer offsets than slots once a job that is not time based nears its end.
            offsets, writes = take(len(slots))
            if writes is None:
                op = write if writes_only else read
                for i, offset in zip(slots, offsets):  # noqa: B905
                    op(offset, bufs[i], i)
                    start[i] = now
            else:
                for i, offset, w in zip(slots, offsets, writes):  # noqa: B905
                    (write if w else read)(offset, bufs[i], i)
                    start[i] = now
                    slot_write[i] = w
            return len(offsets)
        sent = 0
        for i in slots:
            nxt = job.pick()
            if nxt is None:
                break
            offset, w = nxt
            job.begin(i, offset, w)
            (write if w else read)(offset, bufs[i], i)
            start[i] = now
            sent += 1
        return sent

    in_flight = issue(list(range(len(bufs))), time.perf_counter_ns())
    while in_flight:
        done = do_io(min(batch_min, in_flight), timeout=10.0)
        now = time.perf_counter_ns()
        in_flight -= len(done)
        if fast:
            for c in done:
                i = c.user_data
                lat[slot_write[i]].append(now - start[i])
                if c.ret:
                    job.failed(-c.ret)
        else:
            for c in done:
                i = c.user_data
                job.end(i, c.ret == 0, now - start[i], -c.ret)
        clock.tick(now)
        if done:
            in_flight += issue([c.user_data for c in done], now)


def _engine_plug(res: Resources, job: Job, deadline: int | None, clock: Clock) -> None:
    """``path="request"``: every I/O a bio through the block layer's plug, which sorts and
    merges adjacent ones into requests (the seed's request path); slots keep their bio and
    buffer for the whole run."""
    disk, cfg = res.disk, job.cfg
    segs_of: list[list[tuple[int, int]]] = []
    for b in res.bufs:
        gpa = disk.buffer_address(b)
        assert gpa is not None
        segs_of.append(list(disk.requests.segments(gpa, cfg.bs)))
    engine = PluggedQueue(res.queue, disk.queue_limits)
    slots = [engine.bio(False, segs, user_data=i) for i, segs in enumerate(segs_of)]
    start = [0] * len(slots)
    slot_write = job.slot_write
    if not cfg.mixed:  # every slot keeps one direction (verify's read-back re-aims them)
        for i, s in enumerate(slots):
            s.write = cfg.writes
            slot_write[i] = cfg.writes

    def submit(batch: list[Any], now: int) -> list[Any]:
        if deadline is not None and now >= deadline:
            return []
        sent = []
        for s in batch:
            nxt = job.pick()
            if nxt is None:
                break
            offset, write = nxt
            i = s.user_data
            job.begin(i, offset, write)
            s.sector = offset >> SECTOR_SHIFT
            s.write = write
            start[i] = now
            sent.append(s)
        if sent:
            engine.submit_batch(sent)
        return sent

    in_flight = len(submit(slots, time.perf_counter_ns()))
    while in_flight:
        batch = engine.reap(timeout=10.0)
        now = time.perf_counter_ns()
        in_flight -= len(batch)
        for s in batch:
            i = s.user_data
            job.end(i, s.status == _OK, now - start[i])
        clock.tick(now)
        if batch:
            in_flight += len(submit(batch, now))


def _engine_sync(res: Resources, job: Job, deadline: int | None, clock: Clock) -> None:
    """The Disk API, one blocking call at a time (fio's psync)."""
    disk = res.disk
    disk.use_queue(res.queue_index)
    buf = res.bufs[0]
    while True:
        now = time.perf_counter_ns()
        clock.tick(now)
        nxt = job.pick_before(deadline, now)
        if nxt is None:
            return
        offset, write = nxt
        job.begin(0, offset, write)
        ok, err = True, 0
        t = time.perf_counter_ns()
        try:
            if write:
                disk.pwrite(buf, offset)
            else:
                disk.preadv([buf], offset)
        except OSError as exc:
            ok, err = False, exc.errno or errno.EIO
        job.end(0, ok, time.perf_counter_ns() - t, err)


def _engine_aio(res: Resources, job: Job, deadline: int | None, clock: Clock) -> None:
    """AsyncDisk on the job's queue, ``iodepth`` tasks each doing one I/O at a time."""
    from virtblk.aio import AsyncDisk

    async def run() -> None:
        adisk = AsyncDisk(res.disk, queues=[res.queue_index])

        async def worker(i: int) -> None:
            buf = res.bufs[i]
            while True:
                now = time.perf_counter_ns()
                clock.tick(now)
                nxt = job.pick_before(deadline, now)
                if nxt is None:
                    return
                offset, write = nxt
                job.begin(i, offset, write)
                ok, err = True, 0
                try:
                    if write:
                        await adisk.write(buf, offset)
                    else:
                        await adisk.readinto(buf, offset)
                except OSError as exc:
                    ok, err = False, exc.errno or errno.EIO
                job.end(i, ok, time.perf_counter_ns() - now, err)

        try:
            await asyncio.gather(*(worker(i) for i in range(len(res.bufs))))
        finally:
            await adisk.aclose(close_disk=False)

    asyncio.run(run())


_ENGINES: dict[str, Callable[[Resources, Job, int | None, Clock], None]] = {
    "queue": _engine_handle,
    "poll": _engine_handle,
    "sync": _engine_sync,
    "aio": _engine_aio,
}


def run_job(
    res: Resources, cfg: BenchConfig, index: int, base: int, span: int,
    counters: np.ndarray | None,
) -> JobResult:
    """Run one job to the end: the timed phase, then (verify, write-only) the read-back."""
    job = Job(cfg, index, base, span, res.bufs)
    engine = _engine_plug if cfg.path == "request" else _ENGINES[cfg.ioengine]
    q = res.queue
    kicks0, interrupts0 = q.stats_kicks, q.stats_interrupts
    cpu0 = os.times()
    # Only a run that logs notes completion times: the usual clock costs nothing more.
    clock = MarkingClock(job, counters) if cfg.logging else Clock(job, counters)
    deadline = None if cfg.runtime is None else clock.t0 + int(cfg.runtime * 1e9)
    engine(res, job, deadline, clock)
    end = time.perf_counter_ns()
    elapsed = (end - clock.t0) / 1e9
    cpu1 = os.times()
    kicks, interrupts = q.stats_kicks - kicks0, q.stats_interrupts - interrupts0
    read, write = job.stats(READ), job.stats(WRITE)
    if isinstance(clock, MarkingClock):
        clock.mark(end)
        read.done_ns, write.done_ns = clock.completion_times(READ), clock.completion_times(WRITE)
    if job.verifier is not None and not cfg.mixed:
        # The read-back is not part of the measured run (its reads are not the workload).
        job.start_readback()
        engine(res, job, None, Clock(job, None))
    return JobResult(
        job=index,
        elapsed=elapsed,
        read=read,
        write=write,
        errors=job.errors,
        first_errno=job.first_errno,
        verified=job.verified,
        mismatches=job.mismatches,
        first_mismatch=job.first_mismatch,
        usr_cpu=cpu1.user - cpu0.user,
        sys_cpu=cpu1.system - cpu0.system,
        kicks=kicks,
        interrupts=interrupts,
    )
