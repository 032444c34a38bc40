"""A config change re-reads the capacity (and the cache mode), not the limits the queues
were built for: as Linux's ``virtblk_config_changed_work`` updates only the capacity, a
device that reports another block size or more segments later cannot make the driver
build requests its rings cannot carry, nor change the I/O alignment under its users."""

from __future__ import annotations

import os
import socket
import threading

from virtblk import Disk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import BlkConfig
from virtblk.vhost_user.server import serve_connected

MiB = 1 << 20


class ShiftingDevice(BlkDevice):
    """Our device; ``overrides`` (empty at probe) are applied to its config space."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(4 * MiB), size_max=4096, seg_max=2)
        self.overrides: dict[str, int] = {}

    def config(self) -> bytes:
        cfg = BlkConfig.unpack(super().config())
        for name, value in self.overrides.items():
            setattr(cfg, name, value)
        return cfg.pack()


def test_refresh_keeps_the_limits_and_block_size_the_disk_was_probed_with() -> None:
    device = ShiftingDevice()
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    t.start()
    with Disk.from_socket(ours) as disk:
        limits, bs = disk.limits, disk.logical_block_size
        device.overrides = {"seg_max": 64, "blk_size": 4096, "capacity": 16384}
        disk.refresh()
        assert disk.size == 16384 * 512  # the capacity is what a config change changes
        assert (disk.limits, disk.logical_block_size) == (limits, bs)
        buf = disk.buffer(64 * 1024)
        buf[:] = os.urandom(len(buf))
        disk.pwrite(buf, 512)  # 16 segments of size_max: more than 2 per request
        assert disk.pread(len(buf), 512) == bytes(buf)
    t.join(10)
