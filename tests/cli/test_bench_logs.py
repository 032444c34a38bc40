"""fio's log files from ``virtblk bench`` (``--write_lat_log``, ``--write_iops_log``,
``--write_bw_log``, ``--log_avg_msec``): what they hold against the run's own JSON, their
layout against the logs real fio writes with the same options, and fio's own tools
(``fio_generate_plots`` with gnuplot, ``fio2gnuplot``) drawing them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

QUICK = ("--backend", "null", "--device-size", "16M", "--output-format", "json")
LOGS = ("--write_lat_log", "x", "--write_iops_log", "x", "--write_bw_log", "x")


def bench_in(directory: Path, *args: str) -> dict[str, Any]:
    """``virtblk bench ARGS`` run in ``directory`` (fio's logs go where the prefix says,
    relative to the working directory); its JSON report."""
    result = subprocess.run(
        [*_argv(), "bench", *args], cwd=directory, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _argv() -> list[str]:
    from interop.serve_process import virtblk_argv

    return virtblk_argv()


def read_log(path: Path) -> np.ndarray:
    """A log's lines as an integer array (one row per line), checking every line has
    fio's five comma-separated integer columns."""
    lines = path.read_text().splitlines()
    for line in lines:
        assert re.fullmatch(r"\d+(, \d+){4}", line), (path, line)
    return np.array([[int(v) for v in line.split(", ")] for line in lines], np.int64).reshape(
        -1, 5
    )


# -- what the logs hold ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["queue", "poll", "sync", "aio"])
def test_a_line_per_io_matching_the_report(tmp_path: Path, engine: str) -> None:
    data = bench_in(tmp_path, *QUICK, *LOGS, "--rw", "randrw", "--runtime", "0.4",
                    "--ioengine", engine, "--iodepth", "8", "--bs", "8k")  # fmt: skip
    job = data["jobs"][0]
    lat = read_log(tmp_path / "x_lat.1.log")
    for d, name in enumerate(("read", "write")):
        mine = lat[lat[:, 2] == d]
        stats = job[name]
        assert len(mine) == stats["total_ios"] > 0
        # The very latencies the report summarises.
        assert mine[:, 1].mean() == pytest.approx(stats["clat_ns"]["mean"], rel=1e-9)
        assert (mine[:, 1].min(), mine[:, 1].max()) == (stats["clat_ns"]["min"],
                                                        stats["clat_ns"]["max"])  # fmt: skip
    assert set(lat[:, 3]) == {8192} and set(lat[:, 4]) == {0}
    assert np.all(np.diff(lat[:, 0]) >= 0)  # in time order
    assert lat[0, 0] >= 0 and lat[-1, 0] <= job["job_runtime"] + 1
    assert np.array_equal(read_log(tmp_path / "x_clat.1.log"), lat)
    assert (tmp_path / "x_slat.1.log").read_text() == ""  # not measured apart, as fio's psync
    iops = read_log(tmp_path / "x_iops.1.log")
    assert set(iops[:, 1]) == {1} and np.array_equal(iops[:, [0, 2, 3]], lat[:, [0, 2, 3]])
    bw = read_log(tmp_path / "x_bw.1.log")
    assert np.array_equal(bw[:, 1], 8192 * 1_000_000 // lat[:, 1])  # fio's bytes*1e6/ns


def test_windows_average_each_direction(tmp_path: Path) -> None:
    data = bench_in(tmp_path, *QUICK, *LOGS, "--rw", "randrw", "--runtime", "1",
                    "--iodepth", "4", "--log_avg_msec", "100")  # fmt: skip
    job = data["jobs"][0]
    iops = read_log(tmp_path / "x_iops.1.log")
    windows = job["job_runtime"] // 100
    for d, name in enumerate(("read", "write")):
        mine = iops[iops[:, 2] == d]
        assert list(mine[:, 0]) == [100 * (k + 1) for k in range(windows)]
        # Whole windows only: what they counted is at most what the run did, and all but
        # the last partial window of it.
        counted = mine[:, 1].sum() // 10
        assert job[name]["total_ios"] * 0.85 < counted <= job[name]["total_ios"]
    bw = read_log(tmp_path / "x_bw.1.log")
    assert np.array_equal(bw[:, 1], iops[:, 1] * 4096 // 1024)  # KiB/s
    lat = read_log(tmp_path / "x_lat.1.log")
    assert set(lat[:, 3]) == {0} and set(lat[:, 4]) == {0}  # windows have no block size
    assert job["read"]["clat_ns"]["min"] <= lat[lat[:, 2] == 0][:, 1].min()


def test_the_verify_read_back_is_not_logged(tmp_path: Path) -> None:
    data = bench_in(tmp_path, *QUICK, "--write_lat_log", "v", "--rw", "randwrite",
                    "--verify", "md5", "--runtime", "0.3", "--backend", "memory")  # fmt: skip
    lat = read_log(tmp_path / "v_lat.1.log")
    assert set(lat[:, 2]) == {1}
    assert len(lat) == data["jobs"][0]["write"]["total_ios"]


def test_each_job_its_own_log_numbered_across_the_job_file(tmp_path: Path) -> None:
    """fio numbers a job file's jobs 1.. across its sections (``.N``); every job, forked
    ones included, gets its log."""
    (tmp_path / "jobs.fio").write_text("""
[global]
time_based
runtime=300ms
ioengine=libaio
iodepth=4
write_iops_log=j
log_avg_msec=100
[two]
rw=randread
numjobs=2
[one]
rw=randwrite
write_lat_log=lat/one
per_job_logs=0
""")
    data = bench_in(tmp_path, "jobs.fio", *QUICK)
    # per_job_logs=0: the third job's logs, all of them, have no number.
    assert sorted(p.name for p in tmp_path.glob("j_*")) == [
        "j_iops.1.log", "j_iops.2.log", "j_iops.log"]
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == [
        "one_clat.log", "one_lat.log", "one_slat.log"]
    for name, job in zip(["j_iops.1.log", "j_iops.2.log", "j_iops.log"], data["jobs"],
                         strict=True):  # fmt: skip
        direction = 0 if job["jobname"] == "two" else 1
        iops = read_log(tmp_path / name)
        assert set(iops[:, 2]) == {direction}
        assert iops[:, 1].sum() // 10 <= job[("read", "write")[direction]]["total_ios"]
    assert len(read_log(tmp_path / "lat" / "one_lat.log")) > 0


# -- the same layout as fio's ------------------------------------------------------------------
@pytest.mark.parametrize("avg", [0, 100])
def test_the_files_and_columns_are_fios(tmp_path: Path, avg: int) -> None:
    """Real fio (null engine) and ours with the same log options: the same files, the same
    columns, the same constant columns.  (Per I/O, fio's null engine stops after 1000 I/Os:
    it does millions a second.)"""
    ours, theirs = tmp_path / "ours", tmp_path / "fio"
    ours.mkdir()
    theirs.mkdir()
    length = ["--time_based", "--runtime=1"] if avg else ["--number_ios=1000"]
    subprocess.run(
        ["fio", "--name=j", "--ioengine=null", "--rw=randrw", "--bs=4k", "--size=16m",
         "--numjobs=2", "--output=/dev/null", "--write_lat_log=x", "--write_iops_log=x",
         "--write_bw_log=x", f"--log_avg_msec={avg}", *length],
        cwd=theirs, check=True, timeout=60,
    )  # fmt: skip
    bench_in(ours, *QUICK, *LOGS, "--log_avg_msec", str(avg), "--rw", "randrw",
             "--runtime", "1" if avg else "0.2", "--numjobs", "2")  # fmt: skip
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        fio_rows, our_rows = read_log(theirs / name), read_log(ours / name)
        assert (len(fio_rows) == 0) == (len(our_rows) == 0), name  # slat: empty in both
        if len(fio_rows):
            assert set(our_rows[:, 2]) == set(fio_rows[:, 2]) == {0, 1}, name
            for column in (3, 4):  # block size, priority
                assert set(our_rows[:, column]) == set(fio_rows[:, column]), (name, column)


# -- fio's own tools draw them -----------------------------------------------------------------
def _plotted_points(svg: str) -> dict[str, int]:
    """Each plotted file's vertices in a gnuplot SVG, by the file fio_generate_plots names
    in its title (the first segment of a line's path is its sample in the key)."""
    points = {}
    for match in re.finditer(r"<title>Queue depth (.*?)</title>.*?d='([^']*)'", svg, re.S):
        vertices = re.findall(r"[ML]([\d.]+),([\d.]+)", match.group(2))
        points[match.group(1)] = len(vertices) - 2
    return points


def test_fio_generate_plots_draws_our_logs(tmp_path: Path) -> None:
    bench_in(tmp_path, *QUICK, *LOGS, "--rw", "randrw", "--runtime", "1", "--numjobs", "2",
             "--log_avg_msec", "100")  # fmt: skip
    result = subprocess.run(["fio_generate_plots", "virtblk"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ("lat", "clat", "iops", "bw"):
        svg = (tmp_path / f"virtblk-{kind}.svg").read_text()
        plotted = _plotted_points(svg)
        assert sorted(plotted) == ["x.1", "x.2"], plotted  # PREFIX_TYPE.N.log less _TYPE
        for number in (1, 2):
            rows = read_log(tmp_path / f"x_{kind}.{number}.log")
            # gnuplot drops a point on the same pixel as the one before it: rows of one
            # window (read, write) may share it, rows of different windows never do.
            windows = len(set(rows[:, 0]))
            got = plotted[f"x.{number}"]
            assert windows <= got <= len(rows), (kind, number, got, len(rows))
    # As for fio's engines that do not measure submission latency: nothing to draw.
    assert (tmp_path / "virtblk-slat.svg").stat().st_size == 0


def test_fio2gnuplot_reads_our_logs(tmp_path: Path) -> None:
    bench_in(tmp_path, *QUICK, "--write_bw_log", "x", "--rw", "randread", "--runtime", "1",
             "--numjobs", "2", "--log_avg_msec", "100")  # fmt: skip
    result = subprocess.run(["fio2gnuplot", "-b", "-g", "-k", "-d", "out"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 files Selected" in result.stdout or "Using log file per job format" in \
        result.stdout, result.stdout  # fmt: skip
    values = np.concatenate([read_log(tmp_path / f"x_bw.{n}.log")[:, 1] for n in (1, 2)])
    found = dict(line.split("=") for line in (tmp_path / "out" / "result.global")
                 .read_text().split())  # fmt: skip
    assert int(found["values_count"]) == len(values)
    assert float(found["avg"]) == pytest.approx(values.mean(), abs=0.01)
    assert float(found["max"]) == values.max()
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert {"x_bw.1-2Draw.png", "x_bw.2-2Draw.png", "result-3D.png"} <= {p.name for p in pngs}
    assert all(p.stat().st_size > 1000 for p in pngs)


# -- the rows, from known completions ----------------------------------------------------------
def _job(read: list[tuple[int, int]], write: list[tuple[int, int]], elapsed: float) -> Any:
    """A JobResult whose I/Os completed at the given (ms, latency ns)."""
    from virtblk.tools.bench.results import DirectionStats, JobResult

    def stats(ios: list[tuple[int, int]]) -> DirectionStats:
        done = np.array([ms * 1_000_000 for ms, _ in ios], np.int64)
        lat = np.array([ns for _, ns in ios], np.int64)
        return DirectionStats(len(ios), len(ios) * 4096, lat, [], done_ns=done)

    return JobResult(0, elapsed, stats(read), stats(write), 0, 0, 0, 0, "", 0.0, 0.0)


def test_window_rows_from_known_completions() -> None:
    from virtblk.tools.bench import BenchConfig
    from virtblk.tools.bench.logs import log_rows

    # Reads at 10, 20 and 150 ms; a write at 120 ms; one read at 260 ms, past the last
    # whole window of a 0.25 s run.
    job = _job([(10, 1000), (20, 3000), (150, 500), (260, 9)], [(120, 7000)], 0.25)
    cfg = BenchConfig(rw="randrw", log_avg_msec=100, write_lat_log="x")
    assert log_rows(job, cfg, "lat").tolist() == [
        [100, 2000, 0, 0, 0], [200, 500, 0, 0, 0], [200, 7000, 1, 0, 0]]
    assert log_rows(job, cfg, "iops").tolist() == [
        [100, 20, 0, 0, 0], [100, 0, 1, 0, 0], [200, 10, 0, 0, 0], [200, 10, 1, 0, 0]]
    assert log_rows(job, cfg, "bw").tolist() == [  # KiB/s: 20 IOPS of 4 KiB
        [100, 80, 0, 0, 0], [100, 0, 1, 0, 0], [200, 40, 0, 0, 0], [200, 40, 1, 0, 0]]
    per_io = dataclasses.replace(cfg, log_avg_msec=0)
    assert log_rows(job, per_io, "bw").tolist()[:2] == [
        [10, 4096 * 10**6 // 1000, 0, 4096, 0], [20, 4096 * 10**6 // 3000, 0, 4096, 0]]
    assert log_rows(job, per_io, "slat").shape == (0, 5)


def test_a_log_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [*_argv(), "bench", *QUICK, "--runtime", "0.2", "--write_lat_log", "file/x"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "bench: writing the logs:" in result.stderr and "file" in result.stderr
    assert "Traceback" not in result.stderr
