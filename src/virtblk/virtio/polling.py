"""How long to poll a ring before sleeping on its eventfd: QEMU's adaptive polling time.

Both ends of a virtqueue can poll instead of sleeping: the device its avail index, the
driver its used index.  Polling saves the wakeup (and the peer's notification) when the
other end answers soon, and wastes a CPU when it does not; this rule, from QEMU's
``util/aio-posix.c`` (``poll-max-ns``), learns which from how long the waits really are.
"""

from __future__ import annotations

__all__ = ["POLL_START_NS", "RESTART_AFTER", "AdaptivePoll"]

POLL_START_NS = 4000
"""The first polling time once polling pays (QEMU starts at 4 microseconds too)."""

RESTART_AFTER = 4
"""The device's rule: waits short enough to catch in a row before polling starts again
after it stopped (1 is QEMU's rule)."""


class AdaptivePoll:
    """How long to poll before sleeping.

    After each wait, ``adjust(block_ns)`` looks at how long the wait for work really was:
    within the polling time, nothing changes; longer than ``max_ns``, polling stops (it
    would have to spin too long to pay); in between, the polling time doubles (from 4 us)
    up to ``max_ns``.

    ``restart_after`` short waits in a row start polling again once it stopped.  QEMU
    restarts at the first (``restart_after=1``, what the driver's queue handle uses).  The
    device waits for ``RESTART_AFTER``: measured here, a deep queue's waits sit just above
    ``max_ns`` with the odd one below, and QEMU's rule then grows the polling time from
    4 us up again and again, each time spinning for nothing (0.8 us of device CPU per I/O
    at depth 32, no IOPS gained).
    """

    __slots__ = ("_restart_after", "_short", "max_ns", "ns")

    def __init__(self, max_ns: int, *, restart_after: int = RESTART_AFTER) -> None:
        if max_ns < 0:
            raise ValueError(f"polling time must be >= 0 ns, got {max_ns}")
        if restart_after < 1:
            raise ValueError(f"restart_after must be >= 1, got {restart_after}")
        self.max_ns = max_ns
        self.ns = 0
        self._restart_after = restart_after
        self._short = restart_after - 1  # polling may start at the first short wait

    def adjust(self, block_ns: int) -> None:
        """Learn from one wait that lasted ``block_ns``."""
        if block_ns <= self.ns:
            return  # the sweet spot
        if block_ns > self.max_ns:
            self.ns = 0
            self._short = 0
        elif self.ns < self.max_ns:
            if not self.ns:
                self._short += 1
                if self._short < self._restart_after:
                    return
            self.ns = min(self.ns * 2 if self.ns else POLL_START_NS, self.max_ns)
