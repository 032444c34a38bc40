"""A disk that reconnects, against a device that keeps its in-flight requests in the
buffer the driver hands back, after the driver started a ring afresh on the same device.

A fresh ring (``restore`` after ``freeze``, or the reset after a request timeout) starts
at index 0, while the device's region of the in-flight buffer still describes the old
ring: the driver must give that region back to the device empty, or the device, which
recovers a ring from the buffer at every start, resubmits descriptors of the old ring
(or refuses the buffer), and a restarted device does not know the requests of the new
ring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.faulty import FaultyDevice
from peers.process import kill_group
from vhost_user.test_restart_inflight import HOLD_SECTOR, MiB, start_holding_device
from virtblk import Disk
from virtblk.errors import RequestTimeoutError
from virtblk.vhost_user.server import VhostUserServer

LOST = 1024  # the sector whose request the faulty device never completes

RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
"""Either ring: the device lays the buffer out for the ring acked, and the driver must
clear a restarted ring's region in that layout."""


@pytest.fixture
def faulty_server(sock_dir: Path) -> Iterator[tuple[Path, FaultyDevice]]:
    """A FaultyDevice served on a socket path (in-flight buffer offered)."""
    path = sock_dir / "faulty.sock"
    device = FaultyDevice(MiB, lost_sector=LOST)
    server = VhostUserServer(str(path), device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path, device
    finally:
        server.stop()  # not ``close`` under a polling serve_forever: it closes itself
        thread.join(10)
        assert not thread.is_alive()
        server.close()


@RINGS
def test_a_ring_reset_after_a_request_timeout_gives_the_device_a_clean_journal(
    faulty_server: tuple[Path, FaultyDevice], packed: bool
) -> None:
    path, device = faulty_server
    with Disk.connect(str(path), num_queues=1, reconnect_timeout=3,
                      request_timeout=0.5, packed=packed) as disk:
        assert disk.device.device_resubmits and disk.device.packed == packed
        disk.pwrite(b"\x11" * 4096, 0)
        with pytest.raises(RequestTimeoutError):
            disk.pwrite(b"\x22" * 4096, LOST * 512)
        assert device.lost == 1
        # The fresh ring serves, on the same connection: no reconnect was needed.
        for n in range(8):
            disk.pwrite(bytes([n]) * 4096, (n + 1) * 4096)
        assert disk.pread(4096, 0) == b"\x11" * 4096
        for n in range(8):
            assert disk.pread(4096, (n + 1) * 4096) == bytes([n]) * 4096
        assert disk.reconnects == 0


@RINGS
def test_a_write_issued_after_restore_survives_a_device_kill(
    sock_dir: Path, tmp_path: Path, packed: bool
) -> None:
    path = sock_dir / "blk.sock"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    marker = tmp_path / "holding"
    device = start_holding_device(path, image, marker)
    data = b"\x5a" * 4096
    try:
        with Disk.connect(str(path), num_queues=1, reconnect_timeout=30,
                          packed=packed) as disk:
            assert disk.device.device_resubmits and disk.device.packed == packed
            disk.pwrite(b"\x01" * 4096, 0)
            disk.freeze()
            disk.restore()
            outcome: list[object] = []
            writer = threading.Thread(
                target=lambda: outcome.append(disk.pwrite(data, HOLD_SECTOR * 512)))
            writer.start()
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert marker.exists(), "the holding device never got the write"
            kill_group(device)
            with ServeProcess(path, ["--file", str(image), "--workers", "thread"]):
                writer.join(30)
                assert not writer.is_alive(), "the write was lost with the killed device"
                assert outcome == [len(data)]
                assert disk.pread(4096, HOLD_SECTOR * 512) == data
                assert disk.reconnects == 1
    finally:
        if device.poll() is None:
            kill_group(device)
    assert image.read_bytes()[HOLD_SECTOR * 512 : HOLD_SECTOR * 512 + 4096] == data
