"""The virtio-blk device model: configuration, features, request execution, queue workers.

``BlkDevice`` implements the ``VhostUserDevice`` contract (docs/ARCHITECTURE.md): the
vhost-user backend negotiates features and hands over started virtqueues; each queue is
then served by its own thread. A worker drains its queue in batches: one used-index
publication and at most one interrupt per batch, with notifications suppressed while it
works, so the per-request cost stays in parsing and the storage call.

Everything a driver writes into shared memory is hostile input: a malformed chain is
answered (IOERR, or used length 0 when there is nowhere to put a status), counted and
logged; a broken ring stops only its own queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import threading
from collections.abc import Callable

from virtblk.device.backends import Backend, zero_fill
from virtblk.device.request import (
    HEADER_FORMAT,
    HEADER_SIZE,
    BlkRequest,
    ChainLike,
    MalformedRequest,
    parse_request,
    read_segments,
    type_name,
)
from virtblk.device.zoned import ZonedMemoryBackend, ZonedRequests
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BlkConfig,
    DiscardSegment,
    Feature,
    Lifetime,
    RequestType,
    Status,
    feature_names,
    has_feature,
)
from virtblk.virtio.split import ChainError, DeviceVirtqueue, FlatChain, RingError, chain_of

log = logging.getLogger("virtblk.device")

_ONE = (1).to_bytes(8, "little")
"""An eventfd increment: what a call (interrupt) notification writes."""

# Plain ints for the per-request comparisons (enum attribute lookups cost more).
_OK, _IOERR, _UNSUPP = int(Status.OK), int(Status.IOERR), int(Status.UNSUPP)
_IN, _OUT, _OUT_FUA = int(RequestType.IN), int(RequestType.OUT), int(RequestType.OUT_FUA)
_NEXT, _WRITE = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
_NEXT_WRITE = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE

CACHE_WRITE_BACK = "write back"
CACHE_WRITE_THROUGH = "write through"



@dataclasses.dataclass(slots=True)
class QueueStats:
    """Counters of one queue; only its worker writes them, so they need no lock."""

    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    ioerr: int = 0
    unsupp: int = 0
    malformed: int = 0
    chain_errors: int = 0
    internal_errors: int = 0
    notifications: int = 0
    batches: int = 0
    broken: bool = False
    running: bool = False

    def as_dict(self) -> dict[str, object]:
        """A plain snapshot (the dict of types is copied)."""
        snapshot = dataclasses.asdict(self)
        snapshot["requests"] = dict(self.requests)
        return snapshot


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentLimits:
    """Limits of one of DISCARD, WRITE_ZEROES, SECURE_ERASE as advertised in config."""

    max_sectors: int
    max_seg: int
    alignment: int


class BlkDevice:
    """A virtio-blk device over a ``Backend``; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        serial: str | bytes = b"",
        blk_size: int = SECTOR_SIZE,
        read_only: bool = False,
        seg_max: int | None = None,
        size_max: int = 0,
        physical_block_exp: int = 0,
        alignment_offset: int = 0,
        min_io_size: int = 0,
        opt_io_size: int = 0,
        geometry: tuple[int, int, int] | None = None,
        max_discard_sectors: int = 0x3FFFFF,
        max_discard_seg: int = 1,
        discard_sector_alignment: int | None = None,
        max_write_zeroes_sectors: int = 0x3FFFFF,
        max_write_zeroes_seg: int = 1,
        max_secure_erase_sectors: int = 0x3FFFFF,
        max_secure_erase_seg: int = 1,
        secure_erase_sector_alignment: int | None = None,
        writeback: bool = True,
        lifetime: Lifetime | None = None,
        fua: bool = False,
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be in 1..65535, got {num_queues}")
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue_size must be a power of two in 2..32768, got {queue_size}")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size must be a power of two >= 512, got {blk_size}")
        serial_bytes = serial.encode("ascii") if isinstance(serial, str) else bytes(serial)
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(
                f"serial is {len(serial_bytes)} bytes; GET_ID answers at most "
                f"{VIRTIO_BLK_ID_BYTES}")
        for name, value in (("max_discard_seg", max_discard_seg),
                            ("max_write_zeroes_seg", max_write_zeroes_seg),
                            ("max_secure_erase_seg", max_secure_erase_seg)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.backend = backend
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.serial = serial_bytes
        self._id = serial_bytes.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.blk_size = blk_size
        self.seg_max = seg_max if seg_max is not None else min(126, queue_size - 2)
        self.size_max = size_max
        self.topology = (physical_block_exp, alignment_offset, min_io_size, opt_io_size)
        self.geometry = geometry
        default_alignment = blk_size // SECTOR_SIZE
        self.discard_limits = SegmentLimits(
            max_discard_sectors, max_discard_seg,
            discard_sector_alignment if discard_sector_alignment is not None
            else default_alignment)
        self.write_zeroes_limits = SegmentLimits(
            max_write_zeroes_sectors, max_write_zeroes_seg, 1)
        self.secure_erase_limits = SegmentLimits(
            max_secure_erase_sectors, max_secure_erase_seg,
            secure_erase_sector_alignment if secure_erase_sector_alignment is not None
            else default_alignment)
        self.lifetime = lifetime
        self.fua = fua
        self._read_only = read_only or backend.read_only
        self._default_writeback = writeback
        self._writeback = writeback
        self._negotiated: int | None = None
        self.zoned = (ZonedRequests(backend, self)
                      if isinstance(backend, ZonedMemoryBackend) else None)
        """Zone state and zoned request execution when the backend is zoned, else None."""
        if self.zoned is not None:
            self.secure_erase_limits = SegmentLimits(
                max_secure_erase_sectors, max_secure_erase_seg,
                self.zoned.secure_erase_alignment)
        self.features = self._offered_features()
        self.config_changed: Callable[[], None] | None = None
        self._stats = [QueueStats() for _ in range(num_queues)]
        self._workers: dict[int, _QueueWorker] = {}
        self._workers_lock = threading.Lock()
        self._handlers: dict[int, Callable[[BlkRequest], tuple[int, int]]] = {
            RequestType.IN: self._do_in,
            RequestType.OUT: self._do_out,
            RequestType.FLUSH: self._do_flush,
            RequestType.GET_ID: self._do_get_id,
            RequestType.DISCARD: self._do_discard,
            RequestType.WRITE_ZEROES: self._do_write_zeroes,
            RequestType.SECURE_ERASE: self._do_secure_erase,
        }
        if lifetime is not None:
            self._handlers[RequestType.GET_LIFETIME] = self._do_get_lifetime
        if fua:
            self._handlers[RequestType.OUT_FUA] = self._do_out_fua
        if self.zoned is not None:
            self.zoned.install(self._handlers)
        self._apply_cache_mode()

    # ------------------------------------------------------------------ features, config

    def _offered_features(self) -> int:
        offered = [
            Feature.VERSION_1, Feature.ANY_LAYOUT, Feature.RING_INDIRECT_DESC,
            Feature.RING_EVENT_IDX, Feature.VHOST_USER_PROTOCOL_FEATURES,
            Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH, Feature.BLK_TOPOLOGY,
            Feature.BLK_CONFIG_WCE, Feature.BLK_MQ, Feature.BLK_DISCARD,
            Feature.BLK_WRITE_ZEROES, Feature.BLK_SECURE_ERASE,
        ]
        if self.size_max:
            offered.append(Feature.BLK_SIZE_MAX)
        if self.lifetime is not None:
            offered.append(Feature.BLK_LIFETIME)
        if self._read_only:
            offered.append(Feature.BLK_RO)
        if self.geometry is not None:
            offered.append(Feature.BLK_GEOMETRY)
        if self.fua:
            offered.append(Feature.BLK_OUT_FUA)
        bits = 0
        for feature in offered:
            bits |= feature.mask
        if self.zoned is not None:
            bits = self.zoned.offered_features(bits)
        return bits

    @property
    def negotiated_features(self) -> int | None:
        """What the driver accepted, or None before ``set_features``."""
        return self._negotiated

    def set_features(self, features: int) -> None:
        """Record the driver's features; refuse bits we never offered."""
        extra = features & ~self.features
        if extra:
            raise ValueError(
                f"driver accepted features the device did not offer: "
                f"{', '.join(feature_names(extra))} (offered {self.features:#x}, "
                f"got {features:#x})")
        if self.zoned is not None:
            self.zoned.check_features(features)
        self._negotiated = features
        if has_feature(features, Feature.BLK_CONFIG_WCE) and not has_feature(
                features, Feature.BLK_FLUSH):
            # Spec: CONFIG_WCE without FLUSH means writeback starts at 0.
            self._writeback = False
        self._apply_cache_mode()

    def _effective_writeback(self) -> bool:
        """Write-back only when the driver can flush: without FLUSH every write is stable."""
        if self._negotiated is not None and not has_feature(self._negotiated, Feature.BLK_FLUSH):
            return False
        return self._writeback

    def _apply_cache_mode(self) -> None:
        self.backend.set_write_cache(self._effective_writeback())

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors (whatever ``blk_size`` is)."""
        return self.backend.size >> SECTOR_SHIFT

    def config(self) -> bytes:
        """The 96-byte configuration space as the driver reads it."""
        cylinders, heads, sectors = self.geometry or (0, 0, 0)
        phys_exp, align_off, min_io, opt_io = self.topology
        cfg = BlkConfig(
            capacity=self.capacity,
            size_max=self.size_max,
            seg_max=self.seg_max,
            cylinders=cylinders, heads=heads, sectors=sectors,
            blk_size=self.blk_size,
            physical_block_exp=phys_exp, alignment_offset=align_off,
            min_io_size=min_io, opt_io_size=opt_io,
            writeback=int(self._writeback),
            num_queues=self.num_queues,
            max_discard_sectors=self.discard_limits.max_sectors,
            max_discard_seg=self.discard_limits.max_seg,
            discard_sector_alignment=self.discard_limits.alignment,
            max_write_zeroes_sectors=self.write_zeroes_limits.max_sectors,
            max_write_zeroes_seg=self.write_zeroes_limits.max_seg,
            write_zeroes_may_unmap=1,
            max_secure_erase_sectors=self.secure_erase_limits.max_sectors,
            max_secure_erase_seg=self.secure_erase_limits.max_seg,
            secure_erase_sector_alignment=self.secure_erase_limits.alignment,
        )
        if self.zoned is not None:
            self.zoned.fill_config(cfg)
        return cfg.pack()

    def set_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space: only ``writeback`` is writable (with CONFIG_WCE)."""
        current = self.config()
        wb = BlkConfig.OFFSET_WRITEBACK
        if offset <= wb < offset + len(data):
            if self._negotiated is not None and has_feature(
                    self._negotiated, Feature.BLK_CONFIG_WCE):
                self._writeback = data[wb - offset] != 0
                self._apply_cache_mode()
                log.info("driver set the cache mode to %s",
                         CACHE_WRITE_BACK if self._writeback else CACHE_WRITE_THROUGH)
            else:
                log.warning("driver wrote writeback=%d without CONFIG_WCE negotiated; ignored",
                            data[wb - offset])
        if offset < 0 or offset + len(data) > len(current):
            log.warning("driver wrote %d config bytes at offset %d, outside the %d-byte "
                        "config space; ignored", len(data), offset, len(current))
            return
        for pos, value in enumerate(data, start=offset):
            if pos != wb and current[pos] != value:
                log.warning("driver wrote read-only config byte %d (%#x -> %#x); ignored",
                            pos, current[pos], value)

    # ------------------------------------------------------------------ runtime controls

    def _notify_config(self) -> None:
        hook = self.config_changed
        if hook is not None:
            hook()

    def resize(self, new_size_bytes: int) -> None:
        """Change the disk size and tell the driver (config change notification)."""
        self.backend.resize(new_size_bytes)
        log.info("resized to %d bytes (%d sectors)", new_size_bytes, self.capacity)
        self._notify_config()

    @property
    def read_only(self) -> bool:
        """Whether writes are refused now (RO is only offered if read-only at creation)."""
        return self._read_only

    def set_read_only(self, read_only: bool) -> None:
        """Refuse (or accept again) writes, discards and erases from now on.

        VIRTIO_BLK_F_RO is fixed at negotiation, so a running driver learns it only from
        failed writes (IOERR); the config change sent here prompts it to look again."""
        if not read_only and self.backend.read_only:
            raise ValueError("the backend is read-only; the device cannot accept writes")
        changed = read_only != self._read_only
        self._read_only = read_only
        if changed:
            log.info("writes are now %s", "refused (IOERR)" if read_only else "accepted")
            self._notify_config()

    @property
    def cache_mode(self) -> str:
        """``"write back"`` or ``"write through"``, as the config field says."""
        return CACHE_WRITE_BACK if self._writeback else CACHE_WRITE_THROUGH

    def set_cache_mode(self, mode: str) -> None:
        """Switch the write cache mode from the host side and announce it to the driver."""
        if mode not in (CACHE_WRITE_BACK, CACHE_WRITE_THROUGH):
            raise ValueError(
                f"cache mode must be {CACHE_WRITE_BACK!r} or {CACHE_WRITE_THROUGH!r}, "
                f"got {mode!r}")
        self._writeback = self._default_writeback = mode == CACHE_WRITE_BACK
        self._apply_cache_mode()
        self._notify_config()

    def stats(self) -> dict[str, object]:
        """Totals over all queues plus each queue's own counters."""
        queues = [q.as_dict() for q in self._stats]
        requests: dict[str, int] = {}
        for q in self._stats:
            for name, count in list(q.requests.items()):
                requests[name] = requests.get(name, 0) + count
        return {
            "requests": requests,
            "bytes_read": sum(q.bytes_read for q in self._stats),
            "bytes_written": sum(q.bytes_written for q in self._stats),
            "errors": {"IOERR": sum(q.ioerr for q in self._stats),
                       "UNSUPP": sum(q.unsupp for q in self._stats)},
            "malformed": sum(q.malformed for q in self._stats),
            "chain_errors": sum(q.chain_errors for q in self._stats),
            "internal_errors": sum(q.internal_errors for q in self._stats),
            "queues": queues,
        }

    # ------------------------------------------------------------------ request execution

    def process(self, chain: ChainLike, queue: int = 0) -> int:
        """Parse, execute and answer one chain; returns the used length to report."""
        stats = self._stats[queue]
        try:
            req = parse_request(chain, self.zoned is not None)
        except MalformedRequest as exc:
            stats.malformed += 1
            log.warning("queue %d: malformed request: %s", queue, exc.reason)
            if exc.status is None:
                return 0
            exc.status[0] = _IOERR
            stats.ioerr += 1
            return 1
        return self._run(req, stats, queue)

    def process_flat(self, flat: FlatChain, queue: int = 0) -> int:
        """``process`` for a chain the virtqueue returned flat (already validated).

        The common request, ``[header(16, R), data(R or W), status(1, W)]`` reading or
        writing whole sectors, is framed here straight from the table: no intermediate
        chain, no header view.  Any other shape goes through ``parse_request``, which
        applies every rule and names what is wrong.
        """
        head, view, base, t = flat
        if (len(t) == 12 and t[1] == HEADER_SIZE and t[2] == _NEXT and t[9] == 1
                and t[10] == _WRITE):
            data_len = t[5]
            if data_len and not data_len & 511:
                rtype, ioprio, sector = HEADER_FORMAT.unpack_from(view, t[0] - base)
                dflags = t[6]
                if (dflags == _NEXT_WRITE and rtype == _IN) or (
                        dflags == _NEXT and rtype in (_OUT, _OUT_FUA)):
                    d = t[4] - base
                    s = t[8] - base
                    return self._run(
                        BlkRequest(head, rtype, ioprio, sector, [view[d : d + data_len]],
                                   data_len, view[s : s + 1]),
                        self._stats[queue], queue)
        return self.process(chain_of(flat), queue)

    def _run(self, req: BlkRequest, stats: QueueStats, queue: int) -> int:
        """Execute a framed request, count it, write its status; the used length."""
        rtype = req.type
        name = type_name(rtype)
        requests = stats.requests
        requests[name] = requests.get(name, 0) + 1
        try:
            status, used = self.execute(req)
        except Exception:  # a bug must cost one request, not the queue
            log.exception("queue %d: internal error executing %s", queue, name)
            stats.internal_errors += 1
            status, used = _IOERR, 1
        if status == _OK:
            if rtype == _IN:
                stats.bytes_read += req.data_len
            elif rtype in (_OUT, _OUT_FUA):
                stats.bytes_written += req.data_len
        elif status == _IOERR:
            stats.ioerr += 1
        else:
            stats.unsupp += 1
        req.status[0] = status
        return used

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        """Run a parsed request: ``(status, used_len)``, where ``used_len`` counts the bytes
        written into the device-writable area including the status byte. The caller writes
        the status byte."""
        handler = self._handlers.get(req.type)
        if handler is None:
            return _UNSUPP, 1
        return handler(req)

    def _in_range(self, sector: int, length: int) -> bool:
        return (sector << SECTOR_SHIFT) + length <= self.capacity << SECTOR_SHIFT

    def _do_in(self, req: BlkRequest) -> tuple[int, int]:
        if not self._in_range(req.sector, req.data_len):
            log.warning("IN beyond capacity: sector %d + %d bytes > %d sectors",
                        req.sector, req.data_len, self.capacity)
            return _IOERR, 1
        try:
            self.backend.preadv(req.data, req.sector << SECTOR_SHIFT)
        except OSError as exc:
            log.error("read of %d bytes at sector %d failed: %s", req.data_len, req.sector, exc)
            return _IOERR, 1
        return _OK, req.data_len + 1

    def _write(self, req: BlkRequest, *, fua: bool) -> tuple[int, int]:
        if self._read_only:
            return _IOERR, 1
        if not self._in_range(req.sector, req.data_len):
            log.warning("OUT beyond capacity: sector %d + %d bytes > %d sectors",
                        req.sector, req.data_len, self.capacity)
            return _IOERR, 1
        try:
            self.backend.pwritev(req.data, req.sector << SECTOR_SHIFT, fua=fua)
        except OSError as exc:
            log.error("write of %d bytes at sector %d failed: %s", req.data_len, req.sector, exc)
            return _IOERR, 1
        return _OK, 1

    def _do_out(self, req: BlkRequest) -> tuple[int, int]:
        return self._write(req, fua=False)

    def _do_out_fua(self, req: BlkRequest) -> tuple[int, int]:
        return self._write(req, fua=True)

    def _do_flush(self, req: BlkRequest) -> tuple[int, int]:
        try:
            self.backend.flush()
        except OSError as exc:
            log.error("flush failed: %s", exc)
            return _IOERR, 1
        return _OK, 1

    @staticmethod
    def _fill(data: list[memoryview], payload: bytes) -> None:
        """Write ``payload`` across the views, NUL-padding the rest of the data area."""
        pos = 0
        for view in data:
            n = len(view)
            chunk = payload[pos : pos + n]
            view[: len(chunk)] = chunk
            if len(chunk) < n:
                zero_fill(view[len(chunk) :])
            pos += n

    def _do_get_id(self, req: BlkRequest) -> tuple[int, int]:
        # The ID is NUL padded to 20 bytes; a shorter buffer gets what fits, a longer one
        # gets NULs after it, so the whole data area is written.
        self._fill(req.data, self._id)
        return _OK, req.data_len + 1

    def _do_get_lifetime(self, req: BlkRequest) -> tuple[int, int]:
        lifetime = self.lifetime
        if lifetime is None:
            return _UNSUPP, 1
        if req.data_len < Lifetime.SIZE:
            log.warning("GET_LIFETIME with a %d-byte buffer, needs %d",
                        req.data_len, Lifetime.SIZE)
            return _IOERR, 1
        self._fill(req.data, lifetime.pack())
        return _OK, req.data_len + 1

    def _check_segments(
        self, req: BlkRequest, limits: SegmentLimits, allowed_flags: int,
    ) -> tuple[int, list[DiscardSegment]]:
        """Validate every segment before touching storage: ``(status, segments)``."""
        name = type_name(req.type)
        if self._read_only:
            return _IOERR, []
        # Count from the length before decoding: the payload is bounded only by guest memory.
        count = req.data_len // DiscardSegment.SIZE
        if count > limits.max_seg:
            log.warning("%s with %d segments, max %d", name, count, limits.max_seg)
            return _IOERR, []
        segments = read_segments(req)
        for seg in segments:
            if seg.flags & ~allowed_flags:
                log.warning("%s segment with unsupported flags %#x", name, seg.flags)
                return _UNSUPP, []
        for seg in segments:
            if seg.num_sectors > limits.max_sectors:
                log.warning("%s segment of %d sectors, max %d",
                            name, seg.num_sectors, limits.max_sectors)
                return _IOERR, []
            if not self._in_range(seg.sector, seg.num_sectors << SECTOR_SHIFT):
                log.warning("%s beyond capacity: sector %d + %d sectors > %d",
                            name, seg.sector, seg.num_sectors, self.capacity)
                return _IOERR, []
        return _OK, segments

    def _run_segments(
        self, req: BlkRequest, limits: SegmentLimits, allowed_flags: int,
        action: Callable[[int, int, DiscardSegment], None],
    ) -> tuple[int, int]:
        status, segments = self._check_segments(req, limits, allowed_flags)
        if status != _OK:
            return status, 1
        try:
            for seg in segments:
                if seg.num_sectors:
                    action(seg.sector << SECTOR_SHIFT, seg.num_sectors << SECTOR_SHIFT, seg)
        except OSError as exc:
            log.error("%s failed: %s", type_name(req.type), exc)
            return _IOERR, 1
        return _OK, 1

    def _do_discard(self, req: BlkRequest) -> tuple[int, int]:
        # Spec: UNSUPP for any flag on discard, UNMAP included.
        return self._run_segments(
            req, self.discard_limits, 0,
            lambda off, n, seg: self.backend.discard(off, n))

    def _do_write_zeroes(self, req: BlkRequest) -> tuple[int, int]:
        return self._run_segments(
            req, self.write_zeroes_limits, DISCARD_FLAG_UNMAP,
            lambda off, n, seg: self.backend.write_zeroes(off, n, unmap=seg.unmap))

    def _do_secure_erase(self, req: BlkRequest) -> tuple[int, int]:
        return self._run_segments(
            req, self.secure_erase_limits, 0,
            lambda off, n, seg: self.backend.secure_erase(off, n))

    # ------------------------------------------------------------------ queues

    def start_queue(self, index: int, vq: DeviceVirtqueue, kick_fd: int, call_fd: int) -> None:
        """Serve ``vq`` in a new thread. The fds stay owned by the caller."""
        if not 0 <= index < self.num_queues:
            raise ValueError(f"queue {index} does not exist (num_queues {self.num_queues})")
        with self._workers_lock:
            if index in self._workers:
                raise ValueError(f"queue {index} is already running")
            stats = self._stats[index]
            stats.broken = False
            worker = _QueueWorker(self, index, vq, kick_fd, call_fd, stats)
            self._workers[index] = worker
        worker.start()

    def stop_queue(self, index: int) -> int:
        """Stop serving queue ``index``; returns the next avail index to resume from."""
        with self._workers_lock:
            worker = self._workers.pop(index, None)
        if worker is None:
            raise ValueError(f"queue {index} is not running")
        worker.stop()
        return worker.vq.last_avail_idx

    def running_queues(self) -> list[int]:
        """Indices of the queues that have a worker."""
        with self._workers_lock:
            return sorted(self._workers)

    def reset(self) -> None:
        """Device reset: stop every queue and forget the negotiation."""
        for index in self.running_queues():
            with contextlib.suppress(ValueError):  # stopped concurrently
                self.stop_queue(index)
        self._negotiated = None
        self._writeback = self._default_writeback
        self._apply_cache_mode()


class _QueueWorker(threading.Thread):
    """One thread serving one virtqueue until stopped."""

    def __init__(
        self, device: BlkDevice, index: int, vq: DeviceVirtqueue, kick_fd: int,
        call_fd: int, stats: QueueStats,
    ) -> None:
        super().__init__(name=f"virtblk-q{index}", daemon=True)
        self.device = device
        self.index = index
        self.vq = vq
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.stats = stats
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Checked between batches too: a driver that keeps the ring full never lets
        # ``_serve`` return to the poll that watches the stop eventfd.
        self._stopping = False

    def stop(self) -> None:
        """Wake the thread, wait for it, release the stop eventfd."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        self.join()
        os.close(self._stop_fd)

    def run(self) -> None:
        stats = self.stats
        stats.running = True
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self.kick_fd, select.POLLIN)
        try:
            # The driver may have queued requests before we started: serve them first.
            self._serve_safely(poller)
            while True:
                events = poller.poll()
                kicked = False
                for fd, mask in events:
                    if fd == self._stop_fd:
                        return
                    if mask & (select.POLLNVAL | select.POLLERR | select.POLLHUP):
                        # A closed kick fd would wake us forever: wait for stop instead.
                        log.error("queue %d: kick fd %d failed (poll mask %#x); waiting "
                                  "for the queue to be stopped", self.index, fd, mask)
                        poller.unregister(fd)
                        continue
                    kicked = True
                if kicked:
                    self._drain_kick()
                    if not stats.broken:
                        self._serve_safely(poller)
        finally:
            stats.running = False

    def _drain_kick(self) -> None:
        try:
            os.read(self.kick_fd, 8)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.error("queue %d: reading the kick fd failed: %s", self.index, exc)

    def _serve_safely(self, poller: select.poll) -> None:
        try:
            self._serve()
        except RingError as exc:
            self.stats.broken = True
            log.error("queue %d: ring unusable, queue stopped until restarted: %s",
                      self.index, exc)
            with contextlib.suppress(KeyError):  # already gone if the kick fd failed
                poller.unregister(self.kick_fd)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("queue %d: internal error while serving", self.index)

    def _serve(self) -> None:
        """Drain the queue in batches until it stays empty with notifications enabled.

        Each round pops every available chain at once (one avail idx load), answers them,
        publishes the used idx once and signals at most once.  With EVENT_IDX the loop keeps
        going while the driver keeps adding, and only re-arms notifications when a round
        finds the ring empty.
        """
        vq = self.vq
        process = self.device.process
        index = self.index
        stats = self.stats
        pop_flat = vq.pop_flat
        process_flat = self.device.process_flat
        add_used = vq.add_used
        limit = vq.num
        vq.disable_notifications()
        while True:
            completed = 0
            try:
                for chain in pop_flat(limit):
                    if isinstance(chain, ChainError):
                        stats.chain_errors += 1
                        log.warning("queue %d: bad descriptor chain: %s", index, chain)
                        if chain.head is not None:
                            add_used(chain.head, 0)
                            completed += 1
                        continue
                    head = chain[0] if isinstance(chain, tuple) else chain.head
                    try:
                        if isinstance(chain, tuple):
                            add_used(head, process_flat(chain, index))
                        else:
                            add_used(head, process(chain, index))
                    except Exception:  # a bug must cost one request, not the batch behind it
                        log.exception("queue %d: internal error answering the chain at head "
                                      "%d; returned with used length 0", index, head)
                        stats.internal_errors += 1
                        add_used(head, 0)
                    completed += 1
            finally:
                # Publish what was completed even if the ring broke mid-batch.
                if completed:
                    vq.flush_used()
                    stats.batches += 1
                    if vq.needs_notification():
                        self._notify()
            if self._stopping:
                return
            if completed:
                continue  # the driver may have added more meanwhile: look before re-arming
            if not vq.enable_notifications():
                return
            vq.disable_notifications()

    def _notify(self) -> None:
        if self.call_fd < 0:
            return
        try:
            os.write(self.call_fd, _ONE)
            self.stats.notifications += 1
        except BlockingIOError:
            pass  # counter saturated: the driver has a pending interrupt anyway
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            log.error("queue %d: call fd %d is closed", self.index, self.call_fd)
