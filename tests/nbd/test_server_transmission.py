"""Transmission requests through ``ServerConnection``: the events the storage serves, the
replies it builds, and every request the state machine refuses itself."""

from __future__ import annotations

import errno

import pytest
from nbd_helpers import (
    ALL_FLAGS,
    SIZE,
    Reply,
    events,
    export,
    negotiated,
    request,
    transmission_replies,
)

from virtblk.nbd.server import (
    CLOSED,
    NEED_DATA,
    Answered,
    Disconnect,
    Flush,
    ProtocolViolation,
    Read,
    Trim,
    Write,
    WriteZeroes,
    nbd_errno,
)
from virtblk.nbd.wire import ChunkType, Command, CommandFlag, Errno, TransmissionFlag

FUA = CommandFlag.FUA


def test_read_is_an_event_and_its_reply_carries_the_data() -> None:
    for structured in (False, True):
        conn = negotiated(structured=structured)
        (event,) = events(conn, request(Command.READ, 4096, 1024, cookie=7))
        assert event == Read(7, 4096, 1024, False)
        assert conn.in_flight == 1
        header, data = conn.read_reply(event, memoryview(b"x" * 1024))
        assert conn.in_flight == 0
        (reply,) = transmission_replies(header + bytes(data), {7: 1024})
        if structured:
            assert reply == Reply(7, 0, True, True, ChunkType.OFFSET_DATA, 4096, b"x" * 1024)
        else:
            assert reply == Reply(7, 0, data=b"x" * 1024)


def test_write_payload_may_arrive_in_pieces() -> None:
    conn = negotiated()
    raw = request(Command.WRITE, 512, 2048, cookie=3, flags=FUA, payload=b"ab" * 1024)
    assert events(conn, raw[:40]) == []
    assert events(conn, raw[40:1000]) == []
    (event,) = events(conn, raw[1000:])
    assert isinstance(event, Write)
    assert (event.cookie, event.offset, event.length, event.fua) == (3, 512, 2048, True)
    assert bytes(event.data) == b"ab" * 1024
    assert transmission_replies(conn.reply(event)) == [Reply(3, 0)]


def test_flush_trim_and_write_zeroes_events() -> None:
    conn = negotiated()
    found = events(conn, request(Command.FLUSH, cookie=1)
                   + request(Command.TRIM, 0, 4096, cookie=2, flags=FUA)
                   + request(Command.WRITE_ZEROES, 4096, 8192, cookie=3,
                             flags=CommandFlag.NO_HOLE)
                   + request(Command.WRITE_ZEROES, 0, SIZE, cookie=4))
    assert found == [Flush(1, 0, 0, False), Trim(2, 0, 4096, True),
                     WriteZeroes(3, 4096, 8192, False, True),
                     WriteZeroes(4, 0, SIZE, False, False)]
    assert conn.in_flight == 4


def test_errors_in_replies() -> None:
    conn = negotiated()
    read, write = events(conn, request(Command.READ, 0, 512, cookie=1)
                         + request(Command.WRITE, 0, 512, cookie=2))
    assert isinstance(read, Read) and isinstance(write, Write)
    assert transmission_replies(conn.reply(read, Errno.EIO, "disk on fire")) == [
        Reply(1, Errno.EIO, True, True, ChunkType.ERROR, message="disk on fire")]
    assert transmission_replies(conn.reply(write, Errno.ENOSPC, "full")) == [
        Reply(2, Errno.ENOSPC, True, True, ChunkType.ERROR, message="full")]
    conn = negotiated(structured=False)
    (read,) = events(conn, request(Command.READ, 0, 512, cookie=5))
    assert isinstance(read, Read)
    assert transmission_replies(conn.reply(read, Errno.EIO)) == [Reply(5, Errno.EIO)]


def test_reply_misuse_is_a_value_error() -> None:
    conn = negotiated()
    (read,) = events(conn, request(Command.READ, 0, 512))
    assert isinstance(read, Read)
    with pytest.raises(ValueError, match="read_reply"):
        conn.reply(read)
    with pytest.raises(ValueError, match="not an NBD error"):
        conn.reply(read, errno.ENOENT)
    with pytest.raises(ValueError, match="512 bytes answered with 3"):
        conn.read_reply(read, memoryview(b"abc"))
    conn.reply(read, Errno.EIO)
    with pytest.raises(ValueError, match="no request in flight"):
        conn.reply(read, Errno.EIO)


READ_ONLY = export(flags=TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH)
BARE = export(flags=TransmissionFlag(0))


@pytest.mark.parametrize(("exp", "raw", "error", "why"), [
    (None, request(42), Errno.EINVAL, "unknown command 42"),
    (None, request(Command.BLOCK_STATUS, 0, 512), Errno.EINVAL, "BLOCK_STATUS"),
    (None, request(Command.RESIZE, 0, 512), Errno.EINVAL, "RESIZE"),
    (None, request(Command.READ, 0, 512, flags=CommandFlag.NO_HOLE), Errno.EINVAL, "flags 0x2"),
    (None, request(Command.READ, 0, 512, flags=1 << 9), Errno.EINVAL, "flags 0x200"),
    (None, request(Command.WRITE, 0, 512, flags=CommandFlag.DF), Errno.EINVAL, "flags 0x4"),
    (BARE, request(Command.WRITE, 0, 512, flags=FUA), Errno.EINVAL, "flags 0x1"),
    (BARE, request(Command.FLUSH), Errno.EINVAL, "was not advertised"),
    (BARE, request(Command.TRIM, 0, 512), Errno.EINVAL, "was not advertised"),
    (BARE, request(Command.WRITE_ZEROES, 0, 512), Errno.EINVAL, "was not advertised"),
    (None, request(Command.FLUSH, 0, 512), Errno.EINVAL, "offset and length 0"),
    (READ_ONLY, request(Command.WRITE, 0, 512), Errno.EPERM, "read-only"),
    (READ_ONLY, request(Command.WRITE, SIZE, 512), Errno.EPERM, "read-only"),
    (READ_ONLY, request(Command.TRIM, 0, 512), Errno.EPERM, "read-only"),
    (READ_ONLY, request(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO), Errno.EPERM,
     "read-only"),
    (None, request(Command.READ, 0, 128 << 10), Errno.EINVAL, "maximum payload"),
    (None, request(Command.WRITE, 0, 128 << 10), Errno.EINVAL, "maximum payload"),
    (None, request(Command.READ, 1, 512), Errno.EINVAL, "minimum block 512"),
    (None, request(Command.WRITE, 0, 100), Errno.EINVAL, "minimum block 512"),
    (None, request(Command.TRIM, 256, 512), Errno.EINVAL, "minimum block 512"),
    (None, request(Command.READ, SIZE, 512), Errno.EINVAL, "past the export"),
    (None, request(Command.TRIM, SIZE - 512, 1024), Errno.EINVAL, "past the export"),
    (None, request(Command.WRITE, SIZE - 512, 1024), Errno.ENOSPC, "past the export"),
    (None, request(Command.WRITE_ZEROES, SIZE, 512), Errno.ENOSPC, "past the export"),
    (None, request(Command.READ, 2**64 - 512, 512), Errno.EINVAL, "past the export"),
    (None, request(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO), Errno.ENOTSUP,
     "no faster"),
    (export(flags=ALL_FLAGS & ~TransmissionFlag.SEND_FAST_ZERO),
     request(Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO), Errno.EINVAL, "0x10"),
    (None, request(Command.WRITE, 0, 0), 0, "zero length"),
    (None, request(Command.TRIM, 512, 0), 0, "zero length"),
    (None, request(Command.CACHE, 0, 4096), 0, ""),
])  # fmt: skip
def test_refused_or_answered_by_the_state_machine(exp: object, raw: bytes, error: int,
                                                  why: str) -> None:
    conn = negotiated(exp if exp is not None else export())  # type: ignore[arg-type]
    # The request, then a read that must still be parsed (a refused write's payload was
    # skipped, not taken for the next header).
    found = events(conn, raw + request(Command.READ, 0, 512, cookie=99))
    assert len(found) == 2, found
    answered, after = found
    assert isinstance(answered, Answered)
    assert answered.error == error and why in answered.message
    assert after == Read(99, 0, 512, False)
    (reply,) = transmission_replies(conn.data_to_send())
    assert (reply.cookie, reply.error) == (1, error)
    if error:
        assert reply.chunk == ChunkType.ERROR and why in reply.message
    assert conn.in_flight == 1


def test_refused_read_without_structured_replies_is_a_bare_error() -> None:
    conn = negotiated(structured=False)
    (answered,) = events(conn, request(Command.READ, SIZE, 512, cookie=4))
    assert isinstance(answered, Answered)
    assert transmission_replies(conn.data_to_send()) == [Reply(4, Errno.EINVAL)]


def test_unaligned_request_fails_cleanly_when_block_sizes_were_not_asked() -> None:
    conn = negotiated(block_size=False)
    (answered,) = events(conn, request(Command.WRITE, 100, 512, payload=b"z" * 512))
    assert isinstance(answered, Answered) and answered.error == Errno.EINVAL


def test_bad_request_magic_ends_parsing() -> None:
    conn = negotiated()
    raw = bytearray(request(Command.READ, 0, 512))
    raw[0] ^= 0xFF
    found = events(conn, bytes(raw) + request(Command.READ, 0, 512))
    assert len(found) == 1 and isinstance(found[0], ProtocolViolation)
    assert conn.next_event() is CLOSED
    conn.receive_data(request(Command.READ, 0, 512))
    assert conn.next_event() is CLOSED


def test_disc_ends_parsing_and_in_flight_requests_are_still_answered() -> None:
    conn = negotiated()
    read, disc = events(conn, request(Command.READ, 0, 512, cookie=1) + request(Command.DISC)
                        + b"garbage")
    assert isinstance(read, Read) and disc == Disconnect()
    assert conn.disconnecting
    assert conn.next_event() is CLOSED
    conn.read_reply(read, memoryview(bytes(512)))
    assert conn.in_flight == 0


def test_shutdown_refuses_new_requests_with_eshutdown() -> None:
    conn = negotiated()
    (read,) = events(conn, request(Command.READ, 0, 512, cookie=1))
    conn.shutdown()
    (refused,) = events(conn, request(Command.WRITE, 0, 512, cookie=2))
    assert isinstance(refused, Answered) and refused.error == Errno.ESHUTDOWN
    assert isinstance(read, Read)
    conn.read_reply(read, memoryview(bytes(512)))  # what was in flight is still answered


def test_eof_inside_a_write_payload_is_a_violation() -> None:
    conn = negotiated()
    events(conn, request(Command.WRITE, 0, 4096)[:100])
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, ProtocolViolation)
    conn = negotiated()
    events(conn, request(Command.WRITE, 0, 4096)[:28])  # the header alone
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ProtocolViolation)
    conn = negotiated()
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


def test_need_data_until_a_header_is_whole() -> None:
    conn = negotiated()
    raw = request(Command.READ, 0, 512)
    for i in range(len(raw) - 1):
        conn.receive_data(raw[i : i + 1])
        assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[-1:])
    assert isinstance(conn.next_event(), Read)


@pytest.mark.parametrize(("code", "expected"), [
    (errno.EROFS, Errno.EPERM), (errno.EPERM, Errno.EPERM), (errno.EDQUOT, Errno.ENOSPC),
    (errno.EFBIG, Errno.ENOSPC), (errno.ENOSPC, Errno.ENOSPC), (errno.EINVAL, Errno.EINVAL),
    (errno.ETIMEDOUT, Errno.EIO), (errno.ENOTTY, Errno.EIO), (errno.EIO, Errno.EIO),
    (errno.ESHUTDOWN, Errno.ESHUTDOWN),
])  # fmt: skip
def test_nbd_errno(code: int, expected: Errno) -> None:
    assert nbd_errno(code) is expected


def test_a_write_payload_is_lent_not_copied_and_stays_intact() -> None:
    """The payload is a view of the receive buffer: what arrives later (more requests, a
    violation) goes to a new buffer and never moves or overwrites it."""
    conn = negotiated()
    (write,) = events(conn, request(Command.WRITE, 0, 4096, cookie=1, payload=b"\x11" * 4096)
                      + request(Command.READ, 0, 512, cookie=2)[:10])
    assert isinstance(write, Write) and isinstance(write.data, memoryview)
    found = events(conn, request(Command.READ, 0, 512, cookie=2)[10:]
                   + request(Command.WRITE, 0, 512, cookie=3, payload=b"\x22" * 512))
    assert [type(e) for e in found] == [Read, Write]
    events(conn, b"\xff" * 28)  # a bad magic: the state machine drops its buffer
    assert bytes(write.data) == b"\x11" * 4096
    assert bytes(found[1].data) == b"\x22" * 512  # type: ignore[union-attr]
