"""The benchmark engine behind ``virtblk bench``: fio's workloads, engines and report.

A run is ``numjobs`` jobs, each keeping ``iodepth`` I/Os in flight on its own hardware
queue for ``runtime`` seconds, with fio's words for what it does (``rw``, ``bs``,
``rwmixread``, ``ioengine``, ``verify``) and fio's JSON layout for what it measured, so
that tools written for fio read our results.

Engines (``ioengine``), from the simplest API to the fastest:

* ``sync``: the :class:`~virtblk.driver.disk.Disk` API, one blocking call at a time (fio's
  ``psync``: iodepth is 1 whatever is asked);
* ``aio``: :class:`~virtblk.aio.AsyncDisk`, ``iodepth`` asyncio tasks;
* ``queue``: the hardware queue itself, as fio's engines drive a device: each slot keeps
  its tag and its buffer in shared memory for the whole run, completions are reaped in
  batches and resubmitted with one kick (``path="request"`` puts the block layer's plug,
  which merges adjacent I/O, in between);
* ``poll``: a polling :class:`~virtblk.driver.queue_api.QueueHandle` (no interrupts: the
  used ring is read in a loop).

Jobs after the first run in child processes forked once the disk is set up: a vhost-user
device has one frontend connection, so the parent owns it and each child drives its own
hardware queue (ring memory and eventfds are inherited), sending its results back through
a pipe.  Everything a child uses (buffers, queue handles) is allocated before the fork:
the allocator is ordinary process memory, so children allocating on their own would hand
out the same shared memory twice.

Each job works on its own slice of the range (fio's ``offset_increment`` = size/numjobs),
so that verification stays exact with several jobs.

``verify`` (fio's, simplified): every write carries a header (magic, offset, a generation
number) and a checksum (md5 or crc32c) of the whole block; reads of blocks this run wrote
check it.  ``write``/``randwrite`` read back and check every block they wrote after the
timed phase; ``randrw``/``readwrite`` check as they read.  While verifying, no two I/Os to
one block are in flight together, so what a read must find is known exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import mmap
import os
import pickle
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal, NoReturn

# numpy's BLAS starts a thread per CPU that spins after work; the bench never multiplies
# matrices, and on a small machine those threads take CPU from the device it measures.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from virtblk.driver.blklayer import PluggedQueue, QueueLimits
from virtblk.driver.disk import Disk
from virtblk.driver.queue_api import QueueHandle
from virtblk.spec import SECTOR_SHIFT, Status

RwMode = Literal["read", "write", "randread", "randwrite", "randrw", "readwrite"]
IoEngine = Literal["sync", "aio", "queue", "poll"]
IoPath = Literal["bio", "request"]
VerifyKind = Literal["md5", "crc32c"]

PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0,
               99.0, 99.5, 99.9, 99.95, 99.99)  # fmt: skip
"""fio's default ``percentile_list``."""

SAMPLE_NS = 500_000_000
"""IOPS and bandwidth are sampled every 500 ms, fio's default averaging window."""

Progress = Callable[[float, int, int], None]
"""Called about twice a second with (elapsed seconds, reads done, writes done)."""

_OK = int(Status.OK)
_READ, _WRITE = 0, 1


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run: fio's vocabulary."""

    rw: RwMode = "randread"
    bs: int = 4096
    iodepth: int = 1
    runtime: float = 5.0
    size: int | None = None  # bytes of the disk to use from ``offset``; None = to the end
    offset: int = 0
    queue: int = 0  # the first job's hardware queue; job i drives queue + i
    seed: int = 1
    path: IoPath = "bio"
    """``bio``: each I/O is one virtio request on the hardware queue; ``request``: I/Os go
    through the block layer's plug, which merges adjacent ones (the seed's comparison)."""
    rwmixread: int = 50  # percent of reads in randrw / readwrite
    ioengine: IoEngine = "queue"
    numjobs: int = 1
    verify: VerifyKind | None = None
    batch_complete_min: int = 1
    """fio's ``iodepth_batch_complete_min``: completions the ``queue``/``poll`` engines wait
    for before resubmitting; the device is asked to signal only once that many are done."""
    poll_us: float = 0
    """``queue`` engine: poll the used ring up to this long (adaptive) before sleeping."""
    disable_cb_while_draining: bool = True
    """False: the completion loop before the seed's "Disable callback in virtblk_done()"."""

    @property
    def mixed(self) -> bool:
        """Reads and writes in one run."""
        return self.rw in ("randrw", "readwrite")

    @property
    def writes(self) -> bool:
        """Whether the workload writes at all."""
        return self.rw in ("write", "randwrite") or (self.mixed and self.rwmixread < 100)

    @property
    def random(self) -> bool:
        """Random offsets (else sequential)."""
        return self.rw.startswith("rand")

    @property
    def depth(self) -> int:
        """The iodepth the engine really uses: fio's sync engines do one I/O at a time."""
        return 1 if self.ioengine == "sync" else self.iodepth


# -- results -------------------------------------------------------------------------------
@dataclasses.dataclass
class DirectionStats:
    """One direction (read or write) of one job, or of the group."""

    ios: int
    io_bytes: int
    lat_ns: np.ndarray  # completion latency of each I/O, submission to completion
    samples: list[int]  # I/Os completed in each SAMPLE_NS window

    def percentiles(self) -> dict[float, int]:
        """Completion latency percentiles (ns), fio's set."""
        return _percentiles(self.lat_ns)

    @classmethod
    def merge(cls, parts: list[DirectionStats]) -> DirectionStats:
        """Sum of several jobs' stats (fio's group_reporting); samples add up window by
        window."""
        width = max((len(p.samples) for p in parts), default=0)
        samples = [sum(p.samples[i] for p in parts if i < len(p.samples)) for i in range(width)]
        lat = np.concatenate([p.lat_ns for p in parts]) if parts else np.empty(0, np.int64)
        return cls(sum(p.ios for p in parts), sum(p.io_bytes for p in parts), lat, samples)


@dataclasses.dataclass
class JobResult:
    """What one job measured."""

    job: int
    elapsed: float  # seconds from its first submission to its last completion
    read: DirectionStats
    write: DirectionStats
    errors: int  # I/Os that failed
    first_errno: int  # errno of the first failure (fio's ``error``), 0 if none
    verified: int  # blocks whose content was checked
    mismatches: int  # of which wrong
    first_mismatch: str
    usr_cpu: float  # seconds
    sys_cpu: float
    kicks: int = 0  # device notifications the driver sent (kick eventfd writes)
    interrupts: int = 0  # device interrupts the driver woke up for


DeviceCounters = Callable[[], dict[str, int]]
"""Reads our device's counters (``notifications`` it sent, ``kicks`` that woke it)."""


@dataclasses.dataclass
class BenchResult:
    """What a run measured.  Latencies are completion latencies in nanoseconds."""

    config: BenchConfig
    jobs: list[JobResult]
    device_cpu: float | None
    device_counters: dict[str, int] | None = None
    """What our device counted during the run, when the device is ours."""
    timestamp: float = dataclasses.field(default_factory=time.time)

    def notifications_per_io(self) -> dict[str, float | None]:
        """Notifications per I/O, both ways, as each end counted them: the driver's kicks
        and the interrupts it took; the device's interrupts sent and the kicks that woke
        it (None when the device is not ours)."""
        ios = self.ios or 1
        dev = self.device_counters
        return {
            "driver_kicks": round(sum(j.kicks for j in self.jobs) / ios, 4),
            "driver_interrupts": round(sum(j.interrupts for j in self.jobs) / ios, 4),
            "device_notifications": None if dev is None else round(dev["notifications"] / ios,
                                                                   4),
            "device_kicks": None if dev is None else round(dev["kicks"] / ios, 4),
        }

    @property
    def read(self) -> DirectionStats:
        """Reads of all jobs."""
        return DirectionStats.merge([j.read for j in self.jobs])

    @property
    def write(self) -> DirectionStats:
        """Writes of all jobs."""
        return DirectionStats.merge([j.write for j in self.jobs])

    @property
    def elapsed(self) -> float:
        """The group's runtime: its longest job's (fio's group runtime)."""
        return max((j.elapsed for j in self.jobs), default=0.0)

    @property
    def ios(self) -> int:
        """I/Os completed, both directions, all jobs."""
        return sum(j.read.ios + j.write.ios for j in self.jobs)

    @property
    def io_bytes(self) -> int:
        """Bytes transferred, both directions, all jobs."""
        return sum(j.read.io_bytes + j.write.io_bytes for j in self.jobs)

    @property
    def errors(self) -> int:
        """Failed I/Os plus verification mismatches: anything non-zero fails the run."""
        return sum(j.errors + j.mismatches for j in self.jobs)

    @property
    def lat_ns(self) -> np.ndarray:
        """Every completion latency of the run."""
        return np.concatenate([self.read.lat_ns, self.write.lat_ns])

    @property
    def iops(self) -> float:
        """I/Os per second."""
        return self.ios / self.elapsed if self.elapsed else 0.0

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.io_bytes / self.elapsed if self.elapsed else 0.0

    @property
    def driver_cpu(self) -> float:
        """CPU seconds the jobs used (user + system)."""
        return sum(j.usr_cpu + j.sys_cpu for j in self.jobs)

    def percentiles(self) -> dict[float, int]:
        """Completion latency percentiles (ns), fio's set."""
        return _percentiles(self.lat_ns)

    @property
    def driver_cpu_per_io_us(self) -> float:
        """Driver CPU microseconds per I/O."""
        return self.driver_cpu / self.ios * 1e6 if self.ios else 0.0

    @property
    def device_cpu_per_io_us(self) -> float | None:
        """Device-process CPU microseconds per I/O, when the device's process is known."""
        if self.device_cpu is None or not self.ios:
            return None
        return self.device_cpu / self.ios * 1e6

    def summary(self) -> dict[str, object]:
        """A flat, JSON-able record (what the benchmark scripts tabulate)."""
        c = self.config
        lat = self.lat_ns
        return {
            "rw": c.rw,
            "bs": c.bs,
            "iodepth": c.iodepth,
            "ioengine": c.ioengine,
            "numjobs": c.numjobs,
            "path": c.path,
            "runtime_s": round(self.elapsed, 3),
            "ios": self.ios,
            "errors": self.errors,
            "iops": round(self.iops, 1),
            "bw_bytes_per_s": round(self.bandwidth, 1),
            "lat_mean_ns": int(lat.mean()) if len(lat) else 0,
            "lat_max_ns": int(lat.max()) if len(lat) else 0,
            "lat_percentiles_ns": {f"{p:f}": v for p, v in self.percentiles().items()},
            "driver_cpu_us_per_io": round(self.driver_cpu_per_io_us, 3),
            "device_cpu_us_per_io": (
                None
                if self.device_cpu_per_io_us is None
                else round(self.device_cpu_per_io_us, 3)
            ),
            "notifications_per_io": self.notifications_per_io(),
        }

    def fio_json(
        self, *, jobname: str = "virtblk", target: str = "", group_reporting: bool = False
    ) -> dict[str, Any]:
        """The run in fio's ``--output-format=json`` layout (fio 3.x key names and units:
        ``bw`` KiB/s, ``runtime`` ms, ``clat_ns`` ns, percentiles keyed ``"99.000000"``).
        Our own figures (CPU per I/O, verification) sit under ``"virtblk"``, a key fio
        tooling ignores."""
        from virtblk import __version__

        c = self.config
        options = _job_options(jobname, c)
        group = _fio_job(jobname, options, self.elapsed, self.read, self.write,
                         errors=sum(j.errors + j.mismatches for j in self.jobs),
                         first_errno=next((_job_errno(j) for j in self.jobs if _job_errno(j)),
                                          0),
                         usr=sum(j.usr_cpu for j in self.jobs),
                         sys=sum(j.sys_cpu for j in self.jobs))  # fmt: skip
        if group_reporting:
            jobs = [group]
        else:
            jobs = [
                _fio_job(jobname, options, j.elapsed, j.read, j.write,
                         errors=j.errors + j.mismatches, first_errno=_job_errno(j),
                         usr=j.usr_cpu, sys=j.sys_cpu)
                for j in self.jobs
            ]  # fmt: skip
        ours: dict[str, Any] = {
            "target": target,
            "ioengine": c.ioengine,
            "path": c.path,
            "numjobs": c.numjobs,
            "driver_cpu_s": round(self.driver_cpu, 6),
            "device_cpu_s": None if self.device_cpu is None else round(self.device_cpu, 6),
            "driver_cpu_us_per_io": round(self.driver_cpu_per_io_us, 3),
            "device_cpu_us_per_io": (
                None
                if self.device_cpu_per_io_us is None
                else round(self.device_cpu_per_io_us, 3)
            ),
            "notifications_per_io": self.notifications_per_io(),
            "sample_ms": SAMPLE_NS // 1_000_000,
            "verify": None if c.verify is None else {
                "kind": c.verify,
                "verified": sum(j.verified for j in self.jobs),
                "mismatches": sum(j.mismatches for j in self.jobs),
                "first_mismatch": next((j.first_mismatch for j in self.jobs
                                        if j.first_mismatch), ""),
            },
        }  # fmt: skip
        if not group_reporting:
            ours["group"] = group
        ts = self.timestamp
        return {
            "fio version": f"virtblk-{__version__}",
            "timestamp": int(ts),
            "timestamp_ms": int(ts * 1000),
            "time": time.ctime(ts),
            "jobs": jobs,
            "virtblk": ours,
        }


def _job_errno(j: JobResult) -> int:
    if j.first_errno:
        return j.first_errno
    return errno.EILSEQ if j.mismatches else 0  # what fio reports for a verify failure


def _job_options(jobname: str, c: BenchConfig) -> dict[str, str]:
    """fio's ``job options``: the options given, as strings."""
    opts = {
        "name": jobname,
        "rw": c.rw,
        "bs": str(c.bs),
        "iodepth": str(c.iodepth),
        "ioengine": c.ioengine,
        "runtime": f"{c.runtime:g}",
        "numjobs": str(c.numjobs),
        "offset": str(c.offset),
    }
    if c.size is not None:
        opts["size"] = str(c.size)
    if c.mixed:
        opts["rwmixread"] = str(c.rwmixread)
    if c.verify is not None:
        opts["verify"] = c.verify
    return opts


def _percentiles(lat: np.ndarray) -> dict[float, int]:
    if not len(lat):
        return {p: 0 for p in PERCENTILES}
    values = np.percentile(lat, PERCENTILES)
    return {p: int(v) for p, v in zip(PERCENTILES, values, strict=True)}


def _lat_json(lat: np.ndarray, *, percentiles: bool) -> dict[str, Any]:
    n = len(lat)
    out: dict[str, Any] = {
        "min": int(lat.min()) if n else 0,
        "max": int(lat.max()) if n else 0,
        "mean": float(lat.mean()) if n else 0.0,
        "stddev": float(lat.std()) if n > 1 else 0.0,
        "N": n,
    }
    if percentiles and n:
        out["percentile"] = {f"{p:f}": v for p, v in _percentiles(lat).items()}
    return out


def _dir_json(d: DirectionStats, elapsed: float) -> dict[str, Any]:
    """One direction as fio writes it: ``bw`` in KiB/s, ``runtime`` in ms."""
    runtime_ms = round(elapsed * 1000) if d.ios else 0
    bw_bytes = d.io_bytes * 1000 // runtime_ms if runtime_ms else 0
    per_s = 1e9 / SAMPLE_NS
    iops_s = np.asarray(d.samples, dtype=np.float64) * per_s
    bw_s = iops_s * (d.io_bytes / d.ios if d.ios else 0) / 1024
    zero = {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    n = len(iops_s)
    return {
        "io_bytes": d.io_bytes,
        "io_kbytes": d.io_bytes // 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024,
        "iops": d.ios * 1000 / runtime_ms if runtime_ms else 0.0,
        "runtime": runtime_ms,
        "total_ios": d.ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": zero,
        "clat_ns": _lat_json(d.lat_ns, percentiles=True),
        "lat_ns": _lat_json(d.lat_ns, percentiles=False),
        "bw_min": int(bw_s.min()) if n else 0,
        "bw_max": int(bw_s.max()) if n else 0,
        "bw_agg": 100.0 if n else 0.0,
        "bw_mean": float(bw_s.mean()) if n else 0.0,
        "bw_dev": float(bw_s.std()) if n > 1 else 0.0,
        "bw_samples": n,
        "iops_min": int(iops_s.min()) if n else 0,
        "iops_max": int(iops_s.max()) if n else 0,
        "iops_mean": float(iops_s.mean()) if n else 0.0,
        "iops_stddev": float(iops_s.std()) if n > 1 else 0.0,
        "iops_samples": n,
    }


def _fio_job(
    jobname: str,
    options: dict[str, str],
    elapsed: float,
    read: DirectionStats,
    write: DirectionStats,
    *,
    errors: int,
    first_errno: int,
    usr: float,
    sys: float,
) -> dict[str, Any]:
    empty = DirectionStats(0, 0, np.empty(0, np.int64), [])
    zero = {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    return {
        "jobname": jobname,
        "groupid": 0,
        "error": first_errno,
        "total_err": errors,
        "eta": 0,
        "elapsed": round(elapsed),
        "job options": options,
        "read": _dir_json(read, elapsed),
        "write": _dir_json(write, elapsed),
        "trim": _dir_json(empty, elapsed),
        "sync": {"total_ios": 0, "lat_ns": zero},
        "job_runtime": round(elapsed * 1000),
        "usr_cpu": usr / elapsed * 100 if elapsed else 0.0,
        "sys_cpu": sys / elapsed * 100 if elapsed else 0.0,
        "ctx": 0,
        "majf": 0,
        "minf": 0,
    }


# -- verification ------------------------------------------------------------------------------
class Verifier:
    """fio's verify, simplified: a header and a checksum in every block written.

    The header says what the block must be (magic, offset, generation); the checksum,
    over the header and the rest of the block, catches any byte changed.  The rest of the
    block is a pseudo-random pattern fixed per job (making it per write would cost more
    than the device under test; the header already tells a stale or misplaced block).
    """

    MAGIC = b"VBLKVRFY"
    HEADER = struct.Struct("<8sQQI4x16s")  # magic, offset, generation, bs, digest
    _DIGEST = slice(32, 48)

    def __init__(self, kind: VerifyKind, bs: int, seed: int) -> None:
        self.kind = kind
        self.bs = bs
        self.filler = np.random.default_rng(seed).bytes(bs - self.HEADER.size)
        self._generation = 0
        if kind == "crc32c":
            import crc32c  # small C extension, imported only when asked for

            self._crc32c: Callable[[bytes | memoryview], int] = crc32c.crc32c

    def _digest(self, block: memoryview) -> bytes:
        if self.kind == "md5":
            return hashlib.md5(block, usedforsecurity=False).digest()
        return self._crc32c(block).to_bytes(4, "little").ljust(16, b"\0")

    def fill(self, block: memoryview, offset: int) -> int:
        """Write a fresh header, pattern and checksum into ``block``; returns its
        generation."""
        self._generation += 1
        gen = self._generation
        self.HEADER.pack_into(block, 0, self.MAGIC, offset, gen, self.bs, bytes(16))
        block[self.HEADER.size :] = self.filler
        block[self._DIGEST] = self._digest(block)
        return gen

    def check(self, block: memoryview, offset: int, generation: int) -> str | None:
        """Why ``block`` read at ``offset`` is not what generation ``generation`` wrote, or
        None when it is."""
        magic, got_offset, got_gen, got_bs, digest = self.HEADER.unpack_from(block)
        if magic != self.MAGIC:
            return f"offset {offset}: no verify header (magic {magic!r})"
        if got_offset != offset:
            return f"offset {offset}: block written for offset {got_offset}"
        if got_gen != generation or got_bs != self.bs:
            return f"offset {offset}: generation {got_gen}, expected {generation} (stale data)"
        copy = bytearray(block)
        copy[self._DIGEST] = bytes(16)
        if self._digest(memoryview(copy)) != digest:
            return f"offset {offset}: {self.kind} checksum mismatch"
        return None


# -- one job ------------------------------------------------------------------------------------
class _Job:
    """One job's workload and bookkeeping; the engines call ``pick``, ``begin`` and
    ``end`` around every I/O."""

    _TABLE = 1 << 16

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
        """The next ``n`` I/Os of the timed phase: their offsets, and their directions
        (None: all ``cfg.writes``).  The queue engine's batched ``next_io``."""
        if self._random:
            i = self._i
            if i + n > self._TABLE:
                rest = self._offsets[i:]
                rest_dirs = self._dirs[i:] if self._mixed else []
                self._refill()
                more, more_dirs = self.take(n - len(rest))
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
        for d in (_READ, _WRITE):
            self.samples[d].append(len(self.lat[d]))

    def stats(self, d: int) -> DirectionStats:
        """One direction's stats; samples become per-window counts."""
        cum = self.samples[d]
        per_window = [b - a for a, b in zip([0, *cum], cum, strict=False)]
        ios = len(self.lat[d])
        return DirectionStats(ios, ios * self.bs, np.asarray(self.lat[d], np.int64), per_window)


class _Clock:
    """Sampling windows and the shared progress counters, checked once per batch."""

    def __init__(self, job: _Job, counters: np.ndarray | None) -> None:
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
            self.counters[base] = len(job.lat[_READ])
            self.counters[base + 1] = len(job.lat[_WRITE])


# -- engines --------------------------------------------------------------------------------
class _Resources:
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


def _engine_handle(res: _Resources, job: _Job, deadline: int | None, clock: _Clock) -> None:
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
            offsets, writes = take(len(slots))
            if writes is None:
                op = write if writes_only else read
                for i, offset in zip(slots, offsets, strict=True):
                    op(offset, bufs[i], i)
                    start[i] = now
            else:
                for i, offset, w in zip(slots, offsets, writes, strict=True):
                    (write if w else read)(offset, bufs[i], i)
                    start[i] = now
                    slot_write[i] = w
            return len(slots)
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


def _engine_plug(res: _Resources, job: _Job, deadline: int | None, clock: _Clock) -> None:
    """``path="request"``: every I/O a bio through the block layer's plug, which sorts and
    merges adjacent ones into requests (the seed's request path); slots keep their bio and
    buffer for the whole run."""
    disk, cfg = res.disk, job.cfg
    segs_of: list[list[tuple[int, int]]] = []
    for b in res.bufs:
        gpa = disk.buffer_address(b)
        assert gpa is not None
        (segs,) = disk.request_segments(gpa, cfg.bs)
        segs_of.append(segs)
    engine = PluggedQueue(res.queue, QueueLimits.from_limits(disk.limits,
                                                             disk.logical_block_size))
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


def _engine_sync(res: _Resources, job: _Job, deadline: int | None, clock: _Clock) -> None:
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


def _engine_aio(res: _Resources, job: _Job, deadline: int | None, clock: _Clock) -> None:
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


_ENGINES: dict[str, Callable[[_Resources, _Job, int | None, _Clock], None]] = {
    "queue": _engine_handle,
    "poll": _engine_handle,
    "sync": _engine_sync,
    "aio": _engine_aio,
}


def _run_job(
    res: _Resources, cfg: BenchConfig, index: int, base: int, span: int,
    counters: np.ndarray | None,
) -> JobResult:
    """Run one job to the end: the timed phase, then (verify, write-only) the read-back."""
    job = _Job(cfg, index, base, span, res.bufs)
    engine = _engine_plug if cfg.path == "request" else _ENGINES[cfg.ioengine]
    q = res.queue
    kicks0, interrupts0 = q.stats_kicks, q.stats_interrupts
    cpu0 = os.times()
    clock = _Clock(job, counters)
    engine(res, job, clock.t0 + int(cfg.runtime * 1e9), clock)
    elapsed = (time.perf_counter_ns() - clock.t0) / 1e9
    cpu1 = os.times()
    kicks, interrupts = q.stats_kicks - kicks0, q.stats_interrupts - interrupts0
    read, write = job.stats(_READ), job.stats(_WRITE)
    if job.verifier is not None and not cfg.mixed:
        # The read-back is not part of the measured run (its reads are not the workload).
        job.start_readback()
        engine(res, job, None, _Clock(job, None))
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


# -- the run -----------------------------------------------------------------------------------
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
    resources: list[_Resources] = []
    try:
        for i in range(cfg.numjobs):
            resources.append(_Resources(disk, cfg, i))
        bases = [first + i * span * cfg.bs for i in range(cfg.numjobs)]
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
    return BenchResult(config=cfg, jobs=jobs, device_cpu=dev_cpu, device_counters=counted)


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
    resources: list[_Resources],
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
        results = [_run_job(resources[0], cfg, 0, bases[0], span, counters)]
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
    res: _Resources,
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
        result: object = _run_job(res, cfg, index, base, span, counters)
    except BaseException:
        result = f"job {index}: {traceback.format_exc()}"
        code = 1
    try:
        data = pickle.dumps(result)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        os._exit(code)


def plot(result: BenchResult, path: str, title: str = "") -> None:
    """Draw the latency distribution (CDF, log x) and IOPS over time into a PNG.
    Needs matplotlib (the ``plot`` extra); ImportError says so otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install 'virtblk[plot]'"
        ) from exc
    fig, (ax_lat, ax_iops) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, d, color in (("read", result.read, "tab:blue"), ("write", result.write,
                                                               "tab:orange")):
        if not d.ios:
            continue
        lat_us = np.sort(d.lat_ns) / 1000
        frac = np.arange(1, len(lat_us) + 1) / len(lat_us)
        ax_lat.plot(lat_us, frac * 100, color=color, label=f"{name} ({d.ios:,} I/Os)")
        p50, p99 = np.percentile(lat_us, [50, 99])
        for p, style in ((p50, ":"), (p99, "--")):
            ax_lat.axvline(p, color=color, linestyle=style, linewidth=0.8)
        t = (np.arange(len(d.samples)) + 1) * SAMPLE_NS / 1e9
        iops = np.asarray(d.samples, dtype=np.float64) * (1e9 / SAMPLE_NS)
        ax_iops.plot(t, iops, marker="o", markersize=3, color=color, label=name)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("completion latency (µs, log scale); dotted p50, dashed p99")
    ax_lat.set_ylabel("I/Os completed within (%)")
    ax_lat.set_ylim(0, 100)
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(loc="lower right")
    ax_lat.set_title("latency distribution (CDF)")
    ax_iops.set_xlabel("time (s)")
    ax_iops.set_ylabel(f"IOPS (averaged over {SAMPLE_NS // 1_000_000} ms)")
    ax_iops.set_ylim(bottom=0)
    ax_iops.grid(True, alpha=0.3)
    ax_iops.legend(loc="lower right")
    ax_iops.set_title("IOPS over time")
    c = result.config
    fig.suptitle(
        title
        or f"{c.rw} bs={c.bs} iodepth={c.iodepth} numjobs={c.numjobs} ioengine={c.ioengine}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
