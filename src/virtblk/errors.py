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
    """A request that failed: the device completed it with a non-OK status, or (the
    subclass :class:`RequestTimeoutError`) did not complete it in time."""


class RequestTimeoutError(BlockIOError):
    """A request the device did not complete within the disk's ``request_timeout``:
    errno ``ETIMEDOUT``, as Linux's block layer gives a ``BLK_STS_TIMEOUT`` request.

    Also raised for the other requests that were on the same ring when the driver reset it
    (their fate is unknown too; see ``HardwareQueue.expire``).  It is deliberately no
    ``TimeoutError``: that builtin is what a caller's own wait timeout raises (``freeze``,
    ``QueueHandle.do_io``), after which the request is still on the ring; this one means
    the request is over and its buffers are the caller's again.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message)


class DeviceGoneError(ConnectionError, VirtblkError):
    """The device went away (its socket closed or it stopped answering)."""


class DeviceFaultError(OSError, VirtblkError):
    """The device broke the virtio protocol while serving requests (a used ring entry with an
    id not in flight, twice, too long, or an index that jumps): errno ``EIO``.

    Nothing the caller did causes it, so it is no ``ValueError``; like a failed request it is
    an ``OSError`` with the errno the Linux driver's ``virtqueue_get_buf`` failure leads to
    (the ring is marked broken and its requests end with ``BLK_STS_IOERR``).  The queue that
    saw it stays broken: every later request on it raises the same class.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class NegotiationError(VirtblkError):
    """Driver and device could not agree on features or queues, or the device described
    itself as no usable block device (its config space); raised by the probe, before any
    request."""


class FeatureNotNegotiatedError(VirtblkError):
    """A request needs a feature the device did not offer (the driver never sends it)."""


class ZoneError(BlockIOError):
    """A zoned device refused a request by its zone rules (one subclass per status)."""

    status: Status


class ZoneInvalidCommandError(ZoneError):
    """ZONE_INVALID_CMD: not allowed for the zone's type or state, or not inside one zone."""

    status = Status.ZONE_INVALID_CMD


class ZoneUnalignedWriteError(ZoneError):
    """ZONE_UNALIGNED_WP: a write not at the write pointer, or not ending on the write
    granularity."""

    status = Status.ZONE_UNALIGNED_WP


class ZoneOpenResourceError(ZoneError):
    """ZONE_OPEN_RESOURCE: the zone cannot open without exceeding max_open_zones."""

    status = Status.ZONE_OPEN_RESOURCE


class ZoneActiveResourceError(ZoneError):
    """ZONE_ACTIVE_RESOURCE: the zone cannot become active without exceeding
    max_active_zones."""

    status = Status.ZONE_ACTIVE_RESOURCE


STATUS_TIMED_OUT = 0x100
"""The status the driver gives a request it stopped waiting for (``request_timeout``):
no device can write it (a status is one byte), so ``status_error`` knows it is ours."""


# errno as Linux's blk_status_to_errno gives it for virtblk_result's block status.
_ZONE_ERRORS: dict[int, tuple[type[ZoneError], int, str]] = {
    Status.ZONE_INVALID_CMD: (ZoneInvalidCommandError, errno.EIO,
                              "invalid command for the zone's type or state"),
    Status.ZONE_UNALIGNED_WP: (ZoneUnalignedWriteError, errno.EIO,
                               "write not at the zone's write pointer or granularity"),
    Status.ZONE_OPEN_RESOURCE: (ZoneOpenResourceError, errno.ETOOMANYREFS,
                                "too many open zones"),
    Status.ZONE_ACTIVE_RESOURCE: (ZoneActiveResourceError, errno.EOVERFLOW,
                                  "too many active zones"),
}


def status_error(status: int, what: str) -> OSError:
    """Map a virtio-blk status to the errno the Linux driver uses, as an exception
    (``STATUS_TIMED_OUT``, the driver's own, to :class:`RequestTimeoutError`)."""
    if status == STATUS_TIMED_OUT:
        return RequestTimeoutError(f"{what}: the device did not complete the request in time")
    if status == Status.UNSUPP:
        return BlockIOError(errno.ENOTTY, f"{what}: device answered UNSUPP")
    zone = _ZONE_ERRORS.get(status)
    if zone is not None:
        cls, err, meaning = zone
        return cls(err, f"{what}: device answered {Status(status).name} ({meaning})")
    try:
        name = Status(status).name
    except ValueError:
        name = f"unknown status {status}"
    return BlockIOError(errno.EIO, f"{what}: device answered {name}")
