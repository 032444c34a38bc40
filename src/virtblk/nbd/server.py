"""The server side of NBD as a sans-IO state machine (h11 style).

A :class:`ServerConnection` is fed what the client sent (``receive_data``) and hands out
typed events one at a time (``next_event``): the transmission requests the storage must
serve (:class:`Read`, :class:`Write`, :class:`Flush`, :class:`Trim`,
:class:`WriteZeroes`), :class:`Negotiated` when the handshake ends, :class:`Disconnect`,
and, for the log, what it answered itself (:class:`OptionAnswered`, :class:`Answered`).
It never touches a socket: everything the protocol answers on its own (the greeting,
every option reply, every refused request) waits in ``data_to_send()``; the storage's
answers are built by ``reply`` and ``read_reply``, which return the bytes to send.

What the state machine decides, so that one tested place decides it (doc/proto.md):

* The fixed newstyle handshake with NO_ZEROES; ``NBD_OPT_EXPORT_NAME``, ``GO`` and
  ``INFO`` (``INFO_EXPORT``, ``NAME``, ``DESCRIPTION``, ``BLOCK_SIZE``), ``LIST``,
  ``ABORT``, ``STRUCTURED_REPLY``.  ``STARTTLS`` is refused with ``ERR_UNSUP`` (this
  server has no TLS at all; the client may go on in the clear or leave); the meta-context
  options are answered with no context (we offer none, so ``BLOCK_STATUS`` never becomes
  legal); any other option gets ``ERR_UNSUP`` and negotiation goes on.
* Block sizes: the export's minimum block is the device's logical block size (the driver
  cannot read-modify-write safely under concurrent writers), announced in every
  ``GO``/``INFO`` reply.  As QEMU does, a ``GO`` that did not ask for block sizes is
  still let in and its unaligned requests fail with EINVAL; an ``INFO`` that did not
  ask gets ``ERR_BLOCK_SIZE_REQD``.
* Every request is judged before the storage sees it, in the order proto.md implies:
  an unknown command: EINVAL; a change (write, trim, zeroing) to a read-only export:
  EPERM; an unknown flag or a command the flags did not advertise: EINVAL; a read or
  write longer than the maximum payload, or not aligned to the minimum block: EINVAL;
  past the end: ENOSPC for writes, EINVAL for the
  rest.  A refused write's payload is skipped, never buffered.  A zero-length request
  and ``NBD_CMD_CACHE`` (accepted, not advertised) are answered at once; so is
  ``FAST_ZERO`` on an export that cannot zero faster than it writes: ENOTSUP, fast.
* What cannot be answered (a bad magic, unknown client flags, an export name
  ``NBD_OPT_EXPORT_NAME`` does not know, which allows no error reply) is a
  :class:`ProtocolViolation`: the connection must be dropped, and nothing more is parsed.
* After ``shutdown()``, options get ``ERR_SHUTDOWN`` and requests ESHUTDOWN, so that a
  server that stops tells its clients why (proto.md: "Terminating the transmission
  phase").
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from collections.abc import Sequence

from virtblk.nbd.wire import (
    CLIENT_FLAGS,
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
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)

__all__ = [
    "CLOSED",
    "MAX_OPTION_DATA",
    "NEED_DATA",
    "Answered",
    "Disconnect",
    "Event",
    "Export",
    "Flush",
    "Negotiated",
    "OptionAnswered",
    "ProtocolViolation",
    "Read",
    "Request",
    "ServerConnection",
    "Trim",
    "Write",
    "WriteZeroes",
    "nbd_errno",
]

MAX_OPTION_DATA = 16 << 10
"""The largest option payload we read (a GO names at most a 4096-byte export; meta-context
queries are lists of strings).  A larger one is skipped unread and refused with
``ERR_TOO_BIG``, except ``NBD_OPT_EXPORT_NAME``, which has no error reply: that is a
:class:`ProtocolViolation`."""

DEFAULT_MAX_BLOCK = 32 << 20
"""The maximum payload we announce by default: what proto.md tells portable clients to
stay under (2^25)."""

_OFFSET = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_NO_FLAGS = TransmissionFlag(0)
_ZEROES = bytes(124)
_ERRNOS = frozenset(Errno)

# What each command may carry besides FUA (FUA is valid on every command once SEND_FUA
# is advertised: proto.md "Command flags").
_COMMAND_FLAGS = {
    Command.READ: CommandFlag.DF,
    Command.WRITE: CommandFlag(0),
    Command.FLUSH: CommandFlag(0),
    Command.TRIM: CommandFlag(0),
    Command.CACHE: CommandFlag(0),
    Command.WRITE_ZEROES: CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
}
# The transmission flag that must have been advertised for a command (or a flag) to be used.
_NEEDS = {
    Command.FLUSH: TransmissionFlag.SEND_FLUSH,
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
_CHANGES = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_ADVERTISABLE = (
    TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    | TransmissionFlag.ROTATIONAL | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_FAST_ZERO
)
"""What an export may say of itself; HAS_FLAGS is always set and SEND_DF follows from
structured replies, per connection."""


class Sentinel(enum.Enum):
    """Non-message results of ``next_event``."""

    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA = Sentinel.NEED_DATA
CLOSED = Sentinel.CLOSED


def _check_string(what: str, text: str) -> None:
    """proto.md's rule for strings: UTF-8, no NUL, at most 4096 bytes."""
    try:
        raw: bytes | None = text.encode()
    except UnicodeEncodeError:  # undecodable bytes from a command line (surrogates)
        raw = None
    if raw is None or len(raw) > MAX_STRING or b"\0" in raw:
        raise ValueError(f"{what} must be at most {MAX_STRING} bytes of UTF-8 without NUL")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Export:
    """One export: its name, size, what it supports (``flags``, a subset of
    ``_ADVERTISABLE``) and its size constraints (proto.md "Size constraints").

    ``fast_zero`` says the storage zeroes faster than it writes: only then is a
    ``FAST_ZERO`` request executed; otherwise it fails at once with ENOTSUP, which proto.md
    allows a server that "cannot quickly determine" whether zeroing would be fast.
    """

    name: str
    size: int
    flags: TransmissionFlag = _NO_FLAGS
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    fast_zero: bool = False

    def __post_init__(self) -> None:
        _check_string("an export name", self.name)
        _check_string("an export description", self.description)
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} out of range")
        if self.flags & ~_ADVERTISABLE:
            raise ValueError(f"flags an export cannot set: {self.flags & ~_ADVERTISABLE!r}")
        if (self.flags & TransmissionFlag.SEND_FAST_ZERO
                and not self.flags & TransmissionFlag.SEND_WRITE_ZEROES):
            raise ValueError("SEND_FAST_ZERO needs SEND_WRITE_ZEROES (proto.md)")
        if not _power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"minimum block {self.min_block}: a power of two up to 65536")
        if (not _power_of_two(self.preferred_block)
                or self.preferred_block < max(self.min_block, 512)):
            raise ValueError(f"preferred block {self.preferred_block}: a power of two at least "
                             f"max(minimum block, 512)")
        if not self.preferred_block <= self.max_block <= 0xFFFFFFFF:
            raise ValueError(f"maximum payload {self.max_block}: at least the preferred block")
        if self.max_block % self.min_block:
            raise ValueError(f"maximum payload {self.max_block}: a multiple of the minimum block")


# -- events ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class OptionAnswered:
    """The state machine answered an option (for the log): the reply type it sent and, for
    an error, the message that went with it."""

    option: int
    reply: int
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake ended: the transmission phase on ``export`` begins, with these
    transmission ``flags`` (as sent), structured replies or not, and whether the client
    asked for the block sizes (then it promised to obey them)."""

    export: Export
    flags: TransmissionFlag
    structured_replies: bool
    block_sizes_agreed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended the handshake with ``NBD_OPT_ABORT`` (its ACK is queued): send it,
    then close."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The client broke the protocol where no error reply exists: drop the connection."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    """A request the state machine answered itself (``error`` 0 for a success it could
    give without the storage: a zero length, a CACHE hint)."""

    cookie: int
    command: int
    error: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A transmission request the storage must serve; answer it with ``reply`` (or
    ``read_reply``).  ``fua``: the data must be durable before the reply."""

    cookie: int
    offset: int
    length: int
    fua: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Read(Request):
    """``NBD_CMD_READ``: answer with ``read_reply(request, data)`` or an error."""


@dataclasses.dataclass(frozen=True, slots=True)
class Write(Request):
    """``NBD_CMD_WRITE`` with its payload (``length`` bytes)."""

    data: memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class Flush(Request):
    """``NBD_CMD_FLUSH``: every write answered before it must be durable."""


@dataclasses.dataclass(frozen=True, slots=True)
class Trim(Request):
    """``NBD_CMD_TRIM``: a hint that the range is unused."""


@dataclasses.dataclass(frozen=True, slots=True)
class WriteZeroes(Request):
    """``NBD_CMD_WRITE_ZEROES``; ``no_hole``: the range must stay allocated."""

    no_hole: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """``NBD_CMD_DISC``: answer what is in flight, then close (nothing more is parsed)."""


Event = (OptionAnswered | Negotiated | Aborted | ProtocolViolation | Answered | Read | Write
         | Flush | Trim | WriteZeroes | Disconnect | Sentinel)


class _Phase(enum.Enum):
    CLIENT_FLAGS = "waiting for the client flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    DONE = "done"


def nbd_errno(code: int) -> Errno:
    """The NBD error for an OS errno (proto.md lists the only values allowed on the wire):
    what refuses a change is EPERM, what is full is ENOSPC (EDQUOT and EFBIG too, as the
    spec asks), everything unknown EIO."""
    if code in (errno.EPERM, errno.EROFS, errno.EACCES):
        return Errno.EPERM
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return Errno.ENOSPC
    if code in (errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW, errno.ESHUTDOWN):
        return Errno(code)
    return Errno.EIO


class ServerConnection:
    """One client of a server offering ``exports`` (the first is the default export, the
    one an empty name chooses).  Not thread-safe: one event loop drives it."""

    def __init__(self, exports: Sequence[Export]) -> None:
        if not exports:
            raise ValueError("a server needs at least one export")
        names = [e.name for e in exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names repeat: {names}")
        self.exports = tuple(exports)
        self.export: Export | None = None
        """The export of the transmission phase (None before)."""
        self.flags = TransmissionFlag(0)
        """The transmission flags the client was given."""
        self.structured_replies = False
        self.block_sizes_agreed = False
        self.no_zeroes = False
        self.in_flight = 0
        """Requests handed out as events and not answered yet."""
        self.disconnecting = False
        """The client sent ``NBD_CMD_DISC``: answer what is in flight, then close."""
        self._phase = _Phase.CLIENT_FLAGS
        self._shutting_down = False
        self._buf = bytearray()
        self._pos = 0
        self._lent = False  # a Write's payload is a view of _buf
        self._skip = 0  # payload bytes of a refused request (or option) still to drop
        self._skipped_option: tuple[int, OptionReply, str] | None = None
        self._eof = False
        self._out = bytearray(SERVER_GREETING.pack(
            NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))

    # -- the byte interface ---------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add what the socket returned; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
            return
        if self._phase is _Phase.DONE or self.disconnecting:
            return  # nothing after a DISC, an ABORT or a violation is read
        if self._lent:
            # A Write's payload is a view of this buffer: leave it to that view, and go on
            # in a new one with what was not parsed yet (a partial header, at most a few
            # requests).
            self._buf = self._buf[self._pos :]
            self._lent = False
        else:
            # Deleting a bytearray's head only moves its start (no copy of the rest).
            del self._buf[: self._pos]
        self._pos = 0
        self._buf += data

    def data_to_send(self) -> bytes:
        """What the state machine answered on its own since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def shutdown(self) -> None:
        """The server is stopping: options are answered ``ERR_SHUTDOWN`` and requests
        ESHUTDOWN from now on (the storage still answers what it holds)."""
        self._shutting_down = True

    def next_event(self) -> Event:
        """The next event, NEED_DATA (feed more bytes) or CLOSED (the client closed
        between messages, or the session is over)."""
        while True:
            if self._phase is _Phase.DONE or self.disconnecting:
                return CLOSED
            if self._skip:
                n = min(self._skip, len(self._buf) - self._pos)
                self._pos += n
                self._skip -= n
                if self._skip:
                    return self._starved()
                if self._skipped_option is not None:
                    option, reply, message = self._skipped_option
                    self._skipped_option = None
                    return self._option_error(option, reply, message)
            if self._phase is _Phase.CLIENT_FLAGS:
                event = self._client_flags()
            elif self._phase is _Phase.OPTIONS:
                event = self._option()
            else:
                event = self._request()
            if event is not None:
                return event

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            taken = bytes(view[self._pos : self._pos + n])
        self._pos += n
        return taken

    def _starved(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._available() or self._skip:
            return self._violation(
                f"client closed the connection in the middle of a message ({self._phase.value})")
        self._phase = _Phase.DONE
        return CLOSED

    def _violation(self, reason: str) -> ProtocolViolation:
        self._phase = _Phase.DONE
        self._buf = bytearray()  # not clear(): a payload may still be a view of it
        self._pos = 0
        return ProtocolViolation(reason)

    # -- handshake ----------------------------------------------------------------------------
    def _client_flags(self) -> Event | None:
        if self._available() < CLIENT_FLAGS.size:
            return self._starved()
        (flags,) = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))
        unknown = flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        if unknown:  # proto.md: the server MUST drop the connection
            return self._violation(f"unknown client flags {unknown:#x}")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._phase = _Phase.OPTIONS
        return None

    def _option(self) -> Event | None:
        if self._available() < OPTION_HEADER.size:
            return self._starved()
        magic, option, length = OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            return self._violation(f"option magic {magic:#x}, expected IHAVEOPT")
        if length > MAX_OPTION_DATA:
            self._pos += OPTION_HEADER.size
            if option == Option.EXPORT_NAME:
                return self._violation(f"NBD_OPT_EXPORT_NAME of {length} bytes")
            self._skip = length
            self._skipped_option = (option, OptionReply.ERR_TOO_BIG,
                                    f"option data of {length} bytes, at most {MAX_OPTION_DATA}")
            return None
        if self._available() < OPTION_HEADER.size + length:
            return self._starved()
        self._pos += OPTION_HEADER.size
        data = self._take(length)
        return self._handle_option(option, data)

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == Option.ABORT:
            self._option_reply(option, OptionReply.ACK)
            self._phase = _Phase.DONE
            return Aborted()
        if self._shutting_down:
            if option == Option.EXPORT_NAME:
                return self._violation("NBD_OPT_EXPORT_NAME while the server shuts down")
            return self._option_error(option, OptionReply.ERR_SHUTDOWN,
                                      "the server is shutting down")
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option in (Option.INFO, Option.GO):
            return self._info(option, data)
        if option == Option.LIST:
            if data:
                return self._option_error(option, OptionReply.ERR_INVALID,
                                          "NBD_OPT_LIST carries no data")
            for export in self.exports:
                name = export.name.encode()
                self._option_reply(option, OptionReply.SERVER,
                                   _U32.pack(len(name)) + name + export.description.encode())
            return self._option_answered(option, OptionReply.ACK)
        if option == Option.STRUCTURED_REPLY:
            if data:
                return self._option_error(option, OptionReply.ERR_INVALID,
                                          "NBD_OPT_STRUCTURED_REPLY carries no data")
            self.structured_replies = True
            return self._option_answered(option, OptionReply.ACK)
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == Option.STARTTLS:
            return self._option_error(option, OptionReply.ERR_UNSUP,
                                      "this server does not offer TLS: use a Unix socket or "
                                      "a trusted network")
        return self._option_error(option, OptionReply.ERR_UNSUP, f"option {option} unsupported")

    def _export_name(self, data: bytes) -> Event:
        export = self._find(data)
        if export is None:  # no error reply exists for NBD_OPT_EXPORT_NAME
            return self._violation(f"NBD_OPT_EXPORT_NAME: no export named {_quote(data)}")
        flags = self._flags_for(export)
        self._out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += _ZEROES
        return self._negotiated(export, flags, block_sizes=False)

    def _info(self, option: int, data: bytes) -> Event:
        parsed = _parse_info(data)
        if isinstance(parsed, str):
            return self._option_error(option, OptionReply.ERR_INVALID, parsed)
        name, requests = parsed
        export = self._find(name)
        if export is None:
            return self._option_error(option, OptionReply.ERR_UNKNOWN,
                                      f"no export named {_quote(name)}")
        if Info.NAME in requests:
            self._info_reply(option, Info.NAME, export.name.encode())
        if export.description:
            self._info_reply(option, Info.DESCRIPTION, export.description.encode())
        self._option_reply(option, OptionReply.INFO, INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block))
        flags = self._flags_for(export)
        self._option_reply(option, OptionReply.INFO,
                           INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        asked = Info.BLOCK_SIZE in requests
        if option == Option.INFO and not asked and export.min_block > 1:
            return self._option_error(option, OptionReply.ERR_BLOCK_SIZE_REQD,
                                      "ask for NBD_INFO_BLOCK_SIZE to use this export")
        self._option_reply(option, OptionReply.ACK)
        if option == Option.INFO:
            return OptionAnswered(option, OptionReply.ACK)
        return self._negotiated(export, flags, block_sizes=asked)

    def _meta_context(self, option: int, data: bytes) -> Event:
        if not self.structured_replies:
            return self._option_error(option, OptionReply.ERR_INVALID,
                                      "negotiate structured replies first")
        parsed = _parse_meta_context(data)
        if isinstance(parsed, str):
            return self._option_error(option, OptionReply.ERR_INVALID, parsed)
        if self._find(parsed) is None:
            return self._option_error(option, OptionReply.ERR_UNKNOWN,
                                      f"no export named {_quote(parsed)}")
        # No metadata context is offered (so none is selected): an ACK alone, as proto.md
        # requires when the queries find none.
        return self._option_answered(option, OptionReply.ACK)

    def _find(self, raw: bytes) -> Export | None:
        if not raw:
            return self.exports[0]
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return None
        return next((e for e in self.exports if e.name == name), None)

    def _flags_for(self, export: Export) -> TransmissionFlag:
        flags = export.flags | TransmissionFlag.HAS_FLAGS
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF  # every read is answered in one chunk
        return flags

    def _negotiated(self, export: Export, flags: TransmissionFlag, *,
                    block_sizes: bool) -> Negotiated:
        self.export = export
        self.flags = flags
        self.block_sizes_agreed = block_sizes
        self._phase = _Phase.TRANSMISSION
        return Negotiated(export, flags, self.structured_replies, block_sizes)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _info_reply(self, option: int, info: Info, data: bytes) -> None:
        self._option_reply(option, OptionReply.INFO, _U16.pack(info) + data)

    def _option_answered(self, option: int, reply: OptionReply) -> OptionAnswered:
        self._option_reply(option, reply)
        return OptionAnswered(option, reply)

    def _option_error(self, option: int, reply: OptionReply, message: str) -> OptionAnswered:
        self._option_reply(option, reply, message.encode()[:MAX_STRING])
        return OptionAnswered(option, reply, message)

    # -- transmission ---------------------------------------------------------------------------
    def _request(self) -> Event | None:
        if self._available() < REQUEST.size:
            return self._starved()
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            return self._violation(f"request magic {magic:#x}, expected {REQUEST_MAGIC:#x}")
        if command == Command.DISC:
            self._pos += REQUEST.size
            self.disconnecting = True
            return Disconnect()
        refusal = self._judge(command, flags, offset, length)
        if refusal is not None:
            self._pos += REQUEST.size
            if command == Command.WRITE:
                self._skip = length
            return self._answer(cookie, command, *refusal)
        if command == Command.WRITE:
            if self._available() < REQUEST.size + length:
                return self._starved()
            self._pos += REQUEST.size
            # The payload is handed out as a view of the receive buffer, not copied: the
            # buffer is never resized while lent (receive_data starts a new one).
            data = memoryview(self._buf)[self._pos : self._pos + length]
            self._pos += length
            self._lent = True
        else:
            self._pos += REQUEST.size
        fua = bool(flags & CommandFlag.FUA)
        if length == 0 and command != Command.FLUSH:
            return self._answer(cookie, command, 0, "nothing to do for a zero length")
        if command == Command.CACHE:
            return self._answer(cookie, command, 0, "")  # a hint; reads are not cached here
        if command == Command.WRITE_ZEROES and flags & CommandFlag.FAST_ZERO:
            assert self.export is not None
            if not self.export.fast_zero:
                return self._answer(cookie, command, Errno.ENOTSUP,
                                    "this device may zero no faster than it writes")
        self.in_flight += 1
        if command == Command.READ:
            return Read(cookie, offset, length, fua)
        if command == Command.WRITE:
            return Write(cookie, offset, length, fua, data)
        if command == Command.FLUSH:
            return Flush(cookie, offset, length, fua)
        if command == Command.TRIM:
            return Trim(cookie, offset, length, fua)
        return WriteZeroes(cookie, offset, length, fua, bool(flags & CommandFlag.NO_HOLE))

    def _judge(self, command: int, flags: int, offset: int,
               length: int) -> tuple[int, str] | None:
        """Why a request is refused (its error and message), or None to serve it."""
        export = self.export
        assert export is not None
        if self._shutting_down:
            return Errno.ESHUTDOWN, "the server is shutting down"
        try:
            cmd = Command(command)
        except ValueError:
            return Errno.EINVAL, f"unknown command {command}"
        allowed = _COMMAND_FLAGS.get(cmd)
        if allowed is None:  # BLOCK_STATUS (no context was offered), RESIZE
            return Errno.EINVAL, f"NBD_CMD_{cmd.name} is not supported"
        if cmd in _CHANGES and self.flags & TransmissionFlag.READ_ONLY:
            # proto.md asks EPERM for a write or trim on a read-only export, which
            # advertises neither TRIM nor WRITE_ZEROES: before the flag checks.
            return Errno.EPERM, "the export is read-only"
        if self.flags & TransmissionFlag.SEND_FUA:
            allowed |= CommandFlag.FUA
        if not self.flags & TransmissionFlag.SEND_DF:
            allowed &= ~CommandFlag.DF
        if not self.flags & TransmissionFlag.SEND_FAST_ZERO:
            allowed &= ~CommandFlag.FAST_ZERO
        if flags & ~int(allowed):
            return Errno.EINVAL, f"flags {flags & ~int(allowed):#x} not valid on NBD_CMD_{cmd.name}"
        needed = _NEEDS.get(cmd)
        if needed is not None and not self.flags & needed:
            return Errno.EINVAL, f"NBD_CMD_{cmd.name} was not advertised"
        if cmd is Command.FLUSH:
            if offset or length:
                return Errno.EINVAL, "NBD_CMD_FLUSH takes offset and length 0"
            return None
        if cmd in (Command.READ, Command.WRITE) and length > export.max_block:
            return Errno.EINVAL, (f"{length} bytes is more than the maximum payload "
                                  f"{export.max_block}")
        if offset % export.min_block or length % export.min_block:
            return Errno.EINVAL, (f"offset {offset} and length {length} must be multiples "
                                  f"of the minimum block {export.min_block}")
        if offset + length > export.size:
            err = Errno.ENOSPC if cmd in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
            return err, f"{length} bytes at {offset} end past the export's {export.size} bytes"
        return None

    def _answer(self, cookie: int, command: int, error: int, message: str) -> Answered:
        self._out += self._reply_bytes(cookie, command == Command.READ, error, message)
        return Answered(cookie, command, error, message)

    def _reply_bytes(self, cookie: int, read: bool, error: int, message: str) -> bytes:
        if not self.structured_replies or (error == 0 and not read):
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        if error == 0:  # an empty read
            return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                         ChunkType.NONE, cookie, 0)
        text = message.encode()[:MAX_STRING]
        return (STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.ERROR,
                                      cookie, ERROR_CHUNK.size + len(text))
                + ERROR_CHUNK.pack(error, len(text)) + text)

    # -- the storage's answers --------------------------------------------------------------------
    def reply(self, request: Request, error: int = 0, message: str = "") -> bytes:
        """The bytes answering ``request``: success, or ``error`` (an NBD error value, see
        ``nbd_errno``) with ``message`` (sent with structured replies)."""
        if error and error not in _ERRNOS:
            raise ValueError(f"{error} is not an NBD error value")
        if isinstance(request, Read) and error == 0:
            raise ValueError("a successful read is answered with read_reply")
        self._settle()
        return self._reply_bytes(request.cookie, isinstance(request, Read), error, message)

    def read_reply(self, request: Read, data: memoryview) -> tuple[bytes, memoryview]:
        """The header and the data answering a successful read, to send in order (the data
        is not copied: it may be the storage's own buffer)."""
        if len(data) != request.length:
            raise ValueError(f"a read of {request.length} bytes answered with {len(data)}")
        self._settle()
        if not self.structured_replies:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie), data
        header = STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                       ChunkType.OFFSET_DATA, request.cookie,
                                       _OFFSET.size + len(data))
        return header + _OFFSET.pack(request.offset), data

    def _settle(self) -> None:
        if self.in_flight <= 0:
            raise ValueError("a reply to no request in flight")
        self.in_flight -= 1


def _quote(raw: bytes) -> str:
    return repr(raw.decode(errors="replace")[:64])


def _parse_info(data: bytes) -> tuple[bytes, set[int]] | str:
    """GO/INFO data: (export name, information requests) or why it is malformed."""
    if len(data) < 6:
        return f"{len(data)} bytes of data, at least 6 needed"
    (namelen,) = _U32.unpack_from(data)
    if namelen > len(data) - 6:
        return f"a name of {namelen} bytes in {len(data)} bytes of data"
    name = data[4 : 4 + namelen]
    (count,) = _U16.unpack_from(data, 4 + namelen)
    rest = data[6 + namelen :]
    if len(rest) != 2 * count:
        return f"{count} information requests but {len(rest)} bytes for them"
    return name, {r for (r,) in _U16.iter_unpack(rest)}


def _parse_meta_context(data: bytes) -> bytes | str:
    """LIST/SET_META_CONTEXT data: the export name, or why it is malformed."""
    if len(data) < 8:
        return f"{len(data)} bytes of data, at least 8 needed"
    (namelen,) = _U32.unpack_from(data)
    if namelen > len(data) - 8:
        return f"a name of {namelen} bytes in {len(data)} bytes of data"
    name = data[4 : 4 + namelen]
    pos = 4 + namelen
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    for i in range(count):
        if pos + 4 > len(data):
            return f"query {i} of {count} missing"
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4 + qlen
        if pos > len(data):
            return f"query {i} of {qlen} bytes runs past the data"
    if pos != len(data):
        return f"{len(data) - pos} bytes after the queries"
    return name
