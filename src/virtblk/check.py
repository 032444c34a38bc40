"""A conformance run against any vhost-user-blk device (``virtblk check``).

Each check is a small function registered with an id, a title and the section of the
VIRTIO 1.2 specification (or of QEMU's vhost-user protocol document) it tests, and returns
a :class:`Finding`: pass, fail (what was seen against what was expected), skip (why it
does not apply) or warn (legal but surprising, or a SHOULD not met).

Requests are built with the driver's lower layers (``VirtioBlk`` and
``HardwareQueue.submit`` with hand-made buffers), so the checks can send what the
``Disk`` API refuses up front: reads past the end, odd lengths, flags, too many segments,
descriptors pointing outside memory.  Checks that write save the data they touch and
write it back; ``allow_writes=False`` skips them.  A device that drops the connection
(qemu-storage-daemon does on a bad descriptor) ends that check's session only: the next
check reconnects, and the checks that can do this run last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from virtblk import unixsock
from virtblk.driver.virtio_blk import DRIVER_FEATURES, VirtioBlk
from virtblk.errors import DeviceGoneError
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkConfig,
    DiscardSegment,
    Feature,
    Lifetime,
    RequestType,
    Status,
    config_size,
    feature_names,
    has_feature,
)
from virtblk.vhost_user.errors import NackError, VhostUserError
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature, protocol_feature_names

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "Finding",
    "Outcome",
    "Report",
    "run_checks",
]

# Sections of VIRTIO 1.2 (content.tex, device-types/blk/description.tex) and of
# QEMU's docs/interop/vhost-user.rst that the checks cite.
RESERVED_FEATURES = "6.2 Device Requirements: Reserved Feature Bits"
SPLIT_QUEUE = "2.7 Split Virtqueues (descriptor table)"
BLK_CONFIG = "5.2.4 Device configuration layout"
BLK_INIT = "5.2.5 Device Initialization"
BLK_INIT_DEVICE = "5.2.5.2 Device Requirements: Device Initialization"
BLK_OPERATION = "5.2.6 Device Operation"
BLK_OPERATION_DRIVER = "5.2.6.1 Driver Requirements: Device Operation"
BLK_OPERATION_DEVICE = "5.2.6.2 Device Requirements: Device Operation"
VU_PROTOCOL = "vhost-user: Protocol features"
VU_MQ = "vhost-user: Multiple queue support"
VU_CONFIG = "vhost-user: VHOST_USER_GET_CONFIG"

UNKNOWN_TYPE = 0x7E
"""A request type no VIRTIO version defines (and without the legacy barrier bit)."""

_PROTOCOL_WANTED = (
    ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.CONFIG.mask
)
_RECONNECT_TRIES = 20


class Outcome(enum.StrEnum):
    """What a check concluded."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Finding:
    """A check's verdict and what was seen."""

    outcome: Outcome
    detail: str = ""


def passed(detail: str = "") -> Finding:
    """The device did what the spec asks."""
    return Finding(Outcome.PASS, detail)


def failed(seen: str, expected: str) -> Finding:
    """The device broke a requirement: say what it did and what was expected."""
    return Finding(Outcome.FAIL, f"{seen}; expected {expected}")


def warned(detail: str) -> Finding:
    """Allowed by the spec but surprising, or a SHOULD not met."""
    return Finding(Outcome.WARN, detail)


def skipped(why: str) -> Finding:
    """The check does not apply (feature not offered, writes disabled, ...)."""
    return Finding(Outcome.SKIP, why)


class Unexpected(Exception):
    """A step a check relies on went wrong: the check fails with this message."""


class _Skip(Exception):
    """The check cannot run here (raised by shared helpers)."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One registered check."""

    id: str
    title: str
    section: str
    run: Callable[[Context], Finding]
    writes: bool = False
    """Writes to the device (data or config), restoring it afterwards."""
    disruptive: bool = False
    """May make the device drop the connection: run after the others."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """A check's identity and its finding."""

    id: str
    title: str
    section: str
    outcome: Outcome
    detail: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-able dict."""
        return {
            "id": self.id,
            "title": self.title,
            "section": self.section,
            "outcome": str(self.outcome),
            "detail": self.detail,
        }


CHECKS: list[Check] = []
"""Every check, in the order they run (disruptive ones are moved to the end)."""


def check(
    id: str, title: str, section: str, *, writes: bool = False, disruptive: bool = False
) -> Callable[[Callable[[Context], Finding]], Callable[[Context], Finding]]:
    """Register the decorated function as a check."""

    def register(func: Callable[[Context], Finding]) -> Callable[[Context], Finding]:
        CHECKS.append(Check(id, title, section, func, writes, disruptive))
        return func

    return register


def status_name(status: int) -> str:
    """``OK``, ``IOERR``, ``UNSUPP``..., or the number for values the spec does not name."""
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


# ---------------------------------------------------------------------------- sessions


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
    """One connection with negotiated features and one request queue."""

    def __init__(self, path: str, *, timeout: float, queue_size: int, withheld: int = 0) -> None:
        self.withheld = withheld
        self.timeout = timeout
        sock = _connect(path, timeout)
        self.dev = VirtioBlk(
            sock,
            exclude_features=withheld,
            num_queues=1,
            queue_size=queue_size,
            reply_timeout=timeout,
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

    # -- connections -------------------------------------------------------------------
    def session(self, withheld: int = 0) -> Session:
        """A live session with ``withheld`` features left out; reconnects when needed.

        Devices serve one frontend at a time, so the previous session is closed first; the
        device may still be tearing it down, hence the retries.
        """
        current = self._session
        if current is not None and (current.broken or current.withheld != withheld):
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
            raise _Skip(f"{feature.name} not offered")
        if not self.session().has(feature):
            raise _Skip(f"{feature.name} offered but not negotiated")

    def require_writes(self) -> None:
        """Skip unless writing is allowed and the device is writable."""
        if not self.allow_writes:
            raise _Skip("writes disabled (--read-only)")
        if self.offered(Feature.BLK_RO):
            raise _Skip("the device is read-only (BLK_RO)")

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
            raise _Skip(f"the disk ({capacity} sectors) is too small for a scratch region")
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


def _pattern(length: int, seed: int) -> bytes:
    """Recognisable non-zero data, different per seed."""
    block = bytes(((i * 7 + seed) % 251) + 1 for i in range(256))
    return (block * (length // 256 + 1))[:length]


def _expect(
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


# ---------------------------------------------------------------------------- negotiation


@check("vu.version-1", "VIRTIO_F_VERSION_1 offered", RESERVED_FEATURES)
def _version_1(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.error and not n.features:
        return failed(f"negotiation failed: {n.error}", "GET_FEATURES to answer")
    if not ctx.offered(Feature.VERSION_1):
        return failed(f"features {n.features:#x} lack VERSION_1", "a device to offer it (MUST)")
    return passed(f"features {n.features:#x}: {' '.join(feature_names(n.features))}")


@check("vu.protocol-features", "protocol features with CONFIG", VU_PROTOCOL)
def _protocol_features(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.protocol_features is None:
        return failed(
            "VHOST_USER_F_PROTOCOL_FEATURES not offered",
            "it, so the frontend can read the config space (capacity)",
        )
    names = " ".join(protocol_feature_names(n.protocol_features))
    if not n.protocol_features & ProtocolFeature.CONFIG.mask:
        return failed(f"protocol features {names}", "CONFIG: without it the capacity is unknown")
    return passed(f"{n.protocol_features:#x}: {names}")


@check("vu.queue-num", "GET_QUEUE_NUM covers num_queues", VU_MQ)
def _queue_num(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.queue_num is None:
        return skipped("the MQ protocol feature is not offered")
    if n.queue_num < 1:
        return failed(f"GET_QUEUE_NUM answered {n.queue_num}", "at least 1")
    if ctx.offered(Feature.BLK_MQ) and n.config is not None:
        num_queues = BlkConfig.unpack(n.config).num_queues
        if n.queue_num < num_queues:
            return failed(
                f"GET_QUEUE_NUM {n.queue_num} < config num_queues {num_queues}",
                "the backend to support every queue the config announces",
            )
        return passed(f"GET_QUEUE_NUM {n.queue_num}, config num_queues {num_queues}")
    return passed(f"GET_QUEUE_NUM {n.queue_num}")


@check("vu.get-config", "GET_CONFIG of the feature-sized config space", VU_CONFIG)
def _get_config(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.protocol_features is None or not n.protocol_features & ProtocolFeature.CONFIG.mask:
        return skipped("the CONFIG protocol feature is not offered")
    if n.config is None:
        return failed(
            f"GET_CONFIG({n.config_size}) failed: {n.config_error or n.error}",
            "the config space up to the last negotiated field",
        )
    detail = f"{n.config_size} bytes"
    if n.full_config_error:
        detail += f"; a {BlkConfig.SIZE}-byte read is refused ({n.full_config_error})"
    return passed(detail)


# ---------------------------------------------------------------------------- config


@check("config.capacity", "capacity is non-zero", BLK_CONFIG)
def _capacity(ctx: Context) -> Finding:
    cap = ctx.dev.config.capacity
    if cap == 0:
        return warned("capacity is 0 sectors: no I/O is possible")
    return passed(f"{cap} sectors ({cap * SECTOR_SIZE} bytes)")


@check("config.blk-size", "blk_size is a power of two >= 512", BLK_INIT)
def _blk_size(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_BLK_SIZE)
    bs = ctx.dev.config.blk_size
    if bs < SECTOR_SIZE or bs & (bs - 1):
        return failed(f"blk_size {bs}", "a power of two of at least 512")
    cap = ctx.dev.config.capacity
    if cap % (bs // SECTOR_SIZE):
        return warned(f"blk_size {bs}, but capacity {cap} sectors is not a multiple of it")
    return passed(f"blk_size {bs}")


@check("config.seg-max", "seg_max >= 1 and size_max >= blk_size", BLK_CONFIG)
def _seg_max(ctx: Context) -> Finding:
    dev = ctx.dev
    if not (dev.has(Feature.BLK_SEG_MAX) or dev.has(Feature.BLK_SIZE_MAX)):
        raise _Skip("neither SEG_MAX nor SIZE_MAX offered")
    c = dev.config
    parts = []
    if dev.has(Feature.BLK_SEG_MAX):
        if c.seg_max < 1:
            return failed(f"seg_max {c.seg_max}", "at least one segment per request")
        parts.append(f"seg_max {c.seg_max}")
    if dev.has(Feature.BLK_SIZE_MAX):
        if c.size_max == 0:
            parts.append("size_max 0")
            return warned(
                f"{', '.join(parts)}: SIZE_MAX is offered with no usable limit "
                f"(a driver has to guess that 0 means none)"
            )
        if c.size_max < ctx.block:
            return failed(f"size_max {c.size_max}", f"at least one block ({ctx.block})")
        parts.append(f"size_max {c.size_max}")
    return passed(", ".join(parts))


@check("config.num-queues", "num_queues >= 1", BLK_CONFIG)
def _num_queues(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_MQ)
    nq = ctx.dev.config.num_queues
    if nq < 1:
        return failed(f"num_queues {nq}", "at least 1")
    return passed(f"num_queues {nq}")


@check("config.topology", "topology fields are consistent", BLK_INIT)
def _topology(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_TOPOLOGY)
    c = ctx.dev.config
    seen = (
        f"physical_block_exp {c.physical_block_exp}, alignment_offset {c.alignment_offset}, "
        f"min_io_size {c.min_io_size}, opt_io_size {c.opt_io_size}"
    )
    if c.physical_block_exp > 15:
        return failed(seen, "a physical block of at most 2**15 logical blocks")
    if c.alignment_offset >= 1 << c.physical_block_exp:
        return failed(seen, "alignment_offset smaller than a physical block")
    if c.min_io_size and c.opt_io_size and c.opt_io_size % c.min_io_size:
        return warned(f"{seen}: opt_io_size is not a multiple of min_io_size")
    return passed(seen)


@check("config.geometry", "geometry has heads and sectors", BLK_CONFIG)
def _geometry(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_GEOMETRY)
    c = ctx.dev.config
    seen = f"C/H/S {c.cylinders}/{c.heads}/{c.sectors}"
    if not c.heads or not c.sectors:
        return failed(seen, "non-zero heads and sectors")
    return passed(seen)


def _segment_limits(ctx: Context, feature: Feature, names: tuple[str, str]) -> Finding:
    ctx.require(feature)
    c = ctx.dev.config
    values = {name: getattr(c, name) for name in names}
    seen = ", ".join(f"{k} {v}" for k, v in values.items())
    zero = [k for k, v in values.items() if v == 0]
    if zero:
        return failed(seen, f"non-zero {' and '.join(zero)} when {feature.name} is offered")
    return passed(seen)


@check("config.discard-limits", "discard limits are non-zero", BLK_INIT)
def _discard_limits(ctx: Context) -> Finding:
    return _segment_limits(ctx, Feature.BLK_DISCARD, ("max_discard_sectors", "max_discard_seg"))


@check("config.write-zeroes-limits", "write-zeroes limits are non-zero", BLK_INIT)
def _write_zeroes_limits(ctx: Context) -> Finding:
    return _segment_limits(
        ctx, Feature.BLK_WRITE_ZEROES, ("max_write_zeroes_sectors", "max_write_zeroes_seg")
    )


@check("config.secure-erase-limits", "secure-erase limits are non-zero", BLK_INIT)
def _secure_erase_limits(ctx: Context) -> Finding:
    return _segment_limits(
        ctx, Feature.BLK_SECURE_ERASE, ("max_secure_erase_sectors", "max_secure_erase_seg")
    )


@check("config.padding", "unused0 and unused1 are zero", BLK_INIT_DEVICE)
def _padding(ctx: Context) -> Finding:
    raw = ctx.negotiation.config
    if raw is None:
        raise _Skip("the config space could not be read")
    seen = {"unused0": raw[33:34], "unused1": raw[57:60]}
    bad = {k: v.hex() for k, v in seen.items() if any(v)}
    if bad:
        return failed(", ".join(f"{k} = {v}" for k, v in bad.items()), "zero padding (MUST)")
    present = [k for k, v in seen.items() if v]
    return passed(f"{' and '.join(present)} zero")


@check("config.wce", "writeback can be read, toggled and restored", BLK_INIT, writes=True)
def _wce(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_CONFIG_WCE)
    if not ctx.allow_writes:
        raise _Skip("config writes disabled (--read-only)")
    dev = ctx.dev
    original = dev.config.writeback
    if original not in (0, 1):
        return failed(f"writeback reads {original}", "0 (writethrough) or 1 (writeback)")
    dev.set_writeback(not original)
    toggled = dev.config.writeback
    dev.set_writeback(bool(original))
    restored = dev.config.writeback
    if toggled != 1 - original or restored != original:
        return failed(
            f"writeback {original} -> wrote {1 - original}, read {toggled} -> wrote "
            f"{original}, read {restored}",
            "the value written to be read back",
        )
    return passed(f"writeback {original}, toggles to {toggled} and back")


@check("config.wce-without-flush", "CONFIG_WCE without FLUSH starts writethrough", BLK_INIT_DEVICE)
def _wce_without_flush(ctx: Context) -> Finding:
    if not (ctx.offered(Feature.BLK_CONFIG_WCE) and ctx.offered(Feature.BLK_FLUSH)):
        raise _Skip("needs CONFIG_WCE and FLUSH offered")
    session = ctx.session(withheld=Feature.BLK_FLUSH.mask)
    wb = session.dev.config.writeback
    ctx.drop_session()
    if wb != 0:
        return failed(
            f"writeback {wb} with CONFIG_WCE negotiated and FLUSH not",
            "writeback initialised to 0 (MUST)",
        )
    return passed("writeback 0")


# ---------------------------------------------------------------------------- flush


@check("flush.offered", "FLUSH offered (and with CONFIG_WCE)", BLK_INIT_DEVICE)
def _flush_offered(ctx: Context) -> Finding:
    if ctx.offered(Feature.BLK_FLUSH):
        return passed("FLUSH offered")
    if ctx.offered(Feature.BLK_CONFIG_WCE):
        return failed("CONFIG_WCE offered without FLUSH", "FLUSH offered with CONFIG_WCE (MUST)")
    return warned("FLUSH not offered (devices SHOULD offer it): writes are not crash-safe")


@check("flush.request", "FLUSH completes OK", BLK_OPERATION_DEVICE)
def _flush(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_FLUSH)
    return _expect(ctx.session().request(RequestType.FLUSH), "FLUSH", {Status.OK})


@check("flush.after-write", "write, FLUSH, read back", BLK_OPERATION_DEVICE, writes=True)
def _flush_after_write(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_FLUSH)
    ctx.require_writes()
    sector, _ = ctx.scratch()
    with ctx.preserved(sector, ctx.block // SECTOR_SIZE):
        data = _pattern(ctx.block, 3)
        ctx.write(sector, data)
        reply = ctx.session().request(RequestType.FLUSH)
        if reply.status != Status.OK:
            return failed(f"FLUSH after a write answered {reply.status_name}", "OK")
        back = ctx.read(sector, ctx.block)
    if back != data and any(back):
        return failed("data read after the flush differs from what was written", "the same")
    return passed("OK" if back == data else "OK (the device reads zeroes: a null device?)")


# ---------------------------------------------------------------------------- requests


@check("io.read", "IN of one block", BLK_OPERATION)
def _read(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.IN, 0, in_=[ctx.block])
    finding = _expect(reply, f"IN of {ctx.block} bytes at sector 0", {Status.OK})
    if finding.outcome is Outcome.PASS and reply.written != ctx.block + 1:
        return warned(f"OK, but used length {reply.written} (data + status is {ctx.block + 1})")
    return finding


@check("io.round-trip", "OUT then IN returns the data", BLK_OPERATION, writes=True)
def _round_trip(ctx: Context) -> Finding:
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    length = sectors * SECTOR_SIZE
    with ctx.preserved(sector, sectors):
        data = _pattern(length, 1)
        ctx.write(sector, data)
        back = ctx.read(sector, length)
    if back == data:
        return passed(f"{length} bytes at sector {sector}")
    if not any(back):
        return warned(f"wrote {length} bytes, read back zeroes (a null device?)")
    return failed("the data read back differs from what was written", "the same data")


@check("io.get-id", "GET_ID answers a NUL-padded 20-byte ID", BLK_OPERATION)
def _get_id(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.GET_ID, in_=[VIRTIO_BLK_ID_BYTES], fill=0xFF)
    if reply.status == Status.UNSUPP:
        return warned("GET_ID answered UNSUPP: the device has no serial")
    if reply.status != Status.OK:
        return failed(f"GET_ID answered {reply.status_name}", "OK")
    raw = reply.data
    end = raw.find(b"\0")
    text = raw if end < 0 else raw[:end]
    shown = text.decode("ascii", "replace")
    if any(b < 0x20 or b > 0x7E for b in text):
        return failed(f"ID {raw!r} is not printable ASCII", "an ASCII string")
    if end >= 0 and any(raw[end:]):
        padding = raw[end + 1 :]
        untouched = sum(1 for b in padding if b == 0xFF)
        return warned(
            f"ID {shown!r} ends with a NUL at byte {end}, but {len(padding) - padding.count(0)}"
            f" of the {len(padding)} bytes after it are not NULs ({untouched} still hold the "
            f"driver's 0xff): the spec says NUL-padded"
        )
    return passed(f"ID {shown!r}")


@check("io.discard", "DISCARD of an aligned range", BLK_OPERATION, writes=True)
def _discard(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.DISCARD, [DiscardSegment(sector, sectors)])
    return _expect(reply, f"DISCARD of {sectors} sectors", {Status.OK})


def _write_zeroes(ctx: Context, flags: int) -> Finding:
    ctx.require(Feature.BLK_WRITE_ZEROES)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    length = sectors * SECTOR_SIZE
    with ctx.preserved(sector, sectors):
        ctx.write(sector, _pattern(length, 2))
        reply = ctx.segments(RequestType.WRITE_ZEROES, [DiscardSegment(sector, sectors, flags)])
        if reply.status != Status.OK:
            return failed(f"WRITE_ZEROES (flags {flags}) answered {reply.status_name}", "OK")
        back = ctx.read(sector, length)
    if any(back):
        nonzero = sum(1 for b in back if b)
        return failed(f"{nonzero} of {length} bytes read back non-zero", "zeroes (MUST)")
    return passed(f"{sectors} sectors read back as zeroes")


@check("io.write-zeroes", "WRITE_ZEROES reads back zeroes", BLK_OPERATION_DEVICE, writes=True)
def _write_zeroes_plain(ctx: Context) -> Finding:
    return _write_zeroes(ctx, 0)


@check(
    "io.write-zeroes-unmap",
    "WRITE_ZEROES with UNMAP reads back zeroes",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _write_zeroes_unmap(ctx: Context) -> Finding:
    return _write_zeroes(ctx, DISCARD_FLAG_UNMAP)


@check("io.secure-erase", "SECURE_ERASE of an aligned range", BLK_OPERATION, writes=True)
def _secure_erase(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SECURE_ERASE)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.SECURE_ERASE, [DiscardSegment(sector, sectors)])
    return _expect(reply, f"SECURE_ERASE of {sectors} sectors", {Status.OK})


@check("io.get-lifetime", "GET_LIFETIME answers defined values", BLK_OPERATION_DEVICE)
def _get_lifetime(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_LIFETIME)
    reply = ctx.session().request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
    if reply.status != Status.OK:
        return failed(f"GET_LIFETIME answered {reply.status_name}", "OK")
    life = Lifetime.unpack(reply.data)
    seen = (
        f"pre_eol_info {life.pre_eol_info}, typ_a {life.device_lifetime_est_typ_a}, "
        f"typ_b {life.device_lifetime_est_typ_b}"
    )
    if (
        life.pre_eol_info > Lifetime.PRE_EOL_URGENT
        or life.device_lifetime_est_typ_a > 11
        or life.device_lifetime_est_typ_b > 11
    ):
        return failed(seen, "no reserved values (pre_eol_info <= 3, estimates <= 11)")
    return passed(seen)


@check("io.read-only", "writes fail on a read-only device", BLK_OPERATION_DEVICE)
def _read_only(ctx: Context) -> Finding:
    if not ctx.offered(Feature.BLK_RO):
        raise _Skip("the device is writable (BLK_RO not offered)")
    before = ctx.read(0, ctx.block)
    # The same data: even a device that wrongly accepts the write changes nothing.
    reply = ctx.session().request(RequestType.OUT, 0, out=[before])
    after = ctx.read(0, ctx.block)
    if after != before:
        return failed("the data changed after a refused write", "no data written (MUST NOT)")
    return _expect(reply, "OUT on a read-only device", {Status.IOERR})


# ---------------------------------------------------------------------------- limits


@check("limits.seg-max", "a request with seg_max segments", BLK_CONFIG)
def _seg_max_request(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SEG_MAX)
    dev = ctx.dev
    seg_max = dev.config.seg_max
    usable = dev.sg_elems
    count = min(seg_max, usable, dev.capacity_sectors * SECTOR_SIZE // ctx.block)
    if count < 1:
        raise _Skip("no usable segment count")
    reply = ctx.session().request(RequestType.IN, 0, in_=[ctx.block] * count)
    finding = _expect(reply, f"IN with {count} segments of {ctx.block} bytes", {Status.OK})
    if finding.outcome is Outcome.PASS and count < seg_max:
        return passed(
            f"{finding.detail} (seg_max {seg_max}; our queue of "
            f"{dev.queue_size} limits a chain to {usable})"
        )
    return finding


@check("limits.size-max", "a segment of size_max bytes", BLK_CONFIG)
def _size_max_request(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SIZE_MAX)
    dev = ctx.dev
    size = min(dev.config.size_max, 1 << 20, dev.size) // ctx.block * ctx.block
    if size < ctx.block:
        raise _Skip(f"size_max {dev.config.size_max} is smaller than a block")
    reply = ctx.session().request(RequestType.IN, 0, in_=[size])
    return _expect(reply, f"IN of one {size}-byte segment", {Status.OK})


# ---------------------------------------------------------------------------- out of range


@check("range.past-end", "IN starting at capacity fails", BLK_OPERATION)
def _past_end(ctx: Context) -> Finding:
    cap = ctx.dev.capacity_sectors
    reply = ctx.session().request(RequestType.IN, cap, in_=[ctx.block])
    return _expect(reply, f"IN at sector {cap} (= capacity)", {Status.IOERR})


@check("range.straddle", "IN straddling the end fails", BLK_OPERATION)
def _straddle(ctx: Context) -> Finding:
    cap = ctx.dev.capacity_sectors
    per_block = ctx.block // SECTOR_SIZE
    if cap < per_block:
        raise _Skip("the disk is smaller than a block")
    sector = cap - per_block
    reply = ctx.session().request(RequestType.IN, sector, in_=[2 * ctx.block])
    return _expect(
        reply, f"IN of 2 blocks at sector {sector} (1 block before the end)", {Status.IOERR}
    )


@check("range.overflow", "IN at a sector whose byte offset overflows 64 bits", BLK_OPERATION)
def _overflow(ctx: Context) -> Finding:
    sector = (1 << 64) - (ctx.block // SECTOR_SIZE)
    reply = ctx.session().request(RequestType.IN, sector, in_=[ctx.block])
    return _expect(reply, f"IN at sector {sector:#x}", {Status.IOERR})


@check("range.discard-past-end", "DISCARD past capacity fails", BLK_OPERATION, writes=True)
def _discard_past_end(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    cap = ctx.dev.capacity_sectors
    align = max(1, ctx.dev.config.discard_sector_alignment)
    reply = ctx.segments(RequestType.DISCARD, [DiscardSegment(cap // align * align + align, align)])
    return _expect(
        reply,
        "DISCARD past capacity",
        {Status.IOERR},
        warn={Status.UNSUPP},
        why="the device refused it, but as unsupported rather than as an error",
    )


# ---------------------------------------------------------------------------- unsupported


@check("unsupp.unknown-type", "unknown request type answers UNSUPP", BLK_OPERATION)
def _unknown_type(ctx: Context) -> Finding:
    reply = ctx.session().request(UNKNOWN_TYPE)
    return _expect(reply, f"request type {UNKNOWN_TYPE:#x}", {Status.UNSUPP})


@check("unsupp.zone-report", "ZONE_REPORT without ZONED answers UNSUPP", BLK_OPERATION_DEVICE)
def _zone_report(ctx: Context) -> Finding:
    if ctx.session().has(Feature.BLK_ZONED):
        raise _Skip("ZONED was negotiated")
    reply = ctx.session().request(RequestType.ZONE_REPORT, 0, in_=[128])
    return _expect(reply, "ZONE_REPORT without ZONED negotiated", {Status.UNSUPP})


@check("unsupp.not-offered", "a request whose feature is not offered answers UNSUPP", BLK_OPERATION)
def _not_offered(ctx: Context) -> Finding:
    if not ctx.offered(Feature.BLK_LIFETIME):
        reply = ctx.session().request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
        return _expect(
            reply,
            "GET_LIFETIME without LIFETIME offered",
            {Status.UNSUPP},
            warn={Status.IOERR},
            why="IOERR is allowed, UNSUPP is what the spec "
            "names for a request the device does not support",
        )
    if not ctx.offered(Feature.BLK_FLUSH):
        reply = ctx.session().request(RequestType.FLUSH)
        return _expect(
            reply,
            "FLUSH without FLUSH offered",
            {Status.UNSUPP},
            warn={Status.OK, Status.IOERR},
            why="UNSUPP is what the spec names",
        )
    # Legacy SCSI commands: VIRTIO 1.x devices cannot offer BLK_SCSI.
    reply = ctx.session().request(RequestType.SCSI_CMD)
    return _expect(reply, "legacy SCSI_CMD without BLK_SCSI", {Status.UNSUPP})


@check("unsupp.not-negotiated", "a request whose feature was not negotiated", BLK_OPERATION)
def _not_negotiated(ctx: Context) -> Finding:
    """The spec requires UNSUPP only for zone requests without ZONED; for others it says
    nothing, so executing the request is a warning, not a failure."""
    if ctx.offered(Feature.BLK_FLUSH):
        session = ctx.session(withheld=Feature.BLK_FLUSH.mask)
        reply = session.request(RequestType.FLUSH)
        what = "FLUSH with FLUSH offered but not negotiated"
    elif ctx.offered(Feature.BLK_LIFETIME):
        session = ctx.session(withheld=Feature.BLK_LIFETIME.mask)
        reply = session.request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
        what = "GET_LIFETIME with LIFETIME offered but not negotiated"
    else:
        raise _Skip("neither FLUSH nor LIFETIME offered")
    ctx.drop_session()
    return _expect(
        reply,
        what,
        {Status.UNSUPP, Status.IOERR},
        warn={Status.OK},
        why="the device executed it; the spec requires UNSUPP only for zone "
        "requests without ZONED (5.2.6.2) and is silent here",
    )


# ---------------------------------------------------------------------------- malformed


@check("malformed.in-length", "IN whose length is not a multiple of 512", BLK_OPERATION_DRIVER)
def _odd_in(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.IN, 0, in_=[100])
    return _expect(
        reply,
        "IN of 100 bytes",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check(
    "malformed.out-length",
    "OUT whose length is not a multiple of 512",
    BLK_OPERATION_DRIVER,
    writes=True,
)
def _odd_out(ctx: Context) -> Finding:
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors) as original:
        reply = ctx.session().request(RequestType.OUT, sector, out=[original[:100]])
    return _expect(
        reply,
        "OUT of 100 bytes",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check(
    "malformed.discard-unmap",
    "DISCARD with the UNMAP flag answers UNSUPP",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _discard_unmap(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(
            RequestType.DISCARD, [DiscardSegment(sector, sectors, DISCARD_FLAG_UNMAP)]
        )
    return _expect(reply, "DISCARD with UNMAP", {Status.UNSUPP})


@check(
    "malformed.unknown-flags",
    "WRITE_ZEROES with an unknown flag answers UNSUPP",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _unknown_flags(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_WRITE_ZEROES)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.WRITE_ZEROES, [DiscardSegment(sector, sectors, 2)])
    return _expect(reply, "WRITE_ZEROES with flags 0x2", {Status.UNSUPP})


@check(
    "malformed.discard-segments",
    "DISCARD with more than max_discard_seg segments",
    BLK_OPERATION_DRIVER,
    writes=True,
)
def _too_many_segments(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    max_seg = ctx.dev.config.max_discard_seg
    if max_seg > 256:
        raise _Skip(f"max_discard_seg {max_seg} is too large to exceed cheaply")
    sector, sectors = ctx.scratch()
    segs = [DiscardSegment(sector, sectors)] * (max_seg + 1)
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.DISCARD, segs)
    return _expect(
        reply,
        f"DISCARD with {max_seg + 1} segments (max {max_seg})",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check("malformed.bad-address", "a descriptor outside guest memory", SPLIT_QUEUE, disruptive=True)
def _bad_address(ctx: Context) -> Finding:
    session = ctx.session()
    outside = session.dev.region.guest_phys_addr + session.dev.region.size + (1 << 30)
    try:
        reply = session.request(RequestType.IN, 0, raw_in=[(outside, ctx.block)])
    except DeviceGoneError:
        ctx.drop_session()
        return warned("the device dropped the connection (it has to be reconnected)")
    except TimeoutError:
        ctx.drop_session()
        return failed("the request never completed", "an error completion or a hang-up")
    if reply.status == Status.OK and reply.written:
        return failed(f"answered OK with used length {reply.written}", "an error")
    alive = session.request(RequestType.IN, 0, in_=[ctx.block])
    if alive.status != Status.OK:
        return failed(f"the queue is unusable afterwards ({alive.status_name})", "it to work")
    return passed(f"answered with used length {reply.written} and kept serving")


# ---------------------------------------------------------------------------- running


@dataclasses.dataclass
class Report:
    """The results of a run, with what the device offered."""

    socket: str
    results: list[CheckResult]
    features: int
    protocol_features: int | None
    reconnects: int

    @property
    def failed(self) -> bool:
        """True when any check failed."""
        return any(r.outcome is Outcome.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each outcome."""
        return {str(o): sum(1 for r in self.results if r.outcome is o) for o in Outcome}

    def result(self, check_id: str) -> CheckResult:
        """The result of one check by id."""
        for r in self.results:
            if r.id == check_id:
                return r
        raise KeyError(check_id)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "socket": self.socket,
            "features_offered": feature_names(self.features),
            "protocol_features": (
                protocol_feature_names(self.protocol_features)
                if self.protocol_features is not None
                else None
            ),
            "counts": self.counts(),
            "failed": self.failed,
            "reconnects": self.reconnects,
            "checks": [r.as_dict() for r in self.results],
        }


def ordered_checks() -> list[Check]:
    """The checks in run order: disruptive ones last."""
    return [c for c in CHECKS if not c.disruptive] + [c for c in CHECKS if c.disruptive]


def run_checks(
    socket_path: str | os.PathLike[str],
    *,
    allow_writes: bool = True,
    timeout: float = 5.0,
    queue_size: int = 256,
    only: Sequence[str] = (),
    progress: Callable[[CheckResult], None] | None = None,
) -> Report:
    """Run every check (or those whose id starts with one of ``only``) against the device.

    Checks that write restore the data they touched; ``allow_writes=False`` skips them.
    Raises DeviceGoneError when nothing listens on ``socket_path``.
    """
    path = os.fspath(socket_path)
    ctx = Context(path, timeout=timeout, queue_size=queue_size, allow_writes=allow_writes)
    results: list[CheckResult] = []
    try:
        for chk in ordered_checks():
            if only and not any(chk.id.startswith(prefix) for prefix in only):
                continue
            result = CheckResult(chk.id, chk.title, chk.section, *_run_one(ctx, chk))
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        ctx.close()
    return Report(
        path,
        results,
        ctx.negotiation.features,
        ctx.negotiation.protocol_features,
        max(0, ctx.reconnects - 1),
    )


def _run_one(ctx: Context, chk: Check) -> tuple[Outcome, str]:
    if chk.writes and not ctx.allow_writes:
        return Outcome.SKIP, "writes disabled (--read-only)"
    try:
        finding = chk.run(ctx)
    except _Skip as exc:
        return Outcome.SKIP, str(exc)
    except Unexpected as exc:
        return Outcome.FAIL, str(exc)
    except DeviceGoneError as exc:
        ctx.drop_session()
        return Outcome.FAIL, f"the device dropped the connection: {exc}"
    except TimeoutError as exc:
        ctx.drop_session()
        return Outcome.FAIL, f"no completion: {exc}"
    except Exception as exc:  # a check must not stop the run; say what broke
        ctx.drop_session()
        return Outcome.FAIL, f"the check could not complete: {type(exc).__name__}: {exc}"
    return finding.outcome, finding.detail
