"""fio's ``verify``, simplified: a header and a checksum stamped into every block written,
checked when the block is read back."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import numpy as np

from virtblk.tools.bench.config import VerifyKind


class Verifier:
    """fio's verify, simplified: a header and a checksum in every block written.

    The header says what the block must be (magic, offset, generation); the checksum,
    over the header and the rest of the block, catches any byte changed.  The rest of the
    block is a pseudo-random pattern fixed per job (making it per write would cost more
    than the device under test; the header already tells a stale or misplaced block).
    """

    MAGIC = b"VBLKVRFY"
    HEADER = struct.Struct("<8sQQI4x16s")  # magic, offset, generation, bs, digest
    _DIGEST = slice(32, 48)

    def __init__(self, kind: VerifyKind, bs: int, seed: int) -> None:
        self.kind = kind
        self.bs = bs
        self.filler = np.random.default_rng(seed).bytes(bs - self.HEADER.size)
        self._generation = 0
        if kind == "crc32c":
            import crc32c  # small C extension, imported only when asked for

            self._crc32c: Callable[[bytes | memoryview], int] = crc32c.crc32c

    def _digest(self, block: memoryview) -> bytes:
        if self.kind == "md5":
            return hashlib.md5(block, usedforsecurity=False).digest()
        return self._crc32c(block).to_bytes(4, "little").ljust(16, b"\0")

    def fill(self, block: memoryview, offset: int) -> int:
        """Write a fresh header, pattern and checksum into ``block``; returns its
        generation."""
        self._generation += 1
        gen = self._generation
        self.HEADER.pack_into(block, 0, self.MAGIC, offset, gen, self.bs, bytes(16))
        block[self.HEADER.size :] = self.filler
        block[self._DIGEST] = self._digest(block)
        return gen

    def check(self, block: memoryview, offset: int, generation: int) -> str | None:
        """Why ``block`` read at ``offset`` is not what generation ``generation`` wrote, or
        None when it is."""
        magic, got_offset, got_gen, got_bs, digest = self.HEADER.unpack_from(block)
        if magic != self.MAGIC:
            return f"offset {offset}: no verify header (magic {magic!r})"
        if got_offset != offset:
            return f"offset {offset}: block written for offset {got_offset}"
        if got_gen != generation or got_bs != self.bs:
            return f"offset {offset}: generation {got_gen}, expected {generation} (stale data)"
        copy = bytearray(block)
        copy[self._DIGEST] = bytes(16)
        if self._digest(memoryview(copy)) != digest:
            return f"offset {offset}: {self.kind} checksum mismatch"
        return None
