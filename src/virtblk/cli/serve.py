"""``virtblk serve``: a vhost-user-blk device that QEMU, qemu-style frontends and our own
driver use as their disk."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from virtblk.cli.params import SIZE
from virtblk.device.options import DeviceOptions
from virtblk.util import human_size
from virtblk.vhost_user.server import VhostUserServer

log = logging.getLogger("virtblk.serve")


@click.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(), help="Unix socket.")
@click.option("--file", "file_path", type=click.Path(), help="Serve this raw image (or device).")
@click.option("--memory", "memory_size", type=SIZE, help="Serve a RAM disk of this size.")
@click.option("--null", "null_size", type=SIZE, help="Serve a null device of this size.")
@click.option("--size", type=SIZE, help="With --file: create the image with this size.")
@click.option("--read-only", is_flag=True, help="Offer VIRTIO_BLK_F_RO; writes fail.")
@click.option("--num-queues", type=int, default=1, show_default=True, help="Request queues.")
@click.option(
    "--queue-size", type=int, default=256, show_default=True, help="Largest ring accepted."
)
@click.option("--serial", default="", help="GET_ID answer (at most 20 bytes).")
@click.option("--blk-size", type=int, default=512, show_default=True, help="Logical block size.")
@click.option("--zoned", is_flag=True, help="With --memory: a host-managed zoned disk.")
@click.option("--zone-size", type=SIZE, default="4M", show_default=True, help="With --zoned.")
@click.option("--zone-capacity", type=SIZE, help="With --zoned: writable bytes per zone.")
@click.option("--max-open-zones", type=int, default=0, show_default=True, help="0: no limit.")
@click.option("--max-active-zones", type=int, default=0, show_default=True, help="0: no limit.")
@click.option("--conventional-zones", type=int, default=0, show_default=True,
              help="With --zoned: this many randomly writable zones first.")
def serve(
    socket_path: str,
    file_path: str | None,
    memory_size: int | None,
    null_size: int | None,
    size: int | None,
    read_only: bool,
    num_queues: int,
    queue_size: int,
    serial: str,
    blk_size: int,
    zoned: bool,
    zone_size: int,
    zone_capacity: int | None,
    max_open_zones: int,
    max_active_zones: int,
    conventional_zones: int,
) -> None:
    """Serve one backend over vhost-user until SIGTERM or SIGINT.

    Exactly one of --file, --memory, --null.  One worker per queue; a frontend that
    disconnects leaves the server ready for the next.
    """
    chosen = [x for x in (file_path, memory_size, null_size) if x is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --file, --memory, --null")
    if len(serial.encode()) > 20:
        raise click.UsageError("--serial is at most 20 bytes")
    if num_queues < 1:
        raise click.UsageError("--num-queues must be at least 1")
    if file_path is not None:
        opts = DeviceOptions(backend="file", path=file_path, size=size)
    elif memory_size is not None:
        opts = DeviceOptions(backend="memory", size=memory_size)
    else:
        opts = DeviceOptions(backend="null", size=null_size)
    opts.read_only = read_only
    opts.num_queues = num_queues
    opts.queue_size = queue_size
    opts.device = {"serial": serial, "blk_size": blk_size}
    if zoned:
        if memory_size is None:
            raise click.UsageError("--zoned needs --memory")
        opts.zoned = {"zone_size": zone_size, "zone_capacity": zone_capacity,
                      "max_open_zones": max_open_zones, "max_active_zones": max_active_zones,
                      "conventional_zones": conventional_zones}
    try:
        device = opts.build()
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        server = VhostUserServer(socket_path, device)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(
        f"virtblk: serving {opts.backend} {human_size(device.backend.size)} on {socket_path} "
        f"({num_queues} queue{'s' if num_queues > 1 else ''}"
        f"{', read-only' if read_only else ''}{', zoned' if zoned else ''})",
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        device.reset()
        device.backend.close()
    sys.exit(0)
