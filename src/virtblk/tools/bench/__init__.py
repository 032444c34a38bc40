"""The benchmark engine behind ``virtblk bench``: fio's workloads, engines and report.

A run is ``numjobs`` jobs, each keeping ``iodepth`` I/Os in flight on its own hardware
queue for ``runtime`` seconds, with fio's words for what it does (``rw``, ``bs``,
``rwmixread``, ``ioengine``, ``verify``) and fio's JSON layout for what it measured, so
that tools written for fio read our results.

Engines (``ioengine``, :mod:`.engines`), from the simplest API to the fastest:

* ``sync``: the :class:`~virtblk.driver.disk.Disk` API, one blocking call at a time (fio's
  ``psync``: iodepth is 1 whatever is asked);
* ``aio``: :class:`~virtblk.aio.AsyncDisk`, ``iodepth`` asyncio tasks;
* ``queue``: the hardware queue itself, as fio's engines drive a device: each slot keeps
  its tag and its buffer in shared memory for the whole run, completions are reaped in
  batches and resubmitted with one kick (``path="request"`` puts the block layer's plug,
  which merges adjacent I/O, in between);
* ``poll``: a polling :class:`~virtblk.driver.queue_api.QueueHandle` (no interrupts: the
  used ring is read in a loop).

Jobs after the first run in child processes forked once the disk is set up
(:mod:`.runner`): a vhost-user device has one frontend connection, so the parent owns it
and each child drives its own hardware queue (ring memory and eventfds are inherited),
sending its results back through a pipe.  Everything a child uses (buffers, queue handles)
is allocated before the fork: the allocator is ordinary process memory, so children
allocating on their own would hand out the same shared memory twice.

Each job works on its own slice of the range (fio's ``offset_increment`` = size/numjobs),
so that verification stays exact with several jobs (:mod:`.workload`).

``verify`` (fio's, simplified, :mod:`.verify`): every write carries a header (magic,
offset, a generation number) and a checksum (md5 or crc32c) of the whole block; reads of
blocks this run wrote check it.  ``write``/``randwrite`` read back and check every block
they wrote after the timed phase; ``randrw``/``readwrite`` check as they read.  While
verifying, no two I/Os to one block are in flight together, so what a read must find is
known exactly.

The modules: :mod:`.config` (what to run), :mod:`.results` (what was measured),
:mod:`.fio` (fio's JSON), :mod:`.jobfile` (fio's job files), :mod:`.logs` (fio's log files),
:mod:`.verify`, :mod:`.workload`, :mod:`.engines`, :mod:`.runner` (the run and its
processes), :mod:`.plot`.
"""

import os

# numpy's BLAS starts a thread per CPU that spins after work; the bench never multiplies
# matrices, and on a small machine those threads take CPU from the device it measures.
# Set before any module of the package imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from virtblk.tools.bench.config import (
    PERCENTILES,
    SAMPLE_NS,
    BenchConfig,
    IoEngine,
    IoPath,
    RwMode,
    VerifyKind,
)
from virtblk.tools.bench.fio import fio_json
from virtblk.tools.bench.plot import plot
from virtblk.tools.bench.results import BenchResult, DeviceCounters, DirectionStats, JobResult
from virtblk.tools.bench.runner import Progress, check_config, run_bench
from virtblk.tools.bench.verify import Verifier

__all__ = [
    "PERCENTILES",
    "SAMPLE_NS",
    "BenchConfig",
    "BenchResult",
    "DeviceCounters",
    "DirectionStats",
    "IoEngine",
    "IoPath",
    "JobResult",
    "Progress",
    "RwMode",
    "Verifier",
    "VerifyKind",
    "check_config",
    "fio_json",
    "plot",
    "run_bench",
]
