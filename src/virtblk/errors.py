"""Exceptions a virtblk user can catch.

Block I/O failures are ``OSError`` subclasses carrying the errno the Linux driver would
return (``virtblk_result``: UNSUPP is ENOTTY, anything else EIO), so callers handle them as
they would a failed ``pread`` on a real block device.
"""

from __future__ import annotations

import errno

from virtblk.spec import Status


class VirtblkError(Exception):
    """Base of every virtblk-specific error."""


class BlockIOError(OSError, VirtblkError):
    """A request the device completed with a non-OK status."""


class DeviceGoneError(ConnectionError, VirtblkError):
    """The device went away (its socket closed or it stopped answering)."""


class NegotiationError(VirtblkError):
    """Driver and device could not agree on features or queues."""


class FeatureNotNegotiatedError(VirtblkError):
    """A request needs a feature the device did not offer (the driver never sends it)."""


def status_error(status: int, what: str) -> OSError:
    """Map a virtio-blk status to the errno the Linux driver uses, as an exception."""
    if status == Status.UNSUPP:
        return BlockIOError(errno.ENOTTY, f"{what}: device answered UNSUPP")
    try:
        name = Status(status).name
    except ValueError:
        name = f"unknown status {status}"
    return BlockIOError(errno.EIO, f"{what}: device answered {name}")
