"""Turn a descriptor chain into a virtio-blk request, trusting nothing in it.

With VERSION_1 (ANY_LAYOUT) the framing is not fixed by descriptors: the 16-byte header
is the first 16 device-readable bytes wherever they lie, the status is the last
device-writable byte, and the data is what remains on the side the request type uses.
Data is handed on as ``memoryview`` slices of guest memory, never copied.

A chain that cannot be a valid request raises ``MalformedRequest`` naming what is wrong;
it carries the status byte when the chain has one, so the device can still answer IOERR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from virtblk.spec import ZONE_APPEND_SECTOR, DiscardSegment, RequestHeader, RequestType
from virtblk.util import skip_bytes

HEADER_SIZE = RequestHeader.SIZE
HEADER_FORMAT = RequestHeader.FORMAT
_HEADER = HEADER_FORMAT

# Request directions; a type outside all of them is answered UNSUPP without looking at data.
DEVICE_WRITES = frozenset({RequestType.IN, RequestType.GET_ID, RequestType.GET_LIFETIME})
DEVICE_READS = frozenset({RequestType.OUT, RequestType.OUT_FUA})
SEGMENTED = frozenset({RequestType.DISCARD, RequestType.WRITE_ZEROES, RequestType.SECURE_ERASE})
NO_DATA = frozenset({RequestType.FLUSH})
SECTOR_MULTIPLE = frozenset({RequestType.IN, RequestType.OUT, RequestType.OUT_FUA,
                             RequestType.ZONE_APPEND})

# Zoned request types (VIRTIO_BLK_F_ZONED) are framed only by a zoned device: any other
# device answers them UNSUPP whatever their layout, as the spec requires.
ZONED_DEVICE_WRITES = frozenset({RequestType.ZONE_REPORT})
ZONED_NO_DATA = frozenset({RequestType.ZONE_OPEN, RequestType.ZONE_CLOSE,
                           RequestType.ZONE_FINISH, RequestType.ZONE_RESET,
                           RequestType.ZONE_RESET_ALL})
ZONED_APPEND = frozenset({RequestType.ZONE_APPEND})
"""Device-readable data, then ``append_sector`` (8 device-writable bytes) before the
status: ``struct virtio_blk_req_za``."""


class ChainLike(Protocol):
    """The attributes of ``virtblk.virtio.split_device.DescriptorChain`` a request needs."""

    @property
    def head(self) -> int: ...
    @property
    def readable(self) -> list[memoryview]: ...
    @property
    def writable(self) -> list[memoryview]: ...
    @property
    def readable_len(self) -> int: ...
    @property
    def writable_len(self) -> int: ...


class MalformedRequest(ValueError):
    """The chain breaks the request format; ``status`` is None when there is no writable byte
    (the chain can then only be returned with used length 0)."""

    def __init__(self, reason: str, status: memoryview | None, head: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.head = head


@dataclasses.dataclass(slots=True)
class BlkRequest:
    """One parsed request. ``data`` is the payload on the side the type uses:
    device-readable bytes after the header, or device-writable bytes before the status."""

    head: int
    type: int
    ioprio: int
    sector: int
    data: list[memoryview]
    data_len: int
    status: memoryview
    reply: Sequence[memoryview] = ()
    """ZONE_APPEND only: the 8 device-writable bytes for ``append_sector``."""


def _take(views: Sequence[memoryview], keep: int) -> list[memoryview]:
    """The first ``keep`` bytes of the views (empty views dropped)."""
    out: list[memoryview] = []
    for view in views:
        if keep <= 0:
            break
        n = len(view)
        if n == 0:
            continue
        out.append(view if n <= keep else view[:keep])
        keep -= n
    return out


def _read_header(readable: Sequence[memoryview]) -> tuple[int, int, int]:
    first = readable[0]
    if len(first) >= HEADER_SIZE:
        return _HEADER.unpack_from(first)
    raw = b"".join(bytes(v) for v in _take(readable, HEADER_SIZE))
    return _HEADER.unpack(raw)


def _status_byte(writable: Sequence[memoryview]) -> memoryview | None:
    for view in reversed(writable):
        n = len(view)
        if n:
            return view[n - 1 :]
    return None


_TYPE_NAMES = {int(t): t.name for t in RequestType}

# What each known type carries, looked up once per request.
_WRITES, _READS, _SEGMENTS, _NONE, _APPEND = range(5)
_KIND = {
    **{int(t): _WRITES for t in DEVICE_WRITES},
    **{int(t): _READS for t in DEVICE_READS},
    **{int(t): _SEGMENTS for t in SEGMENTED},
    **{int(t): _NONE for t in NO_DATA},
}
_ZONED_KIND = {
    **_KIND,
    **{int(t): _WRITES for t in ZONED_DEVICE_WRITES},
    **{int(t): _NONE for t in ZONED_NO_DATA},
    **{int(t): _APPEND for t in ZONED_APPEND},
}


def type_name(value: int) -> str:
    """A request type's spec name, or the number for types the spec does not define."""
    name = _TYPE_NAMES.get(value)
    return name if name is not None else f"type {value:#x}"


def parse_request(chain: ChainLike, zoned: bool = False) -> BlkRequest:
    """Frame ``chain`` as a request; raise ``MalformedRequest`` with the reason if it is not one.

    An unknown type (including one with the legacy barrier bit) is not malformed: it
    parses with empty data and the device answers UNSUPP.  Zoned types are known only to
    a ``zoned`` device.
    """
    head = chain.head
    writable = chain.writable
    writable_len = chain.writable_len
    readable_len = chain.readable_len
    status = _status_byte(writable) if writable_len else None
    if status is None:
        raise MalformedRequest(
            f"chain {head} has no device-writable byte for the status "
            f"({readable_len} readable bytes)", None, head)
    if readable_len < HEADER_SIZE:
        raise MalformedRequest(
            f"chain {head} has {readable_len} device-readable bytes, "
            f"too few for the {HEADER_SIZE}-byte request header", status, head)
    rtype, ioprio, sector = _read_header(chain.readable)
    kind = (_ZONED_KIND if zoned else _KIND).get(rtype)
    if kind is None:
        return BlkRequest(head, rtype, ioprio, sector, [], 0, status)

    out_extra = readable_len - HEADER_SIZE
    in_extra = writable_len - 1
    reply: Sequence[memoryview] = ()
    if kind in (_READS, _SEGMENTS):
        if in_extra:
            raise MalformedRequest(
                f"{type_name(rtype)} request (chain {head}) has {in_extra} device-writable "
                f"bytes besides the status; it takes none", status, head)
        data, data_len = skip_bytes(chain.readable, HEADER_SIZE), out_extra
    elif kind == _WRITES:
        if out_extra:
            raise MalformedRequest(
                f"{type_name(rtype)} request (chain {head}) carries {out_extra} "
                f"device-readable bytes after the header; it takes none", status, head)
        data, data_len = _take(writable, in_extra), in_extra
    elif kind == _APPEND:
        if in_extra != ZONE_APPEND_SECTOR.size:
            raise MalformedRequest(
                f"{type_name(rtype)} request (chain {head}) has {in_extra} device-writable "
                f"bytes before the status; append_sector needs {ZONE_APPEND_SECTOR.size}",
                status, head)
        data, data_len = skip_bytes(chain.readable, HEADER_SIZE), out_extra
        reply = _take(writable, in_extra)
    else:
        if out_extra or in_extra:
            raise MalformedRequest(
                f"{type_name(rtype)} request (chain {head}) carries data ({out_extra} "
                f"readable, {in_extra} writable bytes); it takes none", status, head)
        data, data_len = [], 0

    if data_len & 511 and rtype in SECTOR_MULTIPLE:
        raise MalformedRequest(
            f"{type_name(rtype)} request (chain {head}) has {data_len} data bytes, "
            f"not a multiple of 512", status, head)
    if kind == _SEGMENTS and (data_len == 0 or data_len % DiscardSegment.SIZE):
        raise MalformedRequest(
            f"{type_name(rtype)} request (chain {head}) has a {data_len}-byte payload, not a "
            f"positive multiple of the {DiscardSegment.SIZE}-byte segment", status, head)
    return BlkRequest(head, rtype, ioprio, sector, data, data_len, status, reply)


def read_segments(req: BlkRequest) -> list[DiscardSegment]:
    """Decode the DISCARD/WRITE_ZEROES/SECURE_ERASE segments (small: copying is fine)."""
    raw = b"".join(bytes(v) for v in req.data)
    size = DiscardSegment.SIZE
    fmt = DiscardSegment.FORMAT
    return [DiscardSegment(*fmt.unpack_from(raw, pos)) for pos in range(0, len(raw), size)]
