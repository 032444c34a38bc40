"""Helpers for the vhost-user tests: a tiny real device and a guest-memory layout.

``RecordingDevice`` implements ``VhostUserDevice`` with no I/O: it records what the
backend asked of it, so the state machine's decisions can be asserted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from virtblk.spec import BlkConfig, Feature
from virtblk.vhost_user.messages import MemRegion
from virtblk.virtio.memory import MemoryRegion
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.split_device import DeviceVirtqueue

Ring = DeviceVirtqueue | PackedDeviceVirtqueue

DEVICE_FEATURES = (
    Feature.VERSION_1.mask
    | Feature.RING_EVENT_IDX.mask
    | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
    | Feature.BLK_CONFIG_WCE.mask
)


@dataclass
class RecordingDevice:
    """A minimal VhostUserDevice: a 96-byte blk config and a log of queue starts/stops."""

    num_queues: int = 2
    features: int = DEVICE_FEATURES
    config_changed: Callable[[], None] | None = None
    failed: Callable[[str], None] | None = None
    config_bytes: bytearray = field(
        default_factory=lambda: bytearray(BlkConfig(capacity=2048, num_queues=2).pack())
    )
    acked: int | None = None
    running: dict[int, tuple[Ring, int, int]] = field(default_factory=dict)
    log: list[tuple[str, int]] = field(default_factory=list)
    resets: int = 0

    def config(self) -> bytes:
        return bytes(self.config_bytes)

    def set_config(self, offset: int, data: bytes) -> None:
        if offset != BlkConfig.OFFSET_WRITEBACK or len(data) != 1:
            raise ValueError(f"only writeback is writable, not {len(data)} bytes at {offset}")
        self.config_bytes[offset] = data[0]

    def set_features(self, features: int) -> None:
        self.acked = features

    def start_queue(self, index: int, vq: Ring, kick_fd: int, call_fd: int) -> None:
        assert index not in self.running, f"queue {index} started twice"
        self.running[index] = (vq, kick_fd, call_fd)
        self.log.append(("start", index))

    def stop_queue(self, index: int) -> int:
        vq, _kick, _call = self.running.pop(index)
        self.log.append(("stop", index))
        return vq.vring_base

    def reset(self) -> None:
        self.running.clear()
        self.resets += 1


GUEST_SIZE = 1 << 20
GUEST_UVA = 0x7F00_0000_0000  # what a frontend would report as its mapping address
DESC_OFF, AVAIL_OFF, USED_OFF = 0x0, 0x1000, 0x2000


def guest_region(gpa: int = 0, uva: int = GUEST_UVA, size: int = GUEST_SIZE) -> MemoryRegion:
    """A real memfd region, as a driver would create it."""
    return MemoryRegion.create(size, guest_phys_addr=gpa, user_addr=uva)


def describe(region: MemoryRegion) -> MemRegion:
    return MemRegion(region.guest_phys_addr, region.size, region.user_addr, region.mmap_offset)


def is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    """How many descriptors this process has open (a leak shows as a difference).

    The vhost-user tests run with the garbage collector off (``conftest.py``), so a cycle
    left by an earlier test cannot close its fds between a test's two counts."""
    return len(os.listdir("/proc/self/fd"))
