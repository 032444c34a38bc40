"""A disk whose data lives on an NBD server (``qemu-nbd``, ``nbdkit``...): ``serve --nbd URI``.

One NBD connection carries every queue's requests, many in flight at once, and has no
thread of its own: the queue's thread encodes the requests of a batch
(``virtblk.nbd.client``, sans-IO) and sends them, headers and guest buffers, in one
``sendmsg``, and the queue's thread reads the replies too, copying read data straight
into the guest's buffers.  Its loop sleeps on an
epoll set of the socket and its own eventfd (:class:`NbdQueue`'s ``wait_fd``); whichever
thread reads the socket (one at a time) answers every request it finds, handing another
queue's answers to that queue's deque and eventfd.  At depth 1 this is what keeps a
request's round trip to one thread: a reader thread handing answers over cost 3.4 times
qemu-storage-daemon's latency (its NBD client is a coroutine in the ring's thread).  A
thread that waits for its own request (the device's general path: flush, discard...)
reads too.  Sending never blocks while replies wait to be read: a full socket is drained
between tries, so neither end can stop the other.

Request mapping (virtio-blk -> NBD):

* IN -> READ; OUT -> WRITE, with FUA in write-through when the export takes FUA, else
  WRITE then FLUSH (when it takes FLUSH); reads and writes above the export's maximum
  payload are split, and answered when every piece is;
* FLUSH -> FLUSH (nothing to do for an export without SEND_FLUSH: it has no cache to
  flush, proto.md forbids sending it);
* DISCARD -> TRIM when the export takes it (else nothing: a discard is advisory);
* WRITE_ZEROES -> WRITE_ZEROES, ``NO_HOLE`` unless the driver allowed unmapping; WRITE of
  zeros for an export without SEND_WRITE_ZEROES;
* SECURE_ERASE -> WRITE of zeros, then FLUSH (a zeroing command may only drop extents);
* GET_ID -> the serial (``nbd_serial``: the export's name by default).

A lost connection (the server died, closed it, or broke the protocol) answers every
request in flight IOERR at once, and so is every request until a new connection is up:
the device keeps serving (a guest sees I/O errors, not a hang) and a thread dials again,
0.1 s after the loss and then backing off to 2 s between tries, forever; a server that
comes back (restarted, on the same socket or port) is picked up, a new size included
(``current_size``).  A request the connected server does not answer waits for it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Sequence
from typing import Any

from virtblk.device.backends import Backend, scatter
from virtblk.device.queue_worker import Offloader, StorageError, Token
from virtblk.nbd.client import (
    ClientConnection,
    ClientHandshake,
    Done,
    Export,
    HandshakeError,
    NbdError,
    ProtocolError,
    ReadData,
    ReadHole,
)
from virtblk.nbd.uri import NbdUri, parse_uri
from virtblk.nbd.wire import Command, CommandFlag, TransmissionFlag
from virtblk.spec import VIRTIO_BLK_ID_BYTES

log = logging.getLogger("virtblk.device")

CONNECT_TIMEOUT = 10.0
"""Seconds to connect and finish the handshake."""

RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0
"""Backoff between reconnection attempts: from the first delay, doubling up to the most."""

_CLOSE_TIMEOUT = 5.0
_RECV = 1 << 18
_IOV_MAX = 512
"""Buffers per ``sendmsg`` (Linux takes 1024)."""
_WAIT_STEP = 0.01
"""Seconds a waiting thread sleeps on the socket before it looks whether another thread
answered its request."""
_ZERO_CHUNK = 1 << 30
"""The most one TRIM or WRITE_ZEROES asks for (servers take any length; some prefer less)."""

_READ, _WRITE, _FLUSH, _TRIM, _WRITE_ZEROES = (
    int(Command.READ), int(Command.WRITE), int(Command.FLUSH), int(Command.TRIM),
    int(Command.WRITE_ZEROES))
_FUA, _NO_HOLE = int(CommandFlag.FUA), int(CommandFlag.NO_HOLE)


def nbd_serial(uri: str) -> str:
    """The GET_ID answer of an NBD disk given no serial: the export's name (else the
    socket's file name, or HOST:PORT), its last 20 bytes, so a guest's
    ``/dev/disk/by-id/virtio-*`` names the export."""
    parsed = parse_uri(uri)
    name = parsed.export or (os.path.basename(parsed.socket) if parsed.socket
                             else f"{parsed.host}:{parsed.port}")
    return name.encode("ascii", "replace").decode("ascii")[-VIRTIO_BLK_ID_BYTES:]


class _Op:
    """One device request as NBD commands: finished once every piece is answered (the
    first error wins) and, in write-through without FUA, a FLUSH after them."""

    __slots__ = ("error", "flush_after", "into", "remaining")

    def __init__(self, into: Sequence[memoryview] | None, flush_after: bool = False) -> None:
        self.into = into
        self.remaining = 0
        self.error: OSError | None = None
        self.flush_after = flush_after

    def finish(self) -> None:
        """Every piece is answered (``error`` says how)."""
        raise NotImplementedError


class _SyncOp(_Op):
    """A request made by a thread that waits for it (the device's general path)."""

    __slots__ = ("event",)

    def __init__(self, into: Sequence[memoryview] | None, flush_after: bool = False) -> None:
        super().__init__(into, flush_after)
        self.event = threading.Event()

    def finish(self) -> None:
        self.event.set()


class _QueueOp(_Op):
    """A request a queue offloaded: its answer lands in the queue's :class:`NbdQueue`."""

    __slots__ = ("queue", "token")

    def __init__(self, queue: NbdQueue, token: Token, into: Sequence[memoryview] | None,
                 flush_after: bool) -> None:
        super().__init__(into, flush_after)
        self.queue = queue
        self.token = token

    def finish(self) -> None:
        error = self.error
        self.queue.land((self.token, None if error is None else StorageError(
            error.errno or errno.EIO, error.strerror)))


class _Link:
    """The connection to the server and its reconnection (see the module docstring).

    ``_lock`` guards the protocol state (the client, the cookie table, which connection
    is current); ``_send_lock`` keeps one request's bytes together on the wire;
    ``_read_lock`` makes one thread at a time the reader.  None is held while waiting for
    a reply; a sender that finds the socket full holds ``_send_lock`` while it waits for
    room, reading replies meanwhile."""

    def __init__(self, uri: NbdUri, connect_timeout: float) -> None:
        self.uri = uri
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._ops: dict[int, tuple[_Op, int]] = {}
        """cookie -> (the request, where this piece starts in its buffers)."""
        self._watchers: list[select.epoll] = []
        """The queues' epoll sets, which hold the current socket."""
        self._closing = threading.Event()
        self._generation = 0
        self._reconnector: threading.Thread | None = None
        self._buffer = bytearray(_RECV)  # one buffer for every recv (the read lock's)
        self._view = memoryview(self._buffer)
        sock, export = self._dial()
        self.export = export
        self.connected = True
        self._sock = sock
        self._client = ClientConnection(export)

    # ---------------------------------------------------------------- connecting

    def _fail(self, what: str) -> NbdError:
        return NbdError(f"NBD server {self.uri.where}, export {self.uri.export!r}: {what}")

    def _dial(self) -> tuple[socket.socket, Export]:
        """Connect and negotiate the export; NbdError saying why not."""
        uri = self.uri
        timeout = self._connect_timeout
        try:
            if uri.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: Any = uri.socket
            else:
                assert uri.host is not None
                infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
                family, _, _, _, address = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise self._fail(f"cannot resolve the address: {exc}") from None
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except OSError as exc:
                raise self._fail(f"cannot connect: {exc.strerror or exc}") from None
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            export = self._handshake(sock)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock, export

    def _handshake(self, sock: socket.socket) -> Export:
        handshake = ClientHandshake(self.uri.export)
        try:
            while True:
                export = handshake.next_event()
                out = handshake.data_to_send()
                if out:
                    sock.sendall(out)
                if export is not None:
                    break
                handshake.receive_data(sock.recv(65536))
        except TimeoutError:
            raise self._fail(f"no answer within {self._connect_timeout:g} s during the "
                             "handshake: not an NBD server?") from None
        except HandshakeError as exc:
            raise self._fail(str(exc)) from None
        except OSError as exc:
            raise self._fail(f"the connection failed during the handshake: "
                             f"{exc.strerror or exc}") from None
        if handshake.leftover:
            raise self._fail("the server sent bytes after the handshake before any request")
        if export.size < 512:
            raise self._fail(f"the export has {export.size} bytes, not one 512-byte sector")
        return export

    def watch(self, epoll: select.epoll) -> None:
        """Have ``epoll`` (a queue's) hold the current socket, and each one after it."""
        with self._lock:
            self._watchers.append(epoll)
            if self.connected:
                _watch_socket(epoll, self._sock)

    def unwatch(self, epoll: select.epoll) -> None:
        """Stop updating ``epoll`` (the queue closes it)."""
        with self._lock:
            self._watchers.remove(epoll)

    # ---------------------------------------------------------------- requests

    def submit(self, op: _Op, pieces: Sequence[tuple[int, int, int, int, int]],
               payload: Sequence[memoryview] | None = None,
               batch: list[tuple[int, list[bytes | memoryview]]] | None = None) -> None:
        """Send ``op``'s pieces, each ``(command, offset, length, flags, base)`` (``base``:
        where its data starts in ``op.into``, or in ``payload`` for a write), or add them
        to ``batch`` for :meth:`send_batch`.  A request the link cannot send now (no
        connection, or the export refuses it) finishes ``op`` with the error at once."""
        wire: list[list[bytes | memoryview]] = []
        with self._lock:
            if not self.connected:
                error = OSError(errno.EIO, f"the NBD server {self.uri.where} is not connected")
            else:
                error = None
                client, sock, ops = self._client, self._sock, self._ops
                cookies = []
                try:
                    for command, offset, length, flags, base in pieces:
                        cookie, header = client.request(command, offset, length, flags)
                        cookies.append(cookie)
                        ops[cookie] = (op, base)
                        if command == _WRITE and payload is not None:
                            wire.append([header, *_slice(payload, base, length)])
                        else:
                            wire.append([header])
                except ValueError as exc:  # the export refuses it: nothing of it is sent
                    for cookie in cookies:
                        client.forget(cookie)
                        del ops[cookie]
                    error = OSError(errno.EIO, str(exc))
                    wire = []
                else:
                    op.remaining += len(pieces)
                generation = self._generation
        if error is not None:
            _set_error(op, error)
            if op.remaining == 0:
                op.finish()
            return
        if batch is not None:
            batch += ((generation, parts) for parts in wire)
            return
        self._send(sock, generation, [part for parts in wire for part in parts])

    def send_batch(self, batch: list[tuple[int, list[bytes | memoryview]]]) -> None:
        """Send what :meth:`submit` gathered, in as few ``sendmsg`` as it takes (a
        request gathered before the connection was lost was answered then: dropped)."""
        with self._lock:
            sock, generation = self._sock, self._generation
        parts = [part for made, request in batch if made == generation for part in request]
        if parts:
            self._send(sock, generation, parts)

    def _send(self, sock: socket.socket, generation: int,
              parts: list[bytes | memoryview]) -> None:
        flushes: list[_Op] = []
        try:
            with self._send_lock:
                for at in range(0, len(parts), _IOV_MAX):
                    self._sendmsg(sock, parts[at:at + _IOV_MAX], flushes)
        except OSError as exc:
            # A reader sees the same loss; whoever comes first answers what was in flight.
            self._lost(generation, f"sending failed: {exc.strerror or exc}")
        self._flush_after(flushes)

    def _sendmsg(self, sock: socket.socket, parts: list[bytes | memoryview],
                 flushes: list[_Op]) -> None:
        """Send every byte of ``parts``; while the socket is full, read replies (the
        server may be waiting for us to, before it reads more requests)."""
        total = sum(len(part) for part in parts)
        while True:
            try:
                sent = sock.sendmsg(parts)
            except BlockingIOError:
                sent = 0
            if sent == total:
                return
            while sent:  # drop what went out
                if sent >= len(parts[0]):
                    sent -= len(parts[0])
                    total -= len(parts[0])
                    parts = parts[1:]
                else:
                    parts = [memoryview(parts[0])[sent:], *parts[1:]]
                    total -= sent
                    sent = 0
            flushes += self.drain()
            fd = sock.fileno()
            if fd < 0:  # the drain found the connection lost, and closed it
                raise OSError(errno.EPIPE, "the connection was lost")
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLOUT)
            poller.poll(1000)

    # ---------------------------------------------------------------- replies

    def pump(self) -> None:
        """Read and answer what the server sent (never waiting for it)."""
        self._flush_after(self.drain())

    def drain(self) -> list[_Op]:
        """Read the socket until it has nothing more, answering each request whose reply
        is complete; the requests that now need their FLUSH (sent by the caller, once no
        lock is held)."""
        flushes: list[_Op] = []
        with self._read_lock:
            lock, ops = self._lock, self._ops
            client, sock, generation = self._client, self._sock, self._generation
            if not self.connected:
                return flushes
            buffer, view = self._buffer, self._view
            try:
                while True:
                    try:
                        n = sock.recv_into(buffer)
                    except BlockingIOError:
                        return flushes
                    if not n:
                        self._lost(generation, "the server closed the connection")
                        return flushes
                    landed: list[tuple[Any, _Op, int]] = []
                    with lock:
                        if generation != self._generation:
                            return flushes
                        client.receive_data(view[:n])
                        while (event := client.next_event()) is not None:
                            cookie = event.cookie
                            if type(event) is Done:
                                op, base = ops.pop(cookie)
                            else:
                                op, base = ops[cookie]
                            landed.append((event, op, base))
                    for event, op, base in landed:
                        if _deliver(self, event, op, base):
                            flushes.append(op)
                    if n < len(buffer):
                        # The socket had no more (nearly always): asking again would cost
                        # a system call; the epoll set is level-triggered if more came.
                        return flushes
            except ProtocolError as exc:
                self._lost(generation, f"the server broke the protocol: {exc}")
            except OSError as exc:
                self._lost(generation, f"the connection failed: {exc.strerror or exc}")
        return flushes

    def wait(self, op: _SyncOp) -> None:
        """Wait for ``op``, reading the replies meanwhile (another thread may be reading
        them: then it answers ``op``, and this one sees it within ``_WAIT_STEP``)."""
        event = op.event
        poller = select.poll()
        registered = -1
        while not event.is_set():
            self.pump()
            if event.is_set():
                break
            with self._lock:
                fd = self._sock.fileno() if self.connected else -1
            if fd < 0:
                event.wait(_WAIT_STEP)  # the loss answered it, or is about to
                continue
            if fd != registered:
                if registered >= 0:
                    poller.unregister(registered)
                poller.register(fd, select.POLLIN)
                registered = fd
            poller.poll(_WAIT_STEP * 1000)
        if op.error is not None:
            raise op.error

    def _flush_after(self, ops: list[_Op]) -> None:
        """A write-through write without FUA is answered after a FLUSH."""
        for op in ops:
            op.flush_after = False
            self.submit(op, ((_FLUSH, 0, 0, 0, 0),))

    # ---------------------------------------------------------------- losing, reconnecting

    def _lost(self, generation: int, reason: str) -> None:
        """The connection ``generation`` is gone: answer what it had in flight (IOERR),
        close it, and dial again in the background (unless closing)."""
        with self._lock:
            if generation != self._generation or not self.connected:
                return
            self.connected = False
            self._generation += 1
            sock, ops = self._sock, self._ops
            self._ops = {}
            self._client.fail_all()
            for epoll in self._watchers:
                with contextlib.suppress(OSError):
                    epoll.unregister(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if not self._closing.is_set():
            log.error("NBD server %s: %s; %d request(s) in flight answered IOERR, "
                      "reconnecting", self.uri.where, reason, len(ops))
        failed = OSError(errno.EIO, f"NBD server {self.uri.where}: {reason}")
        for op, _ in ops.values():
            _set_error(op, failed)
            op.remaining -= 1
            if op.remaining == 0:
                op.finish()
        if not self._closing.is_set():
            self._reconnector = threading.Thread(target=self._reconnect,
                                                 name="virtblk-nbd-reconnect", daemon=True)
            self._reconnector.start()

    def _reconnect(self) -> None:
        delay = RECONNECT_FIRST
        failure = ""
        while not self._closing.wait(delay):
            try:
                sock, export = self._dial()
            except NbdError as exc:
                if str(exc) != failure:
                    log.warning("%s; trying again", exc)
                    failure = str(exc)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            old = self.export
            if export.size != old.size:
                log.warning("NBD server %s: the export now has %d bytes (was %d)",
                            self.uri.where, export.size, old.size)
            if export.read_only and not old.read_only:
                log.warning("NBD server %s: the export is read-only now; writes fail",
                            self.uri.where)
            with self._lock:
                if self._closing.is_set():
                    sock.close()
                    return
                self.export, self._sock = export, sock
                self._client = ClientConnection(export)
                self.connected = True
                for epoll in self._watchers:
                    _watch_socket(epoll, sock)
            log.warning("NBD server %s: connected again", self.uri.where)
            return

    def close(self) -> None:
        """Disconnect (``NBD_CMD_DISC``), stop reconnecting; what is in flight fails."""
        self._closing.set()
        with self._lock:
            connected, sock, generation = self.connected, self._sock, self._generation
            client = self._client
        if connected:
            with contextlib.suppress(OSError), self._send_lock:
                sock.send(client.disconnect())
            self._lost(generation, "closed")
        reconnector = self._reconnector
        if reconnector is not None and reconnector is not threading.current_thread():
            reconnector.join(_CLOSE_TIMEOUT)


def _watch_socket(epoll: select.epoll, sock: socket.socket) -> None:
    """A queue's epoll set wakes its thread when replies come (one queue's thread only,
    when several wait: whoever reads answers them all)."""
    epoll.register(sock, select.EPOLLIN | select.EPOLLEXCLUSIVE)


def _set_error(op: _Op, error: OSError) -> None:
    if op.error is None:
        op.error = error


def _slice(buffers: Sequence[memoryview], at: int, length: int) -> list[memoryview]:
    """``length`` bytes from ``at`` in the buffers taken end to end, as views."""
    if len(buffers) == 1 and at == 0 and len(buffers[0]) == length:
        return [buffers[0]]
    out = []
    for buf in buffers:
        n = len(buf)
        if at >= n:
            at -= n
            continue
        take = min(n - at, length)
        out.append(buf[at:at + take])
        length -= take
        at = 0
        if not length:
            break
    return out


def _deliver(link: _Link, event: Any, op: _Op, base: int) -> bool:
    """One reply event for a piece of ``op``; True when ``op`` now needs its FLUSH."""
    if type(event) is ReadData:
        into = op.into
        assert into is not None
        data = event.data
        at = base + event.offset
        if len(into) == 1:
            into[0][at:at + len(data)] = data
        else:
            scatter(data, _slice(into, at, len(data)))
        return False
    if type(event) is ReadHole:
        assert op.into is not None
        scatter(b"", _slice(op.into, base + event.offset, event.length))  # zeros
        return False
    if event.error:
        code = event.error
        said = f": {event.message}" if event.message else ""
        _set_error(op, OSError(code, f"NBD server {link.uri.where}: "
                               f"{os.strerror(code)}{said}"))
    op.remaining -= 1
    if op.remaining:
        return False
    if op.flush_after and op.error is None:
        return True
    op.finish()
    return False


class NbdBackend(Backend):
    """An NBD export (see the module docstring).  ``uri`` is ``nbd://HOST[:PORT]/EXPORT``
    or ``nbd+unix:///EXPORT?socket=PATH``; ValueError for a bad one, ``NbdError`` (one
    line) when the export cannot be reached or negotiated."""

    blocking = True

    def __init__(self, uri: str, *, read_only: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        self._uri_text = uri
        self._link = _Link(parse_uri(uri), connect_timeout)
        export = self._link.export
        if export.size % 512:
            log.warning("%s: the export's %d bytes are not whole 512-byte sectors; the last "
                        "%d bytes are not served", uri, export.size, export.size % 512)
        super().__init__(export.size, read_only=read_only or export.read_only)

    @property
    def uri(self) -> str:
        """The export's URI as given."""
        return self._uri_text

    @property
    def export(self) -> Export:
        """What the current (or last) connection negotiated."""
        return self._link.export

    @property
    def connected(self) -> bool:
        """Whether a connection is up now (False while reconnecting)."""
        return self._link.connected

    def offloader(self, index: int, depth: int) -> Offloader | None:
        """The queue's reads and writes as NBD requests on the shared connection."""
        return NbdQueue(self)

    # ---------------------------------------------------------------- building requests

    def _check_writable(self) -> None:
        if self._read_only:
            raise OSError(errno.EROFS, f"NBD export {self._uri_text} is read-only")

    def _write_mode(self, fua: bool) -> tuple[int, bool]:
        """The write flags, and whether a FLUSH must follow: a durable write is FUA when
        the export takes it, else a write and a flush."""
        if not (fua or not self._writeback):
            return 0, False
        export = self._link.export
        if export.can(TransmissionFlag.SEND_FUA):
            return _FUA, False
        return 0, export.can(TransmissionFlag.SEND_FLUSH)

    def transfer(self, op: _Op, write: bool, buffers: Sequence[memoryview], offset: int,
                 length: int, flags: int,
                 batch: list[tuple[int, list[bytes | memoryview]]] | None = None) -> None:
        """Send (or add to ``batch``) a read or write of ``length`` bytes, split at the
        export's maximum payload."""
        command = _WRITE if write else _READ
        step = self._link.export.max_payload
        if length <= step:
            pieces: list[tuple[int, int, int, int, int]] = [
                (command, offset, length, flags, 0)]
        else:
            pieces = [(command, offset + at, min(step, length - at), flags, at)
                      for at in range(0, length, step)]
        self._link.submit(op, pieces, buffers if write else None, batch)

    def _sync(self, op: _SyncOp, pieces: Sequence[tuple[int, int, int, int, int]],
              payload: Sequence[memoryview] | None = None) -> None:
        self._link.submit(op, pieces, payload)
        self._link.wait(op)

    # ---------------------------------------------------------------- the Backend calls

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        total = sum(len(buf) for buf in buffers)
        op = _SyncOp(buffers)
        self.transfer(op, False, buffers, offset, total, 0)
        self._link.wait(op)
        return total

    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        self._check_writable()
        total = sum(len(buf) for buf in buffers)
        flags, flush_after = self._write_mode(fua)
        op = _SyncOp(None, flush_after)
        self.transfer(op, True, buffers, offset, total, flags)
        self._link.wait(op)
        return total

    def flush(self) -> None:
        """FLUSH; nothing for an export without SEND_FLUSH (no cache to flush)."""
        if self._link.export.can(TransmissionFlag.SEND_FLUSH):
            self._sync(_SyncOp(None), ((_FLUSH, 0, 0, 0, 0),))

    def _ranges(self, command: int, offset: int, length: int, flags: int,
                step: int) -> list[tuple[int, int, int, int, int]]:
        return [(command, offset + at, min(step, length - at), flags, 0)
                for at in range(0, length, step)]

    def discard(self, offset: int, length: int) -> None:
        """TRIM; nothing for an export without SEND_TRIM (a discard is advisory)."""
        self._check_writable()
        if self._link.export.can(TransmissionFlag.SEND_TRIM):
            flags, flush_after = self._write_mode(False)
            self._sync(_SyncOp(None, flush_after),
                       self._ranges(_TRIM, offset, length, flags, _ZERO_CHUNK))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """WRITE_ZEROES (``NO_HOLE`` unless ``unmap``); zeros written for an export that
        does not take it."""
        self._check_writable()
        flags, flush_after = self._write_mode(False)
        if self._link.export.can(TransmissionFlag.SEND_WRITE_ZEROES):
            flags |= 0 if unmap else _NO_HOLE
            self._sync(_SyncOp(None, flush_after),
                       self._ranges(_WRITE_ZEROES, offset, length, flags, _ZERO_CHUNK))
        else:
            self._write_zero_bytes(offset, length, flags, flush_after)

    def _write_zero_bytes(self, offset: int, length: int, flags: int,
                          flush_after: bool) -> None:
        step = min(self._link.export.max_payload, 1 << 20, length)
        zeros = memoryview(bytes(step))
        for at in range(0, length, step):
            n = min(step, length - at)
            self._sync(_SyncOp(None, flush_after), ((_WRITE, offset + at, n, flags, 0),),
                       (zeros[:n],))

    def secure_erase(self, offset: int, length: int) -> None:
        """Zeros written over the range (not a zeroing command, which may only drop
        extents), then FLUSH."""
        self._check_writable()
        self._write_zero_bytes(offset, length, 0, False)
        self.flush()

    # ---------------------------------------------------------------- size, closing

    def current_size(self) -> int | None:
        """The export's size as the current connection says (a server restarted with a
        resized image shows here; the device follows it)."""
        return self._link.export.size

    def resize(self, new_size: int) -> None:
        """NBD exports are resized on their server; this one follows."""
        raise ValueError("an NBD export is resized on its server (the device follows when "
                         "it reconnects), not through the device")

    def close(self) -> None:
        """Disconnect from the server."""
        self._link.close()


class NbdQueue:
    """One queue's reads and writes as NBD requests on the backend's connection (an
    ``Offloader``), sent and answered on the queue's thread: its loop sleeps on
    ``wait_fd``, an epoll set of the socket and ``event_fd`` (written when another thread
    read this queue's answers), and ``has_done`` reads the socket."""

    def __init__(self, backend: NbdBackend) -> None:
        self._backend = backend
        self._link = backend._link
        self._done: collections.deque[tuple[Token, BaseException | None]] = (
            collections.deque())
        self.event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self.event_fd, select.EPOLLIN)
        self.wait_fd = self._epoll.fileno()
        self._link.watch(self._epoll)
        self.in_flight = 0
        self._owner = -1
        """The queue's thread (its answers land without a wakeup)."""
        self._signalled = False
        self._lock = threading.Lock()
        self._batch: list[tuple[int, list[bytes | memoryview]]] = []
        """Requests submitted and not yet sent (``flush`` sends them)."""

    def land(self, answer: tuple[Token, BaseException | None]) -> None:
        """An answer, read on any thread; another thread wakes the queue's (once per
        take)."""
        with self._lock:
            done = self._done
            done.append(answer)
            if (not self._signalled and self.event_fd >= 0
                    and threading.get_ident() != self._owner):
                self._signalled = True
                os.eventfd_write(self.event_fd, 1)

    def submit(self, write: bool, buf: memoryview, offset: int, token: Token) -> None:
        """Send the read or write of one buffer."""
        self.submitv(write, [buf], offset, token)

    def submitv(self, write: bool, buffers: list[memoryview], offset: int,
                token: Token) -> None:
        """Send the read or write of several buffers (one NBD request, split only above
        the export's maximum payload)."""
        self._owner = threading.get_ident()
        self.in_flight += 1
        backend = self._backend
        flags, flush_after = backend._write_mode(False) if write else (0, False)
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        op = _QueueOp(self, token, None if write else buffers, flush_after)
        backend.transfer(op, write, buffers, offset, length, flags, self._batch)

    def flush(self) -> None:
        """Send the requests of the batch the loop just submitted: one ``sendmsg`` (a
        system call, and a wakeup of the server, per request was 44 % of the device's
        CPU at depth 32)."""
        batch = self._batch
        if batch:
            self._batch = []
            self._link.send_batch(batch)

    @property
    def has_done(self) -> bool:
        """Whether answers are waiting to be taken (the socket is read first: also when
        nothing is in flight, so that a server hanging up is seen, and the epoll set that
        woke the loop for it is quiet again)."""
        if self._batch:  # the loop always flushes; unless a bug cut a round short
            self.flush()
        if not self._done:
            self._link.pump()
        return bool(self._done)

    seen_done = has_done

    def take(self) -> list[tuple[Token, BaseException | None]]:
        """The answers so far: ``(token, None)`` or ``(token, StorageError)``."""
        with self._lock:
            done, self._done = self._done, collections.deque()
            if self._signalled:
                self._signalled = False
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.event_fd)
        self.in_flight -= len(done)
        return list(done)

    def close(self) -> None:
        """Release the epoll set and the eventfd (the queue's loop took every answer:
        nothing is in flight)."""
        self._link.unwatch(self._epoll)
        self._epoll.close()
        with self._lock:
            fd, self.event_fd = self.event_fd, -1
        if fd >= 0:
            os.close(fd)
