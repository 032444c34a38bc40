"""Waiting for a device process to serve its Unix socket, and reading processes from /proc
(their state, parent, group and start): shared by the harnesses that start
``qemu-storage-daemon`` (``peers.qsd``) and ``virtblk serve`` (``interop.serve_process``)
and by the leftover-process check (``peers.leftovers``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def eventually(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll until ``predicate()`` holds (True) or ``timeout`` seconds pass (its last
    answer): for what another thread or process does in its own time (a config change)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


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


@dataclass(frozen=True)
class ProcessStat:
    """What the harness reads of a process in /proc/PID/stat."""

    state: str  #: ``R``, ``S``, ``T``, ``Z``, ...
    ppid: int
    pgrp: int
    #: When it started, in clock ticks after boot: with the pid, it names one process
    #: (a pid is reused once its process is gone).
    started: int


def process_stat(pid: int) -> ProcessStat | None:
    """The process's state, parent, group and start; None when it is gone.  The command
    name before them is skipped by its last ``)``: it may hold spaces and parentheses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields 3, 4, 5 and 22 of proc(5): the first after the name is number 3.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def process_state(pid: int) -> str | None:
    """The state letter of a process (``R``, ``S``, ``T``, ``Z``, ...), None when it is gone."""
    stat = process_stat(pid)
    return stat.state if stat is not None else None


def all_processes() -> dict[int, ProcessStat]:
    """Every process of /proc (zombies too) by pid, as ``process_stat`` reads it."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := process_stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    return table


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    return sorted(pid for pid, stat in all_processes().items()
                  if stat.state != "Z" and stat.pgrp == pgid)


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Wait until process group ``pgid`` has no live process; return what is left after
    ``timeout`` seconds (killed processes vanish only once the kernel has torn them down)."""
    deadline = time.monotonic() + timeout
    while (left := process_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def kill_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL the process group ``process`` leads (a device "crashing" with its queue
    workers), reap it and wait until the group is gone; ``RuntimeError`` names what
    survived ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):  # the group is empty: all exited
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    left = wait_group_gone(process.pid, timeout)
    if left:
        raise RuntimeError(f"processes {left} of group {process.pid} survived SIGKILL")
