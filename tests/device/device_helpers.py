"""Test helpers: a descriptor chain built from plain buffers, as the device sees one."""

from __future__ import annotations

import dataclasses

from virtblk.spec import RequestHeader


@dataclasses.dataclass
class FakeChain:
    """Has the attributes of ``virtblk.virtio.split.DescriptorChain`` the device reads."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


def chain(
    readable: list[bytes | bytearray], writable_sizes: list[int], head: int = 0
) -> tuple[FakeChain, list[bytearray]]:
    """A chain over fresh buffers; returns it and the writable bytearrays to inspect."""
    out = [memoryview(bytearray(b)) for b in readable]
    ins = [bytearray(n) for n in writable_sizes]
    return FakeChain(head, out, [memoryview(b) for b in ins]), ins


def header(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return RequestHeader(rtype, ioprio, sector).pack()
