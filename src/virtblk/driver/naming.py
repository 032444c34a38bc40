"""Disk names as the seed gives them: vda ... vdz, vdaa ... vdzz, vdaaa ...

The legacy scheme is bijective base 26 (``virtblk_name_format``), and indices are handed
out lowest-free-first per process (the seed's ``ida``), so the first disk opened is
``vda`` and a closed disk's name is reused.
"""

from __future__ import annotations

import threading

PREFIX = "vd"


def name_format(index: int, prefix: str = PREFIX) -> str:
    """Name for ``index``: 0 is ``vda``, 25 ``vdz``, 26 ``vdaa``, 701 ``vdzz``, 702 ``vdaaa``."""
    if index < 0:
        raise ValueError(f"disk index must be >= 0, not {index}")
    letters: list[str] = []
    while True:
        letters.append(chr(ord("a") + index % 26))
        index = index // 26 - 1
        if index < 0:
            break
    return prefix + "".join(reversed(letters))


class DiskIndex:
    """Process-wide allocator of disk indices (lowest free first)."""

    _lock = threading.Lock()
    _used: set[int] = set()

    @classmethod
    def acquire(cls) -> int:
        """Take the lowest free index."""
        with cls._lock:
            index = 0
            while index in cls._used:
                index += 1
            cls._used.add(index)
            return index

    @classmethod
    def release(cls, index: int) -> None:
        """Give ``index`` back for reuse."""
        with cls._lock:
            cls._used.discard(index)

    @staticmethod
    def name(index: int) -> str:
        """The disk name for ``index``."""
        return name_format(index)
