"""Hypothesis against ``ServerConnection``: random bytes never crash it, and random
requests, valid and not, are judged as an independent oracle written from proto.md says.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nbd_helpers import (
    ALL_FLAGS,
    FIXED,
    SIZE,
    events,
    export,
    negotiated,
    option,
    option_replies,
    request,
    transmission_replies,
)

from virtblk.nbd.server import (
    CLOSED,
    NEED_DATA,
    Aborted,
    Answered,
    Disconnect,
    Event,
    Flush,
    Negotiated,
    OptionAnswered,
    ProtocolViolation,
    Read,
    Request,
    ServerConnection,
    Trim,
    Write,
    WriteZeroes,
)
from virtblk.nbd.wire import Command, CommandFlag, Errno, OptionReply, TransmissionFlag

MAX = 64 << 10
KNOWN = (Flush, Read, Trim, Write, WriteZeroes, Answered, Disconnect, ProtocolViolation,
         OptionAnswered, Negotiated, Aborted)


def _drain(conn: ServerConnection, data: bytes, chunks: list[int]) -> list[Event]:
    """Feed ``data`` in pieces of the given sizes, answering nothing; every event is one
    the state machine may give, and after a violation only CLOSED comes."""
    found: list[Event] = []
    pos = 0
    for size in [*chunks, len(data)]:
        piece = data[pos : pos + size]
        pos += len(piece)
        if piece:
            conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is CLOSED:
                break
            assert isinstance(event, KNOWN)
            found.append(event)
            if isinstance(event, ProtocolViolation):
                assert conn.next_event() is CLOSED
                return found
    conn.receive_data(b"")
    tail = conn.next_event()
    assert tail is CLOSED or isinstance(tail, ProtocolViolation)
    return found


@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_random_bytes_in_the_handshake(data: bytes, chunks: list[int]) -> None:
    conn = ServerConnection([export()])
    conn.data_to_send()
    _drain(conn, data, chunks)
    conn.data_to_send()


@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=20),
       st.booleans())
def test_random_bytes_in_transmission(data: bytes, chunks: list[int], structured: bool) -> None:
    conn = negotiated(structured=structured)
    _drain(conn, data, chunks)
    transmission_replies(conn.data_to_send())  # whatever it answered is well formed


OPTIONS = st.one_of(st.sampled_from([2, 3, 5, 6, 7, 8, 9, 10, 11]), st.integers(2, 2**32 - 1))


@given(st.lists(st.tuples(OPTIONS, st.binary(max_size=40)), max_size=8),
       st.lists(st.integers(1, 64), max_size=10))
def test_random_options_each_get_one_final_reply(
        opts: list[tuple[int, bytes]], chunks: list[int]) -> None:
    """Options with a valid header (EXPORT_NAME aside, which has no option reply): none is a
    violation, and each gets exactly one final reply (an ACK or an error) until one ends
    the handshake."""
    conn = ServerConnection([export(name="")])
    conn.data_to_send()
    found = _drain(conn, FIXED + b"".join(option(o, d) for o, d in opts), chunks)
    assert not any(isinstance(e, ProtocolViolation) for e in found)
    finals = [r for r in option_replies(conn.data_to_send())
              if r.reply not in (OptionReply.INFO, OptionReply.SERVER)]
    assert len(finals) == len(found)
    ends = [i for i, e in enumerate(found) if isinstance(e, (Negotiated, Aborted))]
    assert ends in ([], [len(found) - 1])


# -- requests against an oracle ----------------------------------------------------------------
OFFSETS = st.one_of(st.sampled_from([0, 512, SIZE - 512, SIZE, 2**63, 2**64 - 512]),
                    st.integers(0, SIZE + 4096), st.integers(0, 2**64 - 1))
LENGTHS = st.one_of(st.sampled_from([0, 512, 4096, MAX, MAX + 512, SIZE]),
                    st.integers(0, MAX + 1024))
COMMANDS = st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 9, 0xFFFF])
FLAGS = st.one_of(st.just(0), st.sampled_from([int(f) for f in CommandFlag]),
                  st.integers(0, 0xFFFF))


def oracle(command: int, flags: int, offset: int, length: int, *, read_only: bool,
           structured: bool) -> tuple[int | None, bool]:
    """(the error the state machine must answer with, or None for an event to serve;
    whether the answer is a success it gives itself)."""
    allowed = {0: CommandFlag.DF if structured else 0, 1: 0, 3: 0, 4: 0, 5: 0,
               6: CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO}
    if command not in allowed:
        return Errno.EINVAL, False
    if command in (1, 4, 6) and read_only:
        return Errno.EPERM, False
    if flags & ~(int(allowed[command]) | int(CommandFlag.FUA)):  # ints: ~ on an IntFlag
        # complements only the defined bits
        return Errno.EINVAL, False
    if command == 3:
        return (Errno.EINVAL, False) if offset or length else (None, False)
    if command in (0, 1) and length > MAX:
        return Errno.EINVAL, False
    if offset % 512 or length % 512:
        return Errno.EINVAL, False
    if offset + length > SIZE:
        return (Errno.ENOSPC if command in (1, 6) else Errno.EINVAL), False
    if length == 0 or command == 5:
        return 0, True
    if command == 6 and flags & CommandFlag.FAST_ZERO:
        return Errno.ENOTSUP, False
    return None, False


@given(st.lists(st.tuples(COMMANDS, FLAGS, OFFSETS, LENGTHS), min_size=1, max_size=12),
       st.booleans(), st.booleans(), st.integers(1, 97))
def test_requests_against_the_oracle(reqs: list[tuple[int, int, int, int]], read_only: bool,
                                     structured: bool, chunk: int) -> None:
    flags = ALL_FLAGS | (TransmissionFlag.READ_ONLY if read_only else 0)
    conn = negotiated(export(flags=flags, max_block=MAX), structured=structured)
    stream = b"".join(
        request(c, o, n, flags=f, cookie=i,
                payload=b"\xa5" * n if c == Command.WRITE else b"")
        for i, (c, f, o, n) in enumerate(reqs))
    found: list[Event] = []
    chunk = max(chunk, len(stream) // 64)  # small pieces cut headers; payloads need not crawl
    for pos in range(0, len(stream), chunk):
        found += events(conn, stream[pos : pos + chunk])
    assert len(found) == len(reqs)
    served = 0
    for i, ((command, flag, offset, length), event) in enumerate(
            zip(reqs, found, strict=True)):
        error, answered = oracle(command, flag, offset, length, read_only=read_only,
                                 structured=structured)
        if error is None:
            assert isinstance(event, Request), (i, event)
            assert (event.cookie, event.offset, event.length) == (i, offset, length)
            assert event.fua == bool(flag & CommandFlag.FUA)
            if isinstance(event, Write):
                assert bytes(event.data) == b"\xa5" * length
            served += 1
        else:
            assert isinstance(event, Answered), (i, event)
            assert (event.cookie, event.error) == (i, error)
            assert answered == (error == 0)
    assert conn.in_flight == served
    replies = transmission_replies(conn.data_to_send())
    assert len(replies) == len(reqs) - served
