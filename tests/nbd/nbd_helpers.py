"""The client's half of NBD, just enough to talk to ``ServerConnection`` in tests: encode
options and requests, decode option replies and transmission replies.

Written from proto.md with the wire structs, independently of the server's code paths,
so that a test reads as "the client sends this, the server must answer that".
"""

from __future__ import annotations

import dataclasses
import struct

from virtblk.nbd.server import (
    CLOSED,
    NEED_DATA,
    Event,
    Export,
    Negotiated,
    ServerConnection,
)
from virtblk.nbd.wire import (
    CLIENT_FLAGS,
    ERROR_CHUNK,
    IHAVEOPT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Info,
    Option,
    TransmissionFlag,
)

ALL_FLAGS = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
             | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
             | TransmissionFlag.CAN_MULTI_CONN)
SIZE = 1 << 20
FIXED = CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
"""The client flags of a fixed-newstyle client that wants no zeroes."""


def export(**changes: object) -> Export:
    """A 1 MiB export with every command, a 512-byte minimum block and a 64 KiB maximum."""
    fields: dict[str, object] = {"name": "disk", "size": SIZE, "flags": ALL_FLAGS,
                                 "description": "a test disk", "min_block": 512,
                                 "max_block": 64 << 10}
    fields.update(changes)
    return Export(**fields)  # type: ignore[arg-type]


def option(opt: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes, *infos: int) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def request(command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
            cookie: int = 1, payload: bytes | None = None) -> bytes:
    if payload is None:
        payload = bytes(length) if command == 1 else b""
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


@dataclasses.dataclass
class OptReply:
    option: int
    reply: int
    data: bytes


def option_replies(raw: bytes) -> list[OptReply]:
    """Split a run of option replies (the whole of ``raw``)."""
    out = []
    pos = 0
    while pos < len(raw):
        magic, opt, reply, length = OPTION_REPLY_HEADER.unpack_from(raw, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += OPTION_REPLY_HEADER.size
        out.append(OptReply(opt, reply, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return out


@dataclasses.dataclass
class Reply:
    """A transmission reply: simple, or one structured chunk."""

    cookie: int
    error: int
    structured: bool = False
    done: bool = True
    chunk: int = 0
    offset: int | None = None
    data: bytes = b""
    message: str = ""


def transmission_replies(raw: bytes, read_lengths: dict[int, int] | None = None) -> list[Reply]:
    """Decode ``raw``; a simple reply to a read carries ``read_lengths[cookie]`` bytes."""
    out = []
    pos = 0
    read_lengths = read_lengths or {}
    while pos < len(raw):
        (magic,) = struct.unpack_from(">I", raw, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = SIMPLE_REPLY.unpack_from(raw, pos)
            pos += SIMPLE_REPLY.size
            n = read_lengths.get(cookie, 0) if error == 0 else 0
            out.append(Reply(cookie, error, data=raw[pos : pos + n]))
            pos += n
            continue
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        _, flags, chunk, cookie, length = STRUCTURED_REPLY.unpack_from(raw, pos)
        pos += STRUCTURED_REPLY.size
        payload = raw[pos : pos + length]
        pos += length
        reply = Reply(cookie, 0, structured=True, done=bool(flags & 1), chunk=chunk)
        if chunk == ChunkType.OFFSET_DATA:
            (reply.offset,) = struct.unpack_from(">Q", payload)
            reply.data = payload[8:]
        elif chunk & 0x8000:
            reply.error, mlen = ERROR_CHUNK.unpack_from(payload)
            reply.message = payload[ERROR_CHUNK.size : ERROR_CHUNK.size + mlen].decode()
        out.append(reply)
    return out


def events(conn: ServerConnection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and collect events until the state machine wants more."""
    if data:
        conn.receive_data(data)
    found: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return found
        found.append(event)


def negotiated(exp: Export | None = None, *, structured: bool = True,
               block_size: bool = True) -> ServerConnection:
    """A connection in the transmission phase on ``exp`` (output drained)."""
    exp = exp or export()
    conn = ServerConnection([exp])
    data = FIXED
    if structured:
        data += option(Option.STRUCTURED_REPLY)
    infos = (Info.BLOCK_SIZE,) if block_size else ()
    data += option(Option.GO, go_data(exp.name.encode(), *infos))
    found = events(conn, data)
    assert isinstance(found[-1], Negotiated), found
    conn.data_to_send()
    return conn
