"""Random input for the vhost-user decoder and the backend state machine.

Whatever bytes and fds a peer sends, the decoder either hands out messages or raises its
own ``ProtocolError``, never another exception, always within a bounded number of calls
(every message consumes at least a header), and no fd outlives its owner.  The backend,
fed well-framed but otherwise arbitrary requests with real fds, answers with replies and
``ProtocolViolation`` events only and releases everything on ``close``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhost_user_helpers import AVAIL_OFF, DESC_OFF, GUEST_UVA, USED_OFF, RecordingDevice, open_fds

from virtblk.spec import Feature
from virtblk.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendConnection,
    ProtocolViolation,
)
from virtblk.vhost_user.codec import CLOSED, HEADER, NEED_DATA, Decoder, encode
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
from virtblk.vhost_user.messages import (
    AddMemReg,
    BackendRequest,
    Channel,
    GetConfig,
    GetFeatures,
    GetInflightFd,
    GetVringBase,
    MemRegion,
    Message,
    ProtocolFeature,
    RemMemReg,
    Request,
    ResetDevice,
    ResetOwner,
    SetConfig,
    SetFeatures,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
)

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
"""No deadline and no speed health check: on a loaded machine a slow example is not a
failure; what an example does depends only on its input."""


def drain(decoder: Decoder, budget: int, out: list[Message]) -> bool:
    """Events until NEED_DATA (False) or CLOSED (True), at most ``budget`` of them."""
    for _ in range(budget):
        event = decoder.next_event()
        if event is NEED_DATA:
            return False
        if event is CLOSED:
            return True
        assert isinstance(event, Message), event
        out.append(event)
    raise AssertionError(f"the decoder gave more than {budget} events for its input")


def feed_decoder(channel: Channel, chunks: list[tuple[bytes, int]], eof: bool) -> None:
    """Feed ``chunks`` (bytes, how many fresh eventfds come with them); every fd must be
    closed again once the decoder and the messages it handed out are."""
    before = open_fds()
    decoder = Decoder(channel)
    messages: list[Message] = []
    budget = sum(len(data) for data, _ in chunks) // HEADER.size + 2
    try:
        for data, count in chunks:
            decoder.receive_data(data, [os.eventfd(0) for _ in range(count)])
            drain(decoder, budget, messages)
        if eof:
            decoder.receive_data(b"")
            assert drain(decoder, budget, messages)  # CLOSED, or the ProtocolError below
    except ProtocolError as exc:
        try:
            decoder.next_event()
        except ProtocolError as again:  # the stream stays failed, with the same error
            assert again is exc
        else:
            raise AssertionError("a failed decoder went on decoding") from exc
    finally:
        decoder.close()
        for message in messages:
            message.close()
    assert open_fds() == before


CODES = st.sampled_from([int(r) for r in Request] + [int(r) for r in BackendRequest]) | (
    st.integers(0, 2**32 - 1)
)
FLAGS = st.sampled_from([0x1, 0x5, 0x9, 0xD]) | st.integers(0, 2**32 - 1)
PAYLOAD = st.binary(max_size=300)


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A header (mostly plausible) and a payload whose size it may or may not tell."""
    payload = draw(PAYLOAD)
    size = draw(st.just(len(payload)) | st.integers(0, 2**32 - 1))
    return HEADER.pack(draw(CODES), draw(FLAGS), size) + payload


@st.composite
def chunked(draw: st.DrawFn, stream: st.SearchStrategy[bytes]) -> list[tuple[bytes, int]]:
    """``stream`` cut at random places, fds (0 to 9) attached to random pieces."""
    data = draw(stream)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [(p, draw(st.integers(0, 9) if p else st.just(0))) for p in pieces if p]


@FUZZ
@given(
    st.sampled_from(list(Channel)),
    chunked(st.binary(max_size=400)),
    st.booleans(),
)
def test_random_bytes_decode_or_raise_protocol_error(
    channel: Channel, chunks: list[tuple[bytes, int]], eof: bool
) -> None:
    feed_decoder(channel, chunks, eof)


@FUZZ
@given(
    st.sampled_from(list(Channel)),
    chunked(st.lists(framed(), min_size=1, max_size=5).map(b"".join)),
    st.booleans(),
)
def test_random_headers_and_payloads_decode_or_raise_protocol_error(
    channel: Channel, chunks: list[tuple[bytes, int]], eof: bool
) -> None:
    feed_decoder(channel, chunks, eof)


# --------------------------------------------------------------------------- the backend

REGION_SIZE = 1 << 16
U32 = st.integers(0, 2**32 - 1)
INDEX = st.integers(0, 3)  # the device has 2 queues: some indices are out of range
UVA = st.sampled_from([GUEST_UVA + off for off in (DESC_OFF, AVAIL_OFF, USED_OFF, 8, 0)]) | (
    st.integers(0, 2**64 - 1)
)
Fd = Callable[[], OwnedFd]
"""A message factory takes this: it makes the message's fds when the message is sent."""


def eventfd() -> OwnedFd:
    return OwnedFd(os.eventfd(0))


def memfd() -> OwnedFd:
    """Guest memory as a frontend must hand it over: sealed against resizing."""
    fd = OwnedFd(os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    os.ftruncate(fd.fileno(), REGION_SIZE)
    fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


REGION = st.builds(
    MemRegion,
    st.sampled_from([0, REGION_SIZE, 1 << 30]) | st.integers(0, 2**64 - 1),
    st.sampled_from([REGION_SIZE, 4096, 0]) | st.integers(0, 2**64 - 1),
    st.sampled_from([GUEST_UVA, GUEST_UVA + REGION_SIZE]) | st.integers(0, 2**64 - 1),
    st.sampled_from([0, 4096, 8]) | st.integers(0, 2**64 - 1),
)
MAYBE = st.booleans()


def _vring_fd(cls: type[SetVringKick | SetVringCall | SetVringErr]) -> st.SearchStrategy[
    Callable[[], Message]
]:
    return st.builds(
        lambda index, with_fd, ack: lambda: cls(index, eventfd() if with_fd else None,
                                                 need_reply=ack),
        INDEX, MAYBE, MAYBE,
    )


REQUESTS: st.SearchStrategy[Callable[[], Message]] = st.one_of(
    st.just(lambda: GetFeatures()),
    st.just(lambda: SetOwner()),
    st.builds(lambda v, ack: lambda: SetProtocolFeatures(v, need_reply=ack),
              st.just(DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask)
              | st.integers(0, 2**64 - 1), MAYBE),
    st.builds(lambda v, ack: lambda: SetFeatures(v, need_reply=ack),
              st.sampled_from([0, 1 << 32, (1 << 32) | (1 << 30) | (1 << 29)])
              | st.integers(0, 2**64 - 1), MAYBE),
    st.builds(lambda r, ack: lambda: SetMemTable((r,), (memfd(),), need_reply=ack), REGION,
              MAYBE),
    st.builds(lambda r, ack: lambda: AddMemReg(r, memfd(), need_reply=ack), REGION, MAYBE),
    st.builds(lambda r, fd, ack: lambda: RemMemReg(r, eventfd() if fd else None,
                                                   need_reply=ack), REGION, MAYBE, MAYBE),
    st.builds(lambda i, n, ack: lambda: SetVringNum(i, n, need_reply=ack), INDEX,
              st.sampled_from([1, 8, 64, 256, 3, 0]) | U32, MAYBE),
    st.builds(lambda i, n, ack: lambda: SetVringBase(i, n, need_reply=ack), INDEX,
              st.integers(0, 0xFFFF) | U32, MAYBE),
    st.builds(lambda i, d, u, a, ack: lambda: SetVringAddr(i, d, u, a, need_reply=ack), INDEX,
              UVA, UVA, UVA, MAYBE),
    _vring_fd(SetVringKick), _vring_fd(SetVringCall), _vring_fd(SetVringErr),
    st.builds(lambda i, on, ack: lambda: SetVringEnable(i, on, need_reply=ack), INDEX,
              st.booleans(), MAYBE),
    st.builds(lambda i: lambda: GetVringBase(i), INDEX),
    st.builds(lambda o, n: lambda: GetConfig(o, n), st.integers(0, 100) | U32,
              st.integers(0, 256)),
    st.builds(lambda o, d, ack: lambda: SetConfig(o, d, need_reply=ack),
              st.integers(0, 100) | U32, st.binary(max_size=16), MAYBE),
    st.builds(lambda n, q: lambda: GetInflightFd(n, q), st.integers(0, 3),
              st.sampled_from([64, 3, 0, 32768, 65535])),
    st.builds(lambda s, n, q, ack: lambda: SetInflightFd(s, 0, n, q, memfd(), need_reply=ack),
              st.sampled_from([0, 4096, 1 << 20]), st.integers(0, 3),
              st.sampled_from([64, 3, 0]), MAYBE),
    st.builds(lambda ack: lambda: ResetOwner(need_reply=ack), MAYBE),
    st.builds(lambda ack: lambda: ResetDevice(need_reply=ack), MAYBE),
)


def answer(conn: BackendConnection) -> bool:
    """The events one request causes: a reply or an ack, a violation, or both; False when
    the framing broke (the decoder repeats its violation on every call from then on)."""
    seen: list[ProtocolViolation] = []
    for _ in range(3):
        event = conn.next_event()
        if event is NEED_DATA:
            return True
        assert isinstance(event, (Message, ProtocolViolation)), event
        if isinstance(event, Message):
            assert event.IS_REPLY
            event.close()
        elif any(v.error is event.error for v in seen):
            return False
        else:
            seen.append(event)
    raise AssertionError("one request caused more than a reply and a violation")


HANDSHAKE: list[Callable[[], Message]] = [
    lambda: SetOwner(),
    lambda: SetProtocolFeatures(DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask),
    lambda: SetFeatures(Feature.VERSION_1.mask | Feature.RING_EVENT_IDX.mask
                        | Feature.VHOST_USER_PROTOCOL_FEATURES.mask),
]
"""What a real frontend sends first; without it most random requests only meet the
SET_OWNER and feature checks."""
RING_UP: list[Callable[[], Message]] = [
    lambda: SetMemTable((MemRegion(0, REGION_SIZE, GUEST_UVA, 0),), (memfd(),)),
    lambda: SetVringNum(0, 64),
    lambda: SetVringAddr(0, GUEST_UVA + DESC_OFF, GUEST_UVA + USED_OFF, GUEST_UVA + AVAIL_OFF),
    lambda: SetVringCall(0, eventfd()),
    lambda: SetVringKick(0, eventfd()),
    lambda: SetVringEnable(0, True),
]
"""A memory table and a running ring 0, so later requests meet a device at work."""


@FUZZ
@given(st.sampled_from([[], HANDSHAKE, HANDSHAKE + RING_UP]),
       st.lists(REQUESTS, min_size=1, max_size=25))
def test_the_backend_answers_any_request_sequence_with_replies_or_violations(
    prefix: list[Callable[[], Message]], random: list[Callable[[], Message]],
) -> None:
    requests = prefix + random
    before = open_fds()
    conn = BackendConnection(
        RecordingDevice(),
        protocol_features=DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask,
    )
    try:
        for make in requests:
            with make() as message:
                data, fds = encode(message)
                conn.receive_data(data, [os.dup(fd) for fd in fds])  # what recvmsg gives
            if not answer(conn):
                break  # the stream is dead: the server drops the frontend here
    finally:
        conn.close()
    assert open_fds() == before


def test_a_mem_table_region_past_the_end_of_its_memfd_is_refused_not_mapped() -> None:
    """The one SET_MEM_TABLE check the fuzzer leans on most: a region longer than its file
    would fault (SIGBUS) on first access, so it must never be mapped."""
    conn = BackendConnection(RecordingDevice())
    try:
        conn.handle(SetOwner())
        message = SetMemTable((MemRegion(0, 2 * REGION_SIZE, GUEST_UVA, 0),), (memfd(),))
        data, fds = encode(message)
        conn.receive_data(data, [os.dup(fd) for fd in fds])
        message.close()
        event = conn.next_event()
        assert isinstance(event, ProtocolViolation) and "runs past" in str(event.error)
        assert conn.memory is None or not conn.memory.regions
    finally:
        conn.close()
