"""Small helpers shared by the CLI, the benchmark and the embedded device."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``4k``, ``1G``, ``512MiB``, ``4096`` -> bytes.  Units are binary, as fio's are."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4k, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def human_size(size: int) -> str:
    """Bytes in binary units, e.g. ``1.00 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{size} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by process ``pid`` and all its descendants: a
    device's queue workers run in processes of their own, and their CPU is the device's.

    Descendants still running are found through their parent pid in /proc; those that
    exited and were waited for are in the parent's ``cutime``/``cstime``.
    """
    fields = _stat_fields(pid)
    ticks = sum(int(x) for x in fields[11:15])
    children: dict[int, list[int]] = {}
    own: dict[int, int] = {}  # utime + stime of each process, from the same one read
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            other = _stat_fields(entry)
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(other[1]), []).append(int(entry))
        own[int(entry)] = int(other[11]) + int(other[12])
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        ticks += own[child]
        todo.extend(children.get(child, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def skip_bytes(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """The views after their first ``skip`` bytes, empty views dropped: the data after a
    request header, or what a short transfer left to do."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if skip >= n:
            skip -= n
            continue
        out.append(view[skip:] if skip else view)
        skip = 0
    return out
