"""The driver side of vhost-user: a blocking request/reply client, and the backend channel.

``VhostUserFrontend`` talks to a backend (qemu-storage-daemon, our own device) over a
connected AF_UNIX stream socket.  One request is in flight at a time, as in QEMU.  Every
wait for a reply is bounded by ``timeout``: a backend that hangs, closes or answers garbage
turns into ``ReplyTimeoutError``, ``PeerGoneError`` or ``ProtocolError`` and the frontend
is unusable afterwards (the spec: on a wrong reply the frontend closes the connection).

When REPLY_ACK is negotiated, requests without a reply of their own carry NEED_REPLY, so a
backend that rejects one (a bad ring address, say) is reported here as ``NackError`` at the
call that caused it rather than as a mysterious hang later.

``BackendChannel`` is the other direction: a socketpair whose far end the frontend hands
over with SET_BACKEND_REQ_FD; the backend sends CONFIG_CHANGE_MSG on it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol, Self, TypeVar

from virtblk import unixsock
from virtblk.vhost_user.codec import CLOSED, Decoder, encode
from virtblk.vhost_user.errors import (
    NackError,
    PeerGoneError,
    ProtocolError,
    ReplyTimeoutError,
    VhostUserError,
)
from virtblk.vhost_user.fd import OwnedFd, dup_all
from virtblk.vhost_user.messages import (
    MAX_FDS,
    Ack,
    AddMemReg,
    Channel,
    ConfigChangeMsg,
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
    GetVringBase,
    GetVringBaseReply,
    MemRegion,
    Message,
    ProtocolFeature,
    RemMemReg,
    ResetDevice,
    SetBackendReqFd,
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
    SetVringKick,
    SetVringNum,
)

__all__ = ["DEFAULT_TIMEOUT", "BackendChannel", "MemoryRegionLike", "VhostUserFrontend"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a reply: a live backend answers in microseconds."""

_RECV_SIZE = 4096

_M = TypeVar("_M", bound=Message)


class MemoryRegionLike(Protocol):
    """What ``set_mem_table`` needs of a region (``virtblk.virtio.memory.MemoryRegion``)."""

    @property
    def guest_phys_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def user_addr(self) -> int: ...
    @property
    def mmap_offset(self) -> int: ...
    @property
    def fd(self) -> int: ...


def _describe(region: MemoryRegionLike) -> MemRegion:
    return MemRegion(region.guest_phys_addr, region.size, region.user_addr, region.mmap_offset)


def _send_message(sock: socket.socket, message: Message) -> None:
    """Send one message whole; the fds go with its first byte."""
    data, fds = encode(message)
    try:
        sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
        if sent < len(data):
            sock.sendall(data[sent:])
    except TimeoutError as exc:
        raise ReplyTimeoutError(f"sending {message.name}: the peer does not read") from exc
    except OSError as exc:  # EPIPE, ECONNRESET, ENOTCONN, EBADF after close
        raise PeerGoneError(f"sending {message.name}: {exc}") from exc


def _receive_into(sock: socket.socket, decoder: Decoder, what: str) -> None:
    """One recvmsg into ``decoder`` (the socket is readable)."""
    try:
        data, fds, msg_flags, _addr = socket.recv_fds(sock, _RECV_SIZE, MAX_FDS)
    except OSError as exc:  # ECONNRESET and friends
        raise PeerGoneError(f"{what}: {exc}") from exc
    decoder.receive_data(data, fds)
    if msg_flags & socket.MSG_CTRUNC:
        raise ProtocolError(f"{what}: more than {MAX_FDS} file descriptors in one message")


class VhostUserFrontend:
    """A vhost-user frontend over a connected Unix stream socket (which it then owns).

    Methods map one to one onto requests and return typed results.  Thread-safe: a lock
    keeps request/reply pairs together.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        use_reply_ack: bool = True,
    ) -> None:
        """Wrap ``sock``; ``use_reply_ack`` False never asks for acks even if offered."""
        self._sock = sock
        self._sock.settimeout(timeout)  # bounds sends; replies are bounded by poll below
        self.timeout = timeout
        self._use_reply_ack = use_reply_ack
        self._decoder = Decoder(Channel.MAIN)
        self._lock = threading.Lock()
        self._failure: VhostUserError | None = None
        self.protocol_features = 0
        """The protocol features set with ``set_protocol_features`` (0 until then)."""

    @classmethod
    def connect(
        cls, path: str, *, timeout: float = DEFAULT_TIMEOUT, use_reply_ack: bool = True
    ) -> VhostUserFrontend:
        """Connect to a backend listening on ``path``; PeerGoneError if nobody answers."""
        try:
            sock = unixsock.connect(path, timeout)
        except OSError as exc:
            raise PeerGoneError(f"vhost-user backend: {exc}") from exc
        return cls(sock, timeout=timeout, use_reply_ack=use_reply_ack)

    # ------------------------------------------------------------------ plumbing

    def fileno(self) -> int:
        """The socket's fd."""
        return self._sock.fileno()

    @property
    def reply_ack(self) -> bool:
        """True when requests without replies of their own are acknowledged."""
        return self._use_reply_ack and bool(self.protocol_features & ProtocolFeature.REPLY_ACK.mask)

    def close(self) -> None:
        """Close the connection (the backend sees EOF and resets its device)."""
        self._decoder.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _transact(self, message: Message, reply_type: type[_M] | None) -> _M | None:
        """Send ``message``; wait for its reply if it has one or an ack was asked for.

        Takes the message: its fds (our dups of the caller's) are closed once it is sent.
        """
        with message, self._lock:
            if self._failure is not None:
                raise type(self._failure)(f"connection unusable after: {self._failure}")
            try:
                log.debug("-> %r", message)
                _send_message(self._sock, message)
                if reply_type is not None:
                    return self._await_reply(message, reply_type)
                if message.wants_ack:
                    ack = self._await_reply(message, Ack)
                    if not ack.ok:
                        raise NackError(message.name, ack.status)
                return None
            except (PeerGoneError, ProtocolError) as exc:
                self._failure = exc
                raise

    def _command(self, message: Message) -> None:
        self._transact(message, None)

    def _with_ack(self, make: Callable[[bool], Message]) -> None:
        self._command(make(self.reply_ack))

    def _await_reply(self, request: Message, reply_type: type[_M]) -> _M:
        deadline = time.monotonic() + self.timeout
        what = f"waiting for the reply to {request.name}"
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            event = self._decoder.next_event()
            if isinstance(event, Message):
                return self._check_reply(request, reply_type, event)
            if event is CLOSED:
                raise PeerGoneError(f"{what}: the backend closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise ReplyTimeoutError(f"{what}: no answer within {self.timeout:g} s")
            _receive_into(self._sock, self._decoder, what)

    @staticmethod
    def _check_reply(request: Message, reply_type: type[_M], reply: Message) -> _M:
        if not reply.IS_REPLY:
            reply.close()
            raise ProtocolError(f"backend sent request {reply.name} on the main channel")
        if reply.code != request.code:
            reply.close()
            raise ProtocolError(f"backend answered {reply.name} to {request.name}")
        if isinstance(reply, GetConfigFailed) and reply_type is GetConfigReply:
            raise NackError(request.name, 1)
        if not isinstance(reply, reply_type):
            reply.close()
            raise ProtocolError(
                f"backend answered {request.name} with {type(reply).__name__}, "
                f"expected {reply_type.__name__}"
            )
        return reply

    def _ask(self, message: Message, reply_type: type[_M]) -> _M:
        reply = self._transact(message, reply_type)
        assert reply is not None
        return reply

    # ------------------------------------------------------------------ negotiation

    def get_features(self) -> int:
        """The virtio features the backend offers (incl. VHOST_USER_F_PROTOCOL_FEATURES)."""
        return self._ask(GetFeatures(), GetFeaturesReply).value

    def set_features(self, features: int) -> None:
        """Acknowledge virtio ``features``."""
        self._with_ack(lambda ack: SetFeatures(features, need_reply=ack))

    def get_protocol_features(self) -> int:
        """The protocol features the backend offers."""
        return self._ask(GetProtocolFeatures(), GetProtocolFeaturesReply).value

    def set_protocol_features(self, features: int) -> None:
        """Enable protocol ``features``; REPLY_ACK takes effect for the next request."""
        self._command(SetProtocolFeatures(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        """Claim the session."""
        self._with_ack(lambda ack: SetOwner(need_reply=ack))

    def reset_device(self) -> None:
        """RESET_DEVICE: disable rings and reset the device (RESET_DEVICE feature)."""
        self._with_ack(lambda ack: ResetDevice(need_reply=ack))

    def get_queue_num(self) -> int:
        """How many queues the backend supports (MQ protocol feature)."""
        return self._ask(GetQueueNum(), GetQueueNumReply).value

    def get_max_mem_slots(self) -> int:
        """How many regions the backend can map (CONFIGURE_MEM_SLOTS)."""
        return self._ask(GetMaxMemSlots(), GetMaxMemSlotsReply).value

    # ------------------------------------------------------------------ memory

    def set_mem_table(self, regions: Sequence[MemoryRegionLike]) -> None:
        """Send the whole memory table (the fds are borrowed, not closed)."""
        descs = tuple(_describe(region) for region in regions)
        fds = dup_all(region.fd for region in regions)
        self._with_ack(lambda ack: SetMemTable(descs, fds, need_reply=ack))

    def add_mem_reg(self, region: MemoryRegionLike) -> None:
        """Map one more region (CONFIGURE_MEM_SLOTS)."""
        desc = _describe(region)
        self._with_ack(lambda ack: AddMemReg(desc, OwnedFd.dup(region.fd), need_reply=ack))

    def rem_mem_reg(self, region: MemoryRegionLike) -> None:
        """Unmap a region added before (CONFIGURE_MEM_SLOTS)."""
        desc = _describe(region)
        self._with_ack(lambda ack: RemMemReg(desc, need_reply=ack))

    # ------------------------------------------------------------------ config space

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """``size`` bytes of the device config space at ``offset``; NackError on failure."""
        request = GetConfig(offset, size)
        reply = self._ask(request, GetConfigReply)
        if reply.offset != offset or len(reply.data) != size:
            with self._lock:
                self._failure = ProtocolError(
                    f"GET_CONFIG({offset}, {size}) answered {len(reply.data)} bytes "
                    f"at offset {reply.offset}"
                )
                raise self._failure
        return reply.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """Write ``data`` to config space at ``offset`` (``flags`` 1: live migration)."""
        self._with_ack(lambda ack: SetConfig(offset, bytes(data), flags, need_reply=ack))

    # ------------------------------------------------------------------ rings

    def set_vring_num(self, index: int, num: int) -> None:
        """Ring ``index`` has ``num`` entries."""
        self._with_ack(lambda ack: SetVringNum(index, num, need_reply=ack))

    def set_vring_addr(
        self,
        index: int,
        desc_uva: int,
        used_uva: int,
        avail_uva: int,
        flags: int = 0,
        log_gpa: int = 0,
    ) -> None:
        """Ring addresses as user addresses of the shared mapping (``flags`` bit 0: LOG)."""
        self._with_ack(
            lambda ack: SetVringAddr(
                index, desc_uva, used_uva, avail_uva, log_gpa, flags, need_reply=ack
            )
        )

    def set_vring_base(self, index: int, base: int) -> None:
        """Ring ``index`` starts at avail index ``base``."""
        self._with_ack(lambda ack: SetVringBase(index, base, need_reply=ack))

    def get_vring_base(self, index: int) -> int:
        """Stop ring ``index``; return its next avail index."""
        reply = self._ask(GetVringBase(index), GetVringBaseReply)
        if reply.index != index:
            with self._lock:
                self._failure = ProtocolError(
                    f"GET_VRING_BASE({index}) answered for ring {reply.index}"
                )
                raise self._failure
        return reply.num

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd we write to kick ring ``index`` (None: the backend polls)."""
        self._with_ack(lambda ack: SetVringKick(index, _dup(fd), need_reply=ack))

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the backend writes on completions (None: we poll)."""
        self._with_ack(lambda ack: SetVringCall(index, _dup(fd), need_reply=ack))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Enable or disable ring ``index`` (needs VHOST_USER_F_PROTOCOL_FEATURES)."""
        self._with_ack(lambda ack: SetVringEnable(index, enable, need_reply=ack))

    # ------------------------------------------------------------------ channels, inflight

    def set_backend_req_fd(self, fd: int) -> None:
        """Hand over the socket for backend-initiated requests (BACKEND_REQ)."""
        self._with_ack(lambda ack: SetBackendReqFd(OwnedFd.dup(fd), need_reply=ack))

    def open_backend_channel(self, on_config_change: Callable[[], None]) -> BackendChannel:
        """Create the backend channel, send its far end, and return our end.

        Call ``start()`` on the result for a background thread, or poll its ``fileno()``
        and call ``process()``.
        """
        channel, remote = BackendChannel.pair(on_config_change, timeout=self.timeout)
        try:
            self.set_backend_req_fd(remote.fileno())
        except BaseException:
            channel.close()
            raise
        finally:
            remote.close()
        return channel

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> GetInflightFdReply:
        """The backend's inflight buffer (INFLIGHT_SHMFD); the reply owns its fd: close it,
        or take the fd.

        A driver that reconnects (``VirtioBlk`` with a ``reconnect_timeout``) asks once and
        keeps the buffer, for the backend's next incarnation to resubmit from."""
        return self._ask(GetInflightFd(num_queues, queue_size), GetInflightFdReply)

    def set_inflight_fd(
        self, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, fd: int
    ) -> None:
        """Hand an inflight buffer back to the backend (INFLIGHT_SHMFD): at every start, as
        QEMU does, so a restarted backend resubmits what the buffer says was in flight."""
        self._with_ack(
            lambda ack: SetInflightFd(
                mmap_size, mmap_offset, num_queues, queue_size, OwnedFd.dup(fd),
                need_reply=ack,
            )
        )


def _dup(fd: int | None) -> OwnedFd | None:
    """Our own copy of an eventfd the caller keeps (None: no fd, poll instead)."""
    return None if fd is None else OwnedFd.dup(fd)


class BackendChannel:
    """Our end of the backend-request channel: answers CONFIG_CHANGE_MSG.

    ``on_config_change`` runs for every CONFIG_CHANGE_MSG; when the backend asked for a
    reply we answer 0 after it returns, or 1 if it raised (the exception is kept in
    ``callback_errors`` rather than killing the reader).
    """

    def __init__(
        self,
        sock: socket.socket,
        on_config_change: Callable[[], None],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Serve ``sock`` (our end of the pair; we own it)."""
        self._sock = sock
        self._sock.settimeout(timeout)
        self._on_config_change = on_config_change
        self._decoder = Decoder(Channel.BACKEND)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.closed = False
        """True once the backend closed its end (or we closed ours)."""
        self.error: VhostUserError | None = None
        """Why the background thread stopped, if it was not a clean close."""
        self.callback_errors: list[BaseException] = []
        self.config_changes = 0
        """How many CONFIG_CHANGE_MSG arrived."""

    @classmethod
    def pair(
        cls, on_config_change: Callable[[], None], *, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[BackendChannel, socket.socket]:
        """A new channel and the far end to send with SET_BACKEND_REQ_FD (then close it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours, on_config_change, timeout=timeout), theirs

    def fileno(self) -> int:
        """The fd to poll for readability before calling ``process``."""
        return self._sock.fileno()

    def process(self, timeout: float | None = 0.0) -> int:
        """Wait up to ``timeout`` s (None: forever) for data, then handle every complete
        message; returns how many were handled.  Raises ProtocolError on garbage."""
        with self._lock:
            if self.closed:
                return 0
            readable, _, _ = select.select([self._sock], [], [], timeout)
            if readable:
                _receive_into(self._sock, self._decoder, "backend channel")
            handled = 0
            while True:
                event = self._decoder.next_event()
                if not isinstance(event, Message):
                    self.closed = event is CLOSED
                    return handled
                self._handle(event)
                handled += 1

    def _handle(self, message: Message) -> None:
        if not isinstance(message, ConfigChangeMsg):
            message.close()
            raise ProtocolError(f"unexpected {message.name} on the backend channel")
        self.config_changes += 1
        status = 0
        try:
            self._on_config_change()
        except Exception as exc:  # the backend gets a NACK; we keep reading
            self.callback_errors.append(exc)
            status = 1
        if message.need_reply:
            _send_message(self._sock, Ack(message.code, status, Channel.BACKEND))

    def start(self) -> None:
        """Serve in a daemon thread until the backend closes the channel or ``close``."""
        self._thread = threading.Thread(target=self._run, name="vhost-user-backend-channel")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self.closed:
                self.process(timeout=None)
        except VhostUserError as exc:
            self.error = exc
        except OSError:
            pass  # closed under us by close()

    def close(self) -> None:
        """Stop the thread (if any) and close our end."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in select
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            self.closed = True
            self._decoder.close()
            self._sock.close()
