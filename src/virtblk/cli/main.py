"""The ``virtblk`` command: serve a device, inspect one, benchmark one."""

from __future__ import annotations

import logging
import sys

import click

from virtblk.cli.bench import bench
from virtblk.cli.check import check
from virtblk.cli.control import control
from virtblk.cli.info import info
from virtblk.cli.nbd import nbd
from virtblk.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="virtblk")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="What to log on stderr.",
)
def main(log_level: str) -> None:
    """virtio-blk in Python: drive vhost-user-blk devices, or be one."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


main.add_command(serve)
main.add_command(info)
main.add_command(bench)
main.add_command(check)
main.add_command(control)
main.add_command(nbd)
