"""Waiting for a device process to serve its Unix socket, and finding the processes of a
process group: shared by the harnesses that start ``qemu-storage-daemon``
(``peers.qsd``) and ``virtblk serve`` (``interop.serve_process``)."""

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


def process_state(pid: int) -> str | None:
    """The state letter of a process (``R``, ``S``, ``T``, ``Z``, ...), None when it is gone."""
    stat = _stat_fields(pid)
    return stat[0] if stat is not None else None


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat_fields(int(entry.name))
        if stat is not None and stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(entry.name))
    return sorted(members)


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Wait until process group ``pgid`` has no live process; return what is left after
    ``timeout`` seconds (killed processes vanish only once the kernel has torn them down)."""
    deadline = time.monotonic() + timeout
    while (left := process_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...);
    None when the process is gone.  The name is skipped by its last ``)``: it may hold
    spaces and parentheses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2 :].split()
