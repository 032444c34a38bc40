"""Processes a test session started and left running, found two ways.

- **Descendants.** Every process still below the pytest process in the process tree
  (walked by parent pid).  This finds a child a test forked without exec — the bench
  runner's jobs, a forked burner, a device's forked child — whatever its environment.
- **The environment tag.** The session puts ``VIRTBLK_TEST_SESSION=<id>`` into
  ``os.environ`` before any test runs, so every program a test *executes* is started with
  it, whatever it does afterwards: a new session (``setsid``), a double fork, a
  reparenting to init, where the tree walk loses it.  ``/proc/PID/environ`` holds the
  environment a process was exec'd with, so the tag finds those.

Neither sees a process that both was forked without exec (so it lacks the tag) and left
the tree (its parent died, or it daemonized), nor one that clears its environment on exec
and leaves the tree.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .process import ProcessStat, all_processes, process_stat

#: The environment variable that carries the session's tag.
SESSION_ENV = "VIRTBLK_TEST_SESSION"


@dataclass(frozen=True)
class Leftover:
    """A live process a session started."""

    pid: int
    command: str
    #: When it started (clock ticks after boot): with the pid, it names the process.
    started: int

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command}"


def _leftover(pid: int, stat: ProcessStat) -> Leftover | None:
    """The process as a `Leftover`; None when it is gone or not ours to read."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    command = argv.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return Leftover(pid, command, stat.started)


def describe(pids: list[int]) -> list[Leftover]:
    """These processes, with their command lines; one that is gone already (it was dying
    when its pid was read) is still named, by pid."""
    found = []
    for pid in pids:
        stat = process_stat(pid)
        leftover = _leftover(pid, stat) if stat is not None else None
        found.append(leftover or Leftover(pid, "(gone before its command line was read)", 0))
    return found


def tagged_processes(tag: str) -> list[Leftover]:
    """The live processes (this one excepted) exec'd with ``SESSION_ENV=tag``.

    Processes of other users cannot be read and are skipped: a test cannot have started
    them.  Zombies have no environment left and are not alive, so they are not listed.
    """
    wanted = f"{SESSION_ENV}={tag}".encode()
    found = []
    for pid, stat in all_processes().items():
        if pid == os.getpid() or stat.state == "Z":
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if wanted in environ.split(b"\0") and (leftover := _leftover(pid, stat)) is not None:
            found.append(leftover)
    return sorted(found, key=lambda leftover: leftover.pid)


def descendants(root: int) -> list[Leftover]:
    """The live processes below ``root`` in the process tree (``root`` excepted).

    Zombies are not alive and are not listed; their children, already handed to init (or
    a subreaper), are not below them any more.
    """
    table = all_processes()
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found = []
    pending = list(children.get(root, ()))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, ()))
        stat = table[pid]
        if stat.state != "Z" and (leftover := _leftover(pid, stat)) is not None:
            found.append(leftover)
    return sorted(found, key=lambda leftover: leftover.pid)


def kill(leftovers: list[Leftover], timeout: float = 10.0) -> list[Leftover]:
    """SIGKILL each process and wait until none is alive; return those still alive after
    ``timeout`` seconds.  Those that are children of this process are reaped, so no
    zombie is left either."""
    for leftover in leftovers:
        try:
            os.kill(leftover.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = leftovers
    while alive:
        # A killed child of ours stays a zombie until waited for: it holds nothing any more.
        alive = [leftover for leftover in alive if not _dead(leftover)]
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return alive


def _dead(leftover: Leftover) -> bool:
    """Whether the process is gone, or a zombie (then reaped if it is a child of ours)."""
    stat = process_stat(leftover.pid)
    if stat is None or stat.started != leftover.started:
        return True
    if stat.state != "Z":
        return False
    if stat.ppid == os.getpid():
        try:
            os.waitpid(leftover.pid, 0)
        except ChildProcessError:
            pass  # reaped meanwhile by whoever started it (a Popen in another thread)
    return True
