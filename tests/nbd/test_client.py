"""The NBD client end, sans-IO: the handshake and the transmission phase fed plain bytes.

A scripted server (the bytes proto.md says a server sends) drives every path of the
handshake; the reply parser is given structured replies split at random and in random
order, and every way a server can break the protocol.  Hypothesis feeds both arbitrary
bytes: they parse, or raise the client's own error, never anything else.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtblk.nbd.client import (
    ClientConnection,
    ClientHandshake,
    Done,
    Event,
    Export,
    HandshakeError,
    NotNbdError,
    ProtocolError,
    ReadData,
    ReadHole,
    TlsRequiredError,
    UnknownExportError,
)
from virtblk.nbd.wire import (
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SERVER_GREETING,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)

FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
SIZE = 1 << 20


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def go_success(size: int = SIZE, flags: int = FLAGS, block: tuple[int, int, int] | None = (
        512, 4096, 65536)) -> bytes:
    out = option_reply(Option.GO, OptionReply.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags))
    if block is not None:
        out += option_reply(Option.GO, OptionReply.INFO, INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, *block))
    # An info we do not ask for is allowed, and ignored.
    out += option_reply(Option.GO, OptionReply.INFO, struct.pack(">H", Info.NAME) + b"disk")
    return out + option_reply(Option.GO, OptionReply.ACK)


def run(handshake: ClientHandshake, *chunks: bytes) -> tuple[Export | None, bytes]:
    """Feed the server's bytes in chunks; the result and everything the client sent."""
    sent = b""
    export = handshake.next_event()
    sent += handshake.data_to_send()
    for chunk in chunks:
        handshake.receive_data(chunk)
        export = handshake.next_event()
        sent += handshake.data_to_send()
    return export, sent


def parse_options(sent: bytes) -> list[tuple[int, bytes]]:
    """The options a client sent after its 4-byte flags."""
    out = []
    pos = CLIENT_FLAGS.size
    while pos < len(sent):
        magic, option, length = OPTION_HEADER.unpack_from(sent, pos)
        assert magic == IHAVEOPT
        pos += OPTION_HEADER.size
        out.append((option, sent[pos:pos + length]))
        pos += length
    return out


# ------------------------------------------------------------------------ handshake


def test_go_with_structured_replies_and_block_sizes() -> None:
    handshake = ClientHandshake("disk")
    export, sent = run(handshake, greeting(),
                       option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK), go_success())
    assert export == Export("disk", SIZE, FLAGS, True, 512, 4096, 65536)
    assert CLIENT_FLAGS.unpack_from(sent)[0] == ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
    (first, empty), (second, go) = parse_options(sent)
    assert (first, empty) == (Option.STRUCTURED_REPLY, b"")
    assert second == Option.GO
    # name length, name, one info request: BLOCK_SIZE
    assert go == struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, Info.BLOCK_SIZE)
    assert handshake.leftover == b""


def test_byte_at_a_time_is_the_same() -> None:
    stream = greeting() + option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK) + go_success()
    export, _ = run(ClientHandshake("disk"), *(stream[i:i + 1] for i in range(len(stream))))
    assert export is not None and export.max_payload == 65536


def test_without_block_size_info_the_defaults_hold() -> None:
    export, _ = run(ClientHandshake(""), greeting(),
                    option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
                    go_success(block=None))
    assert export is not None
    assert (export.min_block, export.max_payload) == (1, 1 << 25)


def test_structured_replies_refused_still_goes() -> None:
    export, sent = run(ClientHandshake("disk"), greeting(),
                       option_reply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP),
                       go_success())
    assert export is not None and not export.structured_replies
    assert [o for o, _ in parse_options(sent)] == [Option.STRUCTURED_REPLY, Option.GO]


def test_a_server_without_go_gets_export_name() -> None:
    export, sent = run(ClientHandshake("old"), greeting(HandshakeFlag.FIXED_NEWSTYLE),
                       option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
                       option_reply(Option.GO, OptionReply.ERR_UNSUP),
                       EXPORT_NAME_REPLY.pack(4096, FLAGS | TransmissionFlag.READ_ONLY),
                       bytes(124))
    assert export is not None and export.size == 4096 and export.read_only
    assert CLIENT_FLAGS.unpack_from(sent)[0] == ClientFlag.FIXED_NEWSTYLE  # no NO_ZEROES
    assert parse_options(sent)[-1] == (Option.EXPORT_NAME, b"old")


def test_plain_newstyle_goes_straight_to_export_name() -> None:
    export, sent = run(ClientHandshake("x"), greeting(0),
                       EXPORT_NAME_REPLY.pack(8192, 0), bytes(124))
    assert export is not None and export.flags == 0 and export.size == 8192
    assert parse_options(sent) == [(Option.EXPORT_NAME, b"x")]


def test_an_export_name_reply_waits_for_the_zeroes() -> None:
    handshake = ClientHandshake("x")
    export, _ = run(handshake, greeting(0), EXPORT_NAME_REPLY.pack(8192, 0), bytes(123))
    assert export is None
    handshake.receive_data(bytes(1))
    assert handshake.next_event() is not None


@pytest.mark.parametrize(("reply", "error", "words"), [
    (OptionReply.ERR_UNKNOWN, UnknownExportError, "no export named 'disk'"),
    (OptionReply.ERR_TLS_REQD, TlsRequiredError, "requires TLS"),
    (OptionReply.ERR_POLICY, HandshakeError, "refused export 'disk': ERR_POLICY"),
    (OptionReply.ERR_SHUTDOWN, HandshakeError, "ERR_SHUTDOWN"),
])
def test_go_errors_say_why(reply: int, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as raised:
        run(ClientHandshake("disk"), greeting(),
            option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
            option_reply(Option.GO, reply, b"says the server"))
    assert "says the server" in str(raised.value)


def test_tls_required_from_the_first_option() -> None:
    with pytest.raises(TlsRequiredError, match="does not speak TLS"):
        run(ClientHandshake("disk"), greeting(),
            option_reply(Option.STRUCTURED_REPLY, OptionReply.ERR_TLS_REQD))


@pytest.mark.parametrize(("stream", "words"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an NBD server"),
    (b"HTTP/1.1", "not an NBD server"),
    (struct.pack(">QQ", NBDMAGIC, 0x00420281861253), "oldstyle"),
    (struct.pack(">QQH", NBDMAGIC, 0x1234, 1), "neither newstyle nor oldstyle"),
])
def test_not_an_nbd_server(stream: bytes, words: str) -> None:
    with pytest.raises(NotNbdError, match=words):
        run(ClientHandshake("disk"), stream)


def test_closed_before_the_greeting() -> None:
    with pytest.raises(NotNbdError, match="closed the connection before greeting"):
        run(ClientHandshake("disk"), b"NBDM", b"")


def test_closed_after_export_name_means_no_such_export() -> None:
    with pytest.raises(UnknownExportError, match="'gone'"):
        run(ClientHandshake("gone"), greeting(0), b"")


def test_a_reply_to_another_option_is_refused() -> None:
    with pytest.raises(HandshakeError, match="answered option 7"):
        run(ClientHandshake("disk"), greeting(), option_reply(Option.GO, OptionReply.ACK))


def test_go_without_the_size_is_refused() -> None:
    with pytest.raises(HandshakeError, match="without the export's size"):
        run(ClientHandshake("disk"), greeting(),
            option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
            option_reply(Option.GO, OptionReply.ACK))


def test_nonsense_block_sizes_are_refused() -> None:
    with pytest.raises(HandshakeError, match="block sizes"):
        run(ClientHandshake("disk"), greeting(),
            option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK),
            go_success(block=(4096, 4096, 512)))


def test_a_huge_option_reply_is_refused_before_it_is_read() -> None:
    header = OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, Option.STRUCTURED_REPLY,
                                      OptionReply.ACK, 1 << 30)
    with pytest.raises(HandshakeError, match="option reply of 1073741824 bytes"):
        run(ClientHandshake("disk"), greeting(), header)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_any_bytes_give_an_export_or_a_handshake_error(stream: bytes, step: int) -> None:
    handshake = ClientHandshake("disk")
    try:
        chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
        run(handshake, *chunks, b"")
    except HandshakeError:
        pass


@given(st.binary(max_size=200))
def test_any_bytes_after_a_valid_greeting_too(tail: bytes) -> None:
    try:
        run(ClientHandshake("disk"), greeting(), tail, b"")
    except HandshakeError:
        pass


# ------------------------------------------------------------------------ transmission


def export(structured: bool = True, flags: int = FLAGS, size: int = SIZE,
           max_payload: int = 65536) -> Export:
    return Export("disk", size, TransmissionFlag(flags), structured, 1, 4096, max_payload)


def chunk(cookie: int, kind: int, payload: bytes, done: bool = False) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                 kind, cookie, len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, ChunkType.OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie: int, offset: int, length: int, done: bool = False) -> bytes:
    return chunk(cookie, ChunkType.OFFSET_HOLE, struct.pack(">QI", offset, length), done)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, ChunkType.NONE, b"", True)


def events(conn: ClientConnection, data: bytes = b"") -> list[Event]:
    conn.receive_data(data)
    out: list[Event] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def test_request_header_is_the_wire_format() -> None:
    conn = ClientConnection(export())
    cookie, header = conn.request(Command.WRITE, 4096, 512, CommandFlag.FUA)
    assert REQUEST.unpack(header) == (REQUEST_MAGIC, CommandFlag.FUA, Command.WRITE, cookie,
                                      4096, 512)
    other, _ = conn.request(Command.READ, 0, 512)
    assert other != cookie and conn.in_flight == 2
    assert REQUEST.unpack(conn.disconnect())[2] == Command.DISC


def test_simple_reply_to_a_read_carries_its_data() -> None:
    conn = ClientConnection(export(structured=False))
    cookie, _ = conn.request(Command.READ, 0, 8)
    reply = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + b"abcdefgh"
    assert events(conn, reply[:10]) == []
    assert events(conn, reply[10:]) == [ReadData(cookie, 0, b"abcdefgh"), Done(cookie)]
    assert conn.in_flight == 0


def test_a_failed_simple_read_has_no_data() -> None:
    conn = ClientConnection(export(structured=False))
    first, _ = conn.request(Command.READ, 0, 8)
    second, _ = conn.request(Command.FLUSH, 0, 0)
    stream = (SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 5, first)
              + SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, second))
    assert events(conn, stream) == [Done(first, 5), Done(second)]


@given(st.data())
def test_structured_read_in_any_chunks_any_order_any_split(data: st.DataObject) -> None:
    """A read's range cut into data and hole chunks, sent in any order with other
    requests' replies between them, and the stream split anywhere: the events rebuild
    exactly the bytes, and the request is done once."""
    length = data.draw(st.integers(min_value=1, max_value=4096))
    offset = data.draw(st.integers(min_value=0, max_value=SIZE - length))
    cuts = sorted(set(data.draw(st.lists(st.integers(min_value=1, max_value=length - 1),
                                         max_size=8)) if length > 1 else []))
    bounds = [0, *cuts, length]
    content = data.draw(st.binary(min_size=length, max_size=length))
    expected = bytearray(content)
    conn = ClientConnection(export())
    cookie, _ = conn.request(Command.READ, offset, length)
    flush, _ = conn.request(Command.FLUSH, 0, 0)
    pieces = []
    for start, end in itertools.pairwise(bounds):
        if data.draw(st.booleans()):
            expected[start:end] = bytes(end - start)
            pieces.append(hole_chunk(cookie, offset + start, end - start))
        else:
            pieces.append(data_chunk(cookie, offset + start, content[start:end]))
    pieces = data.draw(st.permutations(pieces))
    pieces.insert(data.draw(st.integers(0, len(pieces))), none_chunk(flush))
    pieces.append(none_chunk(cookie))
    stream = b"".join(pieces)
    splits = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    got = []
    for start, end in zip([0, *splits], [*splits, len(stream)], strict=False):
        got += events(conn, stream[start:end])
    rebuilt = bytearray(length)
    for event in got:
        if isinstance(event, ReadData):
            rebuilt[event.offset:event.offset + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            assert event.cookie == cookie
            rebuilt[event.offset:event.offset + event.length] = bytes(event.length)
    assert rebuilt == expected
    assert [e for e in got if isinstance(e, Done)] == [Done(flush), Done(cookie)]
    assert conn.in_flight == 0


def test_error_chunks_fail_the_request_with_their_message() -> None:
    conn = ClientConnection(export())
    cookie, _ = conn.request(Command.WRITE, 0, 512)
    message = b"disk on fire"
    error = chunk(cookie, ChunkType.ERROR, ERROR_CHUNK.pack(28, len(message)) + message)
    assert events(conn, error + none_chunk(cookie)) == [Done(cookie, 28, "disk on fire")]


def test_error_offset_and_unknown_error_types_fail_a_read_without_full_data() -> None:
    conn = ClientConnection(export())
    cookie, _ = conn.request(Command.READ, 0, 1024)
    stream = (data_chunk(cookie, 0, bytes(512))
              + chunk(cookie, ChunkType.ERROR_OFFSET, ERROR_CHUNK.pack(5, 0)
                      + struct.pack(">Q", 512))
              + chunk(cookie, 0x8000 + 77, ERROR_CHUNK.pack(12, 0), done=True))
    assert events(conn, stream)[-1] == Done(cookie, 5, "")


@pytest.mark.parametrize(("build", "words"), [
    (lambda c: SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, c + 99), "no request in flight"),
    (lambda c: struct.pack(">I", 0xDEADBEEF) + bytes(20), "neither simple nor structured"),
    (lambda c: SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, c), "simple reply to a read"),
    (lambda c: STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, 1, 1, c, 1 << 20), "oversized"),
    (lambda c: data_chunk(c, 4096, b"x"), "outside the request"),
    (lambda c: data_chunk(c, 0, bytes(600)), "outside the request"),
    (lambda c: data_chunk(c, 0, bytes(100)) + data_chunk(c, 50, bytes(10)), "overlaps"),
    (lambda c: data_chunk(c, 0, bytes(100), done=True), "covered 100 bytes"),
    (lambda c: hole_chunk(c, 0, 0), "OFFSET_HOLE chunk of 0 bytes"),
    (lambda c: chunk(c, ChunkType.OFFSET_HOLE, bytes(8)), "not 12"),
    (lambda c: chunk(c, ChunkType.OFFSET_DATA, bytes(8)), "at least 9"),
    (lambda c: chunk(c, ChunkType.NONE, b""), "without the DONE flag"),
    (lambda c: chunk(c, ChunkType.NONE, b"x", done=True), "NONE chunk of 1 bytes"),
    (lambda c: chunk(c, ChunkType.BLOCK_STATUS, bytes(12)), "type 5"),
    (lambda c: chunk(c, ChunkType.ERROR, ERROR_CHUNK.pack(5, 100)), "does not fit"),
    (lambda c: chunk(c, ChunkType.ERROR, ERROR_CHUNK.pack(0, 0)), "error 0"),
    (lambda c: chunk(c, ChunkType.ERROR, b"\0"), "at least 6"),
])
def test_protocol_violations_break_the_connection(build: object, words: str) -> None:
    conn = ClientConnection(export())
    cookie, _ = conn.request(Command.READ, 0, 512)
    assert callable(build)
    with pytest.raises(ProtocolError, match=words):
        events(conn, build(cookie))
    with pytest.raises(ProtocolError):  # and stays broken
        conn.next_event()


def test_structured_reply_without_negotiation_is_a_violation() -> None:
    conn = ClientConnection(export(structured=False))
    cookie, _ = conn.request(Command.FLUSH, 0, 0)
    with pytest.raises(ProtocolError, match="did not negotiate"):
        events(conn, none_chunk(cookie))


def test_fail_all_forgets_what_was_in_flight() -> None:
    conn = ClientConnection(export())
    cookies = {conn.request(Command.READ, 0, 512)[0] for _ in range(3)}
    assert set(conn.fail_all()) == cookies and conn.in_flight == 0


@pytest.mark.parametrize(("flags", "command", "offset", "length", "req_flags", "words"), [
    (FLAGS, Command.READ, SIZE - 511, 512, 0, "outside the export"),
    (FLAGS, Command.READ, 0, 65537, 0, "maximum payload of 65536"),
    (FLAGS | TransmissionFlag.READ_ONLY, Command.WRITE, 0, 512, 0, "read-only"),
    (FLAGS | TransmissionFlag.READ_ONLY, Command.TRIM, 0, 512, 0, "read-only"),
    (TransmissionFlag.HAS_FLAGS, Command.TRIM, 0, 512, 0, "SEND_TRIM not advertised"),
    (TransmissionFlag.HAS_FLAGS, Command.FLUSH, 0, 0, 0, "SEND_FLUSH"),
    (TransmissionFlag.HAS_FLAGS, Command.WRITE_ZEROES, 0, 512, 0, "SEND_WRITE_ZEROES"),
    (TransmissionFlag.HAS_FLAGS, Command.WRITE, 0, 512, CommandFlag.FUA, "flags 0x1"),
    (FLAGS, Command.DISC, 0, 0, 0, "does not send DISC"),
])
def test_requests_the_export_does_not_take_are_refused(
        flags: int, command: Command, offset: int, length: int, req_flags: int,
        words: str) -> None:
    conn = ClientConnection(export(flags=flags))
    with pytest.raises(ValueError, match=words):
        conn.request(command, offset, length, req_flags)
    assert conn.in_flight == 0


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64), st.booleans())
def test_any_reply_bytes_give_events_or_a_protocol_error(
        stream: bytes, step: int, structured: bool) -> None:
    conn = ClientConnection(export(structured=structured))
    for command, length in ((Command.READ, 64), (Command.WRITE, 64), (Command.FLUSH, 0)):
        conn.request(command, 0, length)
    try:
        for i in range(0, len(stream), step):
            events(conn, stream[i:i + step])
    except ProtocolError:
        pass
