"""The handshake of ``ServerConnection``, option by option, as proto.md words it."""

from __future__ import annotations

import struct

import pytest
from nbd_helpers import (
    ALL_FLAGS,
    FIXED,
    SIZE,
    events,
    export,
    go_data,
    meta_data,
    option,
    option_replies,
)

from virtblk.nbd.server import (
    CLOSED,
    MAX_OPTION_DATA,
    NEED_DATA,
    Aborted,
    Export,
    Negotiated,
    OptionAnswered,
    ProtocolViolation,
    ServerConnection,
)
from virtblk.nbd.wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    SERVER_GREETING,
    ClientFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)


def opened(*exports: Export) -> ServerConnection:
    conn = ServerConnection(exports or [export()])
    conn.data_to_send()
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = ServerConnection([export()])
    assert conn.data_to_send() == SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, 0b11)
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = opened()
    found = events(conn, CLIENT_FLAGS.pack(1 << 5))
    assert len(found) == 1 and isinstance(found[0], ProtocolViolation)
    assert "unknown client flags 0x20" in found[0].reason
    assert conn.next_event() is CLOSED


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(no_zeroes: bool) -> None:
    conn = opened()
    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    found = events(conn, CLIENT_FLAGS.pack(flags) + option(Option.EXPORT_NAME, b"disk"))
    assert found == [Negotiated(export(), ALL_FLAGS | TransmissionFlag.HAS_FLAGS, False, False)]
    expected = EXPORT_NAME_REPLY.pack(SIZE, ALL_FLAGS | TransmissionFlag.HAS_FLAGS)
    assert conn.data_to_send() == expected + (b"" if no_zeroes else bytes(124))


def test_export_name_of_an_unknown_export_is_a_hard_disconnect() -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.EXPORT_NAME, b"nope"))
    assert isinstance(found[0], ProtocolViolation) and "'nope'" in found[0].reason
    assert conn.data_to_send() == b""


def test_empty_name_is_the_first_export() -> None:
    other = export(name="other", size=4096 * 4)
    conn = opened(export(), other)
    found = events(conn, FIXED + option(Option.GO, go_data(b"", Info.BLOCK_SIZE)))
    assert isinstance(found[0], Negotiated) and found[0].export.name == "disk"
    conn = opened(export(), other)
    found = events(conn, FIXED + option(Option.GO, go_data(b"other", Info.BLOCK_SIZE)))
    assert isinstance(found[0], Negotiated) and found[0].export is other


def test_go_sends_block_size_export_description_and_name_then_ack() -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.STRUCTURED_REPLY)
                   + option(Option.GO, go_data(b"disk", Info.NAME, Info.BLOCK_SIZE, 99)))
    flags = ALL_FLAGS | TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
    assert found == [OptionAnswered(Option.STRUCTURED_REPLY, OptionReply.ACK),
                     Negotiated(export(), flags, True, True)]
    replies = option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [OptionReply.ACK] + [OptionReply.INFO] * 4 + [
        OptionReply.ACK]
    infos = {struct.unpack_from(">H", r.data)[0]: r.data for r in replies[1:5]}
    assert infos[Info.NAME][2:] == b"disk"
    assert infos[Info.DESCRIPTION][2:] == b"a test disk"
    assert INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE]) == (
        Info.BLOCK_SIZE, 512, 4096, 64 << 10)
    assert INFO_EXPORT.unpack(infos[Info.EXPORT]) == (Info.EXPORT, SIZE, flags)


def test_go_without_block_size_is_tolerated_and_info_without_it_is_refused() -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.INFO, go_data(b"disk")))
    assert found == [OptionAnswered(Option.INFO, OptionReply.ERR_BLOCK_SIZE_REQD,
                                    "ask for NBD_INFO_BLOCK_SIZE to use this export")]
    # proto.md: send NBD_INFO_BLOCK_SIZE before the error, to spare a round trip
    replies = option_replies(conn.data_to_send())
    assert replies[-1].reply == OptionReply.ERR_BLOCK_SIZE_REQD
    assert any(r.data[:2] == struct.pack(">H", Info.BLOCK_SIZE) for r in replies[:-1])
    found = events(conn, option(Option.INFO, go_data(b"disk", Info.BLOCK_SIZE)))
    assert found == [OptionAnswered(Option.INFO, OptionReply.ACK)]
    found = events(conn, option(Option.GO, go_data(b"disk")))
    assert isinstance(found[0], Negotiated) and not found[0].block_sizes_agreed


def test_info_with_byte_granular_export_needs_no_block_size() -> None:
    conn = opened(export(min_block=1))
    assert events(conn, FIXED + option(Option.INFO, go_data(b"disk"))) == [
        OptionAnswered(Option.INFO, OptionReply.ACK)]


def test_go_for_an_unknown_export_is_an_error_and_negotiation_goes_on() -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.GO, go_data(b"x", Info.BLOCK_SIZE)))
    assert found == [OptionAnswered(Option.GO, OptionReply.ERR_UNKNOWN, "no export named 'x'")]
    assert [r.reply for r in option_replies(conn.data_to_send())] == [OptionReply.ERR_UNKNOWN]
    found = events(conn, option(Option.GO, go_data(b"disk", Info.BLOCK_SIZE)))
    assert isinstance(found[0], Negotiated)


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x09disk\0\0", b"\0\0\0\x04disk\0\x02\0\x03",
                                  b"\0\0\0\x04disk\0\0\0"])
def test_malformed_go_is_invalid(data: bytes) -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.GO, data))
    assert len(found) == 1 and isinstance(found[0], OptionAnswered)
    assert found[0].reply == OptionReply.ERR_INVALID


def test_list_names_every_export() -> None:
    conn = opened(export(), export(name="b", description=""))
    assert events(conn, FIXED + option(Option.LIST)) == [
        OptionAnswered(Option.LIST, OptionReply.ACK)]
    replies = option_replies(conn.data_to_send())
    assert [(r.reply, r.data) for r in replies] == [
        (OptionReply.SERVER, b"\0\0\0\x04diska test disk"),
        (OptionReply.SERVER, b"\0\0\0\x01b"),
        (OptionReply.ACK, b""),
    ]
    assert events(conn, option(Option.LIST, b"x"))[0] == OptionAnswered(
        Option.LIST, OptionReply.ERR_INVALID, "NBD_OPT_LIST carries no data")


def test_starttls_is_refused_and_negotiation_goes_on() -> None:
    conn = opened()
    found = events(conn, FIXED + option(Option.STARTTLS))
    assert isinstance(found[0], OptionAnswered) and found[0].reply == OptionReply.ERR_UNSUP
    assert "TLS" in option_replies(conn.data_to_send())[0].data.decode()
    found = events(conn, option(Option.GO, go_data(b"disk", Info.BLOCK_SIZE)))
    assert isinstance(found[0], Negotiated)


@pytest.mark.parametrize("opt", [Option.PEEK_EXPORT, Option.EXTENDED_HEADERS, 12, 0xFFFFFFFF])
def test_unknown_options_are_unsupported(opt: int) -> None:
    conn = opened()
    found = events(conn, FIXED + option(opt, b"whatever"))
    assert isinstance(found[0], OptionAnswered) and found[0].reply == OptionReply.ERR_UNSUP


def test_oversized_option_is_skipped_unread_and_refused() -> None:
    conn = opened()
    events(conn, FIXED)
    n = MAX_OPTION_DATA + 1
    conn.receive_data(struct.pack(">QII", IHAVEOPT, Option.GO, n))
    assert conn.next_event() is NEED_DATA
    for _ in range(n // 4096):
        conn.receive_data(bytes(4096))
        assert conn.next_event() is NEED_DATA
    found = events(conn, bytes(n % 4096) + option(Option.STRUCTURED_REPLY))
    assert [e.reply for e in found if isinstance(e, OptionAnswered)] == [
        OptionReply.ERR_TOO_BIG, OptionReply.ACK]


def test_oversized_export_name_is_a_violation() -> None:
    conn = opened()
    found = events(conn, FIXED + struct.pack(">QII", IHAVEOPT, Option.EXPORT_NAME, 1 << 30))
    assert isinstance(found[0], ProtocolViolation)


def test_abort_is_acknowledged_and_ends_the_session() -> None:
    conn = opened()
    assert events(conn, FIXED + option(Option.ABORT) + b"ignored") == [Aborted()]
    assert [r.reply for r in option_replies(conn.data_to_send())] == [OptionReply.ACK]
    assert conn.next_event() is CLOSED


def test_bad_option_magic_is_a_violation() -> None:
    conn = opened()
    found = events(conn, FIXED + struct.pack(">QII", 0x1234, Option.GO, 0))
    assert isinstance(found[0], ProtocolViolation) and "magic" in found[0].reason


def test_meta_context_needs_structured_replies_and_offers_none() -> None:
    conn = opened()
    events(conn, FIXED)
    data = meta_data(b"disk", b"base:allocation")
    found = events(conn, option(Option.SET_META_CONTEXT, data))
    assert found[0] == OptionAnswered(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID,
                                      "negotiate structured replies first")
    events(conn, option(Option.STRUCTURED_REPLY))
    conn.data_to_send()
    for opt in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
        assert events(conn, option(opt, data)) == [OptionAnswered(opt, OptionReply.ACK)]
        assert [r.reply for r in option_replies(conn.data_to_send())] == [OptionReply.ACK]
    found = events(conn, option(Option.LIST_META_CONTEXT, data[:-3]))
    assert isinstance(found[0], OptionAnswered) and found[0].reply == OptionReply.ERR_INVALID
    found = events(conn, option(Option.LIST_META_CONTEXT, meta_data(b"zz")))
    assert isinstance(found[0], OptionAnswered) and found[0].reply == OptionReply.ERR_UNKNOWN


def test_shutdown_refuses_options_but_abort() -> None:
    conn = opened()
    events(conn, FIXED)
    conn.shutdown()
    found = events(conn, option(Option.GO, go_data(b"disk", Info.BLOCK_SIZE)))
    assert isinstance(found[0], OptionAnswered) and found[0].reply == OptionReply.ERR_SHUTDOWN
    assert events(conn, option(Option.ABORT)) == [Aborted()]


def test_eof_between_and_inside_messages() -> None:
    conn = opened()
    events(conn, FIXED)
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    conn = opened()
    events(conn, FIXED + option(Option.GO)[:10])
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, ProtocolViolation) and "middle of a message" in event.reason


def test_a_byte_at_a_time_gives_the_same_answers() -> None:
    stream = (FIXED + option(Option.LIST) + option(Option.STRUCTURED_REPLY)
              + option(Option.GO, go_data(b"disk", Info.BLOCK_SIZE)))
    whole = opened()
    expected = events(whole, stream)
    piecewise = opened()
    found = []
    for i in range(len(stream)):
        found += events(piecewise, stream[i : i + 1])
    assert found == expected
    assert piecewise.data_to_send() == whole.data_to_send()


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": "x" * 4097}, "export name"),
    ({"name": "a\0b"}, "export name"),
    ({"description": "a\udcffb"}, "export description"),
    ({"min_block": 3}, "minimum block"),
    ({"min_block": 1 << 17}, "minimum block"),
    ({"preferred_block": 256}, "preferred block"),
    ({"max_block": 1024}, "maximum payload"),
    ({"flags": TransmissionFlag.SEND_FAST_ZERO}, "SEND_FAST_ZERO needs"),
    ({"flags": TransmissionFlag.HAS_FLAGS}, "cannot set"),
    ({"size": -1}, "size"),
])  # fmt: skip
def test_export_refuses_what_proto_md_forbids(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export(**changes)


def test_a_server_needs_distinct_exports() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ServerConnection([])
    with pytest.raises(ValueError, match="repeat"):
        ServerConnection([export(), export()])
