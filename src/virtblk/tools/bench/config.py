"""What a bench run is asked to do: fio's vocabulary (``rw``, ``bs``, ``iodepth``,
``ioengine``, ``verify``...) and the constants the report uses."""

from __future__ import annotations

import dataclasses
from typing import Literal

RwMode = Literal["read", "write", "randread", "randwrite", "randrw", "readwrite"]
IoEngine = Literal["sync", "aio", "queue", "poll"]
IoPath = Literal["bio", "request"]
VerifyKind = Literal["md5", "crc32c"]

PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0,
               99.0, 99.5, 99.9, 99.95, 99.99)  # fmt: skip
"""fio's default ``percentile_list``."""

SAMPLE_NS = 500_000_000
"""IOPS and bandwidth are sampled every 500 ms, fio's default averaging window."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run: fio's vocabulary."""

    rw: RwMode = "randread"
    bs: int = 4096
    iodepth: int = 1
    runtime: float | None = 5.0
    """Seconds each job runs; None: no time limit (then ``time_based`` must be False)."""
    time_based: bool = True
    """fio's: True, a job runs for ``runtime`` whatever it has done; False, it ends once it
    has transferred ``io_size`` bytes (by default one pass over its slice of the range), or
    at ``runtime`` if that comes first."""
    io_size: int | None = None
    """fio's: the bytes each job transfers when not ``time_based``; None: its slice once."""
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
    write_lat_log: str | None = None
    """fio's: a prefix for ``PREFIX_lat.N.log``, ``_clat``, ``_slat`` (see :mod:`.logs`)."""
    write_iops_log: str | None = None
    write_bw_log: str | None = None
    log_avg_msec: int = 0
    """0: a log line per I/O; else one per direction and window of this many ms (its mean)."""
    per_job_logs: bool = True
    """fio's: the job's number in the log's name (``PREFIX_lat.N.log``); False: none."""

    @property
    def logging(self) -> bool:
        """Whether any fio log is written: the engines then note completion times."""
        return any((self.write_lat_log, self.write_iops_log, self.write_bw_log))

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
