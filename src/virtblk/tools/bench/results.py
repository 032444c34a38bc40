"""What a bench run measured: per direction, per job and for the run, with the figures
the benchmark scripts tabulate (:meth:`BenchResult.summary`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from virtblk.tools.bench.config import PERCENTILES, BenchConfig


@dataclasses.dataclass
class DirectionStats:
    """One direction (read or write) of one job, or of the group."""

    ios: int
    io_bytes: int
    lat_ns: np.ndarray  # completion latency of each I/O, submission to completion
    samples: list[int]  # I/Os completed in each SAMPLE_NS window
    done_ns: np.ndarray | None = None
    """When each I/O completed (ns since the job started, aligned with ``lat_ns``), when
    the run writes fio's logs; a merged group has none."""

    def percentiles(self) -> dict[float, int]:
        """Completion latency percentiles (ns), fio's set."""
        return latency_percentiles(self.lat_ns)

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
    reconnects: int = 0
    """How many times the disk reached its device again during the run (``Disk.reconnects``,
    with ``--reconnect-timeout``)."""
    ring: str = "split"
    """The virtqueue layout the disk ran on (``Disk.ring``): ``"split"`` or ``"packed"``."""
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
        return latency_percentiles(self.lat_ns)

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


def latency_percentiles(lat: np.ndarray) -> dict[float, int]:
    """fio's percentiles (``PERCENTILES``) of ``lat``, zeroes when it is empty."""
    if not len(lat):
        return {p: 0 for p in PERCENTILES}
    values = np.percentile(lat, PERCENTILES)
    return {p: int(v) for p, v in zip(PERCENTILES, values, strict=True)}
