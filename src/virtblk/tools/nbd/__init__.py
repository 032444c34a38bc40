"""``virtblk nbd``: an NBD export of any vhost-user-blk device.

The protocol is ``virtblk.nbd.server`` (sans-IO); this package is the shell around it:
``address`` (where to listen, loopback unless told), ``export`` (the flags and size
constraints a disk allows), ``server`` (the asyncio server) and ``run_nbd``, which
connects the disk, serves until SIGINT/SIGTERM and closes everything in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from virtblk.aio import AsyncDisk
from virtblk.driver.disk import Disk
from virtblk.nbd.server import Export
from virtblk.tools.nbd.address import DEFAULT_PORT, ListenAddress, is_loopback, parse_listen
from virtblk.tools.nbd.export import export_for
from virtblk.tools.nbd.server import MAX_IN_FLIGHT, NbdServer, ServerStats

__all__ = [
    "DEFAULT_PORT",
    "MAX_IN_FLIGHT",
    "ListenAddress",
    "NbdServer",
    "ServerStats",
    "export_for",
    "is_loopback",
    "parse_listen",
    "run_nbd",
]

log = logging.getLogger("virtblk.nbd")


def run_nbd(
    socket_path: str | os.PathLike[str],
    address: ListenAddress,
    *,
    export_name: str = "",
    description: str | None = None,
    read_only: bool = False,
    num_queues: int | None = None,
    on_ready: Callable[[NbdServer], None] | None = None,
) -> ServerStats:
    """Export the device on ``socket_path`` at ``address`` until SIGINT or SIGTERM.

    ``on_ready(server)`` runs once the server listens (the command prints its line
    there).  Raises what connecting or listening raises (OSError, NegotiationError).
    """
    disk = Disk.connect(socket_path, num_queues=num_queues)
    try:
        export = export_for(disk, name=export_name, description=description,
                            read_only=read_only)
        return asyncio.run(_serve(disk, export, address, on_ready))
    finally:
        disk.close()


async def _serve(disk: Disk, export: Export, address: ListenAddress,
                 on_ready: Callable[[NbdServer], None] | None) -> ServerStats:
    disks = [AsyncDisk(disk, queues=[i]) for i in range(disk.num_queues)]
    try:
        server = NbdServer(disk, disks, export, address)
        server.listen()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, _stopper(server, signum))
        if on_ready is not None:
            on_ready(server)
        await server.run()
        return server.stats
    finally:
        for adisk in disks:  # waits for what is still in flight on each queue
            await adisk.aclose(close_disk=False)


def _stopper(server: NbdServer, signum: int) -> Callable[[], None]:
    def stop() -> None:
        log.info("signal %d: finishing the requests in flight, then stopping", signum)
        server.stop()
    return stop
