"""The asyncio shell around ``virtblk.nbd.server``: sockets in, the disk's requests out.

One event loop serves every client; the protocol decisions are the sans-IO
``ServerConnection``'s, and this module only moves bytes and runs requests:

* Each client is given one ``AsyncDisk`` over one hardware queue, round robin, so that
  clients on a multi-queue device do not share a ring.
* A client's requests run concurrently (a task each, as they arrive), and each reply is
  sent when its request completes: NBD clients pipeline (qemu-img, nbdcopy and fio keep
  many requests in flight), and proto.md allows replies in any order.  At most
  ``MAX_IN_FLIGHT`` requests and ``MAX_BYTES_IN_FLIGHT`` of reads and writes per client:
  beyond that the client's socket is not read until replies go out (a client sending
  32 MiB writes as fast as it can is held to a few of them).
* A read lands in a ``Disk.buffer`` (shared memory the device writes directly) and is
  sent from there: no copy on our side; the buffer goes back to a pool once the kernel
  has every byte.  A write's payload is copied once into such a buffer.  Replies that
  complete together leave together, in one ``sendmsg`` (a writer task per client).  When
  shared memory runs short a private buffer stands in (the disk bounces it).
* Stopping (``stop()``, SIGINT/SIGTERM in the command): the listener closes, every
  connection answers new options and requests with ``ERR_SHUTDOWN``/ESHUTDOWN, requests
  in flight finish and are answered, then the connections close (proto.md: "the server
  SHOULD wait for inflight requests to be serviced prior to initiating a hard
  disconnect").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Sequence

from virtblk.aio import AsyncDisk
from virtblk.driver.disk import Disk
from virtblk.errors import DeviceGoneError, FeatureNotNegotiatedError
from virtblk.nbd.server import (
    CLOSED,
    NEED_DATA,
    Aborted,
    Answered,
    Disconnect,
    Export,
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
    nbd_errno,
)
from virtblk.nbd.wire import Command, Errno, Option, OptionReply
from virtblk.tools.nbd.address import ListenAddress

__all__ = ["MAX_BYTES_IN_FLIGHT", "MAX_IN_FLIGHT", "NbdServer", "ServerStats"]

log = logging.getLogger("virtblk.nbd")

MAX_IN_FLIGHT = 64
"""Requests one client may have in flight before we stop reading its socket."""

MAX_BYTES_IN_FLIGHT = 64 << 20
"""Bytes of reads and writes one client may have in flight before we stop reading it."""

RECV_SIZE = 256 << 10
"""Bytes asked of the socket per read (a few large writes, or many small requests)."""

POOL_LIMIT = 64 << 20
"""Shared-memory bytes kept for reuse between requests (of the driver's 256 MiB)."""

_IOV_MAX = 1024
"""Buffers one ``sendmsg`` takes at most (Linux's UIO_MAXIOV)."""

STOP_GRACE = 30.0
"""How long ``stop`` waits for requests in flight before closing connections anyway."""


@dataclasses.dataclass
class ServerStats:
    """What the server did, for the log line at exit."""

    clients: int = 0
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    refused: int = 0
    violations: int = 0
    failure: str | None = None
    """Why the server stopped on its own (the device went away), if it did."""


class NbdServer:
    """Serve ``export`` of ``disk`` on ``address`` until ``stop()``.

    ``disks`` are the disk's asyncio faces, one per hardware queue the server may use;
    the caller owns them and the disk (``run`` closes neither).
    """

    def __init__(self, disk: Disk, disks: Sequence[AsyncDisk], export: Export,
                 address: ListenAddress) -> None:
        if not disks:
            raise ValueError("an NBD server needs at least one AsyncDisk")
        self.disk = disk
        self.export = export
        self.address = address
        self.stats = ServerStats()
        self._disks = list(disks)
        self._next_disk = itertools.cycle(self._disks)
        self._clients: set[_Client] = set()
        self._listener: socket.socket | None = None
        self._stopping = asyncio.Event()
        self._numbers = itertools.count(1)
        self.buffers = _BufferPool(disk)
        """Shared memory for reads and writes, reused between requests."""

    @property
    def queues(self) -> int:
        """Hardware queues the clients are spread over."""
        return len(self._disks)

    def listen(self) -> socket.socket:
        """Bind and listen (before ``run``, so the caller reports a bad address at once)."""
        addr = self.address
        if addr.path is not None:
            _remove_stale_socket(addr.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = addr.path
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            target = (addr.host, addr.port)
        try:
            sock.bind(target)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
        sock.setblocking(False)
        self._listener = sock
        if addr.path is None:  # port 0: the kernel chose one
            self.address = dataclasses.replace(addr, port=sock.getsockname()[1])
        return sock

    async def run(self) -> None:
        """Accept clients until ``stop()``; then let every client finish (see the module
        docstring) and close the listener."""
        if self._listener is None:
            self.listen()
        listener = self._listener
        assert listener is not None
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(self._accept_loop(loop, listener))
        try:
            await self._stopping.wait()
        finally:
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept
            listener.close()
            if self.address.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address.path)
            clients = list(self._clients)
            for client in clients:
                client.shutdown()
            if clients:
                _, pending = await asyncio.wait(
                    [asyncio.ensure_future(c.finished.wait()) for c in clients],
                    timeout=STOP_GRACE)
                for waiter in pending:
                    waiter.cancel()
                for client in list(self._clients):
                    client.close("the server stopped")
            self.buffers.clear()

    def stop(self) -> None:
        """Begin stopping (safe from a signal handler on the loop)."""
        self._stopping.set()

    def fail(self, why: str) -> None:
        """The device is gone: nothing can be served any more, so stop (the clients get
        ESHUTDOWN for what they send next) and say why."""
        if self.stats.failure is None:
            self.stats.failure = why
            log.error("stopping: %s", why)
        self.stop()

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop,
                           listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: say so, keep serving
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            number = next(self._numbers)
            name = f"client {number}" + (f" ({peer[0]}:{peer[1]})" if peer else "")
            client = _Client(self, sock, next(self._next_disk), name)
            self._clients.add(client)
            self.stats.clients += 1
            client.start()

    def _forget(self, client: _Client) -> None:
        self._clients.discard(client)


def _remove_stale_socket(path: str) -> None:
    """Make room for our listener at ``path``: a socket nobody listens on any more is
    removed; a live one, or any other file, is refused (OSError naming it)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left behind by a server that is gone
            return
    raise OSError(errno.EADDRINUSE, f"another server listens on {path}")


class _Client:
    """One connection: a reader task feeding the state machine, a task per request, and a
    writer task that sends the replies completed meanwhile together."""

    def __init__(self, server: NbdServer, sock: socket.socket, disk: AsyncDisk,
                 name: str) -> None:
        self.server = server
        self.sock = sock
        self.disk = disk
        self.name = name
        self.conn = ServerConnection([server.export])
        self.finished = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._bytes = 0  # of the reads and writes in flight
        self._room = asyncio.Event()  # set while under both in-flight limits
        self._room.set()
        self._outbox: list[bytes | memoryview] = []
        self._release: list[memoryview] = []  # buffers to give back once sent
        self._wake = asyncio.Event()  # the outbox has something
        self._idle = asyncio.Event()  # the outbox is empty and nothing is being sent
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._draining = False  # no more requests: close when the last one is answered

    def start(self) -> None:
        self._post(self.conn.data_to_send())
        self._writer = self._loop.create_task(self._write_loop())
        self._reader = self._loop.create_task(self._read_loop())

    def shutdown(self) -> None:
        """The server stops: refuse what comes next, finish what is in flight."""
        self.conn.shutdown()
        self._pump()
        self._drain("the server is stopping")

    async def _read_loop(self) -> None:
        try:
            while not self._closed and not self._draining:
                await self._room.wait()
                data = await self._loop.sock_recv(self.sock, RECV_SIZE)
                self.conn.receive_data(data)
                self._pump()
                if not data:
                    break
        except OSError as exc:
            self.close(f"connection failed: {exc}")

    def _pump(self) -> None:
        """Take every event the state machine has, up to the in-flight limit."""
        conn = self.conn
        while self._has_room() and not self._closed:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if event is CLOSED:
                self._drain("the client closed the connection")
                break
            if isinstance(event, Request):
                self.server.stats.requests += 1
                if isinstance(event, (Read, Write)):
                    self._bytes += event.length
                task = self._loop.create_task(self._serve(event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(event, Answered):
                self.server.stats.refused += event.error != 0
                if event.error:
                    log.info("%s: %s refused: %s (%s)", self.name, _command_name(event.command),
                             Errno(event.error).name, event.message)
            elif isinstance(event, OptionAnswered):
                log.debug("%s: option %s answered %s %s", self.name, _option_name(event.option),
                          _reply_name(event.reply), event.message)
            elif isinstance(event, Negotiated):
                log.info("%s: transmission on export %r (flags %#x%s%s)", self.name,
                         event.export.name, int(event.flags),
                         ", structured replies" if event.structured_replies else "",
                         ", block sizes agreed" if event.block_sizes_agreed else "")
            elif isinstance(event, Disconnect):
                self._drain("the client disconnected")
                break
            elif isinstance(event, Aborted):
                self._drain("the client aborted the handshake")
                break
            elif isinstance(event, ProtocolViolation):
                self.server.stats.violations += 1
                log.warning("%s: protocol violation, disconnecting: %s", self.name, event.reason)
                self._drain(event.reason)
                break
        self._post(conn.data_to_send())
        if not self._has_room():
            self._room.clear()

    async def _serve(self, request: Request) -> None:
        """Run one request on the disk and queue its reply."""
        disk = self.disk
        conn = self.conn
        try:
            if isinstance(request, Read):
                await self._read(request)
                return
            if isinstance(request, Write):
                await self._write(request)
            elif isinstance(request, WriteZeroes):
                await disk.write_zeroes(request.offset, request.length,
                                        unmap=not request.no_hole)
            elif isinstance(request, Trim):
                await disk.discard(request.offset, request.length)
            if request.fua or isinstance(request, Flush):
                await disk.flush()
            reply = conn.reply(request)
        except DeviceGoneError as exc:
            reply = conn.reply(request, Errno.EIO, str(exc))
            self.server.fail(str(exc))
        except OSError as exc:
            reply = conn.reply(request, nbd_errno(exc.errno or errno.EIO), str(exc))
        except (ValueError, FeatureNotNegotiatedError) as exc:
            # The device changed under the export (a resize, a feature gone on reconnect).
            reply = conn.reply(request, Errno.EINVAL, str(exc))
        except Exception as exc:  # a driver fault: this request fails, the server goes on
            log.error("%s: %s failed: %r", self.name, type(request).__name__, exc)
            reply = conn.reply(request, Errno.EIO, f"internal error: {exc}")
        self._post(reply)
        self._answered(request)

    async def _read(self, request: Read) -> None:
        """Read into shared memory and queue header and buffer as they are: the buffer goes
        back to the pool once the writer has sent it."""
        buf = self.server.buffers.get(request.length)
        try:
            await self.disk.readinto(buf, request.offset)
        except Exception as exc:  # the request fails, the server goes on (as in _serve)
            if isinstance(exc, DeviceGoneError):
                self.server.fail(str(exc))
            self.server.buffers.put(buf)
            if isinstance(exc, OSError):
                code = nbd_errno(exc.errno or errno.EIO)
            elif isinstance(exc, ValueError):
                code = Errno.EINVAL
            else:
                log.error("%s: Read failed: %r", self.name, exc)
                code = Errno.EIO
            self._post(self.conn.reply(request, code, str(exc)))
        else:
            self.server.stats.bytes_read += request.length
            self._post(*self.conn.read_reply(request, buf), release=buf)
        self._answered(request)

    async def _write(self, request: Write) -> None:
        """Copy the payload into a pooled shared buffer (the one copy a bounce would make
        anyway, without its allocation) and write it from there."""
        buf = self.server.buffers.get(request.length)
        try:
            buf[:] = request.data
            await self.disk.write(buf, request.offset)
        finally:
            self.server.buffers.put(buf)
        self.server.stats.bytes_written += request.length

    def _has_room(self) -> bool:
        return self.conn.in_flight < MAX_IN_FLIGHT and self._bytes < MAX_BYTES_IN_FLIGHT

    def _answered(self, request: Request) -> None:
        if isinstance(request, (Read, Write)):
            self._bytes -= request.length
        if self._has_room() and not self._room.is_set():
            self._room.set()
            self._pump()  # requests already received may wait in the state machine
        if self._draining and self.conn.in_flight == 0:
            self._close_soon("done")

    def _post(self, *chunks: bytes | memoryview, release: memoryview | None = None) -> None:
        """Queue ``chunks`` for the writer; ``release`` goes back to the pool once sent."""
        if self._closed:
            if release is not None:
                self.server.buffers.put(release)
            return
        self._outbox.extend(c for c in chunks if len(c))
        if release is not None:
            self._release.append(release)
        if self._outbox:
            self._idle.clear()
            self._wake.set()

    async def _write_loop(self) -> None:
        """Send what was queued since the last round with one ``sendmsg`` (the replies that
        completed together leave together); the rest, if the socket is full, as it drains."""
        sock = self.sock
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    chunks, self._outbox = self._outbox[:_IOV_MAX], self._outbox[_IOV_MAX:]
                    release: list[memoryview] = []
                    if not self._outbox:
                        release, self._release = self._release, []
                    try:
                        sent = sock.sendmsg(chunks)
                    except BlockingIOError:
                        sent = 0
                    for chunk in chunks:
                        if sent >= len(chunk):
                            sent -= len(chunk)
                            continue
                        await self._loop.sock_sendall(sock, memoryview(chunk)[sent:])
                        sent = 0
                    for buf in release:
                        self.server.buffers.put(buf)
                self._idle.set()
        except OSError as exc:  # the client went away: nothing more to tell it
            self.close(f"send failed: {exc}")

    def _drain(self, why: str) -> None:
        """Read no more; close once every request in flight is answered."""
        if self._draining:
            return
        self._draining = True
        log.info("%s: %s", self.name, why)
        if self.conn.in_flight == 0:
            self._close_soon(why)

    def _close_soon(self, why: str) -> None:
        task = self._loop.create_task(self._close_when_sent(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_when_sent(self, why: str) -> None:
        await self._idle.wait()
        self.close(why)

    def close(self, why: str) -> None:
        if self._closed:
            return
        self._closed = True
        log.debug("%s: closed (%s)", self.name, why)
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not current:
                task.cancel()
        for buf in self._release:
            self.server.buffers.put(buf)
        self._release.clear()
        self._outbox.clear()
        self.sock.close()
        self.server._forget(self)
        self.finished.set()


class _BufferPool:
    """Shared-memory buffers (``Disk.buffer``) kept for reuse by size: a read or write of
    a size seen before costs no allocation and no registration.  Up to ``limit`` bytes are
    kept; when shared memory runs out, a private buffer stands in (the disk then bounces)."""

    def __init__(self, disk: Disk, limit: int = POOL_LIMIT) -> None:
        self._disk = disk
        self._free: dict[int, list[memoryview]] = {}
        self._kept = 0
        self._limit = limit

    def get(self, size: int) -> memoryview:
        free = self._free.get(size)
        if free:
            self._kept -= size
            return free.pop()
        try:
            return self._disk.buffer(size)
        except MemoryError:
            self.clear()  # give what is kept back to the allocator, then try once more
            try:
                return self._disk.buffer(size)
            except MemoryError:
                return memoryview(bytearray(size))

    def put(self, buf: memoryview) -> None:
        if self._disk.buffer_address(buf) is None:
            return  # a private stand-in
        size = len(buf)
        if self._kept + size <= self._limit:
            self._free.setdefault(size, []).append(buf)
            self._kept += size
        else:
            self._disk.free_buffer(buf)

    def clear(self) -> None:
        for bufs in self._free.values():
            for buf in bufs:
                self._disk.free_buffer(buf)
        self._free.clear()
        self._kept = 0


def _command_name(command: int) -> str:
    try:
        return f"NBD_CMD_{Command(command).name}"
    except ValueError:
        return f"command {command}"


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return f"option {option}"


def _reply_name(reply: int) -> str:
    try:
        return OptionReply(reply).name
    except ValueError:
        return str(reply)
