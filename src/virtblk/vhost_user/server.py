"""The socket shell around ``BackendConnection``: listen, accept, serve, repeat.

One frontend at a time, as qemu-storage-daemon does: QEMU connects once per device, and a
second frontend on the same device would fight over its rings.  When the frontend goes
away (EOF, ECONNRESET) or breaks the protocol, the session is torn down (the device is
reset, memory unmapped, every fd closed) and the server accepts the next one.

``stop()`` may be called from another thread or a signal handler: it writes to a pipe the
poll loop watches.  The socket file is created 0600 (the frontend gets to read and write
our guest memory mappings, so nobody else may connect), a stale one left by a crashed
server is replaced, a live one is never stolen, and ours is removed on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Self

from virtblk.unixsock import bind_private, remove_if_ours
from virtblk.vhost_user.backend import (
    DEFAULT_MAX_MEM_SLOTS,
    DEFAULT_PROTOCOL_FEATURES,
    BackendConnection,
    ProtocolViolation,
    VhostUserDevice,
)
from virtblk.vhost_user.codec import CLOSED, NEED_DATA
from virtblk.vhost_user.codec import encode as encode_message
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
from virtblk.vhost_user.messages import MAX_FDS, Message

__all__ = ["VhostUserServer", "serve_connected"]

log = logging.getLogger(__name__)

_RECV_SIZE = 4096
_BACKEND_SEND_TIMEOUT = 1.0  # a frontend that does not drain its channel loses messages


class _SessionEnd(Exception):
    """Internal: the current session is over (EOF, reset, violation or stop)."""


class VhostUserServer:
    """Serve ``device`` (or one device per session from ``device_factory``) to frontends.

    ``address`` is a socket path to listen on, or a socket: a listening one (we accept on
    it) or a connected one (served once, like ``--fd``).  Use ``serve_forever`` to run;
    ``serve_connected`` serves an already-connected socket (e.g. one end of a socketpair).
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | socket.socket | None,
        device: VhostUserDevice | None = None,
        *,
        device_factory: Callable[[], VhostUserDevice] | None = None,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        accept_unsealed_memory: bool = False,
    ) -> None:
        """Prepare to serve; a path is bound at once (so a clash is reported here).
        ``accept_unsealed_memory`` maps guest memory a frontend could still shrink (and so
        kill this process with SIGBUS); refused by default."""
        if (device is None) == (device_factory is None):
            raise ValueError("give exactly one of device= or device_factory=")
        self._device = device
        self._device_factory = device_factory
        self.protocol_features = protocol_features
        self.max_mem_slots = max_mem_slots
        self.accept_unsealed_memory = accept_unsealed_memory
        self.path: str | None = None
        self._listener: socket.socket | None = None
        self._connected: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._closed = False
        self.sessions = 0
        """Sessions served so far."""
        self.last_violation: ProtocolError | None = None
        """The protocol error that ended the last session, if one did."""
        self.connection: BackendConnection | None = None
        """The session being served (for inspection; owned by the server thread)."""
        if isinstance(address, socket.socket):
            if address.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                self._listener = address
            else:
                self._connected = address
        elif address is not None:
            self.path = os.fspath(address)
            self._listener = self._bind(self.path)

    # ------------------------------------------------------------------ socket file

    def _bind(self, path: str) -> socket.socket:
        sock, self._socket_id = bind_private(path, backlog=1)
        return sock

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """End ``serve_forever``/``serve_connected`` soon (thread- and signal-safe)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._stop_w, b"x")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        """Release the listening socket and remove our socket file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        if self._connected is not None:
            self._connected.close()
        if self.path is not None and self._socket_id is not None:
            remove_if_ours(self.path, self._socket_id)
        for fd in (self._stop_r, self._stop_w, self._wake_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.close()

    # ------------------------------------------------------------------ serving

    def serve_forever(self) -> None:
        """Accept and serve frontends one at a time until ``stop``; then ``close``."""
        try:
            if self._connected is not None:
                sock, self._connected = self._connected, None
                self.serve_connected(sock)
                return
            if self._listener is None:
                raise ValueError("this server has no address to listen on")
            poller = select.poll()
            poller.register(self._listener, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            while not self._stopping:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_r in ready:
                    break
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                try:
                    self.serve_connected(sock)
                except Exception:
                    # A bug or an unexpected failure in one session must not take the
                    # server down: that frontend is dropped, the next one is served.
                    log.exception("session %d ended by an internal error", self.sessions)
        finally:
            self.close()

    def serve_connected(self, sock: socket.socket) -> None:
        """Serve one frontend on a connected socket until it leaves (or ``stop``).

        Takes ownership of ``sock``.  Returns normally whatever the frontend did; a protocol
        violation is logged and kept in ``last_violation``.
        """
        try:
            device = self._device if self._device is not None else self._new_device()
            conn = BackendConnection(
                device, protocol_features=self.protocol_features,
                max_mem_slots=self.max_mem_slots,
                accept_unsealed_memory=self.accept_unsealed_memory,
            )
        except BaseException:
            sock.close()  # the frontend sees the connection end instead of waiting on it
            raise
        conn.wakeup = self._wake
        self.connection = conn
        self.sessions += 1
        self.last_violation = None
        session = _Session(self, conn, sock)
        try:
            session.run()
        except _SessionEnd:
            pass
        finally:
            session.close()
            conn.close()
            sock.close()
            self.connection = None

    def _new_device(self) -> VhostUserDevice:
        assert self._device_factory is not None
        return self._device_factory()


def serve_connected(
    sock: socket.socket,
    device: VhostUserDevice,
    *,
    protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
    max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
) -> None:
    """Serve one frontend on a connected socket (a socketpair end) until it leaves.

    Takes ownership of ``sock``; the device is reset when the session ends.
    """
    server = VhostUserServer(
        None, device, protocol_features=protocol_features, max_mem_slots=max_mem_slots
    )
    try:
        server.serve_connected(sock)
    finally:
        server.close()


class _Session:
    """The poll loop of one connection: main socket, backend channel, stop and wakeup."""

    def __init__(self, server: VhostUserServer, conn: BackendConnection, sock: socket.socket):
        self.server = server
        self.conn = conn
        self.sock = sock
        sock.setblocking(True)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.poller.register(server._stop_r, select.POLLIN)
        self.poller.register(server._wake_fd, select.POLLIN)
        self.backend: socket.socket | None = None
        self.backend_of: OwnedFd | None = None  # the connection's fd that ``backend`` dups

    def run(self) -> None:
        while not self.server._stopping:
            for fd, _events in self.poller.poll():
                if fd == self.server._stop_r:
                    raise _SessionEnd
                if fd == self.server._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self.server._wake_fd)
                    if self.conn.failure is not None:
                        log.error("dropping the frontend: %s", self.conn.failure)
                        raise _SessionEnd
                    self._flush_backend()
                elif self.backend is not None and fd == self.backend.fileno():
                    self._read_backend()
                elif fd == self.sock.fileno():
                    self._read_main()
            self._track_backend_channel()
        raise _SessionEnd

    def _read_main(self) -> None:
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.sock, _RECV_SIZE, MAX_FDS)
        except (ConnectionResetError, ConnectionAbortedError):
            data, fds, msg_flags = b"", [], 0
        self.conn.receive_data(data, fds)
        if msg_flags & socket.MSG_CTRUNC:
            self._violation(ProtocolError(f"more than {MAX_FDS} fds in one message"))
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                log.info("frontend disconnected")
                raise _SessionEnd
            if isinstance(event, ProtocolViolation):
                self._violation(event.error)
            if isinstance(event, Message):
                self._send(event)

    def _violation(self, error: ProtocolError) -> None:
        log.warning("dropping the frontend: %s", error)
        self.server.last_violation = error
        raise _SessionEnd

    def _send(self, reply: Message) -> None:
        with reply:  # a reply owns its fds (GET_INFLIGHT_FD's dup): closed once sent
            data, fds = encode_message(reply)
            try:
                sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            except OSError as exc:
                log.info("frontend went away while we replied: %s", exc)
                raise _SessionEnd from exc

    # ------------------------------------------------------------------ backend channel

    def _track_backend_channel(self) -> None:
        """Follow SET_BACKEND_REQ_FD: poll the channel the connection currently holds."""
        if self.conn.backend_req is self.backend_of:
            return
        self._drop_backend()
        if self.conn.backend_req is not None:
            self.backend_of = self.conn.backend_req
            self.backend = socket.socket(fileno=os.dup(self.backend_of.fileno()))
            self.backend.settimeout(_BACKEND_SEND_TIMEOUT)
            self.poller.register(self.backend, select.POLLIN)
            self._flush_backend()

    def _drop_backend(self) -> None:
        if self.backend is not None:
            self.poller.unregister(self.backend)
            self.backend.close()
        self.backend = None
        self.backend_of = None

    def _flush_backend(self) -> None:
        self._track_backend_channel()
        for data, fds in self.conn.backend_data_to_send():
            if self.backend is None:
                log.info("config change not sent: no backend channel")
                continue
            try:
                socket.send_fds(self.backend, [data], fds) if fds else self.backend.sendall(data)
            except OSError as exc:
                log.warning("backend channel broke while sending: %s", exc)
                self._close_backend_channel()

    def _read_backend(self) -> None:
        assert self.backend is not None
        try:
            data, fds, _flags, _ = socket.recv_fds(self.backend, _RECV_SIZE, MAX_FDS)
            self.conn.receive_backend_data(data, fds)
        except (OSError, ProtocolError) as exc:
            log.warning("backend channel closed: %s", exc)
            self._close_backend_channel()
            return
        if not data:
            self._drop_backend()

    def _close_backend_channel(self) -> None:
        self._drop_backend()
        self.conn.close_backend_channel()

    def close(self) -> None:
        self._drop_backend()
