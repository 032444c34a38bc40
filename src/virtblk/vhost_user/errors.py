"""Errors of the vhost-user layer.

``ProtocolError`` is what a malformed or out-of-order message becomes, whichever end
detects it; the connection that raised it is unusable afterwards (framing or state may be
lost), so callers drop the connection, as qemu-storage-daemon and QEMU do.
``PeerGoneError`` is a ``DeviceGoneError`` so a driver catches one exception for
"the device went away" whatever layer noticed it.
"""

from __future__ import annotations

from virtblk.errors import DeviceGoneError, VirtblkError


class VhostUserError(VirtblkError):
    """Base of every vhost-user error."""


class ProtocolError(VhostUserError):
    """The peer sent something the protocol does not allow; the message says what."""


class PeerGoneError(DeviceGoneError, VhostUserError):
    """The peer closed the connection, reset it, or stopped answering."""


class ReplyTimeoutError(PeerGoneError, TimeoutError):
    """No reply arrived within the timeout: the peer is hung or gone."""


class NackError(VhostUserError):
    """The backend answered a request with a failure (REPLY_ACK non-zero, empty config)."""

    def __init__(self, request: str, status: int) -> None:
        self.request = request
        self.status = status
        super().__init__(f"{request} failed: backend answered status {status}")
