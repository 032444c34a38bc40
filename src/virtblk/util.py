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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
