"""The benchmark engine behind ``virtblk bench``: keep ``iodepth`` requests in flight on one
hardware queue and measure IOPS, bandwidth, completion latency and CPU per I/O.

It drives the queue directly, as fio's engines drive a device: each slot keeps its tag and
its buffer in shared memory for the whole run, completions are reaped in batches and the
batch is resubmitted with a single kick, so what is measured is the driver and the device,
not buffer management.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from virtblk.driver.blklayer import PluggedQueue, QueueLimits
from virtblk.driver.disk import Disk
from virtblk.spec import SECTOR_SHIFT, RequestType, Status

RwMode = Literal["read", "write", "randread", "randwrite"]
IoPath = Literal["bio", "request"]
PERCENTILES = (1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 99.99)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run: fio's vocabulary."""

    rw: RwMode = "randread"
    bs: int = 4096
    iodepth: int = 1
    runtime: float = 5.0
    size: int | None = None  # bytes of the disk to use from ``offset``; None = to the end
    offset: int = 0
    queue: int = 0
    seed: int = 1
    path: IoPath = "bio"
    """``bio``: each I/O is one virtio request on the hardware queue; ``request``: I/Os go
    through the block layer's plug, which merges adjacent ones (the seed's comparison)."""


@dataclasses.dataclass
class BenchResult:
    """What a run measured.  Latencies are completion latencies in nanoseconds."""

    config: BenchConfig
    ios: int
    io_bytes: int
    elapsed: float
    errors: int
    lat_ns: np.ndarray
    driver_cpu: float
    device_cpu: float | None

    @property
    def iops(self) -> float:
        """I/Os per second."""
        return self.ios / self.elapsed if self.elapsed else 0.0

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.io_bytes / self.elapsed if self.elapsed else 0.0

    def percentiles(self) -> dict[float, int]:
        """Completion latency percentiles (ns), fio's set."""
        if not len(self.lat_ns):
            return {p: 0 for p in PERCENTILES}
        values = np.percentile(self.lat_ns, PERCENTILES)
        return {p: int(v) for p, v in zip(PERCENTILES, values, strict=True)}

    @property
    def driver_cpu_per_io_us(self) -> float:
        """Driver-process CPU microseconds per I/O."""
        return self.driver_cpu / self.ios * 1e6 if self.ios else 0.0

    @property
    def device_cpu_per_io_us(self) -> float | None:
        """Device-process CPU microseconds per I/O, when the device's process is known."""
        if self.device_cpu is None or not self.ios:
            return None
        return self.device_cpu / self.ios * 1e6

    def summary(self) -> dict[str, object]:
        """A flat, JSON-able record."""
        lat = self.lat_ns
        return {
            "rw": self.config.rw,
            "bs": self.config.bs,
            "iodepth": self.config.iodepth,
            "path": self.config.path,
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
        }


def run_bench(
    disk: Disk,
    cfg: BenchConfig,
    *,
    device_cpu: Callable[[], float] | None = None,
    progress: Callable[[float, int], None] | None = None,
) -> BenchResult:
    """Run ``cfg`` against ``disk``; ``device_cpu`` reads the device process's CPU seconds."""
    write = cfg.rw in ("write", "randwrite")
    if write and disk.read_only:
        raise ValueError(f"{cfg.rw} on a read-only disk")
    bs = cfg.bs
    if bs <= 0 or bs % disk.logical_block_size:
        raise ValueError(f"bs {bs} must be a multiple of {disk.logical_block_size}")
    if cfg.offset % bs:
        raise ValueError(f"offset {cfg.offset} must be a multiple of bs {bs}")
    span = (cfg.size if cfg.size is not None else disk.size - cfg.offset) // bs
    if span <= 0 or cfg.offset + span * bs > disk.size:
        raise ValueError("the range to test is empty or past the end of the disk")
    q = disk.device.queues[cfg.queue]
    depth = max(1, min(cfg.iodepth, q.depth))
    rng = np.random.default_rng(cfg.seed)
    if cfg.rw.startswith("rand"):
        blocks = rng.integers(0, span, size=1 << 16, dtype=np.int64)
    else:
        blocks = np.arange(min(span, 1 << 16), dtype=np.int64)
    sectors = ((blocks * bs + cfg.offset) >> SECTOR_SHIFT).tolist()
    nsect = len(sectors)
    seq_wraps = not cfg.rw.startswith("rand") and span > nsect

    memory = disk.device.memory
    bufs = [disk.buffer(bs) for _ in range(depth)]
    if write:
        for b in bufs:
            b[:] = rng.bytes(bs)
    segs_of: list[list[tuple[int, int]]] = []
    for b in bufs:
        gpa = memory.guest_address_of(b)
        assert gpa is not None
        segs_of.append([(gpa, bs)])
    # A slot is a Request (bio path) or a Bio (request path); both have ``sector`` and
    # ``status``, and both engines have ``submit_batch`` and ``reap``.
    engine: Any
    slots: list[Any]
    if cfg.path == "request":
        engine = PluggedQueue(q, QueueLimits.from_limits(disk.limits, disk.logical_block_size))
        slots = [engine.bio(write, segs) for segs in segs_of]
    else:
        engine = q
        slots = [q.get_tag() for _ in range(depth)]
        type_ = int(RequestType.OUT if write else RequestType.IN)
        for r, segs in zip(slots, segs_of, strict=True):
            # Each slot keeps its type and buffer for the whole run: the queue's per-tag
            # indirect table is written once, a resubmission changes only the sector.
            r.type = type_
            r.callback = None
            if write:
                r.out_bufs, r.in_bufs = segs, ()
            else:
                r.out_bufs, r.in_bufs = (), segs
    start: dict[Any, int] = {}
    lat: list[int] = []
    cursor = 0
    base_sector = 0  # sequential runs longer than the table continue past it
    errors = 0
    ok = int(Status.OK)
    step = bs >> SECTOR_SHIFT

    def submit(batch: list[Any]) -> None:
        nonlocal cursor, base_sector
        now = time.perf_counter_ns()
        for r in batch:
            r.sector = sectors[cursor] + base_sector
            cursor += 1
            if cursor == nsect:
                cursor = 0
                if seq_wraps:
                    base_sector = (base_sector + nsect * step) % (span * step)
            start[r] = now
        engine.submit_batch(batch)

    cpu0 = time.process_time()
    dev0 = device_cpu() if device_cpu else None
    t0 = time.perf_counter_ns()
    deadline = t0 + int(cfg.runtime * 1e9)
    next_report = t0 + 1_000_000_000
    submit(slots)
    in_flight = depth
    ios = 0
    while in_flight:
        batch = engine.reap(timeout=10.0)
        now = time.perf_counter_ns()
        in_flight -= len(batch)
        for r in batch:
            lat.append(now - start[r])
            if r.status != ok:
                errors += 1
        ios += len(batch)
        if now < deadline and batch:
            submit(batch)
            in_flight += len(batch)
        if progress is not None and now >= next_report:
            progress((now - t0) / 1e9, ios)
            next_report += 1_000_000_000
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    driver_cpu = time.process_time() - cpu0
    dev_cpu = device_cpu() - dev0 if device_cpu and dev0 is not None else None
    if cfg.path == "bio":
        for r in slots:
            q.put_tag(r)
    for b in bufs:
        disk.free_buffer(b)
    return BenchResult(
        config=cfg,
        ios=ios,
        io_bytes=ios * bs,
        elapsed=elapsed,
        errors=errors,
        lat_ns=np.asarray(lat, dtype=np.int64),
        driver_cpu=driver_cpu,
        device_cpu=dev_cpu,
    )
