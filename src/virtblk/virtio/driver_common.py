"""What the driver's end of a split and of a packed virtqueue do alike: tokens and prepared
chains, which know nothing of the ring they are submitted on.

``DriverQueueBase`` holds a queue's tokens (busy or free), each token's indirect table and
prepared chain, and the broken state; ``split_driver.DriverVirtqueue`` and
``packed_driver.PackedDriverVirtqueue`` add the ring: how a table is written (the two
rings flag its entries differently), how a chain is made available and found used.  The
hot paths (``add_prepared_batch``, ``get_used``, ``kick_prepare``) stay whole in each
ring, written out for it: sharing them would cost a call per request.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NoReturn

from virtblk.errors import DeviceFaultError
from virtblk.spec import VRING_DESC_ALIGN, VRING_DESC_SIZE
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.split_layout import VirtqueueError, VringAddrs

__all__ = ["DeviceProtocolError", "DriverQueueBase", "QueueFull"]


class DeviceProtocolError(DeviceFaultError, VirtqueueError):
    """The device broke the used-ring protocol; the driver queue is now broken.

    A ``virtblk.errors.DeviceFaultError`` (``OSError``, errno ``EIO``), so a ``Disk`` caller
    catches it with the rest of the documented hierarchy, and still a ``VirtqueueError``.

    ``completed`` holds the valid ``(token, written_len)`` completions that the same
    ``get_used`` call read before the bad entry: the caller still owns completing them.
    """

    def __init__(self, message: str, completed: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.completed: list[tuple[int, int]] = completed or []


class QueueFull(VirtqueueError):
    """Not enough free descriptors for the chain; complete something and retry."""


Prepared = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], int, int]
"""A token's prepared chain: (out, in, table entries or 0 for a direct chain, writable bytes)."""


class DriverQueueBase(ABC):
    """Token and prepared-chain bookkeeping both rings' driver ends share.

    A subclass checks the queue size, calls ``_init_tokens`` before it sets up its ring and
    ``_init_tables`` after (so a ring that cannot be mapped allocates no tables), writes
    tables with ``_write_table`` and submits prepared chains in its own
    ``add_prepared_batch``.
    """

    def _init_tokens(
        self,
        addrs: VringAddrs,
        *,
        event_idx: bool,
        indirect: bool,
        allocator: BufferAllocator,
        max_chain: int,
        max_tokens: int | None,
    ) -> None:
        """Check the chain and token bounds and set the state every ring has;
        ``max_tokens`` defaults to the queue size."""
        num = addrs.num
        if max_chain < 1:
            raise ValueError(f"max_chain {max_chain} must be at least 1")
        if max_tokens is None:
            max_tokens = num
        if max_tokens < 1:
            raise ValueError(f"max_tokens {max_tokens} must be at least 1")
        self.addrs = addrs
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain = max_chain
        self.max_tokens = max_tokens
        self._allocator = allocator
        self._token_busy = bytearray(max_tokens)
        self._in_flight = 0
        self._broken: str | None = None

    def _init_tables(self, memory: GuestMemory) -> None:
        """Give every token an indirect table of ``max_chain`` entries when ``indirect``."""
        self._table_stride = VRING_DESC_SIZE * self.max_chain
        # The spec bounds every chain, indirect ones included, by the queue size.
        self._table_limit = min(self.max_chain, self.num)
        self._prepared: list[Prepared | None] = [None] * self.max_tokens
        self._tables_base = 0  # gpa of token 0's indirect table
        self._tables = memoryview(b"")
        if self.indirect:
            size = self._table_stride * self.max_tokens
            self._tables_base = self._allocator.alloc(size, VRING_DESC_ALIGN)
            self._tables = memory.view(self._tables_base, size)

    # -- state

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned by ``get_used`` (nor detached)."""
        return self._in_flight

    @property
    def broken(self) -> bool:
        """True once the device broke the protocol; ``add`` then refuses."""
        return self._broken is not None

    # -- prepared chains: a chain written once and submitted many times

    @abstractmethod
    def _write_table(
        self, token: int, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]],
        count: int,
    ) -> int:
        """Write ``out`` then ``in_`` into ``token``'s indirect table; returns the writable
        bytes.  Raises ``struct.error`` for an address or length out of range."""

    @abstractmethod
    def add_prepared_batch(self, tokens: Sequence[int]) -> int:
        """Queue the prepared chains of ``tokens`` in order, as far as descriptors go;
        returns how many were queued."""

    def prepare(
        self, token: int, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]]
    ) -> None:
        """Make ``out`` (device-readable) then ``in_`` (device-writable) the chain that
        ``token`` carries on each ``add_prepared`` from now on.

        With indirect descriptors the chain is written into the token's own table here, so
        submitting it later writes one ring descriptor (and on a split ring one avail
        entry), whatever its length (what a blk-mq tag with a fixed header and status
        needs).  Preparing the chain already prepared costs one comparison.  The bytes the
        buffers hold (a header, the data) stay the caller's to change between submissions.
        Raises ValueError for a token in flight, a chain that no ``add`` would accept or an
        address out of range.
        """
        if not 0 <= token < self.max_tokens or self._token_busy[token]:
            self._reject_token(token)
        out = tuple(out)
        in_ = tuple(in_)
        cached = self._prepared[token]
        if cached is not None and cached[0] == out and cached[1] == in_:
            return
        self._prepared[token] = None
        count = len(out) + len(in_)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        if not self.indirect or count == 1:
            if count > self.num:
                raise ValueError(f"chain of {count} buffers exceeds the queue size {self.num}")
            written = sum(length for _, length in in_)
            self._prepared[token] = (out, in_, 0, written)  # direct: ``add`` at submit
            return
        if count > self._table_limit:
            raise ValueError(
                f"chain of {count} buffers exceeds max_chain {self.max_chain} "
                f"or the queue size {self.num}"
            )
        try:
            written = self._write_table(token, out, in_, count)
        except struct.error as exc:
            raise ValueError(f"buffer address or length out of range: {exc}") from exc
        self._prepared[token] = (out, in_, count, written)

    def add_prepared(self, token: int) -> None:
        """Queue the chain ``prepare`` gave ``token`` (not visible before ``kick_prepare``);
        raises ``QueueFull`` when no descriptor is free (nothing changes then)."""
        if not self.add_prepared_batch((token,)):
            raise QueueFull("no free descriptor")

    def _reject_token(self, token: int) -> NoReturn:
        """Say why ``token`` cannot be submitted: the queue is broken, the token is out of
        range or already in flight (called only once a check has failed)."""
        if self._broken is not None:
            raise DeviceProtocolError(f"queue is broken: {self._broken}")
        if not 0 <= token < self.max_tokens:
            raise ValueError(f"token {token} outside 0..{self.max_tokens - 1}")
        raise ValueError(f"token {token} is already in flight")

    def _release_tables(self) -> None:
        """Forget the prepared chains and give the indirect tables back to the allocator
        (``close``; idempotent)."""
        self._prepared = [None] * self.max_tokens
        if self.indirect and self._tables:
            self._tables.release()
            self._tables = memoryview(b"")
            self._allocator.free(self._tables_base)
