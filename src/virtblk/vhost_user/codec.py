"""Sans-IO framing of vhost-user messages: ``encode`` and a ``Decoder`` (h11 style).

The decoder is fed whatever the socket returned (``receive_data(data, fds)``) and hands out
one typed message at a time (``next_event``).  It never touches a socket, so every corner
is tested with plain bytes.

File descriptors: the kernel attaches SCM_RIGHTS fds to the first byte of the ``sendmsg``
that carried them, and a ``recvmsg`` that returns fds stops at the end of that send.  So
the fds that arrive with a chunk belong to the *last* message whose header starts in that
chunk; fds in a chunk where no message starts are a protocol error.  Readers that read
exactly one header at a time (as libvhost-user does) are a special case of this rule.

The decoder owns the fds it was given (as ``OwnedFd``s from the moment they arrive) until
it hands them out inside a message, which then owns them; fds of a rejected message, and
any it still holds on ``close``, it closes itself, so a hostile peer cannot make us leak
descriptors.

After a ProtocolError the stream is unusable (a size or header we refused leaves us without
framing): the decoder raises the same error again on every later call.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Literal

from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd, close_all
from virtblk.vhost_user.messages import (
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION_MASK,
    Channel,
    Flag,
    Message,
    message_class,
    request_name,
)

__all__ = ["CLOSED", "HEADER", "NEED_DATA", "Decoder", "Event", "Sentinel", "encode"]

HEADER = struct.Struct("=III")
"""request, flags, size: the 12-byte header, in native byte order."""


class Sentinel(enum.Enum):
    """Non-message results of ``Decoder.next_event``."""

    NEED_DATA = "need data"  # feed more bytes
    CLOSED = "closed"  # the peer closed the stream cleanly, between messages


NEED_DATA = Sentinel.NEED_DATA
CLOSED = Sentinel.CLOSED

Event = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]


def encode(message: Message) -> tuple[bytes, list[int]]:
    """The wire bytes of ``message`` and the fds to send with them (borrowed from the
    message, which still owns them: close it once sent)."""
    payload, fds = message.encode_payload()
    header = HEADER.pack(message.code, message.header_flags, len(payload))
    return header + payload, list(fds)


class Decoder:
    """Turns a byte stream plus fds into messages of one ``channel``.

    On the main channel, requests (no REPLY flag) come from a frontend and replies from a
    backend; on the backend channel it is the other way round.  One class serves both
    ends: a backend simply never expects replies on its main channel, and says so.
    """

    def __init__(self, channel: Channel = Channel.MAIN, *, max_payload: int = MAX_PAYLOAD):
        """Decode messages of ``channel``; payload sizes above ``max_payload`` are refused."""
        self.channel = channel
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._offset = 0  # stream position of _buffer[0]
        self._received = 0  # stream position after the last byte received
        self._batches: list[tuple[int, int, list[OwnedFd]]] = []  # (start, end, fds)
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add what one receive returned; ``b""`` means the peer closed (end of stream).

        Takes ownership of ``fds`` (what ``recvmsg`` returned: nobody else holds them).
        """
        owned = [OwnedFd(fd) for fd in fds]
        if self._eof or self._error is not None or not data:
            self._eof = self._eof or not data
            close_all(owned)
            return
        start = self._received
        self._received += len(data)
        self._buffer += data
        if owned:
            self._batches.append((start, self._received, owned))

    def next_event(self) -> Event:
        """The next complete message, NEED_DATA, or CLOSED; raises ProtocolError."""
        if self._error is not None:
            # The same error, with this call's frames only: a raise appends to the
            # traceback it carries, so a caller polling a dead stream would grow it forever.
            raise self._error.with_traceback(None)
        try:
            return self._next()
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Close every fd not yet handed out; the decoder accepts nothing more."""
        self._eof = True
        self._buffer.clear()
        batches, self._batches = self._batches, []
        for _start, _end, fds in batches:
            close_all(fds)

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self.close()

    def _next(self) -> Event:
        if len(self._buffer) < HEADER.size:
            return self._starved()
        code, flags, size = HEADER.unpack_from(self._buffer)
        is_reply = self._check_header(code, flags, size)
        sizes, decode = message_class(self.channel, is_reply, code)
        if not sizes[0] <= size <= sizes[1]:
            what = f"{'reply to ' if is_reply else ''}{request_name(code, self.channel)}"
            raise ProtocolError(
                f"{what}: payload size {size} outside the allowed {sizes[0]}..{sizes[1]}"
            )
        end = HEADER.size + size
        if len(self._buffer) < end:
            return self._starved()
        payload = bytes(self._buffer[HEADER.size : end])
        fds = self._claim_fds(self._offset, self._offset + end)
        del self._buffer[:end]
        self._offset += end
        try:
            return decode(code, flags, payload, tuple(fds))
        except ProtocolError:
            close_all(fds)
            raise
        except (ValueError, OverflowError) as exc:  # belt and braces: never another type
            close_all(fds)
            raise ProtocolError(f"{request_name(code, self.channel)}: {exc}") from exc

    def _starved(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._buffer:
            raise ProtocolError(
                f"peer closed the connection in the middle of a message "
                f"({len(self._buffer)} bytes of it received)"
            )
        return CLOSED

    def _check_header(self, code: int, flags: int, size: int) -> bool:
        if flags & VERSION_MASK != Flag.VERSION:
            raise ProtocolError(
                f"header of {request_name(code, self.channel)}: version {flags & VERSION_MASK}, "
                f"only version 1 exists (flags {flags:#x})"
            )
        unknown = flags & ~(VERSION_MASK | int(Flag.REPLY) | int(Flag.NEED_REPLY))  # ints: ~ on
        # an IntFlag only complements the defined bits
        if unknown:
            raise ProtocolError(
                f"header of {request_name(code, self.channel)}: unknown flag bits {unknown:#x}"
            )
        if size > self.max_payload:
            raise ProtocolError(
                f"header of {request_name(code, self.channel)}: payload size {size} is over "
                f"the {self.max_payload}-byte limit"
            )
        return bool(flags & Flag.REPLY)

    def _claim_fds(self, start: int, end: int) -> list[OwnedFd]:
        """The fds of the message occupying stream bytes [start, end)."""
        mine: list[OwnedFd] = []
        orphans: list[OwnedFd] = []
        keep: list[tuple[int, int, list[OwnedFd]]] = []
        for batch in self._batches:
            chunk_start, chunk_end, fds = batch
            if chunk_start <= start < chunk_end and end >= chunk_end:
                mine += fds  # this message is the last to start in that chunk
            elif chunk_end <= end and chunk_start > start:
                orphans += fds  # arrived in the middle of this message
            else:
                keep.append(batch)
        self._batches = keep
        if orphans:
            close_all(orphans)
            close_all(mine)
            raise ProtocolError(
                f"{len(orphans)} file descriptors arrived in the middle of a message"
            )
        if len(mine) > MAX_FDS:
            close_all(mine)
            raise ProtocolError(f"{len(mine)} file descriptors with one message, at most {MAX_FDS}")
        return mine
