"""``OwnedFd``: one file descriptor and the duty to close it, discharged exactly once.

vhost-user messages carry file descriptors (memory regions, eventfds, the backend
channel's socket).  A plain int says nothing about who must close it, so every error path
had to remember; forgetting leaks a descriptor per hostile message, remembering twice
closes whatever the kernel gave that number to in between.  An ``OwnedFd`` holds one
descriptor until it is either closed (``close``, idempotent) or handed on (``take``,
which empties it): after either, it holds nothing, so the same descriptor can never be
closed twice nor given to two owners.  Nothing relies on ``__del__``: an owner closes
what it holds when it is done (a ``with`` block, a ``finally``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from types import TracebackType
from typing import Self

__all__ = ["OwnedFd", "close_all", "dup_all"]


class OwnedFd:
    """One open file descriptor we must close, or hand on with ``take``."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd`` (an open descriptor)."""
        if fd < 0:
            raise ValueError(f"file descriptor {fd} is not open")
        self._fd = fd

    @classmethod
    def dup(cls, fd: int) -> OwnedFd:
        """A descriptor of our own for the file ``fd`` (borrowed, left open) refers to."""
        return cls(os.dup(fd))

    @property
    def closed(self) -> bool:
        """True once closed or taken: there is nothing left to close."""
        return self._fd < 0

    def fileno(self) -> int:
        """The descriptor, borrowed (to send, poll or read it); ownership stays here."""
        if self._fd < 0:
            raise ValueError("the file descriptor was closed or handed on")
        return self._fd

    def take(self) -> int:
        """Hand the descriptor and the duty to close it to the caller (once)."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor if we still hold it (a second call does nothing).

        Errors are not raised: Linux releases the number even when ``close`` fails, so
        there is nothing to retry and nothing leaks.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd >= 0 else "OwnedFd(closed)"


def close_all(fds: Iterable[OwnedFd | None]) -> None:
    """Close every descriptor still held (None entries are skipped)."""
    for fd in fds:
        if fd is not None:
            fd.close()


def dup_all(fds: Iterable[int]) -> tuple[OwnedFd, ...]:
    """Our own copies of borrowed descriptors; none is left open if one ``dup`` fails."""
    owned: list[OwnedFd] = []
    try:
        for fd in fds:
            owned.append(OwnedFd.dup(fd))
    except BaseException:
        close_all(owned)
        raise
    return tuple(owned)
