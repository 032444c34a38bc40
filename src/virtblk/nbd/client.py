"""The client end of NBD, sans-IO: bytes in, typed events out (h11's way).

Two objects, one per phase of ``doc/proto.md``:

* :class:`ClientHandshake` negotiates one export: fixed newstyle (``NO_ZEROES`` when
  offered), ``NBD_OPT_STRUCTURED_REPLY``, then ``NBD_OPT_GO`` asking for
  ``NBD_INFO_BLOCK_SIZE``; a server that does not know ``GO`` gets ``NBD_OPT_EXPORT_NAME``,
  as does an old one without fixed newstyle.  It ends in an :class:`Export` or raises a
  :class:`HandshakeError` whose text is one line for the user (no such export, TLS
  required, not an NBD server...).
* :class:`ClientConnection` is the transmission phase: :meth:`~ClientConnection.request`
  encodes a command (checked against what the export allows) and remembers its cookie;
  :meth:`~ClientConnection.receive_data` and :meth:`~ClientConnection.next_event` turn the
  server's replies, simple or structured, into :class:`ReadData`, :class:`ReadHole` and
  :class:`Done` events.  Everything the server sends is checked (magic, cookie, chunk
  types, lengths, a read's chunks inside its range, not overlapping and covering it): a
  violation raises :class:`ProtocolError`, after which the connection cannot be trusted
  and must be dropped (proto.md: a hard disconnect).

Neither touches a socket; ``virtblk.device.nbd`` is the shell that does.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from virtblk.nbd.wire import (
    CLIENT_FLAGS,
    CLISERV_MAGIC,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REP_FLAG_ERROR,
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

DEFAULT_MAX_PAYLOAD = 1 << 25
"""proto.md: without ``NBD_INFO_BLOCK_SIZE``, reads and writes of up to 32 MiB."""

MAX_OPTION_REPLY = 1 << 16
"""The longest option reply payload we take (infos and error messages are short)."""

_ZEROES = 124
"""Bytes of zeros after ``NBD_OPT_EXPORT_NAME``'s answer, unless ``NO_ZEROES``."""

_MAX_ERROR_CHUNK = ERROR_CHUNK.size + MAX_STRING + 8
"""The longest error chunk (``ERROR_OFFSET`` with a message of the longest string)."""


class NbdError(Exception):
    """Something about an NBD server that the user must hear, in one line."""


class HandshakeError(NbdError):
    """The handshake failed: the server is not NBD, refused the export, wants TLS..."""


class NotNbdError(HandshakeError):
    """The peer is not an NBD server we can talk to."""


class TlsRequiredError(HandshakeError):
    """The server insists on TLS, which we do not speak."""


class UnknownExportError(HandshakeError):
    """The server has no export of that name."""


class ProtocolError(NbdError):
    """The server broke the protocol in the transmission phase: drop the connection."""


@dataclasses.dataclass(frozen=True, slots=True)
class Export:
    """What the handshake agreed on."""

    name: str
    size: int
    flags: TransmissionFlag
    structured_replies: bool
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD

    @property
    def read_only(self) -> bool:
        """The server refuses writes."""
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    def can(self, flag: TransmissionFlag) -> bool:
        """Whether the export advertises ``flag`` (SEND_FLUSH, SEND_FUA, SEND_TRIM...)."""
        return bool(self.flags & flag)


class _Step(enum.Enum):
    GREETING = enum.auto()
    STRUCTURED = enum.auto()
    GO = enum.auto()
    EXPORT_NAME = enum.auto()
    DONE = enum.auto()


class ClientHandshake:
    """Negotiate ``export_name`` (see the module docstring).

    Feed what the server sends to :meth:`receive_data` (``b""`` when it closed the
    connection), send what :meth:`data_to_send` returns, and call :meth:`next_event` until
    it returns the :class:`Export`; None means it needs more bytes.
    """

    def __init__(self, export_name: str, *, structured_replies: bool = True) -> None:
        name = export_name.encode()
        if len(name) > MAX_STRING:
            raise ValueError(f"export name of {len(name)} bytes, at most {MAX_STRING}")
        self._name = export_name
        self._name_bytes = name
        self._want_structured = structured_replies
        self._structured = False
        self._no_zeroes = False
        self._buffer = bytearray()
        self._eof = False
        self._out = bytearray()
        self._step = _Step.GREETING
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._block = (1, 4096, DEFAULT_MAX_PAYLOAD)
        self._export: Export | None = None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""``: it closed the connection."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """What to send to the server now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def leftover(self) -> bytes:
        """Bytes the server sent after the handshake (there should be none)."""
        return bytes(self._buffer)

    # ---------------------------------------------------------------- parsing

    def _take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            if self._eof:
                raise self._closed()
            return None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def _closed(self) -> HandshakeError:
        if self._step is _Step.GREETING:
            return NotNbdError("the server closed the connection before greeting us: not an "
                               "NBD server, or it refuses more clients")
        if self._step is _Step.EXPORT_NAME:
            return UnknownExportError(
                f"the server closed the connection when asked for export {self._name!r}: "
                "it has no such export, or refused it")
        return HandshakeError("the server closed the connection during the handshake")

    def next_event(self) -> Export | None:
        """The negotiated export once the handshake is over; None while it needs data."""
        while True:
            step = self._step
            if step is _Step.DONE:
                return self._export
            if step is _Step.GREETING:
                if not self._greeting():
                    return None
            elif step is _Step.EXPORT_NAME:
                if not self._export_name_reply():
                    return None
            elif not self._option_reply():
                return None

    def _greeting(self) -> bool:
        head = self._peek_greeting()
        if head is None:
            return False
        magic, style, flags = SERVER_GREETING.unpack(head)
        assert magic == NBDMAGIC and style != CLISERV_MAGIC  # _peek_greeting judged them
        if style != IHAVEOPT:
            raise NotNbdError(f"the server's handshake magic is {style:#x}, neither newstyle "
                              "nor oldstyle NBD")
        server = HandshakeFlag(flags & 0xFFFF)
        fixed = bool(server & HandshakeFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(server & HandshakeFlag.NO_ZEROES)
        client = ClientFlag(0)
        if fixed:
            client |= ClientFlag.FIXED_NEWSTYLE
        if self._no_zeroes:
            client |= ClientFlag.NO_ZEROES
        self._out += CLIENT_FLAGS.pack(client)
        if not fixed:
            # Plain newstyle: the only option such a server is sure to take.
            self._send_export_name()
        elif self._want_structured:
            self._send_option(Option.STRUCTURED_REPLY, b"")
            self._step = _Step.STRUCTURED
        else:
            self._send_go()
        return True

    def _peek_greeting(self) -> bytes | None:
        # Judge the magic as soon as 8 bytes are in: a server that is not NBD may send
        # fewer than a greeting's 18 and wait for us.
        buf = self._buffer
        if len(buf) >= 8 and int.from_bytes(buf[:8], "big") != NBDMAGIC:
            raise NotNbdError(f"the server's first bytes are {bytes(buf[:8])!r}, not "
                              "NBDMAGIC: not an NBD server")
        if len(buf) >= 16 and int.from_bytes(buf[8:16], "big") == CLISERV_MAGIC:
            raise NotNbdError("the server speaks the oldstyle handshake (one export, no "
                              "names), which virtblk does not")
        return self._take(SERVER_GREETING.size)

    def _send_option(self, option: Option, data: bytes) -> None:
        self._out += OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data

    def _send_go(self) -> None:
        name = self._name_bytes
        data = (len(name).to_bytes(4, "big") + name + (1).to_bytes(2, "big")
                + int(Info.BLOCK_SIZE).to_bytes(2, "big"))
        self._send_option(Option.GO, data)
        self._step = _Step.GO

    def _send_export_name(self) -> None:
        self._send_option(Option.EXPORT_NAME, self._name_bytes)
        self._step = _Step.EXPORT_NAME

    def _export_name_reply(self) -> bool:
        need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else _ZEROES)
        data = self._take(need)
        if data is None:
            return False
        size, flags = EXPORT_NAME_REPLY.unpack_from(data)
        self._size, self._flags = size, TransmissionFlag(flags)
        self._finish()
        return True

    def _option_reply(self) -> bool:
        buf = self._buffer
        if len(buf) < OPTION_REPLY_HEADER.size:
            if self._eof:
                raise self._closed()
            return False
        magic, option, reply, length = OPTION_REPLY_HEADER.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise HandshakeError(f"an option reply with magic {magic:#x}: the server broke "
                                 "the handshake")
        sent = Option.STRUCTURED_REPLY if self._step is _Step.STRUCTURED else Option.GO
        if option != sent:
            raise HandshakeError(f"the server answered option {option} to option "
                                 f"{int(sent)} ({sent.name})")
        if length > MAX_OPTION_REPLY:
            raise HandshakeError(f"an option reply of {length} bytes (we take up to "
                                 f"{MAX_OPTION_REPLY})")
        data = self._take(OPTION_REPLY_HEADER.size + length)
        if data is None:
            return False
        payload = data[OPTION_REPLY_HEADER.size:]
        if reply & REP_FLAG_ERROR:
            self._option_error(sent, reply, payload)
        elif self._step is _Step.STRUCTURED:
            if reply != OptionReply.ACK:
                raise HandshakeError(f"the server answered NBD_OPT_STRUCTURED_REPLY with "
                                     f"reply type {reply}")
            self._structured = True
            self._send_go()
        elif reply == OptionReply.INFO:
            self._info(payload)
        elif reply == OptionReply.ACK:
            if self._size is None:
                raise HandshakeError("the server ended NBD_OPT_GO without the export's size "
                                     "(NBD_INFO_EXPORT)")
            self._finish()
        else:
            raise HandshakeError(f"the server answered NBD_OPT_GO with reply type {reply}")
        return True

    def _option_error(self, sent: Option, reply: int, payload: bytes) -> None:
        message = payload[:MAX_STRING].decode(errors="replace").strip()
        said = f" ({message})" if message else ""
        if reply == OptionReply.ERR_TLS_REQD:
            raise TlsRequiredError(f"the server requires TLS{said}; virtblk does not speak "
                                   "TLS (serve the export without it, e.g. on a Unix socket)")
        if sent is Option.STRUCTURED_REPLY:
            # Without structured replies, reads get simple ones: ask for the export.
            self._send_go()
            return
        if reply == OptionReply.ERR_UNSUP:
            # A server from before NBD_OPT_GO: the old way still works.
            self._send_export_name()
            return
        if reply == OptionReply.ERR_UNKNOWN:
            raise UnknownExportError(f"the server has no export named {self._name!r}{said}")
        try:
            name = OptionReply(reply).name
        except ValueError:
            name = f"error {reply & ~REP_FLAG_ERROR}"
        raise HandshakeError(f"the server refused export {self._name!r}: {name}{said}")

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise HandshakeError("an NBD_REP_INFO of less than 2 bytes")
        kind = int.from_bytes(payload[:2], "big")
        if kind == Info.EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise HandshakeError(f"an NBD_INFO_EXPORT of {len(payload)} bytes, not "
                                     f"{INFO_EXPORT.size}")
            _, size, flags = INFO_EXPORT.unpack(payload)
            self._size, self._flags = size, TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise HandshakeError(f"an NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, not "
                                     f"{INFO_BLOCK_SIZE.size}")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
            if not (minimum and preferred and maximum) or maximum < minimum:
                raise HandshakeError(f"block sizes that make no sense: minimum {minimum}, "
                                     f"preferred {preferred}, maximum {maximum}")
            self._block = (minimum, preferred, maximum)
        # Other infos (name, description) are for people; the export is the one we named.

    def _finish(self) -> None:
        assert self._size is not None
        if not self._flags & TransmissionFlag.HAS_FLAGS:
            self._flags = TransmissionFlag(0)  # proto.md: the other bits mean nothing then
        minimum, preferred, maximum = self._block
        self._export = Export(self._name, self._size, self._flags, self._structured,
                              minimum, preferred, maximum)
        self._step = _Step.DONE


# ------------------------------------------------------------------------ transmission


@dataclasses.dataclass(frozen=True, slots=True)
class ReadData:
    """Data for a read: ``data`` belongs ``offset`` bytes into the request's range."""

    cookie: int
    offset: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ReadHole:
    """A read's ``length`` bytes at ``offset`` (into its range) are zeros."""

    cookie: int
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """The request ``cookie`` is answered: ``error`` 0, or an errno (NBD's values are
    Linux's) with the server's ``message`` if it sent one."""

    cookie: int
    error: int = 0
    message: str = ""


Event = ReadData | ReadHole | Done


class _Pending:
    """What a request in flight needs to check its reply."""

    __slots__ = ("command", "covered", "error", "length", "message", "offset", "seen")

    def __init__(self, command: int, offset: int, length: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.error = 0
        self.message = ""
        self.covered: list[tuple[int, int]] = []
        """A structured read's chunks so far, as (start, end) into its range."""
        self.seen = 0
        """Bytes of the read's range its chunks covered."""


_COMMAND_FLAG: dict[int, TransmissionFlag] = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
}
"""Commands a client may send only when the export's flag says so."""

_WRITES: frozenset[int] = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})


class ClientConnection:
    """The transmission phase on an :class:`Export` (see the module docstring)."""

    def __init__(self, export: Export) -> None:
        self.export = export
        self._structured = export.structured_replies
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._buffer = bytearray()
        self._pos = 0
        self._events: collections.deque[Event] = collections.deque()
        self._broken: ProtocolError | None = None
        # What request() checks, as plain ints (it runs for every request).
        self._size = export.size
        self._max_payload = export.max_payload
        refused = {int(Command.DISC), int(Command.BLOCK_STATUS), int(Command.RESIZE)}
        refused |= {int(c) for c, flag in _COMMAND_FLAG.items() if not export.can(flag)}
        if export.read_only:
            refused |= {int(c) for c in _WRITES}
        self._refused = frozenset(refused)
        allowed = CommandFlag.NO_HOLE
        if export.can(TransmissionFlag.SEND_FUA):
            allowed |= CommandFlag.FUA
        if export.can(TransmissionFlag.SEND_FAST_ZERO):
            allowed |= CommandFlag.FAST_ZERO
        self._flags_allowed = int(allowed)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def request(self, command: int, offset: int, length: int,
                flags: int = 0) -> tuple[int, bytes]:
        """The cookie and the 28-byte header of a request (a write's data follows it on
        the wire: the caller sends it, so it need not be copied).  ValueError for a
        request the export does not take (past its end, a write to a read-only export,
        a command or flag it did not advertise, a payload above its maximum)."""
        if (offset < 0 or length < 0 or offset + length > self._size
                or command in self._refused or flags & ~self._flags_allowed
                or (command <= Command.WRITE and length > self._max_payload)
                or length >> 32):
            raise ValueError(self._refusal(command, offset, length, flags))
        pending = self._pending
        cookie = self._next_cookie
        while cookie in pending:
            cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF
        pending[cookie] = _Pending(command, offset, length)
        return cookie, REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    def _refusal(self, command: int, offset: int, length: int, flags: int) -> str:
        """Why :meth:`request` refuses a request."""
        export = self.export
        try:
            name = Command(command).name
        except ValueError:
            name = f"command {command}"
        if offset < 0 or length < 0 or offset + length > export.size:
            return (f"{name} of {length} bytes at {offset} is outside the export's "
                    f"{export.size} bytes")
        if command in self._refused:
            if command in _WRITES and export.read_only:
                return f"{name} on a read-only export"
            needed = _COMMAND_FLAG.get(command)
            if needed is not None:
                return f"the export does not take {name} ({needed.name} not advertised)"
            return f"the client does not send {name}"
        if flags & ~self._flags_allowed:
            return (f"{name} with flags {flags:#x}; the export takes "
                    f"{self._flags_allowed:#x}")
        if length >> 32:
            return f"{name} of {length} bytes: NBD lengths are 32 bits"
        return (f"{name} of {length} bytes, above the export's maximum payload of "
                f"{export.max_payload}")

    def disconnect(self) -> bytes:
        """``NBD_CMD_DISC`` (the one way to send it): the server closes the connection,
        and answers nothing."""
        return REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server (parsed by :meth:`next_event`)."""
        buf = self._buffer
        if self._pos:
            del buf[:self._pos]
            self._pos = 0
        buf += data

    def next_event(self) -> Event | None:
        """The next event, None when more bytes are needed; :class:`ProtocolError` when the
        server broke the protocol (and for every call after)."""
        events = self._events
        while not events:
            if self._broken is not None:
                raise self._broken
            try:
                if not self._parse():
                    return None
            except ProtocolError as exc:
                self._broken = exc
                events.clear()  # nothing of a broken stream is to be believed
                raise
        return events.popleft()

    def forget(self, cookie: int) -> None:
        """Drop a request :meth:`request` made and the caller never sent."""
        del self._pending[cookie]

    def fail_all(self) -> list[int]:
        """Forget every request in flight (the connection is gone); their cookies."""
        cookies = list(self._pending)
        self._pending.clear()
        return cookies

    # ---------------------------------------------------------------- parsing

    def _parse(self) -> bool:
        """Parse one message into events; False when it is not all here."""
        buf, pos = self._buffer, self._pos
        have = len(buf) - pos
        if have < 4:
            return False
        magic = int.from_bytes(buf[pos:pos + 4], "big")
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple(buf, pos, have)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self._structured:
                raise ProtocolError("a structured reply, which we did not negotiate")
            return self._chunk(buf, pos, have)
        raise ProtocolError(f"a reply with magic {magic:#010x}, neither simple nor structured")

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"a reply for cookie {cookie:#x}, which no request in flight "
                                "has")
        return pending

    def _simple(self, buf: bytearray, pos: int, have: int) -> bool:
        if have < SIMPLE_REPLY.size:
            return False
        _, error, cookie = SIMPLE_REPLY.unpack_from(buf, pos)
        pending = self._lookup(cookie)
        data_len = 0
        if pending.command == Command.READ:
            if self._structured:
                raise ProtocolError("a simple reply to a read, with structured replies "
                                    "negotiated")
            if not error:
                data_len = pending.length
        if have < SIMPLE_REPLY.size + data_len:
            return False
        start = pos + SIMPLE_REPLY.size
        self._pos = start + data_len
        del self._pending[cookie]
        if data_len:
            self._events.append(ReadData(cookie, 0, bytes(buf[start:start + data_len])))
        self._events.append(Done(cookie, error))
        return True

    def _chunk(self, buf: bytearray, pos: int, have: int) -> bool:
        if have < STRUCTURED_REPLY.size:
            return False
        _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack_from(buf, pos)
        pending = self._lookup(cookie)
        read = pending.command == Command.READ
        limit = pending.length + 12 if read else 0
        if length > max(limit, _MAX_ERROR_CHUNK):
            raise ProtocolError(f"a {length}-byte reply chunk for a {pending.length}-byte "
                                f"{Command(pending.command).name}: oversized")
        if have < STRUCTURED_REPLY.size + length:
            return False
        start = pos + STRUCTURED_REPLY.size
        payload = memoryview(buf)[start:start + length]
        try:
            self._pos = start + length
            self._chunk_payload(cookie, pending, kind, payload)
        finally:
            payload.release()
        if flags & REPLY_FLAG_DONE:
            del self._pending[cookie]
            if read and not pending.error and pending.seen != pending.length:
                raise ProtocolError(f"the reply to a {pending.length}-byte read covered "
                                    f"{pending.seen} bytes of it")
            self._events.append(Done(cookie, pending.error, pending.message))
        elif kind == ChunkType.NONE:
            raise ProtocolError("an NBD_REPLY_TYPE_NONE chunk without the DONE flag")
        return True

    def _chunk_payload(self, cookie: int, pending: _Pending, kind: int,
                       payload: memoryview) -> None:
        length = len(payload)
        if kind == ChunkType.NONE:
            if length:
                raise ProtocolError(f"an NBD_REPLY_TYPE_NONE chunk of {length} bytes")
            return
        if kind & 0x8000:
            self._error_chunk(pending, kind, payload)
            return
        if pending.command != Command.READ or kind not in (ChunkType.OFFSET_DATA,
                                                           ChunkType.OFFSET_HOLE):
            raise ProtocolError(f"a chunk of type {kind} in the reply to "
                                f"{Command(pending.command).name}")
        if kind == ChunkType.OFFSET_DATA:
            if length < 9:
                raise ProtocolError(f"an OFFSET_DATA chunk of {length} bytes (at least 9)")
            at = self._place(pending, int.from_bytes(payload[:8], "big"), length - 8)
            self._events.append(ReadData(cookie, at, payload[8:].tobytes()))
        else:
            if length != 12:
                raise ProtocolError(f"an OFFSET_HOLE chunk of {length} bytes (not 12)")
            size = int.from_bytes(payload[8:12], "big")
            if not size:
                raise ProtocolError("an OFFSET_HOLE chunk of 0 bytes")
            at = self._place(pending, int.from_bytes(payload[:8], "big"), size)
            self._events.append(ReadHole(cookie, at, size))

    @staticmethod
    def _place(pending: _Pending, offset: int, size: int) -> int:
        """Where a content chunk starts in its read's range; checked inside it and clear
        of the chunks before it."""
        at = offset - pending.offset
        end = at + size
        if at < 0 or end > pending.length:
            raise ProtocolError(f"a read chunk for {size} bytes at {offset}, outside the "
                                f"request's {pending.length} bytes at {pending.offset}")
        for start, stop in pending.covered:
            if at < stop and start < end:
                raise ProtocolError(f"a read chunk for {size} bytes at {offset} overlaps "
                                    "an earlier one")
        pending.covered.append((at, end))
        pending.seen += size
        return at

    @staticmethod
    def _error_chunk(pending: _Pending, kind: int, payload: memoryview) -> None:
        length = len(payload)
        fixed = ERROR_CHUNK.size + (8 if kind == ChunkType.ERROR_OFFSET else 0)
        if length < fixed:
            raise ProtocolError(f"an error chunk of {length} bytes (at least {fixed})")
        error, message_len = ERROR_CHUNK.unpack_from(payload)
        if message_len > length - fixed:
            raise ProtocolError(f"an error chunk whose {message_len}-byte message does not "
                                f"fit its {length} bytes")
        if not error:
            raise ProtocolError("an error chunk with error 0")
        if not pending.error:  # the first error is the one to report
            pending.error = error
            message = payload[ERROR_CHUNK.size:ERROR_CHUNK.size + message_len]
            pending.message = message.tobytes().decode(errors="replace")
