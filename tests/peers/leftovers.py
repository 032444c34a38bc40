"""Processes a test session started and left running, found by an environment tag.

The session puts ``VIRTBLK_TEST_SESSION=<id>`` into its own environment before any test
runs, so every process a test starts inherits it, whatever it does afterwards: a new
session (``setsid``), a double fork, a reparenting to init.  ``/proc/PID/environ`` holds
the environment a process was started with, so the tag finds them all; only a process
that clears its environment on exec escapes it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .process import process_state

#: The environment variable that carries the session's tag.
SESSION_ENV = "VIRTBLK_TEST_SESSION"


@dataclass(frozen=True)
class Leftover:
    """A live process that carries a session's tag."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command}"


def tagged_processes(tag: str) -> list[Leftover]:
    """The live processes (this one excepted) started with ``SESSION_ENV=tag``.

    Processes of other users cannot be read and are skipped: a test cannot have started
    them.  Zombies have no environment left and are not alive, so they are not listed.
    """
    wanted = f"{SESSION_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            argv = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if wanted in environ.split(b"\0"):
            command = argv.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            found.append(Leftover(int(entry.name), command))
    return sorted(found, key=lambda leftover: leftover.pid)


def kill(leftovers: list[Leftover], timeout: float = 10.0) -> list[Leftover]:
    """SIGKILL each process and wait until none is alive; return those still alive after
    ``timeout`` seconds."""
    for leftover in leftovers:
        try:
            os.kill(leftover.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = leftovers
    while alive:
        # A killed child of ours stays a zombie until waited for: it holds nothing any more.
        alive = [leftover for leftover in alive
                 if process_state(leftover.pid) not in (None, "Z")]
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return alive

