"""The vhost-user codec: every message round-trips; malformed input is a clear ProtocolError."""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_user_helpers import is_open

from virtblk.vhost_user.codec import CLOSED, HEADER, NEED_DATA, Decoder, encode
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
from virtblk.vhost_user.messages import (
    MAX_CONFIG_SIZE,
    Ack,
    AddMemReg,
    Channel,
    ConfigChangeMsg,
    Flag,
    GetConfig,
    GetConfigFailed,
    GetConfigReply,
    GetFeatures,
    GetFeaturesReply,
    GetInflightFd,
    GetInflightFdReply,
    GetMaxMemSlots,
    GetMaxMemSlotsReply,
    GetProtocolFeatures,
    GetProtocolFeaturesReply,
    GetQueueNum,
    GetQueueNumReply,
    GetStatus,
    GetStatusReply,
    GetVringBase,
    GetVringBaseReply,
    MemRegion,
    Message,
    ProtocolFeature,
    RemMemReg,
    Request,
    ResetDevice,
    ResetOwner,
    SetBackendReqFd,
    SetConfig,
    SetFeatures,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetStatus,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
INDEX = st.integers(0, 255)
FD = 1000
"""A number no test opens: the codec only passes fds along, and a message that decodes is
never closed here, so it is never closed; real fds are used where closing is checked."""


def fake_fds(count: int) -> tuple[OwnedFd, ...]:
    return tuple(OwnedFd(fd) for fd in range(FD, FD + count))


FAKE_FD = st.builds(OwnedFd, st.just(FD))
MAYBE_FD = st.none() | FAKE_FD


def plain(message: object) -> tuple[type, tuple[Any, ...]]:
    """A message as comparable values: its class and fields, each fd as its number (an
    ``OwnedFd`` compares by identity, and a decoded message holds new ones)."""
    assert dataclasses.is_dataclass(message)

    def value(v: object) -> object:
        if isinstance(v, OwnedFd):
            return ("fd", v.fileno())
        if isinstance(v, tuple):
            return tuple(value(x) for x in v)
        return v

    return type(message), tuple(value(getattr(message, f.name))
                                for f in dataclasses.fields(message))
FLAG = st.booleans()


def _decode_all(data: bytes, fds: list[int], channel: Channel = Channel.MAIN) -> list[Message]:
    decoder = Decoder(channel)
    decoder.receive_data(data, fds)
    out: list[Message] = []
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Message)
        out.append(event)


def roundtrip(message: Message) -> Message:
    data, fds = encode(message)
    (decoded,) = _decode_all(data, fds, message.channel)
    return decoded


@st.composite
def regions(draw: st.DrawFn, count: int) -> tuple[MemRegion, ...]:
    """Non-overlapping regions (guest and user ranges laid out in order)."""
    out = []
    gpa = draw(st.integers(0, 2**40))
    uva = draw(st.integers(0, 2**40))
    for _ in range(count):
        size = draw(st.integers(1, 2**32))
        out.append(MemRegion(gpa, size, uva, draw(st.integers(0, 2**32))))
        gpa += size + draw(st.integers(0, 2**20))
        uva += size + draw(st.integers(0, 2**20))
    return tuple(out)


REQUESTS = st.one_of(
    st.builds(GetFeatures, need_reply=FLAG),
    st.builds(SetFeatures, U64, need_reply=FLAG),
    st.builds(GetProtocolFeatures, need_reply=FLAG),
    st.builds(SetProtocolFeatures, U64, need_reply=FLAG),
    st.builds(SetOwner, need_reply=FLAG),
    st.builds(ResetOwner, need_reply=FLAG),
    st.builds(ResetDevice, need_reply=FLAG),
    st.builds(GetQueueNum, need_reply=FLAG),
    st.builds(GetMaxMemSlots, need_reply=FLAG),
    st.builds(GetStatus, need_reply=FLAG),
    st.builds(SetStatus, U64, need_reply=FLAG),
    st.builds(SetVringNum, U32, U32, need_reply=FLAG),
    st.builds(SetVringBase, U32, U32, need_reply=FLAG),
    st.builds(GetVringBase, U32, need_reply=FLAG),
    st.builds(SetVringEnable, U32, st.booleans(), need_reply=FLAG),
    st.builds(SetVringAddr, U32, U64, U64, U64, U64, st.sampled_from([0, 1]), need_reply=FLAG),
    st.builds(SetVringKick, INDEX, MAYBE_FD, need_reply=FLAG),
    st.builds(SetVringCall, INDEX, MAYBE_FD, need_reply=FLAG),
    st.builds(SetVringErr, INDEX, MAYBE_FD, need_reply=FLAG),
    st.builds(GetConfig, U32, st.integers(0, MAX_CONFIG_SIZE), U32, need_reply=FLAG),
    st.builds(SetConfig, U32, st.binary(max_size=MAX_CONFIG_SIZE), U32, need_reply=FLAG),
    st.builds(SetBackendReqFd, FAKE_FD, need_reply=FLAG),
    st.builds(GetInflightFd, U16, U16, need_reply=FLAG),
    st.builds(SetInflightFd, U64, U64, U16, U16, FAKE_FD, need_reply=FLAG),
    st.integers(0, 8).flatmap(
        lambda n: st.builds(
            SetMemTable, regions(n), st.builds(fake_fds, st.just(n)), need_reply=FLAG
        )
    ),
    st.builds(AddMemReg, regions(1).map(lambda r: r[0]), FAKE_FD, need_reply=FLAG),
    st.builds(
        RemMemReg, regions(1).map(lambda r: r[0]), MAYBE_FD, need_reply=FLAG
    ),
)

REPLIES = st.one_of(
    st.builds(GetFeaturesReply, U64),
    st.builds(GetProtocolFeaturesReply, U64),
    st.builds(GetQueueNumReply, U64),
    st.builds(GetMaxMemSlotsReply, U64),
    st.builds(GetStatusReply, U64),
    st.builds(GetVringBaseReply, U32, U32),
    st.builds(GetConfigReply, U32, st.binary(min_size=0, max_size=MAX_CONFIG_SIZE), U32),
    st.just(GetConfigFailed()),
    st.builds(GetInflightFdReply, st.integers(1, 2**64 - 1), U64, U16, U16, FAKE_FD),
    st.builds(GetInflightFdReply, st.just(0), U64, U16, U16, st.none()),
    st.builds(
        Ack,
        st.sampled_from(
            [r for r in Request if r not in (11, 1, 15, 17, 24, 31, 36, 40)]  # no own reply
        ),
        U64,
    ),
)

BACKEND_CHANNEL = st.one_of(
    st.builds(ConfigChangeMsg, need_reply=FLAG),
    st.builds(Ack, st.just(2), U64, st.just(Channel.BACKEND)),
)


@settings(deadline=None)  # a slow example on a loaded machine is not a failure
@given(REQUESTS)
def test_every_request_round_trips(message: Message) -> None:
    assert plain(roundtrip(message)) == plain(message)


@settings(deadline=None)  # a slow example on a loaded machine is not a failure
@given(REPLIES)
def test_every_reply_round_trips(message: Message) -> None:
    assert plain(roundtrip(message)) == plain(message)


@settings(deadline=None)  # a slow example on a loaded machine is not a failure
@given(BACKEND_CHANNEL)
def test_backend_channel_messages_round_trip(message: Message) -> None:
    assert plain(roundtrip(message)) == plain(message)


@settings(deadline=None)  # a slow example on a loaded machine is not a failure
@given(st.lists(REQUESTS, min_size=1, max_size=6), st.integers(1, 64))
def test_stream_split_anywhere_yields_the_same_messages(
    messages: list[Message], chunk: int
) -> None:
    """Bytes arriving in arbitrary pieces give the same messages, fds on the right one."""
    decoder = Decoder()
    for message in messages:
        data, fds = encode(message)
        # fds travel with the chunk holding the message's first byte, as with recvmsg
        for start in range(0, len(data), chunk):
            decoder.receive_data(data[start : start + chunk], fds if start == 0 else [])
    out = []
    while (event := decoder.next_event()) is not NEED_DATA:
        out.append(event)
    assert [plain(m) for m in out] == [plain(m) for m in messages]


def test_header_layout_matches_the_spec() -> None:
    data, fds = encode(SetVringKick(3, None, need_reply=True))
    assert len(data) == 12 + 8
    request, flags, size = HEADER.unpack_from(data)
    assert (request, flags, size) == (12, 0x1 | 0x8, 8)
    assert struct.unpack_from("=Q", data, 12)[0] == 3 | 0x100
    assert fds == []
    reply, _ = encode(GetFeaturesReply(5))
    assert HEADER.unpack_from(reply) == (1, 0x5, 8)


def test_protocol_feature_bits_match_the_spec() -> None:
    assert ProtocolFeature.REPLY_ACK == 3
    assert ProtocolFeature.BACKEND_REQ == 5
    assert ProtocolFeature.CONFIG == 9
    assert ProtocolFeature.INFLIGHT_SHMFD == 12
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 15
    assert ProtocolFeature.STATUS == 16
    # qemu-storage-daemon 7.2 offers 0x8f2b: every bit of it has a name here
    assert sum(1 << int(f) for f in ProtocolFeature) & 0x8F2B == 0x8F2B


def test_inflight_payload_is_padded_to_24_bytes() -> None:
    data, _ = encode(GetInflightFd(2, 128))
    assert HEADER.unpack_from(data)[2] == 24


def test_clean_eof_between_messages_is_closed() -> None:
    decoder = Decoder()
    data, _ = encode(GetFeatures())
    decoder.receive_data(data)
    decoder.receive_data(b"")
    assert decoder.next_event() == GetFeatures()
    assert decoder.next_event() is CLOSED


# --------------------------------------------------------------------------- malformed input


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Real fds, to check that the decoder closes those of rejected messages."""
    fds: list[int] = []
    for _ in range(2):
        fds += os.pipe()
    yield fds
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def raw(request: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


def reject(data: bytes, fds: list[int] = (), channel: Channel = Channel.MAIN) -> str:  # type: ignore[assignment]
    decoder = Decoder(channel)
    decoder.receive_data(data, list(fds))
    with pytest.raises(ProtocolError) as info:
        while decoder.next_event() is not NEED_DATA:
            pass
    # the decoder stays failed
    with pytest.raises(ProtocolError):
        decoder.next_event()
    return str(info.value)


def test_unknown_request_code() -> None:
    assert "unknown" in reject(raw(99, 1, b""))
    assert "SET_LOG_BASE" in reject(raw(Request.SET_LOG_BASE, 1, bytes(16)))


def test_wrong_payload_size_for_request() -> None:
    message = reject(raw(Request.SET_FEATURES, 1, bytes(4)))
    assert "SET_FEATURES" in message and "payload size 4" in message
    assert "GET_FEATURES" in reject(raw(Request.GET_FEATURES, 1, bytes(8)))


def test_absurd_size_is_refused_before_buffering() -> None:
    decoder = Decoder()
    decoder.receive_data(HEADER.pack(Request.SET_MEM_TABLE, 1, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="over the 4096-byte limit"):
        decoder.next_event()
    assert decoder.pending_bytes == 0


def test_bad_version_and_unknown_flags() -> None:
    assert "version 2" in reject(raw(Request.GET_FEATURES, 2, b""))
    assert "version 0" in reject(raw(Request.GET_FEATURES, 0, b""))
    assert "unknown flag bits 0x10" in reject(raw(Request.GET_FEATURES, 0x11, b""))


def test_truncated_header_then_eof() -> None:
    decoder = Decoder()
    decoder.receive_data(raw(Request.GET_FEATURES, 1, b"")[:7])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a message"):
        decoder.next_event()


def test_truncated_payload_then_eof() -> None:
    decoder = Decoder()
    decoder.receive_data(raw(Request.SET_FEATURES, 1, bytes(8))[:15])
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"middle of a message \(15 bytes"):
        decoder.next_event()


def test_missing_fd(pipe_fds: list[int]) -> None:
    assert "0 file descriptors attached, expected 1" in reject(
        raw(Request.SET_VRING_KICK, 1, struct.pack("=Q", 0))
    )
    assert "expected 1" in reject(raw(Request.SET_BACKEND_REQ_FD, 1, b""))


def test_extra_fds_are_refused_and_closed(pipe_fds: list[int]) -> None:
    data, _ = encode(SetVringKick(0, None))
    assert "no-fd flag" in reject(data, pipe_fds[:1])
    data, _ = encode(SetFeatures(1))
    assert "expected 0" in reject(data, pipe_fds[1:3])
    assert all(not is_open(fd) for fd in pipe_fds[:3])


def test_mem_table_fd_count_must_match(pipe_fds: list[int]) -> None:
    regions = (MemRegion(0, 4096, 0x10000, 0), MemRegion(8192, 4096, 0x20000, 0))
    data, _ = encode(SetMemTable(regions, fake_fds(2)))
    assert "with 2 regions: 1 file descriptors" in reject(data, pipe_fds[:1])
    assert not is_open(pipe_fds[0])


def test_too_many_memory_regions() -> None:
    payload = struct.pack("=I4x", 9) + bytes(32 * 8)
    assert "9 regions, at most 8" in reject(raw(Request.SET_MEM_TABLE, 1, payload))


def test_overlapping_and_empty_regions(pipe_fds: list[int]) -> None:
    overlap = (MemRegion(0, 8192, 0x10000, 0), MemRegion(4096, 4096, 0x40000, 0))
    data, _ = encode(SetMemTable(overlap, fake_fds(2)))
    assert "overlaps" in reject(data, pipe_fds[:2])
    user_overlap = (MemRegion(0, 4096, 0x10000, 0), MemRegion(8192, 4096, 0x10800, 0))
    data, _ = encode(SetMemTable(user_overlap, fake_fds(2)))
    assert "overlaps" in reject(data, pipe_fds[2:4])
    data, _ = encode(AddMemReg(MemRegion(0, 0, 0, 0), OwnedFd(FD)))
    assert "size 0" in reject(data, [os.dup(0)])
    wrap = MemRegion(2**64 - 4096, 8192, 0, 0)
    data, _ = encode(AddMemReg(wrap, OwnedFd(FD)))
    assert "wraps" in reject(data, [os.dup(0)])
    assert all(not is_open(fd) for fd in pipe_fds)


def test_mem_table_size_must_match_region_count() -> None:
    payload = struct.pack("=I4x", 2) + bytes(32)
    assert "expected 72" in reject(raw(Request.SET_MEM_TABLE, 1, payload))


def test_reserved_bits_in_vring_fd_payload() -> None:
    assert "reserved bits" in reject(raw(Request.SET_VRING_CALL, 1, struct.pack("=Q", 1 << 9)))


def test_bad_enable_state_and_ring_flags() -> None:
    assert "expected 0 or 1" in reject(raw(Request.SET_VRING_ENABLE, 1, struct.pack("=II", 0, 2)))
    payload = struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0)
    assert "unknown flags 0x2" in reject(raw(Request.SET_VRING_ADDR, 1, payload))


def test_config_size_field_must_match_payload() -> None:
    payload = struct.pack("=III", 0, 10, 0) + bytes(4)
    assert "SET_CONFIG of 10 config bytes" in reject(raw(Request.SET_CONFIG, 1, payload))
    payload = struct.pack("=III", 0, 300, 0)
    assert "outside the allowed" in reject(raw(Request.GET_CONFIG, 1, payload + bytes(300)))


def test_reply_ack_must_be_a_u64() -> None:
    assert "reply to SET_OWNER: payload size 4" in reject(raw(Request.SET_OWNER, 0x5, bytes(4)), [])


def test_reply_on_backend_channel_must_name_a_backend_request() -> None:
    assert "unknown backend-channel" in reject(raw(77, 0x5, bytes(8)), [], Channel.BACKEND)
    assert "backend-channel request" in reject(raw(42, 0x1, b""), [], Channel.BACKEND)


def test_fds_in_the_middle_of_a_message_are_an_error(pipe_fds: list[int]) -> None:
    data, _ = encode(SetConfig(0, bytes(64)))
    decoder = Decoder()
    decoder.receive_data(data[:20])
    decoder.receive_data(data[20:40], pipe_fds[:1])
    decoder.receive_data(data[40:])
    with pytest.raises(ProtocolError, match="middle of a message"):
        decoder.next_event()
    assert not is_open(pipe_fds[0])


def test_fds_belong_to_the_last_message_starting_in_their_chunk(pipe_fds: list[int]) -> None:
    first, _ = encode(GetFeatures())
    second, _ = encode(SetVringCall(1, OwnedFd(FD)))
    decoder = Decoder()
    decoder.receive_data(first + second, pipe_fds[:1])
    assert decoder.next_event() == GetFeatures()
    event = decoder.next_event()
    assert plain(event) == plain(SetVringCall(1, OwnedFd(pipe_fds[0])))
    assert isinstance(event, SetVringCall) and event.fd is not None
    event.fd.take()  # the fixture closes the pipe


def test_close_releases_fds_not_handed_out(pipe_fds: list[int]) -> None:
    data, _ = encode(SetVringKick(0, OwnedFd(FD)))
    decoder = Decoder()
    decoder.receive_data(data[:5], pipe_fds[:1])
    decoder.close()
    assert not is_open(pipe_fds[0])


def test_reply_flag_decides_request_or_reply() -> None:
    data, _ = encode(GetFeaturesReply(7))
    assert _decode_all(data, []) == [GetFeaturesReply(7)]
    request, _ = encode(GetFeatures())
    assert _decode_all(request, []) == [GetFeatures()]
    assert HEADER.unpack_from(data)[1] & Flag.REPLY


def test_a_failed_decoder_raises_its_error_again_without_growing_it() -> None:
    """Every later call raises the same error; re-raising must not pile each call's frames
    onto its traceback (a caller polling a dead stream grew without bound: 18 GB in a
    minute under the backend fuzzer)."""
    decoder = Decoder()
    decoder.receive_data(raw(99, 0x1, b""))

    def depth() -> int:
        with pytest.raises(ProtocolError) as info:
            decoder.next_event()
        tb, frames = info.value.__traceback__, 0
        while tb is not None:
            tb, frames = tb.tb_next, frames + 1
        return frames

    first, again = depth(), depth()
    for _ in range(100):
        depth()
    assert depth() == again <= first
