"""``virtblk bench``: fio's options and report against a vhost-user-blk device (ours,
embedded, when none is named).

The options keep fio's names and meanings (``--rw --bs --iodepth --numjobs --runtime --size
--offset --rwmixread --verify --ioengine --group_reporting --output-format json``) and the
JSON output keeps fio's layout and units, so scripts written for fio read it unchanged; an
fio job file runs its sections one after another (:mod:`virtblk.tools.bench.jobfile`), and
``--write_lat_log`` and its kin write fio's logs (:mod:`virtblk.tools.bench.logs`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import click

from virtblk.cli.params import SIZE
from virtblk.util import human_size, process_cpu_seconds

if TYPE_CHECKING:  # imported where they are used: ``--help`` loads none of them
    from virtblk.driver.disk import Disk
    from virtblk.tools.bench import BenchConfig, BenchResult, DirectionStats
    from virtblk.tools.bench.jobfile import JobRun

_SHOWN_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9, 99.99)


@click.command()
@click.argument("socket_path", required=False, metavar="[SOCKET]")
@click.argument("job_file", required=False, metavar="[JOBFILE]")
@click.option("--name", default="virtblk", show_default=True, help="Job name (fio's jobname).")
@click.option(
    "--rw",
    type=click.Choice(["read", "write", "randread", "randwrite", "randrw", "readwrite", "rw"]),
    default="randread",
    show_default=True,
    help="I/O pattern (fio's words; rw = readwrite).",
)
@click.option("--bs", type=SIZE, default="4k", show_default=True, help="Block size.")
@click.option(
    "--iodepth", type=click.IntRange(min=1), default=32, show_default=True,
    help="I/Os in flight per job (1 with --ioengine sync).",
)  # fmt: skip
@click.option(
    "--numjobs", type=click.IntRange(min=1), default=1, show_default=True,
    help="Jobs, each its own process driving its own hardware queue.",
)  # fmt: skip
@click.option(
    "--runtime", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
    help="Seconds to run.",
)  # fmt: skip
@click.option("--size", type=SIZE, default=None, help="Bytes of the disk to use [to the end].")
@click.option("--offset", type=SIZE, default=0, help="Where the tested range starts.")
@click.option(
    "--rwmixread", type=click.IntRange(0, 100), default=50, show_default=True,
    help="Percent of reads in randrw / readwrite.",
)  # fmt: skip
@click.option(
    "--verify", type=click.Choice(["md5", "crc32c"]), default=None,
    help="Stamp every block written and check it when read (write workloads read back).",
)  # fmt: skip
@click.option(
    "--ioengine", type=click.Choice(["sync", "aio", "queue", "poll"]), default="queue",
    show_default=True,
    help="sync: Disk API, one I/O at a time; aio: AsyncDisk; queue: the hardware queue, "
    "batched; poll: a polling queue handle (no interrupts).",
)  # fmt: skip
@click.option(
    "--iodepth_batch_complete_min", "--iodepth-batch-complete-min", "batch_complete_min",
    type=click.IntRange(min=1), default=1, show_default=True,
    help="queue/poll engines: completions to wait for before resubmitting (fio's); the "
    "device is asked to signal once that many are done.",
)  # fmt: skip
@click.option(
    "--poll-us", "poll_us", type=click.FloatRange(min=0), default=0, show_default=True,
    help="queue engine: poll the used ring up to this many microseconds (adaptive, as "
    "QEMU's poll-max-ns) before sleeping on the interrupt.",
)  # fmt: skip
@click.option(
    "--keep-cb-while-draining", is_flag=True,
    help="queue engine: leave device notifications on while reaping (the completion loop "
    "before the seed's commit 'Disable callback in virtblk_done()', to measure it).",
)  # fmt: skip
@click.option(
    "--path", "io_path", type=click.Choice(["bio", "request"]), default="bio",
    show_default=True,
    help="bio: one request per I/O; request: through the block layer's plug, which merges "
    "adjacent I/O (--ioengine queue).",
)  # fmt: skip
@click.option(
    "--group_reporting", "--group-reporting", "group_reporting", is_flag=True,
    help="JSON: one entry for all jobs, as fio's group_reporting.",
)  # fmt: skip
@click.option("--randseed", type=int, default=1, show_default=True, help="Random seed.")
@click.option(
    "--output-format", type=click.Choice(["normal", "json", "json+"]), default="normal",
    show_default=True,
    help="json: fio's JSON layout; json+: with fio's latency histogram (clat_ns bins), "
         "which fio_jsonplus_clat2csv reads.",
)  # fmt: skip
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False),
    help="Draw the latency distribution and IOPS over time into this PNG (needs matplotlib).",
)  # fmt: skip
@click.option(
    "--write_lat_log", "--write-lat-log", "write_lat_log", metavar="PREFIX",
    help="fio's latency logs: PREFIX_lat.N.log, PREFIX_clat.N.log (and an empty "
    "PREFIX_slat.N.log: submission latency is not measured apart).",
)  # fmt: skip
@click.option(
    "--write_iops_log", "--write-iops-log", "write_iops_log", metavar="PREFIX",
    help="fio's IOPS log: PREFIX_iops.N.log.",
)  # fmt: skip
@click.option(
    "--write_bw_log", "--write-bw-log", "write_bw_log", metavar="PREFIX",
    help="fio's bandwidth log (KiB/s): PREFIX_bw.N.log.",
)  # fmt: skip
@click.option(
    "--log_avg_msec", "--log-avg-msec", "log_avg_msec", type=click.IntRange(min=0),
    default=0, show_default=True,
    help="Logs: one line per direction per window of this many ms (its mean); 0: per I/O.",
)  # fmt: skip
@click.option(
    "--backend", type=click.Choice(["null", "memory", "file"]), default="null",
    show_default=True, help="Embedded device backend (without SOCKET).",
)  # fmt: skip
@click.option(
    "--device-size", type=SIZE, default="1G", show_default=True, help="Embedded device size."
)
@click.option("--file", "file_path", type=click.Path(), help="Image for --backend file.")
@click.option("--queue-size", type=int, default=256, show_default=True, help="Ring size.")
@click.option(
    "--device-pid", type=int, default=None,
    help="PID of an external device, to report its CPU per I/O (its child processes "
    "included: our device's queue workers).",
)  # fmt: skip
@click.option(
    "--device-control", type=click.Path(), default=None,
    help="Control socket of an external virtblk serve (--control), to report its "
    "notifications per I/O.",
)  # fmt: skip
@click.option(
    "--device-poll-us", type=click.FloatRange(min=0), default=None,
    help="Embedded device: its --poll-us (default: serve's).",
)  # fmt: skip
@click.option(
    "--reconnect-timeout", type=click.FloatRange(min=0), default=None,
    help="With SOCKET: keep running across a device restart, dialling it again for up to "
    "this many seconds (Disk.connect's reconnect_timeout); the result counts reconnects.",
)  # fmt: skip
@click.option(
    "--packed/--split", "packed", default=None,
    help="Virtqueue layout: --packed requires VIRTIO_F_RING_PACKED, --split keeps the split "
    "ring [default: packed when the device offers it].",
)  # fmt: skip
@click.pass_context
def bench(
    ctx: click.Context,
    socket_path: str | None,
    job_file: str | None,
    name: str,
    rw: str,
    bs: int,
    iodepth: int,
    numjobs: int,
    runtime: float,
    size: int | None,
    offset: int,
    rwmixread: int,
    verify: str | None,
    ioengine: str,
    batch_complete_min: int,
    poll_us: float,
    keep_cb_while_draining: bool,
    io_path: str,
    group_reporting: bool,
    randseed: int,
    output_format: str,
    plot_path: str | None,
    write_lat_log: str | None,
    write_iops_log: str | None,
    write_bw_log: str | None,
    log_avg_msec: int,
    backend: str,
    device_size: int,
    file_path: str | None,
    queue_size: int,
    device_pid: int | None,
    device_control: str | None,
    device_poll_us: float | None,
    reconnect_timeout: float | None,
    packed: bool | None,
) -> None:
    """Measure IOPS, bandwidth, completion latency and CPU per I/O, fio-style.

    Without SOCKET it starts our own device (in a child process) with --backend, with one
    queue per job.  JOBFILE, an fio job file, runs its job sections one after another (a
    lone argument naming a regular file is the JOBFILE).  Exits 1 when any I/O fails or any
    block fails verification.
    """
    import os

    from virtblk.tools.bench import BenchConfig, plot
    from virtblk.tools.bench.fio import FioRun, fio_json_runs
    from virtblk.tools.bench.jobfile import JobRun
    from virtblk.tools.bench.logs import write_logs

    if job_file is None and socket_path is not None and os.path.isfile(socket_path):
        socket_path, job_file = None, socket_path  # a socket is never a regular file

    # Checked here: the embedded device would only fail in its child process, and the
    # driver would see nothing but a dropped connection.
    if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
        raise click.BadParameter(
            f"{queue_size} is not a power of two in 2..32768", param_hint="--queue-size"
        )
    if socket_path is None and backend == "file" and file_path is None:
        raise click.UsageError("--backend file needs --file IMAGE")
    if (socket_path is not None or backend != "file") and file_path is not None:
        raise click.UsageError("--file goes with --backend file (and no SOCKET)")
    if socket_path is None and device_control is not None:
        raise click.UsageError("--device-control names an external device's control socket "
                               "(with SOCKET)")
    if socket_path is not None and device_poll_us is not None:
        raise click.UsageError("--device-poll-us configures the embedded device (no SOCKET)")
    if reconnect_timeout is not None and socket_path is None:
        raise click.UsageError("--reconnect-timeout needs SOCKET: the embedded device is "
                               "not restarted")
    if reconnect_timeout is not None and numjobs > 1:
        raise click.UsageError("--reconnect-timeout runs one job (jobs 2.. are forked "
                               "processes, each with its own copy of the connection)")
    if io_path == "request" and ioengine != "queue":
        raise click.UsageError("--path request goes with --ioengine queue")
    if rw == "rw":
        rw = "readwrite"
    cfg = BenchConfig(
        rw=rw,  # type: ignore[arg-type]
        bs=bs,
        iodepth=iodepth,
        runtime=runtime,
        size=size,
        offset=offset,
        seed=randseed,
        path=io_path,  # type: ignore[arg-type]
        rwmixread=rwmixread,
        ioengine=ioengine,  # type: ignore[arg-type]
        numjobs=numjobs,
        verify=verify,  # type: ignore[arg-type]
        batch_complete_min=batch_complete_min,
        poll_us=poll_us,
        disable_cb_while_draining=not keep_cb_while_draining,
        write_lat_log=write_lat_log,
        write_iops_log=write_iops_log,
        write_bw_log=write_bw_log,
        log_avg_msec=log_avg_msec,
    )
    if job_file is not None:
        runs = _job_file_runs(ctx, job_file, cfg)
        if reconnect_timeout is not None and any(r.config.numjobs > 1 for r in runs):
            raise click.UsageError("--reconnect-timeout runs one job (jobs 2.. are forked "
                                   "processes, each with its own copy of the connection)")
    else:
        runs = [JobRun(name, cfg, group_reporting)]
    if verify is not None and not cfg.writes:
        raise click.UsageError(
            f"--verify needs a workload that writes (write, randwrite, randrw, readwrite), "
            f"not --rw {rw}" + (" --rwmixread 100" if cfg.mixed else "")
        )
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise click.ClickException(
                "--plot needs matplotlib: pip install 'virtblk[plot]'"
            ) from exc
    explicit_depth = ctx.get_parameter_source("iodepth") != click.core.ParameterSource.DEFAULT
    if ioengine == "sync" and iodepth > 1 and explicit_depth:
        click.echo(f"note: --ioengine sync does one I/O at a time (iodepth {iodepth} -> 1)",
                   err=True)
    done: list[FioRun] = []
    target = ""
    number = 1  # fio's job number, across the whole job file: the logs' .N
    for run in runs:
        result, target = _run_one(
            run, socket_path, queue_size, backend, device_size, file_path, device_pid,
            device_poll_us, reconnect_timeout, device_control, packed,
            live=output_format == "normal" and sys.stderr.isatty(),
            label=f"job '{run.name}': " if job_file is not None else "",
        )  # fmt: skip
        if result.config.logging:
            try:
                write_logs(result, number)
            except OSError as exc:
                raise click.ClickException(f"bench: writing the logs: {exc}") from exc
        number += result.config.numjobs
        done.append(FioRun(run.name, result, run.group_reporting))
    if output_format in ("json", "json+"):
        report = fio_json_runs(done, target=target, plus=output_format == "json+")
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo("\n".join(
            (f"[{r.jobname}] " if job_file is not None else "") + format_result(r.result, target)
            for r in done
        ))  # fmt: skip
    if plot_path is not None:
        plot(done[0].result, plot_path, title=f"{name}: {_headline(done[0].result, target)}")
    failures = [(r.jobname, r.result) for r in done if r.result.errors]
    if failures:
        raise click.ClickException("; ".join(
            (f"job '{n}': " if job_file is not None else "") + _failure(r) for n, r in failures
        ))  # fmt: skip


def _run_one(
    run: JobRun,
    socket_path: str | None,
    queue_size: int,
    backend: str,
    device_size: int,
    file_path: str | None,
    device_pid: int | None,
    device_poll_us: float | None,
    reconnect_timeout: float | None,
    device_control: str | None,
    packed: bool | None,
    *,
    live: bool,
    label: str,
) -> tuple[BenchResult, str]:
    """One run on a connection of its own (a run's forked jobs leave their rings in states
    this process cannot resume, so the next run connects afresh); returns its result and
    the target's description.  ``label`` names the job section in errors."""
    from virtblk.device.control import notification_counters
    from virtblk.tools.bench import DeviceCounters, check_config, run_bench

    cfg = run.config
    with ExitStack() as stack:
        disk, device_cpu, target = _open(
            stack, socket_path, cfg.numjobs, queue_size, backend, device_size, file_path,
            device_pid, device_poll_us, reconnect_timeout, packed,
        )  # fmt: skip
        counters: DeviceCounters | None = None
        if disk.embedded_device is not None:
            counters = disk.embedded_device.counters
        elif device_control is not None:
            path = device_control
            counters = lambda: notification_counters(path)  # noqa: E731
        total_ios = None
        if not cfg.time_based:  # progress is the share of the I/Os done, not of the time
            try:
                span = check_config(disk, cfg)[1]
            except ValueError as exc:
                raise click.UsageError(f"{label}{exc}") from exc
            total_ios = cfg.numjobs * (cfg.io_size // cfg.bs if cfg.io_size else span)
        with _live_progress(cfg, live, total_ios) as progress:
            try:
                result = run_bench(disk, cfg, device_cpu=device_cpu, progress=progress,
                                   device_counters=counters)
            except ValueError as exc:
                raise click.UsageError(f"{label}{exc}") from exc
            except (OSError, RuntimeError) as exc:  # the device failed or went away
                raise click.ClickException(f"bench: {label}{exc}") from exc
    return result, target


_WORKLOAD_OPTIONS = ("name", "rw", "bs", "iodepth", "numjobs", "runtime", "size", "offset",
                     "rwmixread", "verify", "ioengine", "batch_complete_min",
                     "group_reporting", "randseed", "plot_path")  # fmt: skip
"""What a job file says itself: on the command line too, they would contradict it."""


def _job_file_runs(ctx: click.Context, job_file: str, cfg: BenchConfig) -> list[JobRun]:
    """The job file's sections as runs over fio's defaults (``rw=read``, ``bs=4k``,
    ``iodepth=1``, ``ioengine=psync``, our ``sync``) and the command line's device and log
    options, which the file's own options override."""
    from virtblk.tools.bench.jobfile import JobFileError, job_runs, parse_job_file

    given = [p.opts[0] for p in ctx.command.params
             if p.name in _WORKLOAD_OPTIONS
             and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
    if given:
        flags = ", ".join(given)
        raise click.UsageError(f"{flags}: with a job file the workload is the file's (put "
                               "it in the file's [global] or a job section)")
    try:
        with open(job_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"job file {job_file}: {exc}") from exc
    defaults = dataclasses.replace(cfg, rw="read", bs=4096, iodepth=1, ioengine="sync")
    try:
        runs = job_runs(parse_job_file(text), defaults)
    except JobFileError as exc:
        raise click.ClickException(f"job file {job_file}:\n{exc}") from exc
    for run in runs:
        for note in run.notes:
            click.echo(f"note: {note}", err=True)
    return runs


def _open(
    stack: ExitStack,
    socket_path: str | None,
    numjobs: int,
    queue_size: int,
    backend: str,
    device_size: int,
    file_path: str | None,
    device_pid: int | None,
    device_poll_us: float | None,
    reconnect_timeout: float | None = None,
    packed: bool | None = None,
) -> tuple[Disk, Callable[[], float] | None, str]:
    """Connect (or start the embedded device) with one hardware queue per job."""
    from virtblk.driver.disk import Disk
    from virtblk.errors import NegotiationError

    device_cpu: Callable[[], float] | None = None
    if socket_path is None:
        extra: dict[str, Any] = {} if device_poll_us is None else {"poll_us": device_poll_us}
        try:
            disk = stack.enter_context(
                Disk.embedded(
                    size=device_size,
                    backend=backend,  # type: ignore[arg-type]
                    path=file_path,
                    num_queues=numjobs,
                    queue_size=queue_size,
                    packed=packed,
                    **extra,
                )
            )
        except NegotiationError as exc:  # --packed, and the device does not offer it
            raise click.ClickException(f"embedded device: {exc}") from exc
        assert disk.embedded_device is not None
        device_cpu = disk.embedded_device.cpu_seconds
        return disk, device_cpu, f"embedded {backend} device, {human_size(disk.size)}"
    try:
        disk = stack.enter_context(
            Disk.connect(socket_path, num_queues=numjobs, queue_size=queue_size,
                         reconnect_timeout=reconnect_timeout, packed=packed)
        )
    except NegotiationError as exc:
        if numjobs > 1:
            raise click.ClickException(
                f"--numjobs {numjobs} needs {numjobs} hardware queues, one per job: {exc}"
            ) from exc
        raise click.ClickException(f"{socket_path}: {exc}") from exc
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    if device_pid is not None:
        pid = device_pid
        device_cpu = lambda: process_cpu_seconds(pid)  # noqa: E731
    return disk, device_cpu, f"{socket_path}, {human_size(disk.size)}"


@contextmanager
def _live_progress(
    cfg: BenchConfig, enabled: bool, total_ios: int | None = None
) -> Iterator[Callable[[float, int, int], None] | None]:
    """fio's status line, with rich, on a terminal: elapsed, IOPS and bandwidth over the
    last half second, ETA.  Transient: it is gone when the report prints.  A run that is
    not time based ends after ``total_ios``: its progress is theirs (or the runtime's,
    whichever is further)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    last = [0.0, 0, 0]

    def update(elapsed: float, reads: int, writes: int) -> None:
        dt = max(elapsed - last[0], 1e-9)
        r_iops, w_iops = (reads - last[1]) / dt, (writes - last[2]) / dt
        last[:] = [elapsed, reads, writes]
        shares = [] if cfg.runtime is None else [elapsed / cfg.runtime]
        if total_ios:
            shares.append((reads + writes) / total_ios)
        share = min(1.0, max(shares))
        done = share * 100
        eta = elapsed / share - elapsed if share > 0 else 0.0
        mib = cfg.bs / (1 << 20)
        line = Text.assemble(
            (f"Jobs: {cfg.numjobs} ", "bold"),
            f"[{cfg.rw} {cfg.ioengine}][{done:5.1f}%]",
            ("[r=", "cyan"), (f"{r_iops * mib:,.1f}MiB/s {r_iops:,.0f} IOPS", "cyan"),
            ("][w=", "magenta"), (f"{w_iops * mib:,.1f}MiB/s {w_iops:,.0f} IOPS", "magenta"),
            f"][eta {int(eta) // 60:02d}m:{int(eta) % 60:02d}s]",
        )  # fmt: skip
        live.update(line, refresh=True)

    with Live(console=Console(stderr=True), auto_refresh=False, transient=True) as live:
        yield update


def _headline(r: BenchResult, target: str) -> str:
    c = r.config
    words = [f"{c.rw}: bs={c.bs} iodepth={c.iodepth} ioengine={c.ioengine}"]
    if c.numjobs > 1:
        words.append(f"numjobs={c.numjobs}")
    if c.mixed:
        words.append(f"rwmixread={c.rwmixread}")
    if c.path != "bio":
        words.append(f"path={c.path}")
    return " ".join(words) + f" on {target}, {r.ring} ring"


def _direction(name: str, d: DirectionStats, elapsed: float) -> list[str]:
    iops = d.ios / elapsed if elapsed else 0.0
    bw = d.io_bytes / elapsed / (1 << 20) if elapsed else 0.0
    lines = [f"  {name}: IOPS={iops:,.0f}  BW={bw:,.1f}MiB/s  ({d.ios:,} I/Os in {elapsed:.2f}s)"]
    if d.ios:
        lat = d.lat_ns
        pct = d.percentiles()
        shown = ", ".join(f"p{p:g}={pct[p] / 1000:.1f}" for p in _SHOWN_PERCENTILES)
        lines.append(
            f"    clat (us): mean={lat.mean() / 1000:.1f}, {shown}, max={lat.max() / 1000:.1f}"
        )
    return lines


def format_result(r: BenchResult, target: str) -> str:
    """fio-like human summary: per job when there are several, then per direction."""
    c = r.config
    lines = [_headline(r, target)]
    if len(r.jobs) > 1:
        for j in r.jobs:
            rate = (j.read.ios + j.write.ios) / j.elapsed if j.elapsed else 0.0
            lines.append(
                f"  job {j.job} (queue {c.queue + j.job}): IOPS={rate:,.0f} "
                f"(read {j.read.ios:,}, write {j.write.ios:,} I/Os in {j.elapsed:.2f}s)"
            )
    elapsed = r.elapsed
    for name, d in (("read", r.read), ("write", r.write)):
        if d.ios or not (r.read.ios or r.write.ios):
            lines.extend(_direction(name, d, elapsed))
    lines.append(
        f"  total: IOPS={r.iops:,.0f}  BW={r.bandwidth / (1 << 20):,.1f}MiB/s  "
        f"({r.ios:,} I/Os in {elapsed:.2f}s, {r.errors} errors)"
    )
    if c.verify is not None:
        verified = sum(j.verified for j in r.jobs)
        mismatches = sum(j.mismatches for j in r.jobs)
        lines.append(f"  verify ({c.verify}): {verified:,} blocks checked, {mismatches} bad")
    cpu = f"  CPU per I/O: driver {r.driver_cpu_per_io_us:.2f} us"
    if r.device_cpu_per_io_us is not None:
        cpu += f", device {r.device_cpu_per_io_us:.2f} us"
    lines.append(cpu)
    n = r.notifications_per_io()
    line = (f"  notifications per I/O: driver kicked {n['driver_kicks']:.3f}, "
            f"was interrupted {n['driver_interrupts']:.3f}")
    if n["device_notifications"] is not None:
        line += (f"; device interrupted {n['device_notifications']:.3f}, "
                 f"was kicked awake {n['device_kicks']:.3f}")
    lines.append(line)
    if r.reconnects:
        lines.append(f"  reconnects: {r.reconnects} (the device went away and came back)")
    return "\n".join(lines)


def _failure(r: BenchResult) -> str:
    """Why the run failed, for the error line."""
    parts = []
    failed = sum(j.errors for j in r.jobs)
    if failed:
        parts.append(f"{failed} I/O errors")
    mismatches = sum(j.mismatches for j in r.jobs)
    if mismatches:
        first = next(j.first_mismatch for j in r.jobs if j.first_mismatch)
        parts.append(f"verify: {mismatches} blocks bad (first: {first})")
    return "; ".join(parts)
