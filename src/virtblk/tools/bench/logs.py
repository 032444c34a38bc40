"""fio's log files (``write_lat_log``, ``write_iops_log``, ``write_bw_log``), so that fio's
own plotting tools (``fio_generate_plots``, ``fio2gnuplot``) draw a virtblk run.

fio 3.x's format ("Log File Formats" in its HOWTO), one line per entry::

    time (ms since the job started), value, data direction (0 read, 1 write), block size, 0

the last column being the command priority (fio writes the offset before it only with
``log_offset=1``, which is not supported).  Values: latency in ns, bandwidth in KiB/s, IOPS.

Without ``log_avg_msec`` every I/O has a line: its latency; IOPS 1; bandwidth as fio
computes it for one I/O (``bytes * 10**6 / latency_ns``).  With it, each window of that many
ms has a line per direction the job did, at the window's end: the mean latency of the I/Os
completed in it (no line when none did), the IOPS and KiB/s of the window; block size 0,
as fio writes them.  Only whole windows are logged.

What we measure is from submission to completion: the ``lat`` and ``clat`` logs both hold
it, and the ``slat`` log is empty, as fio's is for engines that do not measure submission
latency.  Files are named as fio names them: ``PREFIX_lat.N.log`` with N the job's number
in the whole job file (1..), without ``.N`` when ``per_job_logs=0``.

The parent writes every job's logs from the completion times the jobs return with their
results (:class:`~virtblk.tools.bench.results.DirectionStats` ``done_ns``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

import numpy as np

from virtblk.tools.bench.config import BenchConfig
from virtblk.tools.bench.results import BenchResult, DirectionStats, JobResult

_MS = 1_000_000


def log_paths(cfg: BenchConfig, number: int) -> dict[str, Path]:
    """The files job ``number`` (1..) writes, by fio's log type (lat, clat, slat, iops,
    bw)."""
    suffix = f".{number}.log" if cfg.per_job_logs else ".log"
    paths: dict[str, Path] = {}
    for prefix, kinds in ((cfg.write_lat_log, ("lat", "clat", "slat")),
                          (cfg.write_iops_log, ("iops",)), (cfg.write_bw_log, ("bw",))):
        if prefix is not None:
            for kind in kinds:
                paths[kind] = Path(f"{prefix}_{kind}{suffix}")
    return paths


def write_logs(result: BenchResult, first_number: int = 1) -> list[Path]:
    """Write the logs ``result.config`` asks for, job ``i`` of the run as fio's job number
    ``first_number + i``; returns the files written."""
    cfg = result.config
    written: list[Path] = []
    for job in result.jobs:
        for kind, path in log_paths(cfg, first_number + job.job).items():
            rows = log_rows(job, cfg, kind)
            if path.parent != Path():
                os.makedirs(path.parent, exist_ok=True)
            with open(path, "w") as f:
                _write_rows(f, rows)
            written.append(path)
    return written


_CHUNK = 1 << 16


def _write_rows(f: TextIO, rows: np.ndarray) -> None:
    """fio's ``a, b, c, d, e`` lines; one %-format per chunk of rows (a million-line log in
    about a second; ``np.savetxt`` formats row by row, four times slower)."""
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        f.write(("%d, %d, %d, %d, %d\n" * len(chunk)) % tuple(chunk.ravel().tolist()))


def log_rows(job: JobResult, cfg: BenchConfig, kind: str) -> np.ndarray:
    """One log's lines as an (n, 5) integer array: time ms, value, direction, bs, 0."""
    if kind == "slat":
        return np.empty((0, 5), np.int64)
    parts = []
    for d, stats in enumerate((job.read, job.write)):
        if stats.ios:
            if cfg.log_avg_msec:
                parts.append(_windowed(stats, d, cfg, kind, job.elapsed))
            else:
                parts.append(_per_io(stats, d, cfg.bs, kind))
    if not parts:
        return np.empty((0, 5), np.int64)
    rows = np.concatenate(parts)
    return rows[np.argsort(rows[:, 0], kind="stable")]


def _done(stats: DirectionStats) -> np.ndarray:
    if stats.done_ns is None:
        raise ValueError("the run did not note completion times (BenchConfig.logging)")
    return stats.done_ns


def _per_io(stats: DirectionStats, d: int, bs: int, kind: str) -> np.ndarray:
    lat = stats.lat_ns.astype(np.int64)
    if kind in ("lat", "clat"):
        value = lat
    elif kind == "iops":
        value = np.ones_like(lat)
    else:  # bw: fio's add_bw_sample for one I/O, bytes * 1e6 / ns
        value = np.where(lat > 0, bs * 1_000_000 // np.maximum(lat, 1), 0)
    n = len(lat)
    return np.column_stack([_done(stats) // _MS, value, np.full(n, d), np.full(n, bs),
                            np.zeros(n, np.int64)]).astype(np.int64)  # fmt: skip


def _windowed(
    stats: DirectionStats, d: int, cfg: BenchConfig, kind: str, elapsed: float
) -> np.ndarray:
    width = cfg.log_avg_msec * _MS
    windows = int(elapsed * 1e9) // width
    index = _done(stats) // width
    inside = index < windows
    index = index[inside]
    counts = np.bincount(index, minlength=windows)[:windows]
    ends = (np.arange(windows, dtype=np.int64) + 1) * cfg.log_avg_msec
    if kind in ("lat", "clat"):
        sums = np.bincount(index, weights=stats.lat_ns[inside].astype(np.float64),
                           minlength=windows)[:windows]  # fmt: skip
        some = counts > 0
        value = (sums[some] // counts[some]).astype(np.int64)
        ends = ends[some]
    elif kind == "iops":
        value = counts * 1000 // cfg.log_avg_msec
    else:  # bw, KiB/s
        value = counts * cfg.bs * 1000 // (1024 * cfg.log_avg_msec)
    n = len(value)
    zero = np.zeros(n, np.int64)
    return np.column_stack([ends, value, np.full(n, d), zero, zero]).astype(np.int64)
