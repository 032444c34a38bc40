"""NBD's constants and fixed-size wire structs, as ``doc/proto.md`` names them.

Everything on the wire is big-endian. The names are the spec's without the ``NBD_``
prefix, grouped by the field they belong to, so the server and the client share one
definition of the protocol and a test can compare both against real peers.
"""

from __future__ import annotations

import enum
import struct

NBDMAGIC = 0x4E42444D41474943
"""``"NBDMAGIC"``: the first eight bytes a server sends."""
IHAVEOPT = 0x49484156454F5054
"""``"IHAVEOPT"``: newstyle negotiation; also the magic of every option request."""
CLISERV_MAGIC = 0x00420281861253
"""What an oldstyle server sends after ``NBDMAGIC`` (where a newstyle one sends
``IHAVEOPT``)."""
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_OPTION_LENGTH = 4096
"""The longest option payload we accept (an export name is at most 4096 bytes)."""
MAX_STRING = 4096
"""proto.md: strings (export names, descriptions) SHOULD be no longer than 4096 bytes."""


class HandshakeFlag(enum.IntFlag):
    """The server's 16-bit handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """The client's 32-bit flags, its answer to the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """The 16-bit per-export flags: what the export is and which commands it takes."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option request types (the handshake phase)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_FLAG_ERROR = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR + 1
    ERR_POLICY = REP_FLAG_ERROR + 2
    ERR_INVALID = REP_FLAG_ERROR + 3
    ERR_PLATFORM = REP_FLAG_ERROR + 4
    ERR_TLS_REQD = REP_FLAG_ERROR + 5
    ERR_UNKNOWN = REP_FLAG_ERROR + 6
    ERR_SHUTDOWN = REP_FLAG_ERROR + 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
    ERR_TOO_BIG = REP_FLAG_ERROR + 9


class Info(enum.IntEnum):
    """``NBD_REP_INFO`` payload types (and what ``NBD_OPT_INFO``/``GO`` may ask for)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission-phase request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """The 16-bit flags of a request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1 << 0
"""Structured reply flag: the last chunk of a request's reply."""


class ChunkType(enum.IntEnum):
    """Structured reply chunk types; those with bit 15 set are errors."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """The error values a reply may carry (proto.md: these, and only these, on the wire)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Fixed-size structs (big-endian). Each is named for what it carries.
SERVER_GREETING = struct.Struct(">QQH")
"""NBDMAGIC, IHAVEOPT, handshake flags."""
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
"""IHAVEOPT, option, length of the data that follows."""
OPTION_REPLY_HEADER = struct.Struct(">QIII")
"""OPTION_REPLY_MAGIC, option, reply type, length of the data that follows."""
EXPORT_NAME_REPLY = struct.Struct(">QH")
"""``NBD_OPT_EXPORT_NAME``'s answer: size, transmission flags (then 124 zeroes unless
NO_ZEROES)."""
INFO_EXPORT = struct.Struct(">HQH")
"""Info.EXPORT, size, transmission flags."""
INFO_BLOCK_SIZE = struct.Struct(">HIII")
"""Info.BLOCK_SIZE, minimum, preferred, maximum block size."""
REQUEST = struct.Struct(">IHHQQI")
"""REQUEST_MAGIC, command flags, type, cookie (handle), offset, length."""
SIMPLE_REPLY = struct.Struct(">IIQ")
"""SIMPLE_REPLY_MAGIC, error, cookie."""
STRUCTURED_REPLY = struct.Struct(">IHHQI")
"""STRUCTURED_REPLY_MAGIC, flags, type, cookie, length of the payload."""
ERROR_CHUNK = struct.Struct(">IH")
"""An error chunk's payload: error, length of the message that follows."""
