"""``virtblk bench``: fio-style load against a device (ours, embedded, when none is named)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import ExitStack

import click

from virtblk.bench import PERCENTILES, BenchConfig, BenchResult, run_bench
from virtblk.cli.params import SIZE
from virtblk.driver.disk import Disk
from virtblk.util import human_size, process_cpu_seconds


@click.command()
@click.argument("socket_path", required=False, metavar="[SOCKET]")
@click.option(
    "--rw",
    type=click.Choice(["randread", "randwrite", "read", "write"]),
    default="randread",
    show_default=True,
    help="I/O pattern (fio's words).",
)
@click.option("--bs", type=SIZE, default="4k", show_default=True, help="Block size.")
@click.option(
    "--iodepth",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Requests in flight.",
)
@click.option(
    "--runtime",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to run.",
)
@click.option("--size", type=SIZE, default=None, help="Bytes of the disk to use [whole disk].")
@click.option("--offset", type=SIZE, default=0, help="Where the tested range starts.")
@click.option(
    "--backend",
    type=click.Choice(["null", "memory", "file"]),
    default="null",
    show_default=True,
    help="Embedded device backend (without SOCKET).",
)
@click.option(
    "--device-size", type=SIZE, default="1G", show_default=True, help="Embedded device size."
)
@click.option("--file", "file_path", type=click.Path(), help="Image for --backend file.")
@click.option("--queue-size", type=int, default=256, show_default=True, help="Ring size.")
@click.option(
    "--device-pid",
    type=int,
    default=None,
    help="PID of an external device, to report its CPU per I/O.",
)
@click.option(
    "--output-format",
    type=click.Choice(["normal", "json"]),
    default="normal",
    show_default=True,
)
def bench(
    socket_path: str | None,
    rw: str,
    bs: int,
    iodepth: int,
    runtime: float,
    size: int | None,
    offset: int,
    backend: str,
    device_size: int,
    file_path: str | None,
    queue_size: int,
    device_pid: int | None,
    output_format: str,
) -> None:
    """Measure IOPS, bandwidth, completion latency and CPU per I/O.

    Without SOCKET it starts our own device (in a child process) with --backend.
    """
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
    cfg = BenchConfig(
        rw=rw,  # type: ignore[arg-type]
        bs=bs,
        iodepth=iodepth,
        runtime=runtime,
        size=size,
        offset=offset,
    )
    with ExitStack() as stack:
        if socket_path is None:
            disk = stack.enter_context(
                Disk.embedded(
                    size=device_size,
                    backend=backend,  # type: ignore[arg-type]
                    path=file_path,
                    queue_size=queue_size,
                )
            )
            assert disk.embedded_device is not None
            device_cpu: Callable[[], float] | None = disk.embedded_device.cpu_seconds
            target = f"embedded {backend} device, {human_size(disk.size)}"
        else:
            disk = stack.enter_context(Disk.connect(socket_path, queue_size=queue_size))
            pid = device_pid
            device_cpu = (lambda: process_cpu_seconds(pid)) if pid is not None else None
            target = f"{socket_path}, {human_size(disk.size)}"
        progress = _progress if sys.stderr.isatty() and output_format == "normal" else None
        try:
            result = run_bench(disk, cfg, device_cpu=device_cpu, progress=progress)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    if progress is not None:
        click.echo("", err=True)
    if output_format == "json":
        click.echo(json.dumps({"target": target, **result.summary()}, indent=2))
    else:
        click.echo(format_result(result, target))
    if result.errors:
        sys.exit(1)


def _progress(elapsed: float, ios: int) -> None:
    click.echo(f"\r[{elapsed:5.1f}s] {ios / elapsed:>10,.0f} IOPS", nl=False, err=True)


def format_result(r: BenchResult, target: str) -> str:
    """fio-like human summary."""
    c = r.config
    pct = r.percentiles()
    lat_us = ", ".join(f"p{p:g}={pct[p] / 1000:.1f}" for p in PERCENTILES if p >= 50)
    mean = r.lat_ns.mean() / 1000 if len(r.lat_ns) else 0.0
    worst = r.lat_ns.max() / 1000 if len(r.lat_ns) else 0.0
    lines = [
        f"{c.rw}: bs={c.bs} iodepth={c.iodepth} on {target}",
        f"  IOPS={r.iops:,.0f}  BW={r.bandwidth / (1 << 20):,.1f}MiB/s  "
        f"({r.ios} I/Os in {r.elapsed:.2f}s, {r.errors} errors)",
        f"  clat (us): mean={mean:.1f}, {lat_us}, max={worst:.1f}",
    ]
    cpu = f"  CPU per I/O: driver {r.driver_cpu_per_io_us:.2f} us"
    if r.device_cpu_per_io_us is not None:
        cpu += f", device {r.device_cpu_per_io_us:.2f} us"
    lines.append(cpu)
    return "\n".join(lines)
