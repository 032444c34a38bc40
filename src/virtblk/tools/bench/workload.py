"""One job's workload: which block each I/O goes to, in which direction, and the
bookkeeping around it (latencies, sampling windows, errors, verification)."""

from __future__ import annotations

import errno
import time

import numpy as np

from virtblk.tools.bench.config import SAMPLE_NS, BenchConfig
from virtblk.tools.bench.results import DirectionStats
from virtblk.tools.bench.verify import Verifier

READ, WRITE = 0, 1
"""Index of a direction in the per-direction lists (a write flag used as an index)."""


class Job:
    """One job's workload and bookkeeping; the engines call ``pick``, ``begin`` and
    ``end`` around every I/O."""

    _TABLE = 1 << 16
    _UNLIMITED = 1 << 62

    def __init__(
        self, cfg: BenchConfig, index: int, base: int, span: int, bufs: list[memoryview]
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.base = base  # byte offset of the job's slice
        self.span = span  # blocks in the slice
        self.bs = cfg.bs
        self.bufs = bufs
        self.rng = np.random.default_rng([cfg.seed, index])
        self.verifier = (
            Verifier(cfg.verify, cfg.bs, cfg.seed + index) if cfg.verify is not None else None
        )
        self.written: dict[int, int] = {}  # offset -> generation of its last completed write
        self.busy: set[int] = set()  # offsets with an I/O in flight (verify only)
        depth = len(bufs)
        self.slot_offset = [0] * depth
        self.slot_write = [False] * depth
        self.slot_expect = [0] * depth  # generation a read must find; 0: not checked
        self.lat: tuple[list[int], list[int]] = ([], [])
        self.samples: tuple[list[int], list[int]] = ([], [])
        self.errors = 0
        self.first_errno = 0
        self.verified = 0
        self.mismatches = 0
        self.first_mismatch = ""
        self._pos = [0, 0]  # next sequential block, per direction
        self._offsets: list[int] = []
        self._dirs: list[bool] = []
        self._fixed_write = cfg.rw in ("write", "randwrite")
        self._mixed = cfg.mixed
        self._random = cfg.random
        self._refill()
        self._finite: list[int] | None = None  # the read-back phase's offsets
        # I/Os the timed phase may still start: a time-based job never runs out.
        if cfg.time_based:
            self.left = self._UNLIMITED
        else:
            self.left = cfg.io_size // cfg.bs if cfg.io_size is not None else span

    def _refill(self) -> None:
        """The next table of random offsets and directions (fresh each pass: a repeating
        table would let caches see the same blocks again)."""
        n = self._TABLE
        if self._random:
            blocks = self.rng.integers(0, self.span, size=n, dtype=np.int64)
            self._offsets = (blocks * self.bs + self.base).tolist()
        if self._mixed:
            self._dirs = (self.rng.random(n) >= self.cfg.rwmixread / 100).tolist()
        self._i = 0

    def next_io(self) -> tuple[int, bool]:
        """The next I/O of the timed phase, (offset, write?); without verify, engines use it
        directly (``pick`` is the general case)."""
        i = self._i
        if i == self._TABLE:
            self._refill()
            i = 0
        self._i = i + 1
        write = self._dirs[i] if self._mixed else self._fixed_write
        if self._random:
            return self._offsets[i], write
        # Reads and writes each walk the range in order (fio's last_pos per direction), so
        # a mixed sequential run reads back what it wrote.
        pos = self._pos[write]
        self._pos[write] = pos + 1 if pos + 1 < self.span else 0
        return self.base + pos * self.bs, write

    def take(self, n: int) -> tuple[list[int], list[bool] | None]:
        """The next ``n`` I/Os of the timed phase, fewer once a job that is not time based
        nears its ``io_size``: their offsets, and their directions (None: all
        ``cfg.writes``).  The queue engine's batched ``next_io``."""
        if n > self.left:
            n = self.left
        self.left -= n
        return self._take(n)

    def _take(self, n: int) -> tuple[list[int], list[bool] | None]:
        if self._random:
            i = self._i
            if i + n > self._TABLE:
                rest = self._offsets[i:]
                rest_dirs = self._dirs[i:] if self._mixed else []
                self._refill()
                more, more_dirs = self._take(n - len(rest))
                return rest + more, (rest_dirs + more_dirs) if more_dirs is not None else None
            self._i = i + n
            return self._offsets[i : i + n], self._dirs[i : i + n] if self._mixed else None
        if self._mixed:
            pairs = [self.next_io() for _ in range(n)]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        pos, span, bs, base = self._pos[self._fixed_write], self.span, self.bs, self.base
        self._pos[self._fixed_write] = (pos + n) % span
        return [base + ((pos + k) % span) * bs for k in range(n)], None

    def pick(self) -> tuple[int, bool] | None:
        """The next I/O (offset, write?), or None when a finite phase is over."""
        if self._finite is not None:
            return (self._finite.pop(), False) if self._finite else None
        if self.left <= 0:
            return None
        self.left -= 1
        if self.verifier is None:
            return self.next_io()
        while True:  # a block with an I/O in flight is skipped (span > iodepth: terminates)
            offset, write = self.next_io()
            if offset not in self.busy:
                return offset, write

    def pick_before(self, deadline: int | None, now: int) -> tuple[int, bool] | None:
        """``pick``, or None once ``now`` has reached the deadline (the engines that issue
        one I/O at a time)."""
        if deadline is not None and now >= deadline:
            return None
        return self.pick()

    def begin(self, slot: int, offset: int, write: bool) -> None:
        """Record ``slot``'s I/O; with verify, stamp the block (write) or note what it must
        contain (read)."""
        self.slot_offset[slot] = offset
        self.slot_write[slot] = write
        v = self.verifier
        if v is None:
            return
        self.busy.add(offset)
        if write:
            self.slot_expect[slot] = v.fill(self.bufs[slot], offset)
        else:
            self.slot_expect[slot] = self.written.get(offset, 0)

    def end(self, slot: int, ok: bool, lat_ns: int, err: int = errno.EIO) -> None:
        """Account ``slot``'s completed I/O (latency, errors, verification)."""
        write = self.slot_write[slot]
        self.lat[write].append(lat_ns)
        if not ok:
            self.failed(err)
        v = self.verifier
        if v is None:
            return
        offset = self.slot_offset[slot]
        self.busy.discard(offset)
        expect = self.slot_expect[slot]
        if write:
            if ok:
                self.written[offset] = expect
            else:
                self.written.pop(offset, None)  # what the block holds now is unknown
        elif ok and expect:
            self.verified += 1
            why = v.check(self.bufs[slot], offset, expect)
            if why is not None:
                self.mismatches += 1
                if not self.first_mismatch:
                    self.first_mismatch = why

    def failed(self, err: int) -> None:
        """Count a failed I/O."""
        self.errors += 1
        if not self.first_errno:
            self.first_errno = err

    def start_readback(self) -> None:
        """Switch to the verify phase: read every block written, once."""
        self._finite = sorted(self.written, reverse=True)

    def sample(self) -> None:
        """Close one SAMPLE_NS window."""
        for d in (READ, WRITE):
            self.samples[d].append(len(self.lat[d]))

    def stats(self, d: int) -> DirectionStats:
        """One direction's stats; samples become per-window counts."""
        cum = self.samples[d]
        per_window = [b - a for a, b in zip([0, *cum], cum, strict=False)]
        ios = len(self.lat[d])
        return DirectionStats(ios, ios * self.bs, np.asarray(self.lat[d], np.int64), per_window)


class Clock:
    """Sampling windows and the shared progress counters, checked once per batch."""

    def __init__(self, job: Job, counters: np.ndarray | None) -> None:
        self.job = job
        self.counters = counters
        self.t0 = time.perf_counter_ns()
        self.next_sample = self.t0 + SAMPLE_NS

    def tick(self, now: int) -> None:
        job = self.job
        while now >= self.next_sample:
            job.sample()
            self.next_sample += SAMPLE_NS
        if self.counters is not None:
            base = 2 * job.index
            self.counters[base] = len(job.lat[READ])
            self.counters[base + 1] = len(job.lat[WRITE])


class MarkingClock(Clock):
    """A :class:`Clock` that also notes, at every tick, how many I/Os of each direction
    have completed: an I/O completed at the first mark after it, which gives each one its
    completion time for fio's logs.  The engines tick once per batch of completions, so this
    costs one append per batch, and only runs that log pay it (they get this clock)."""

    def __init__(self, job: Job, counters: np.ndarray | None) -> None:
        super().__init__(job, counters)
        self.marks: list[tuple[int, int, int]] = []

    def tick(self, now: int) -> None:
        self.mark(now)
        super().tick(now)

    def mark(self, now: int) -> None:
        """Note ``now`` and the completions so far (the engines' last mark is at their end)."""
        lat = self.job.lat
        self.marks.append((now, len(lat[READ]), len(lat[WRITE])))

    def completion_times(self, d: int) -> np.ndarray:
        """When each I/O of direction ``d`` completed, in ns since the clock started, in
        the order of ``job.lat[d]``."""
        if not self.marks:
            return np.empty(0, np.int64)
        marks = np.asarray(self.marks, np.int64)
        per_mark = np.diff(marks[:, 1 + d], prepend=0)
        return np.repeat(marks[:, 0] - self.t0, per_mark)
