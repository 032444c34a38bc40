"""``virtblk info``: what a vhost-user-blk device offers and what we negotiated with it."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import click

from virtblk.util import human_size

if TYPE_CHECKING:  # imported where it is used: ``--help`` loads no driver
    from virtblk.driver.disk import Disk

#: Bits a vhost-user device may offer that are not virtio features, so ``Feature`` has no
#: name for them.  qemu-storage-daemon 7.2 offers bit 26 (dirty-page logging for
#: migration); naming it keeps ``info`` from printing a mysterious "bit 26".
_VHOST_BITS = {"bit 26": "VHOST_F_LOG_ALL"}


def _names(bits: int) -> list[str]:
    from virtblk.spec import feature_names

    return [_VHOST_BITS.get(name, name) for name in feature_names(bits)]


def describe(disk: Disk) -> dict[str, Any]:
    """Everything ``info`` reports, as a JSON-able dict."""
    from virtblk.spec import Feature
    from virtblk.vhost_user.messages import protocol_feature_names

    dev = disk.device
    c = dev.config
    return {
        "name": disk.name,
        "capacity_bytes": disk.size,
        "capacity": human_size(disk.size),
        "capacity_sectors": dev.capacity_sectors,
        "logical_block_size": disk.logical_block_size,
        "read_only": disk.read_only,
        "serial": disk.serial,
        "cache_mode": disk.cache_mode,
        "num_queues": disk.num_queues,
        "device_num_queues": c.num_queues if dev.has(Feature.BLK_MQ) else 1,
        "device_max_queues": dev.device_max_queues,
        "queue_size": dev.queue_size,
        "queue_depth": dev.queues[0].depth if dev.queues else 0,
        "ring": disk.ring,
        "features_offered": _names(dev.offered_features),
        "features_negotiated": _names(dev.features),
        "protocol_features": protocol_feature_names(dev.protocol_features),
        "geometry": dataclasses.asdict(disk.geometry),
        "topology": dataclasses.asdict(disk.topology),
        "limits": dataclasses.asdict(disk.limits),
        "zoned": _zoned(disk),
        # The raw config space as read (fields of features not negotiated read as 0).
        "config": dataclasses.asdict(c),
    }


def _zoned(disk: Disk) -> dict[str, Any] | None:
    """Zoned characteristics, with the model by name and the zone count."""
    zc = disk.zoned
    if zc is None:
        return None
    return {
        "model": zc.model.name,
        "zone_sectors": zc.zone_sectors,
        "zone_size": zc.zone_size,
        "nr_zones": zc.nr_zones(disk.device.capacity_sectors),
        "max_open_zones": zc.max_open_zones,
        "max_active_zones": zc.max_active_zones,
        "max_append_sectors": zc.max_append_sectors,
        "write_granularity": zc.write_granularity,
    }


@click.command()
@click.argument("socket_path", metavar="SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--packed/--split", "packed", default=None,
    help="Virtqueue layout: --packed requires VIRTIO_F_RING_PACKED, --split keeps the split "
    "ring [default: packed when the device offers it].",
)  # fmt: skip
def info(socket_path: str, as_json: bool, timeout: float, packed: bool | None) -> None:
    """Show a device's features, capacity, limits, serial, cache mode, topology and queues."""
    from virtblk.driver.disk import Disk
    from virtblk.errors import NegotiationError

    try:
        with Disk.connect(socket_path, timeout=timeout, packed=packed) as disk:
            data = describe(disk)
    except (OSError, NegotiationError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        if value is None:
            value = "-"
        elif isinstance(value, list):
            value = " ".join(value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")
