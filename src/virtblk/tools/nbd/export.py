"""What an NBD export of a virtio-blk disk promises: its flags and size constraints.

Every flag follows from what the driver negotiated with the device, never from hope:

* ``READ_ONLY``: the device is read-only (VIRTIO_BLK_F_RO) or the user said so.
* ``SEND_FLUSH`` and ``SEND_FUA``: with VIRTIO_BLK_F_FLUSH.  A FLUSH goes to the device
  when its cache is write-back at that moment (``AsyncDisk.flush``); a FUA write is the
  write followed by such a flush (virtio-blk 1.2 has no FUA; the proposed OUT_FUA is
  not in ``AsyncDisk``).  Without the feature there is no flush to send: virtio leaves
  a completed write's durability to the device, and neither flag is advertised.
* ``SEND_TRIM`` with VIRTIO_BLK_F_DISCARD, ``SEND_WRITE_ZEROES`` with
  VIRTIO_BLK_F_WRITE_ZEROES, on a writable export.
* ``SEND_FAST_ZERO`` with ``SEND_WRITE_ZEROES``: the driver cannot learn whether the
  device zeroes by writing (qemu-storage-daemon falls back to writing zero buffers where
  its driver cannot punch), so ``FAST_ZERO`` requests are refused at once with ENOTSUP,
  the answer proto.md asks of a server that cannot tell in advance; clients (qemu-img,
  nbdcopy) then write zeroes where they need them.
* ``CAN_MULTI_CONN``: always.  Every connection reaches the same device through the
  same driver, and this server keeps no cache of its own: a write answered on one
  connection is on the device, so any later read on any connection sees it; and a
  virtio-blk FLUSH makes every write completed before it stable, whichever virtqueue
  carried it (virtio 1.2, 5.2.6.2: a write is stable once completed and a FLUSH sent
  after its completion has completed, queues unmentioned), so a FLUSH or FUA answered on
  one connection covers the writes answered on all of them, which is what proto.md asks
  for the flag.
* Size constraints: the minimum block is the logical block size (the device takes
  nothing smaller, and the driver has no safe read-modify-write); the preferred block is
  the physical block size or the optimal I/O size when larger (at least 4096); the
  maximum payload 32 MiB, the most proto.md tells portable clients to send.
"""

from __future__ import annotations

from virtblk.driver.disk import Disk
from virtblk.nbd.server import DEFAULT_MAX_BLOCK, Export
from virtblk.nbd.wire import TransmissionFlag
from virtblk.spec import Feature
from virtblk.util import human_size

__all__ = ["export_for"]


def export_for(disk: Disk, *, name: str = "", description: str | None = None,
               read_only: bool = False) -> Export:
    """The export of ``disk`` named ``name`` (see the module docstring for each flag)."""
    dev = disk.device
    flags = TransmissionFlag.CAN_MULTI_CONN
    ro = read_only or disk.read_only
    if ro:
        flags |= TransmissionFlag.READ_ONLY
    if dev.has(Feature.BLK_FLUSH):
        flags |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    if not ro and dev.has(Feature.BLK_DISCARD):
        flags |= TransmissionFlag.SEND_TRIM
    if not ro and dev.has(Feature.BLK_WRITE_ZEROES):
        flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    bs = disk.logical_block_size
    topology = disk.topology
    preferred = max(4096, bs, topology.physical_block_size, topology.opt_io_size)
    if preferred & (preferred - 1):  # an odd optimal size: the next power of two
        preferred = 1 << preferred.bit_length()
    preferred = min(preferred, DEFAULT_MAX_BLOCK)
    if description is None:
        description = (f"virtblk {disk.name}: {human_size(disk.size)} vhost-user-blk device"
                       f"{', read-only' if ro else ''}")
    return Export(name=name, size=disk.size, flags=flags, description=description,
                  min_block=bs, preferred_block=preferred, max_block=DEFAULT_MAX_BLOCK)
