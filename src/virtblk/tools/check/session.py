"""The session harness: connections to the device under test, the bare vhost-user
negotiation, and the :class:`Context` every check is given (a live session that
reconnects after the device hung up, requests that must succeed, data saved and written
back), with the helpers checks use to judge a reply."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Collection, Iterator, Sequence

from virtblk import unixsock
from virtblk.driver.virtio_blk import DRIVER_FEATURES, VirtioBlk
from virtblk.errors import DeviceGoneError
from virtblk.spec import (
    SECTOR_SIZE,
    BlkConfig,
    DiscardSegment,
    Feature,
    RequestType,
    Status,
    config_size,
    has_feature,
)
from virtblk.tools.check.framework import (
    Finding,
    Skip,
    Unexpected,
    failed,
    passed,
    status_name,
    warned,
)
from virtblk.vhost_user.errors import NackError, VhostUserError
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature

_PROTOCOL_WANTED = (
    ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.CONFIG.mask
)
_RECONNECT_TRIES = 20


@dataclasses.dataclass(frozen=True)
class Reply:
    """A completed request: status byte, used length, and the bytes of its in-buffers."""

    status: int
    written: int
    data: bytes

    @property
    def status_name(self) -> str:
        """The status as the spec names it."""
        return status_name(self.status)


class Session:
    """One connection with negotiated features and one request queue on a ring of the
    layout ``packed`` asks for (the driver's rule: False split, True packed)."""

    def __init__(self, path: str, *, timeout: float, queue_size: int, withheld: int = 0,
                 packed: bool = False) -> None:
        self.withheld = withheld
        self.timeout = timeout
        self.packed = packed
        sock = _connect(path, timeout)
        self.dev = VirtioBlk(
            sock,
            exclude_features=withheld,
            num_queues=1,
            queue_size=queue_size,
            reply_timeout=timeout,
            packed=packed,
        )
        self.queue = self.dev.queues[0]

    @property
    def broken(self) -> bool:
        """The queue saw the device go away or a request never completed."""
        return self.queue.broken is not None

    def has(self, feature: Feature) -> bool:
        """Negotiated in this session."""
        return self.dev.has(feature)

    def request(
        self,
        type_: int,
        sector: int = 0,
        out: Sequence[bytes] = (),
        in_: Sequence[int] = (),
        *,
        fill: int = 0,
        raw_in: Sequence[tuple[int, int]] = (),
    ) -> Reply:
        """Send one request with ``out`` data buffers and ``in_`` buffers of these lengths
        (pre-filled with ``fill``), plus ``raw_in`` buffers given as (address, length).

        Raises TimeoutError when it does not complete (the session is then unusable) and
        DeviceGoneError when the device hangs up.
        """
        dev = self.dev
        q = self.queue
        allocated: list[int] = []
        try:
            out_bufs: list[tuple[int, int]] = []
            for data in out:
                gpa = dev.allocator.alloc(max(1, len(data)))
                allocated.append(gpa)
                dev.memory.view(gpa, len(data))[:] = data
                out_bufs.append((gpa, len(data)))
            in_bufs: list[tuple[int, int]] = []
            for length in in_:
                gpa = dev.allocator.alloc(max(1, length))
                allocated.append(gpa)
                dev.memory.view(gpa, length)[:] = bytes([fill]) * length
                in_bufs.append((gpa, length))
            req = q.get_tag(self.timeout)
            q.submit(req, type_, sector, out_bufs, [*in_bufs, *raw_in])
            try:
                q.wait_for(req, self.timeout)
            except TimeoutError:
                allocated.clear()  # the device may still write them: never reuse
                q.fail(TimeoutError(f"request type {type_} never completed"))
                raise TimeoutError(
                    f"the device did not complete the request within {self.timeout:g} s"
                ) from None
            data = b"".join(bytes(dev.memory.view(gpa, n)) for gpa, n in in_bufs)
            reply = Reply(req.status, req.written, data)
            q.put_tag(req)
            return reply
        finally:
            for gpa in allocated:
                dev.allocator.free(gpa)

    def close(self) -> None:
        """Close the connection (the device resets)."""
        with contextlib.suppress(Exception):
            self.dev.close()


def _connect(path: str, timeout: float) -> socket.socket:
    try:
        return unixsock.connect(path, timeout)
    except OSError as exc:
        # unixsock's message already names the path and the reason: its strerror, not
        # str(exc), whose "[Errno N]" the new error would print a second time.
        raise DeviceGoneError(exc.errno, exc.strerror or str(exc)) from exc


@dataclasses.dataclass
class Negotiation:
    """What a bare vhost-user negotiation showed, before any queue was set up."""

    features: int = 0
    protocol_features: int | None = None
    queue_num: int | None = None
    config_size: int = 0
    config: bytes | None = None
    config_error: str | None = None
    full_config_error: str | None = None
    error: str | None = None


def negotiate(path: str, timeout: float) -> Negotiation:
    """Walk the vhost-user handshake by hand and record every answer.

    Raises DeviceGoneError when nothing listens on ``path``.  A device still tearing down
    an earlier connection may hang up on the first message: that is retried.
    """
    for _ in range(_RECONNECT_TRIES):
        result = _negotiate_once(path, timeout)
        if result.features or result.error is None:
            return result
        time.sleep(0.1)
    return result


def _negotiate_once(path: str, timeout: float) -> Negotiation:
    result = Negotiation()
    with VhostUserFrontend(_connect(path, timeout), timeout=timeout) as fe:
        try:
            fe.set_owner()
            result.features = fe.get_features()
            protocol = 0
            if has_feature(result.features, Feature.VHOST_USER_PROTOCOL_FEATURES):
                result.protocol_features = fe.get_protocol_features()
                protocol = result.protocol_features & _PROTOCOL_WANTED
                fe.set_protocol_features(protocol)
            if protocol & ProtocolFeature.MQ.mask:
                result.queue_num = fe.get_queue_num()
            wanted = result.features & (DRIVER_FEATURES | Feature.VHOST_USER_PROTOCOL_FEATURES.mask)
            fe.set_features(wanted)
            result.config_size = config_size(wanted)
            if protocol & ProtocolFeature.CONFIG.mask:
                try:
                    result.config = fe.get_config(result.config_size)
                except NackError as exc:
                    result.config_error = str(exc)
                if result.config_size < BlkConfig.SIZE:
                    try:
                        fe.get_config(BlkConfig.SIZE)
                    except NackError as exc:
                        result.full_config_error = str(exc)
        except (VhostUserError, DeviceGoneError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
    return result


class Context:
    """What checks share: the socket, options, the negotiation record, a live session."""

    def __init__(self, path: str, *, timeout: float, queue_size: int, allow_writes: bool) -> None:
        self.path = path
        self.timeout = timeout
        self.queue_size = queue_size
        self.allow_writes = allow_writes
        self._session: Session | None = None
        self._gone: str | None = None
        self.reconnects = 0
        self.negotiation = negotiate(path, timeout)
        self.packed = False
        """The ring layout request checks run over: the runner runs them over the split
        ring, then again over the packed ring when the device offers it."""

    # -- connections -------------------------------------------------------------------
    def session(self, withheld: int = 0) -> Session:
        """A live session with ``withheld`` features left out, on a ring of the layout
        ``packed`` says; reconnects when needed.

        Devices serve one frontend at a time, so the previous session is closed first; the
        device may still be tearing it down, hence the retries.
        """
        current = self._session
        if current is not None and (current.broken or current.withheld != withheld
                                    or current.packed != self.packed):
            self.drop_session()
        if self._session is None and self._gone is not None:
            raise Unexpected(self._gone)
        if self._session is None:
            last: Exception | None = None
            for _ in range(_RECONNECT_TRIES):
                try:
                    self._session = Session(
                        self.path,
                        timeout=self.timeout,
                        queue_size=self.queue_size,
                        withheld=withheld,
                        packed=self.packed,
                    )
                    break
                except (DeviceGoneError, VhostUserError) as exc:
                    last = exc
                    time.sleep(0.1)
            else:
                self._gone = f"cannot reconnect to the device: {last}"
                raise Unexpected(self._gone)
            self.reconnects += 1
        assert self._session is not None
        return self._session

    def drop_session(self) -> None:
        """Close the current session (after the device hung up or a request hung)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- what the main session negotiated -----------------------------------------------
    @property
    def dev(self) -> VirtioBlk:
        """The driver core of the main session."""
        return self.session().dev

    def offered(self, feature: Feature) -> bool:
        """The device offers ``feature``."""
        return has_feature(self.negotiation.features, feature)

    def require(self, feature: Feature) -> None:
        """Skip the check unless ``feature`` was offered and negotiated."""
        if not self.offered(feature):
            raise Skip(f"{feature.name} not offered")
        if not self.session().has(feature):
            raise Skip(f"{feature.name} offered but not negotiated")

    def require_writes(self) -> None:
        """Skip unless writing is allowed and the device is writable."""
        if not self.allow_writes:
            raise Skip("writes disabled (--read-only)")
        if self.offered(Feature.BLK_RO):
            raise Skip("the device is read-only (BLK_RO)")

    @property
    def block(self) -> int:
        """The logical block size in bytes: the unit every data request uses."""
        return self.dev.logical_block_size

    def scratch(self) -> tuple[int, int]:
        """``(sector, sectors)``: an aligned region in the middle of the disk to test on."""
        dev = self.dev
        c = dev.config
        align = max(8, self.block // SECTOR_SIZE)
        if dev.has(Feature.BLK_DISCARD):
            align = max(align, c.discard_sector_alignment)
        if dev.has(Feature.BLK_SECURE_ERASE):
            align = max(align, c.secure_erase_sector_alignment)
        capacity = dev.capacity_sectors
        if capacity < 2 * align:
            raise Skip(f"the disk ({capacity} sectors) is too small for a scratch region")
        return (capacity // 2) // align * align, align

    # -- requests that must succeed ------------------------------------------------------
    def read(self, sector: int, length: int) -> bytes:
        """Read ``length`` bytes at ``sector``; Unexpected unless OK."""
        reply = self.session().request(RequestType.IN, sector, in_=[length], fill=0xA5)
        if reply.status != Status.OK:
            raise Unexpected(f"IN of {length} bytes at sector {sector}: {reply.status_name}")
        return reply.data

    def write(self, sector: int, data: bytes) -> None:
        """Write ``data`` at ``sector``; Unexpected unless OK."""
        reply = self.session().request(RequestType.OUT, sector, out=[data])
        if reply.status != Status.OK:
            raise Unexpected(f"OUT of {len(data)} bytes at sector {sector}: {reply.status_name}")

    @contextlib.contextmanager
    def preserved(self, sector: int, sectors: int) -> Iterator[bytes]:
        """Save the region, yield its data, write it back (and flush) afterwards."""
        original = self.read(sector, sectors * SECTOR_SIZE)
        try:
            yield original
        finally:
            session = self.session()
            reply = session.request(RequestType.OUT, sector, out=[original])
            if reply.status != Status.OK:
                raise Unexpected(
                    f"restoring {sectors} sectors at {sector} failed: {reply.status_name}"
                )
            if session.has(Feature.BLK_FLUSH):
                session.request(RequestType.FLUSH)

    def segments(self, type_: int, segments: Sequence[DiscardSegment]) -> Reply:
        """A DISCARD / WRITE_ZEROES / SECURE_ERASE request with these segments."""
        payload = b"".join(seg.pack() for seg in segments)
        return self.session().request(type_, 0, out=[payload])

    def close(self) -> None:
        """Close whatever session is open."""
        self.drop_session()


def pattern(length: int, seed: int) -> bytes:
    """Recognisable non-zero data, different per seed."""
    block = bytes(((i * 7 + seed) % 251) + 1 for i in range(256))
    return (block * (length // 256 + 1))[:length]


def expect(
    reply: Reply,
    what: str,
    ok: Collection[int],
    *,
    warn: Collection[int] = (),
    why: str = "",
) -> Finding:
    """Pass when the status is in ``ok``, warn when in ``warn``, else fail."""
    seen = f"{what} answered {reply.status_name}"
    expected = " or ".join(status_name(s) for s in sorted(ok))
    if reply.status in ok:
        return passed(seen)
    if reply.status in warn:
        return warned(f"{seen}{'; ' + why if why else ''}")
    return failed(seen, expected)
