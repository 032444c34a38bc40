"""A device whose config space no block device can have is refused at probe, with a clear
error, as Linux's virtblk_probe refuses it; odd but workable limits are made safe."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from virtblk import Disk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.errors import NegotiationError
from virtblk.spec import BlkConfig
from virtblk.vhost_user.server import serve_connected


class LyingDevice(BlkDevice):
    """Our device, but its config space says what the test wants."""

    def __init__(self, **overrides: int) -> None:
        super().__init__(MemoryBackend(1 << 20), size_max=4096)
        self.overrides = overrides

    def config(self) -> bytes:
        cfg = BlkConfig.unpack(super().config())
        for name, value in self.overrides.items():
            setattr(cfg, name, value)
        return cfg.pack()


@contextmanager
def connect(device: BlkDevice) -> Iterator[Disk]:
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    t.start()
    disk = Disk.from_socket(ours)
    try:
        yield disk
    finally:
        disk.close()
        t.join(10)


def refused_at_probe(device: LyingDevice, reason: str) -> None:
    """The driver refuses ``device`` at connect, with ``reason`` in its NegotiationError."""
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    t.start()
    with pytest.raises(NegotiationError, match=reason):
        Disk.from_socket(ours)
    t.join(10)


@pytest.mark.parametrize("blk_size", [0, 100, 513, 1 << 20])
def test_invalid_block_size_is_refused(blk_size: int) -> None:
    refused_at_probe(LyingDevice(blk_size=blk_size), "invalid block size")


def test_zero_queues_with_mq_is_refused() -> None:
    refused_at_probe(LyingDevice(num_queues=0), "zero queues")


def test_tiny_size_max_still_carries_whole_blocks() -> None:
    with connect(LyingDevice(size_max=1)) as disk:
        assert disk.limits.max_segment_size == 512
        data = os.urandom(8192)
        disk.pwrite(data, 0)
        assert disk.pread(8192, 0) == data


def test_zero_seg_max_means_one_segment() -> None:
    with connect(LyingDevice(seg_max=0)) as disk:
        assert disk.limits.max_segments == 1
        data = os.urandom(64 * 1024)
        disk.pwrite(data, 4096)
        assert disk.pread(len(data), 4096) == data


def test_zero_capacity_is_refused_at_probe() -> None:
    refused_at_probe(LyingDevice(capacity=0), "capacity of 0")


class TurncoatDevice(LyingDevice):
    """Honest at probe; after a device reset its config space says ``later``."""

    def __init__(self, **later: int) -> None:
        super().__init__()
        self.later = later

    def reset(self) -> None:
        super().reset()
        self.overrides = self.later


def test_a_config_invalid_after_reset_is_refused_by_restore() -> None:
    """restore() negotiates again and reads the config again: it is checked as at probe,
    so the disk never works with a block size of 0 (a ZeroDivisionError on the next I/O)."""
    with connect(TurncoatDevice(blk_size=0)) as disk:
        disk.freeze()
        with pytest.raises(NegotiationError, match="invalid block size 0"):
            disk.restore()
        assert disk.logical_block_size == 512
