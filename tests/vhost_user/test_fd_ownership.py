"""Who closes which file descriptor: ``OwnedFd``, the messages that carry them, the backend
that keeps some, and the whole session over a socket.

A leak shows as a descriptor still open after its owner is done; a double close shows as a
descriptor opened afterwards (which the kernel gives the freed number) being closed under
its new owner.  Both are checked with ``os.fstat`` and the count of ``/proc/self/fd``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import types
import typing
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from vhost_user_helpers import (
    AVAIL_OFF,
    DESC_OFF,
    USED_OFF,
    RecordingDevice,
    describe,
    is_open,
    open_fds,
)

from virtblk.spec import Feature
from virtblk.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendConnection,
    ProtocolViolation,
)
from virtblk.vhost_user.codec import HEADER, encode
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd, dup_all
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import (
    AddMemReg,
    Channel,
    GetInflightFdReply,
    MemRegion,
    Message,
    ProtocolFeature,
    RemMemReg,
    Request,
    SetBackendReqFd,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringCall,
    SetVringErr,
    SetVringKick,
)
from virtblk.vhost_user.server import VhostUserServer
from virtblk.virtio.memory import MemoryRegion


@pytest.fixture
def conn() -> Iterator[BackendConnection]:
    c = BackendConnection(RecordingDevice())
    c.handle(SetProtocolFeatures(DEFAULT_PROTOCOL_FEATURES))
    c.handle(SetOwner())
    yield c
    c.close()


# --------------------------------------------------------------------------- OwnedFd


def test_close_is_idempotent_and_take_hands_on_once() -> None:
    fd = OwnedFd(os.eventfd(0))
    number = fd.fileno()
    taken = fd.take()
    assert taken == number and fd.closed
    with pytest.raises(ValueError, match="closed or handed on"):
        fd.take()
    with pytest.raises(ValueError, match="closed or handed on"):
        fd.fileno()
    fd.close()  # nothing held: must not close the number the taker now owns
    assert is_open(taken)
    with OwnedFd(taken) as again:
        assert again.fileno() == taken
    assert not is_open(taken) and again.closed
    again.close()


def test_a_closed_owner_never_closes_the_number_reused_later() -> None:
    fd = OwnedFd(os.eventfd(0))
    number = fd.fileno()
    fd.close()
    reused = os.eventfd(0)  # the kernel hands out the lowest free number: ours
    try:
        assert reused == number
        fd.close()
        assert is_open(reused)
    finally:
        os.close(reused)


def test_dup_all_leaves_nothing_open_when_one_dup_fails() -> None:
    before = open_fds()
    good = os.eventfd(0)
    try:
        with pytest.raises(OSError):
            dup_all([good, good, 1 << 20])  # the third is not an open descriptor
        assert open_fds() == before + 1  # only ``good`` itself
    finally:
        os.close(good)


# --------------------------------------------------------------------------- every message class


@dataclasses.dataclass(frozen=True, slots=True)
class _NewMessage(Message):
    """A message a later change might add: fds in every shape a field can hold them, and
    not a word about closing them.  The base class must find them all by itself."""

    CODE: ClassVar[int] = 99

    count: int
    fd: OwnedFd
    maybe: OwnedFd | None
    many: tuple[OwnedFd, ...]
    listed: list[OwnedFd]


def _message_classes() -> list[type[Message]]:
    """Every subclass of ``Message``, at any depth, found by introspection.

    ``dataclass(slots=True)`` builds a new class and the one it replaced stays in
    ``__subclasses__`` (its methods' ``__class__`` cells keep it alive): only the class
    its module names is the real one.
    """
    found: list[type[Message]] = []
    pending = [Message]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if getattr(sys.modules[sub.__module__], sub.__qualname__, None) is sub:
                found.append(sub)
    return found


_SAMPLES: dict[Any, Any] = {
    int: 0,
    bool: False,
    bytes: b"",
    MemRegion: MemRegion(0, 4096, 0, 0),
    Channel: Channel.MAIN,
}


def _fd_shape(hint: Any) -> type | None:
    """How a field annotated ``hint`` holds fds: ``OwnedFd`` (one, maybe optional), a
    container type (several), or None (no fds)."""
    if hint is OwnedFd or (
        isinstance(hint, types.UnionType) and OwnedFd in typing.get_args(hint)
    ):
        return OwnedFd
    origin = typing.get_origin(hint)
    if origin in (tuple, list) and OwnedFd in typing.get_args(hint):
        return typing.cast(type, origin)
    return None


def _build(cls: type[Message]) -> tuple[Message, list[int]]:
    """An instance of ``cls`` with fresh eventfds in every field annotated to hold fds, and
    the numbers of those eventfds."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    numbers: list[int] = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        shape = _fd_shape(hint)
        if shape is not None:
            owned = [OwnedFd(os.eventfd(0)) for _ in range(1 if shape is OwnedFd else 2)]
            numbers += [fd.fileno() for fd in owned]
            values[field.name] = owned[0] if shape is OwnedFd else shape(owned)
        elif field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif typing.get_origin(hint) is tuple:
            values[field.name] = ()
        elif hint in _SAMPLES:
            values[field.name] = _SAMPLES[hint]
        else:
            pytest.fail(f"{cls.__name__}.{field.name}: no sample for {hint}; add one")
    return cls(**values), numbers


def test_every_message_class_is_a_dataclass_and_the_walk_sees_the_fd_carriers() -> None:
    """Fields outside the dataclass machinery would be invisible to ``owned_fds``; and a
    walk that found no fd fields would make the test below pass on nothing."""
    classes = _message_classes()
    for cls in classes:
        assert "__dataclass_fields__" in cls.__dict__, f"{cls.__name__} is not a dataclass"
    carriers = {
        cls
        for cls in classes
        if any(_fd_shape(hint) for hint in typing.get_type_hints(cls).values())
    }
    known = {SetMemTable, AddMemReg, RemMemReg, SetVringKick, SetVringCall, SetVringErr,
             SetBackendReqFd, SetInflightFd, GetInflightFdReply, _NewMessage}
    assert known <= carriers


@pytest.mark.parametrize("how", ["close", "with"])
@pytest.mark.parametrize("cls", _message_classes(), ids=lambda cls: cls.__name__)
def test_closing_any_message_closes_every_fd_it_holds(cls: type[Message], how: str) -> None:
    """Whatever the class, ``close()`` and ``with message:`` close each fd in each field
    annotated to hold one (alone, optional, in a tuple or a list): no class has to say
    which fields those are, so a new one cannot forget."""
    message, numbers = _build(cls)
    if how == "close":
        message.close()
    else:
        with message:
            assert all(is_open(number) for number in numbers)
    leaked = [number for number in numbers if is_open(number)]
    for number in leaked:
        os.close(number)
    assert not leaked, f"{cls.__name__}: fds {leaked} left open"


# --------------------------------------------------------------------------- the backend


def test_fds_the_backend_does_not_keep_are_closed(conn: BackendConnection) -> None:
    """REM_MEM_REG's stray fd (old frontends attach one) is closed even when the request
    itself is refused; an fd on a refused ring request too."""
    stray, refused = os.eventfd(0), os.eventfd(0)
    with pytest.raises(ProtocolError, match="no region"):
        conn.handle(RemMemReg(MemRegion(0, 4096, 0, 0), OwnedFd(stray)))
    assert not is_open(stray)
    with pytest.raises(ProtocolError, match="ring index 9 out of range"):
        conn.handle(SetVringErr(9, OwnedFd(refused)))
    assert not is_open(refused)


def test_a_taken_fd_is_closed_once_by_its_new_owner(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    """The connection keeps the err eventfd; the message that brought it is closed again
    after the connection closed it and a new file reused the number: nothing happens."""
    message = SetVringErr(0, OwnedFd(os.eventfd(0)))
    assert message.fd is not None
    number = message.fd.fileno()
    conn.handle(message)
    assert message.fd.closed and is_open(number)  # taken: now the connection's
    message.close()
    assert is_open(number)
    conn.handle(SetVringErr(0, None))  # replaced: the connection closes its fd
    assert not is_open(number)
    reused = os.eventfd(0)
    try:
        assert reused == number
        message.close()
        conn.close()
        assert is_open(reused)
    finally:
        os.close(reused)


def test_a_replaced_backend_channel_is_closed_and_the_new_one_kept(
    conn: BackendConnection,
) -> None:
    first_ours, first = socket.socketpair()
    second_ours, second = socket.socketpair()
    with first_ours, second_ours:
        conn.handle(SetBackendReqFd(OwnedFd(first.detach())))
        kept = conn.backend_req
        assert kept is not None
        first_number = kept.fileno()
        conn.handle(SetBackendReqFd(OwnedFd(second.detach())))
        assert not is_open(first_number) and kept.closed
        assert conn.backend_req is not None and is_open(conn.backend_req.fileno())


@pytest.mark.parametrize(
    "data_and_fd_count",
    [
        # SET_MEM_TABLE announcing one region and carrying two fds
        (HEADER.pack(Request.SET_MEM_TABLE, 1, 40) + (1).to_bytes(8, "little") + bytes(32), 2),
        # ADD_MEM_REG with a region of size 0 (refused by the decoder)
        (encode(AddMemReg(MemRegion(0, 0, 0, 0), OwnedFd(1 << 20)))[0], 1),
        # SET_VRING_KICK with the no-fd flag and an fd anyway
        (HEADER.pack(Request.SET_VRING_KICK, 1, 8) + (0x100).to_bytes(8, "little"), 1),
        # a reply on the main channel, which a frontend must never send
        (HEADER.pack(Request.GET_INFLIGHT_FD, 0x5, 24) + (4096).to_bytes(8, "little")
         + bytes(16), 1),
        # a header with an unknown version
        (HEADER.pack(Request.SET_VRING_CALL, 0x2, 8) + bytes(8), 3),
    ],
    ids=["fd count", "empty region", "no-fd flag", "reply", "version"],
)
def test_a_malformed_message_with_fds_leaks_none(
    conn: BackendConnection, data_and_fd_count: tuple[bytes, int]
) -> None:
    data, count = data_and_fd_count
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(count)]
    conn.receive_data(data, fds)
    assert isinstance(conn.next_event(), ProtocolViolation)
    assert not any(is_open(fd) for fd in fds)
    assert open_fds() == before


def test_a_message_the_backend_refuses_after_taking_part_of_it_leaks_nothing(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    """ADD_MEM_REG maps the fd, then finds the region overlapping: the mapping and its fd
    go, and nothing else stays open."""
    conn.handle(AddMemReg(describe(region), OwnedFd.dup(region.fd)))
    before = open_fds()
    with pytest.raises(ProtocolError, match="overlaps"):
        conn.handle(AddMemReg(describe(region), OwnedFd.dup(region.fd)))
    assert open_fds() == before


# --------------------------------------------------------------------------- a whole session


def test_a_session_over_a_socket_leaves_no_fd_behind(region: MemoryRegion) -> None:
    """Frontend (which sends dups of the caller's fds) and server (which sends a dup of
    the inflight buffer it keeps) in one process: after the session every fd is gone but
    the ones the test itself holds."""
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    features = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.INFLIGHT_SHMFD.mask
    server = VhostUserServer(theirs, RecordingDevice(), protocol_features=features)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        with VhostUserFrontend(ours, timeout=5) as frontend:
            frontend.get_features()
            frontend.set_protocol_features(features)
            frontend.set_owner()
            frontend.set_features(Feature.VERSION_1.mask
                                  | Feature.VHOST_USER_PROTOCOL_FEATURES.mask)
            frontend.set_mem_table([region])
            uva = region.user_addr
            frontend.set_vring_num(0, 64)
            frontend.set_vring_addr(0, uva + DESC_OFF, uva + USED_OFF, uva + AVAIL_OFF)
            frontend.set_vring_call(0, call)
            frontend.set_vring_kick(0, kick)
            frontend.set_vring_enable(0, True)  # the device runs the ring on its dups
            assert frontend.get_vring_base(0) == 0
            reply = frontend.get_inflight_fd(2, 64)
            with reply:
                assert isinstance(reply, GetInflightFdReply) and reply.fd is not None
                assert os.fstat(reply.fd.fileno()).st_size == reply.mmap_size
                frontend.set_inflight_fd(reply.mmap_size, 0, 2, 64, reply.fd.fileno())
            frontend.set_vring_call(0, None)
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert is_open(kick) and is_open(call)  # borrowed by the frontend, still ours
    finally:
        os.close(kick)
        os.close(call)
        server.close()
    assert open_fds() == before
