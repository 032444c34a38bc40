"""A run in fio's ``--output-format=json`` layout, so that fio's tools read our results."""

from __future__ import annotations

import dataclasses
import errno
import time
from typing import Any

import numpy as np

from virtblk import __version__
from virtblk.tools.bench.config import SAMPLE_NS, BenchConfig
from virtblk.tools.bench.results import BenchResult, DirectionStats, JobResult, latency_percentiles


def fio_json(
    result: BenchResult,
    *,
    jobname: str = "virtblk",
    target: str = "",
    group_reporting: bool = False,
    plus: bool = False,
) -> dict[str, Any]:
    """``result`` in fio's ``--output-format=json`` layout (fio 3.x key names and units:
    ``bw`` KiB/s, ``runtime`` ms, ``clat_ns`` ns, percentiles keyed ``"99.000000"``);
    with ``plus``, ``json+``: each direction's ``clat_ns`` also has fio's latency
    histogram (``bins``, see :func:`plat_bins`).
    Our own figures (CPU per I/O, verification) sit under ``"virtblk"``, a key fio
    tooling ignores."""
    return fio_json_runs([FioRun(jobname, result, group_reporting)], target=target, plus=plus)


@dataclasses.dataclass(frozen=True)
class FioRun:
    """One job section's run, as a job file's report lists it."""

    jobname: str
    result: BenchResult
    group_reporting: bool = False


def fio_json_runs(runs: list[FioRun], *, target: str = "", plus: bool = False) -> dict[str, Any]:
    """Several runs (a job file's sections, one after another) in one fio JSON document:
    their job entries in order, each run its own group (``groupid`` 0, 1, ...), as fio
    reports jobs separated by ``stonewall``.  ``"virtblk"`` holds our figures: for one run
    as :func:`fio_json` has them, for several ``{"target", "runs": [...]}``, one per run."""
    jobs: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    for groupid, run in enumerate(runs):
        run_jobs, run_ours = _run_json(run, groupid, target, plus)
        jobs.extend(run_jobs)
        ours.append(run_ours)
    ts = runs[0].result.timestamp if runs else time.time()
    return {
        "fio version": f"virtblk-{__version__}",
        "timestamp": int(ts),
        "timestamp_ms": int(ts * 1000),
        "time": time.ctime(ts),
        "jobs": jobs,
        "virtblk": ours[0] if len(ours) == 1 else {"target": target, "runs": ours},
    }


def _run_json(
    run: FioRun, groupid: int, target: str, plus: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One run's job entries (one, or one per job) and our figures for it."""
    result, jobname = run.result, run.jobname
    c = result.config
    options = _job_options(jobname, c)
    group = _fio_job(jobname, options, result.elapsed, result.read, result.write,
                     errors=sum(j.errors + j.mismatches for j in result.jobs),
                     first_errno=next((_job_errno(j) for j in result.jobs if _job_errno(j)),
                                      0),
                     usr=sum(j.usr_cpu for j in result.jobs),
                     sys=sum(j.sys_cpu for j in result.jobs), plus=plus,
                     groupid=groupid)  # fmt: skip
    if run.group_reporting:
        jobs = [group]
    else:
        jobs = [
            _fio_job(jobname, options, j.elapsed, j.read, j.write,
                     errors=j.errors + j.mismatches, first_errno=_job_errno(j),
                     usr=j.usr_cpu, sys=j.sys_cpu, plus=plus, groupid=groupid)
            for j in result.jobs
        ]  # fmt: skip
    ours: dict[str, Any] = {
        "jobname": jobname,
        "target": target,
        "ioengine": c.ioengine,
        "path": c.path,
        "numjobs": c.numjobs,
        "ring": result.ring,
        "driver_cpu_s": round(result.driver_cpu, 6),
        "device_cpu_s": None if result.device_cpu is None else round(result.device_cpu, 6),
        "driver_cpu_us_per_io": round(result.driver_cpu_per_io_us, 3),
        "device_cpu_us_per_io": (
            None
            if result.device_cpu_per_io_us is None
            else round(result.device_cpu_per_io_us, 3)
        ),
        "notifications_per_io": result.notifications_per_io(),
        "reconnects": result.reconnects,
        "sample_ms": SAMPLE_NS // 1_000_000,
        "verify": None if c.verify is None else {
            "kind": c.verify,
            "verified": sum(j.verified for j in result.jobs),
            "mismatches": sum(j.mismatches for j in result.jobs),
            "first_mismatch": next((j.first_mismatch for j in result.jobs
                                    if j.first_mismatch), ""),
        },
    }  # fmt: skip
    if not run.group_reporting:
        ours["group"] = group
    return jobs, ours


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
        "numjobs": str(c.numjobs),
        "offset": str(c.offset),
    }
    if c.runtime is not None:
        opts["runtime"] = f"{c.runtime:g}"
    if c.time_based:
        opts["time_based"] = "1"
    if c.io_size is not None:
        opts["io_size"] = str(c.io_size)
    if c.size is not None:
        opts["size"] = str(c.size)
    if c.mixed:
        opts["rwmixread"] = str(c.rwmixread)
    if c.verify is not None:
        opts["verify"] = c.verify
    return opts


# fio's latency histogram (stat.h): 29 groups of 64 buckets, each group twice as wide as
# the one before; a value keeps its 6 bits below the most significant one.
PLAT_BITS = 6
PLAT_VAL = 1 << PLAT_BITS
PLAT_NR = 29 * PLAT_VAL


def plat_bins(lat: np.ndarray) -> dict[str, int]:
    """``lat`` (ns) in fio's histogram, as ``--output-format=json+`` writes it in
    ``clat_ns.bins``: each non-empty bucket keyed by the value fio gives it (its middle,
    ``plat_idx_to_val``), so fio's own tools (``fio_jsonplus_clat2csv``) read ours.  The
    buckets are fio's ``plat_val_to_idx``: exact below 128 ns, then 64 per power of two."""
    if not len(lat):
        return {}
    values = np.maximum(lat.astype(np.int64), 0)
    _, exponent = np.frexp(values.astype(np.float64))  # exact below 2**53 ns
    msb = np.maximum(exponent.astype(np.int64) - 1, 0)
    error_bits = np.maximum(msb - PLAT_BITS, 0)
    grouped = ((error_bits + 1) << PLAT_BITS) + ((PLAT_VAL - 1) & (values >> error_bits))
    index = np.where(msb <= PLAT_BITS, values, np.minimum(grouped, PLAT_NR - 1))
    counts = np.bincount(index, minlength=PLAT_NR)
    return {str(_plat_value(int(i))): int(counts[i]) for i in np.flatnonzero(counts)}


def _plat_value(index: int) -> int:
    """fio's ``plat_idx_to_val``: the middle of bucket ``index``, in ns."""
    if index < PLAT_VAL << 1:
        return index
    error_bits = (index >> PLAT_BITS) - 1
    base = 1 << (error_bits + PLAT_BITS)
    return base + int((index % PLAT_VAL + 0.5) * (1 << error_bits))


def _lat_json(lat: np.ndarray, *, percentiles: bool, bins: bool = False) -> dict[str, Any]:
    n = len(lat)
    out: dict[str, Any] = {
        "min": int(lat.min()) if n else 0,
        "max": int(lat.max()) if n else 0,
        "mean": float(lat.mean()) if n else 0.0,
        "stddev": float(lat.std()) if n > 1 else 0.0,
        "N": n,
    }
    if percentiles and n:
        out["percentile"] = {f"{p:f}": v for p, v in latency_percentiles(lat).items()}
    if bins and n:
        out["bins"] = plat_bins(lat)
    return out


def _dir_json(d: DirectionStats, elapsed: float, plus: bool = False) -> dict[str, Any]:
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
        "clat_ns": _lat_json(d.lat_ns, percentiles=True, bins=plus),
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
    plus: bool,
    groupid: int = 0,
) -> dict[str, Any]:
    empty = DirectionStats(0, 0, np.empty(0, np.int64), [])
    zero = {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    return {
        "jobname": jobname,
        "groupid": groupid,
        "error": first_errno,
        "total_err": errors,
        "eta": 0,
        "elapsed": round(elapsed),
        "job options": options,
        "read": _dir_json(read, elapsed, plus),
        "write": _dir_json(write, elapsed, plus),
        "trim": _dir_json(empty, elapsed),
        "sync": {"total_ios": 0, "lat_ns": zero},
        "job_runtime": round(elapsed * 1000),
        "usr_cpu": usr / elapsed * 100 if elapsed else 0.0,
        "sys_cpu": sys / elapsed * 100 if elapsed else 0.0,
        "ctx": 0,
        "majf": 0,
        "minf": 0,
    }
