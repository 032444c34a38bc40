"""``virtblk nbd``: export a vhost-user-blk device over NBD (qemu-img, nbdcopy, qemu-io,
fio's nbd engine, nbdinfo, qemu-nbd's clients)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported where it is used: ``--help`` loads neither driver nor asyncio
    from virtblk.tools.nbd import NbdServer


@click.command()
@click.argument("socket_path", metavar="SOCKET")
@click.option("--listen", "listen", default="127.0.0.1:10809", show_default=True,
              metavar="unix:PATH|HOST:PORT",
              help="Where NBD clients connect: a Unix socket, or TCP. A TCP address other "
                   "than loopback needs --allow-remote.")
@click.option("--allow-remote", is_flag=True,
              help="Allow a TCP listener on a non-loopback address. NBD has no "
                   "authentication and this server no TLS: anyone who reaches the port "
                   "reads and writes the whole device.")
@click.option("--export-name", default="", show_default=True,
              help="The export's name (clients that give none get it too).")
@click.option("--description", default=None,
              help="The export's description (NBD_INFO_DESCRIPTION).")
@click.option("--read-only", is_flag=True,
              help="Export read-only: writes, trims and zeroing fail with EPERM.")
@click.option("--num-queues", type=click.IntRange(min=1), default=None,
              help="Hardware queues to use (default: as many as the device offers, at most "
                   "one per CPU); clients are spread over them round robin.")
def nbd(socket_path: str, listen: str, allow_remote: bool, export_name: str,
        description: str | None, read_only: bool, num_queues: int | None) -> None:
    """Serve the vhost-user-blk device at SOCKET to NBD clients until SIGINT or SIGTERM.

    \b
    Examples:
      virtblk nbd /run/vhost.sock --listen unix:/run/disk.nbd
      qemu-img convert -n -O raw disk.img 'nbd+unix:///?socket=/run/disk.nbd'
      nbdinfo 'nbd+unix:///?socket=/run/disk.nbd'
      virtblk nbd /run/vhost.sock                # nbd://127.0.0.1:10809/
    """
    from virtblk.errors import NegotiationError
    from virtblk.nbd.server import Export
    from virtblk.nbd.wire import TransmissionFlag
    from virtblk.tools.nbd import is_loopback, parse_listen, run_nbd
    from virtblk.util import human_size

    try:
        address = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from exc
    if address.path is None and not allow_remote and not is_loopback(address.host):
        raise click.UsageError(
            f"--listen {address} is not a loopback address: NBD has no authentication and "
            f"this server no TLS, so add --allow-remote if every host that can reach it may "
            f"read and write the device")
    try:  # the export's own rule for names and descriptions, before the device is dialled
        Export(name=export_name, size=0, description=description or "")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def ready(server: NbdServer) -> None:
        export = server.export
        ro = bool(export.flags & TransmissionFlag.READ_ONLY)
        click.echo(
            f"virtblk nbd: exporting {socket_path} ({human_size(export.size)}, "
            f"{server.queues} queue{'s' if server.queues > 1 else ''}"
            f"{', read-only' if ro else ''}) at "
            f"{server.address.uri(export.name)}", err=True)

    try:
        stats = run_nbd(socket_path, address, export_name=export_name,
                        description=description, read_only=read_only,
                        num_queues=num_queues, on_ready=ready)
    except (OSError, NegotiationError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if stats.failure is not None:
        raise click.ClickException(f"{stats.failure} (after {stats.clients} client(s), "
                                   f"{stats.requests} request(s))")
    click.echo(f"virtblk nbd: stopped after {stats.clients} client(s), {stats.requests} "
               f"request(s), {human_size(stats.bytes_read)} read, "
               f"{human_size(stats.bytes_written)} written, {stats.refused} refused, "
               f"{stats.violations} protocol violation(s)", err=True)
