"""Our server with the real BlkDevice, driven by our Disk: the layers fit together."""

from __future__ import annotations

import threading
from pathlib import Path

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.driver.disk import Disk
from virtblk.vhost_user.server import VhostUserServer


def test_disk_io_through_our_server_across_two_sessions(sock_dir: Path) -> None:
    path = str(sock_dir / "blk.sock")
    backend = MemoryBackend(16 << 20)
    server = VhostUserServer(path, BlkDevice(backend, num_queues=2))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Disk.connect(path, timeout=5) as disk:
            disk.pwrite(b"vhost-user" * 1638 + b"!!!!", 8192)
            disk.flush()
        # a new session sees the data; the device was reset in between
        with Disk.connect(path, timeout=5) as disk:
            assert disk.pread(16384, 8192) == b"vhost-user" * 1638 + b"!!!!"
    finally:
        server.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert server.sessions == 2 and server.last_violation is None
