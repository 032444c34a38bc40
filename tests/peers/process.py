"""Waiting for a device process to serve its Unix socket: shared by the harnesses that
start ``qemu-storage-daemon`` (``peers.qsd``) and ``virtblk serve``
(``interop.serve_process``)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def accepts(path: Path) -> bool:
    """Whether the socket file exists and a server listens on it (the probe connection is
    closed at once).

    Probing with connect() would be served as a (short) session by our one-at-a-time
    server; that is harmless, but checking the file first avoids most of it.
    """
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def wait_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, interval: float
) -> int | None:
    """Poll until ``ready()`` holds; returns None then, or the exit status if the process
    exits first.  Raises ``TimeoutError`` after ``timeout`` seconds (the process is left
    running: the caller stops it and says what it was waiting for)."""
    deadline = time.monotonic() + timeout
    while True:
        rc = process.poll()
        if rc is not None:
            return rc
        if ready():
            return None
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(interval)
