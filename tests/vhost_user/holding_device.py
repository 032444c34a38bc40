"""A device that hangs in the middle of a write: run as a process, killed by the test.

``python holding_device.py SOCKET IMAGE MARKER SECTOR`` serves IMAGE on SOCKET like
``virtblk serve --file --aio threads`` (the in-flight buffer offered), except that a
write at SECTOR creates MARKER and then never returns: that request stays popped, recorded
in flight and unanswered until the test SIGKILLs the process, while the I/O threads answer
the requests after it (out of order: what only the in-flight buffer can recover).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from virtblk.device.backends import FileBackend
from virtblk.device.blk import BlkDevice
from virtblk.vhost_user.server import VhostUserServer


class HoldingFile(FileBackend):
    def __init__(self, path: str, marker: str, sector: int) -> None:
        super().__init__(path)
        self.marker = Path(marker)
        self.offset = sector * 512

    def write_from(self, buf: memoryview, offset: int) -> None:
        if offset == self.offset:
            self.marker.touch()
            threading.Event().wait()  # until SIGKILL
        super().write_from(buf, offset)


def main(socket_path: str, image: str, marker: str, sector: str) -> None:
    device = BlkDevice(HoldingFile(image, marker, int(sector)), workers="thread", aio="threads")
    with VhostUserServer(socket_path, device) as server:
        server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])
