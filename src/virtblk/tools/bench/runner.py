"""A whole run: check the configuration, allocate every job's resources, fork the jobs
after the first into child processes (one hardware queue each), gather their results."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

import numpy as np

from virtblk.driver.disk import Disk
from virtblk.tools.bench.config import BenchConfig
from virtblk.tools.bench.engines import Resources, run_job
from virtblk.tools.bench.results import BenchResult, DeviceCounters, JobResult
from virtblk.tools.bench.verify import Verifier

Progress = Callable[[float, int, int], None]
"""Called about twice a second with (elapsed seconds, reads done, writes done)."""


def check_config(disk: Disk, cfg: BenchConfig) -> tuple[int, int]:
    """Refuse what cannot run, with the reason (ValueError); returns (first byte, blocks
    per job)."""
    bs = cfg.bs
    lbs = disk.logical_block_size
    if bs <= 0 or bs % lbs:
        raise ValueError(f"bs {bs} must be a multiple of {lbs}")
    if cfg.iodepth < 1 or cfg.numjobs < 1:
        raise ValueError("iodepth and numjobs must be at least 1")
    if not 0 <= cfg.rwmixread <= 100:
        raise ValueError(f"rwmixread {cfg.rwmixread} is not a percentage")
    if cfg.writes and disk.read_only:
        raise ValueError(f"{cfg.rw} on a read-only disk")
    if cfg.time_based and cfg.runtime is None:
        raise ValueError("a time based run needs a runtime")
    if cfg.time_based and cfg.io_size is not None:
        raise ValueError("io_size goes with a run that is not time based")
    if cfg.io_size is not None and (cfg.io_size < bs or cfg.io_size % bs):
        raise ValueError(f"io_size {cfg.io_size} must be a positive multiple of bs {bs}")
    if cfg.offset < 0 or cfg.offset % bs:
        raise ValueError(f"offset {cfg.offset} must be a multiple of bs {bs}")
    total = (cfg.size if cfg.size is not None else disk.size - cfg.offset) // bs
    if total <= 0 or cfg.offset + total * bs > disk.size:
        raise ValueError("the range to test is empty or past the end of the disk")
    span = total // cfg.numjobs
    if span <= 0:
        raise ValueError(f"the range has {total} blocks of {bs}: fewer than numjobs")
    available = disk.num_queues - cfg.queue
    if cfg.numjobs > available:
        raise ValueError(
            f"numjobs {cfg.numjobs} needs {cfg.numjobs} hardware queues (one per job); "
            f"the disk has {available} from queue {cfg.queue} "
            "(give the device more queues: num-queues)"
        )
    if cfg.path == "request" and cfg.ioengine != "queue":
        raise ValueError("path request goes with ioengine queue")
    if cfg.ioengine in ("queue", "poll") and cfg.path == "bio":
        lim = disk.limits
        per_request = lim.max_segments * lim.max_segment_size
        if bs > per_request:
            raise ValueError(
                f"bs {bs} is larger than one request may be ({per_request} bytes: seg_max x "
                f"size_max); ioengine {cfg.ioengine} sends each I/O as one request"
            )
    depth = min(cfg.depth, disk.device.queues[cfg.queue].depth)
    if cfg.verify is not None:
        if not cfg.writes:
            raise ValueError(
                f"verify needs a workload that writes (write, randwrite, randrw, readwrite), "
                f"not {cfg.rw}"
            )
        if span <= depth:
            raise ValueError(
                f"verify needs more blocks per job ({span}) than iodepth ({depth}): "
                "two I/Os to one block may not be in flight together"
            )
        if bs < Verifier.HEADER.size:
            raise ValueError(f"verify needs bs of at least {Verifier.HEADER.size}")
    return cfg.offset, span


def run_bench(
    disk: Disk,
    cfg: BenchConfig,
    *,
    device_cpu: Callable[[], float] | None = None,
    progress: Progress | None = None,
    device_counters: DeviceCounters | None = None,
) -> BenchResult:
    """Run ``cfg`` against ``disk``; ``device_cpu`` reads the device process's CPU seconds,
    ``device_counters`` our device's notification counters.

    One job runs here; more run in child processes forked after their resources are
    allocated, one per hardware queue.  Raises ValueError for a configuration that cannot
    run (see :func:`check_config`).
    """
    first, span = check_config(disk, cfg)
    depth = min(cfg.depth, disk.device.queues[cfg.queue].depth)
    if depth != cfg.iodepth:  # what runs is what is reported (sync: 1; at most the tags)
        cfg = dataclasses.replace(cfg, iodepth=depth)
    shared = mmap.mmap(-1, 16 * cfg.numjobs)  # MAP_SHARED: children count, we display
    counters = np.frombuffer(shared, dtype=np.int64)
    resources: list[Resources] = []
    try:
        for i in range(cfg.numjobs):
            resources.append(Resources(disk, cfg, i))
        bases = [first + i * span * cfg.bs for i in range(cfg.numjobs)]
        reconnects0 = disk.reconnects
        dev0 = device_cpu() if device_cpu else None
        counted0 = device_counters() if device_counters else None
        with _Monitor(counters, progress):
            jobs = _run_jobs(resources, cfg, bases, span, counters)
        dev_cpu = device_cpu() - dev0 if device_cpu and dev0 is not None else None
        counted = None
        if device_counters is not None and counted0 is not None:
            after = device_counters()
            counted = {k: after[k] - counted0.get(k, 0) for k in after}
    finally:
        for res in resources:
            res.release()
        del counters
        # A failed run's traceback still holds the counters: the mapping then goes with
        # it, and the run's own error is what the caller must see.
        with contextlib.suppress(BufferError):
            shared.close()
    return BenchResult(config=cfg, jobs=jobs, device_cpu=dev_cpu, device_counters=counted,
                       reconnects=disk.reconnects - reconnects0, ring=disk.ring)


class _Monitor:
    """A thread that reports the counters to ``progress`` twice a second."""

    def __init__(self, counters: np.ndarray, progress: Progress | None) -> None:
        self.counters = counters
        self.progress = progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Monitor:
        if self.progress is not None:
            self._thread = threading.Thread(target=self._run, name="bench-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self.progress is not None
        t0 = time.monotonic()
        while not self._stop.wait(0.5):
            c = self.counters
            self.progress(time.monotonic() - t0, int(c[0::2].sum()), int(c[1::2].sum()))

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _run_jobs(
    resources: list[Resources],
    cfg: BenchConfig,
    bases: list[int],
    span: int,
    counters: np.ndarray,
) -> list[JobResult]:
    """Job 0 runs here; each other job in a child process, all starting together (closing
    a pipe is the starting gun).  A child writes its pickled JobResult (or its traceback)
    to its own pipe.

    Afterwards the children's queues are marked failed here: the children moved their rings
    on, and this process's copy of each ring's state is stale.
    """
    go_r, go_w = os.pipe()
    children: list[tuple[int, int]] = []  # (pid, read end of its result pipe)
    try:
        try:
            for i in range(1, len(resources)):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: its own queue, buffers and pipe from here on
                    os.close(r)
                    os.close(go_w)
                    _child(resources[i], cfg, i, bases[i], span, counters, go_r, w)
                os.close(w)
                children.append((pid, r))
        finally:
            os.close(go_w)  # go
            os.close(go_r)
        results = [run_job(resources[0], cfg, 0, bases[0], span, counters)]
        failures: list[str] = []
        for pid, r in children:
            with os.fdopen(r, "rb") as f:
                payload = f.read()
            _, status = os.waitpid(pid, 0)
            outcome = pickle.loads(payload) if payload else f"exited with status {status}"
            if isinstance(outcome, JobResult):
                results.append(outcome)
            else:
                failures.append(str(outcome))
        children = []
    finally:
        for pid, _ in children:  # interrupted: stop the children still running
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for res in resources[1:]:
            res.queue.fail(
                RuntimeError(
                    f"{res.queue.name} was driven by a bench job in a child process; its "
                    "ring state here is stale: reconnect to use this queue again"
                )
            )
    if failures:
        raise RuntimeError("bench job failed: " + failures[0])
    return results


def _child(
    res: Resources,
    cfg: BenchConfig,
    index: int,
    base: int,
    span: int,
    counters: np.ndarray,
    go: int,
    out: int,
) -> NoReturn:
    """A job's process: wait for the start, run, report, and leave with ``os._exit`` (no
    atexit handler, no finaliser may touch the parent's vhost-user connection)."""
    code = 0
    try:
        os.read(go, 1)
        result: object = run_job(res, cfg, index, base, span, counters)
    except BaseException:
        result = f"job {index}: {traceback.format_exc()}"
        code = 1
    try:
        data = pickle.dumps(result)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        os._exit(code)
