"""The virtio-blk device model: configuration, features, request execution, queue workers.

``BlkDevice`` implements the ``VhostUserDevice`` contract (docs/ARCHITECTURE.md): the
vhost-user backend negotiates features and hands over started virtqueues; each queue is
then served by its own worker (``virtblk.device.queue_worker``), which drains it in
batches.  ``execute_batch`` answers the usual read or write inline and sends everything
else through ``process``, the general path that checks every rule.

Everything a driver writes into shared memory is hostile input: a malformed chain is
answered (IOERR, or used length 0 when there is nowhere to put a status), counted and
logged; a broken ring stops only its own queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from virtblk.device import linux_aio
from virtblk.device.backends import Backend, scatter
from virtblk.device.queue_worker import (
    IoPool,
    Offload,
    OffloadedChain,
    Offloader,
    OffloadVector,
    QueueServer,
    QueueStats,
    QueueWorker,
    Ring,
    StorageError,
    Token,
)
from virtblk.device.request import (
    HEADER_FORMAT,
    BlkRequest,
    ChainLike,
    MalformedRequest,
    parse_request,
    read_segments,
    type_name,
)
from virtblk.device.settings import ZONED_WORKERS_ERROR, BlkSettings, check_queues
from virtblk.device.worker_process import WorkerError, WorkerProcess
from virtblk.device.zoned import ZonedMemoryBackend, ZonedRequests
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkConfig,
    DiscardSegment,
    Feature,
    Lifetime,
    RequestType,
    Status,
    feature_names,
    has_feature,
)
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.split_device import ChainError, DescriptorChain, Triple

log = logging.getLogger("virtblk.device")


# Plain ints for the per-request comparisons (enum attribute lookups cost more).
_OK, _IOERR, _UNSUPP = int(Status.OK), int(Status.IOERR), int(Status.UNSUPP)
_IN, _OUT, _OUT_FUA = int(RequestType.IN), int(RequestType.OUT), int(RequestType.OUT_FUA)

CACHE_WRITE_BACK = "write back"
CACHE_WRITE_THROUGH = "write through"

SIZE_WATCH_INTERVAL = 1.0
"""Seconds between looks at the size of storage that can be resized by others
(``Backend.current_size``: an RBD image that ``rbd resize`` changed)."""

_SIZE_WATCH_STOP = 5.0
"""How long close waits for the size watch to end (it may be waiting for a cluster that
does not answer; it is a daemon thread, and left behind then)."""

_STOP_WAIT = 60.0
"""How long stats() waits for a queue's stop: a stop ends within a worker's reply timeout
(30 s), after which the worker is killed and replaced."""


class _FailureLog:
    """Storage failures of offloaded requests, at most one line a second: an outage fails
    every request (30 000 a second against an NBD server that is down), and a line for
    each would flood the log."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._quiet = 0
        self._lock = threading.Lock()

    def error(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._quiet += 1
                return
            quiet, self._quiet = self._quiet, 0
            self._next = now + self._interval
        more = f" (and {quiet} more failures since the last line)" if quiet else ""
        log.error(message + more, *args)


_storage_failures = _FailureLog()


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
        poll_us: float = 0,
        io_threads: int = 32,
        aio: Literal["native", "threads"] = "native",
        packed: bool = True,
        workers: Literal["thread", "process"] = "thread",
    ) -> None:
        """``workers="process"`` serves each queue from a process of its own
        (``virtblk.device.worker_process``), so queues do not share one interpreter lock;
        the storage must then be a file, memory or null backend.  Call :meth:`close` to
        end those processes."""
        # One place judges the settings (the caller's, before any child process starts,
        # when they came as a BlkSettings): made from the keywords, it judges them here.
        self.settings = BlkSettings(
            # latin-1 keeps a byte a character, so the settings' ASCII rule judges bytes too
            serial=serial.decode("latin-1") if isinstance(serial, bytes) else serial,
            blk_size=blk_size, seg_max=seg_max, size_max=size_max,
            physical_block_exp=physical_block_exp, alignment_offset=alignment_offset,
            min_io_size=min_io_size, opt_io_size=opt_io_size, geometry=geometry,
            max_discard_sectors=max_discard_sectors, max_discard_seg=max_discard_seg,
            discard_sector_alignment=discard_sector_alignment,
            max_write_zeroes_sectors=max_write_zeroes_sectors,
            max_write_zeroes_seg=max_write_zeroes_seg,
            max_secure_erase_sectors=max_secure_erase_sectors,
            max_secure_erase_seg=max_secure_erase_seg,
            secure_erase_sector_alignment=secure_erase_sector_alignment,
            writeback=writeback, lifetime=lifetime, fua=fua, poll_us=poll_us,
            io_threads=io_threads, aio=aio, packed=packed)
        """The settings other than the storage and the queues, as given."""
        check_queues(num_queues, queue_size)
        serial_bytes = self.settings.serial.encode("ascii")
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
        self.packed = packed
        """Offer VIRTIO_F_RING_PACKED (the frontend then chooses the ring kind)."""
        self.poll_ns = int(poll_us * 1000)
        """How long a queue worker may poll an empty ring before it sleeps (0: never)."""
        self.io_threads = io_threads if backend.blocking else 0
        """Threads per queue making a blocking backend's calls (many reads in flight)."""
        self.aio = aio
        """How a blocking backend keeps reads and writes in flight: Linux AIO on an
        O_DIRECT descriptor (``native``, where the file takes O_DIRECT) or threads."""
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
        self.failed: Callable[[str], None] | None = None
        """Installed by the vhost-user connection: the device calls it when it can no
        longer serve the frontend correctly (a queue's worker process died)."""
        self.size_watch_interval: float | None = SIZE_WATCH_INTERVAL
        """Seconds between looks at the storage's own size while the device serves
        (``Backend.current_size``); None: never (a worker process, which the main
        process tells)."""
        self._size_watch: _SizeWatch | None = None
        # One resize at a time: the watch must not take a size read before a resize of
        # ours for a change made outside.
        self._resize_lock = threading.Lock()
        self._procs: list[WorkerProcess] | None = None
        self._remote: dict[int, Ring] = {}  # queues running in worker processes
        self._watcher: _WorkerWatcher | None = None
        self._stats = [QueueStats() for _ in range(num_queues)]
        self._workers: dict[int, QueueWorker] = {}
        self._vectored: dict[int, OffloadVector] = {}
        """Per running queue, its offloader's ``submitv`` when it has one."""
        self._workers_lock = threading.Lock()
        # Worker-process queues being stopped: between the stop's first step (the queue
        # leaves the running set) and its last (the worker's final counters become the
        # queue's), stats() would report the stale copy, so it waits for that queue's stop
        # (and only for it: the other queues' stops and stats go on).
        self._stopping: dict[int, threading.Event] = {}
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
        # Reads and writes are answered inline (``execute_batch``) only where that is
        # exactly what ``execute`` would do: not on a zoned device (zone state decides every
        # write), nor in a subclass that changes ``execute``.
        self._inline = self.zoned is None and type(self).execute is BlkDevice.execute
        if workers == "process":
            if self.zoned is not None or not self._inline:
                raise ValueError(ZONED_WORKERS_ERROR)
            # Everything but the storage, as a worker process rebuilds this device.
            settings = {**self.settings.as_kwargs(), "num_queues": num_queues,
                        "queue_size": queue_size, "read_only": read_only}
            self._procs = []
            try:
                for index in range(num_queues):
                    self._procs.append(WorkerProcess(index, settings, backend))
                self._watcher = _WorkerWatcher(self)
            except BaseException:
                self.close()
                raise
        elif workers != "thread":
            raise ValueError(f"workers must be 'thread' or 'process', not {workers!r}")

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
        if self.packed:
            offered.append(Feature.RING_PACKED)
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

    @property
    def ring_kind(self) -> Literal["split", "packed"] | None:
        """The virtqueue layout the driver chose (None before ``set_features``)."""
        if self._negotiated is None:
            return None
        return "packed" if has_feature(self._negotiated, Feature.RING_PACKED) else "split"

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
        """The backend writes back or through as negotiated; worker processes too."""
        self.backend.set_write_cache(self._effective_writeback())
        self._push_state()

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
        if new_size_bytes < 0:  # before any worker process hears of it
            raise ValueError(f"disk size must be >= 0, got {new_size_bytes}")
        with self._resize_lock:
            shrink = new_size_bytes < self.backend.size
            if shrink:
                self._push_state(size=new_size_bytes)  # workers stop using the tail first
            self.backend.resize(new_size_bytes)
            if not shrink:
                self._push_state()  # workers use the new tail once it exists
        log.info("resized to %d bytes (%d sectors)", new_size_bytes, self.capacity)
        self._notify_config()

    def follow_storage(self) -> bool:
        """Take the size the storage has now when it changed by itself (another client
        resized the image): no resize of ours, the worker processes told as for one, the
        driver too (config change).  False when the storage's size cannot change but
        through us (``Backend.current_size`` is None)."""
        with self._resize_lock:
            backend = self.backend
            size = backend.current_size()
            if size is None:
                return False
            old = backend.size
            if size == old:
                return True
            if size < old:
                self._push_state(size=size)  # the tail is gone already: stop using it
            backend.follow_resize(size)
            if size > old:
                self._push_state()
        log.info("the storage was resized from %d to %d bytes (%d sectors)", old, size,
                 self.capacity)
        self._notify_config()
        return True

    def _watch_size(self) -> None:
        """Start looking at the storage's own size, once, if it can change by itself."""
        if (self._size_watch is None and self.size_watch_interval is not None
                and type(self.backend).current_size is not Backend.current_size):
            self._size_watch = _SizeWatch(self, self.size_watch_interval)

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
        self._push_state()
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

    # ------------------------------------------------------------------ worker processes

    def _state(self, size: int | None = None) -> dict[str, Any]:
        """What a worker process must know of the device now."""
        return {"size": self.backend.size if size is None else size,
                "read_only": self._read_only, "writeback": self._writeback,
                "negotiated": self._negotiated}

    def _push_state(self, size: int | None = None) -> None:
        """Tell every worker process about a change of size, read-only flag or cache mode
        (each answers once it applies it: no request after this sees the old state)."""
        if self._procs is None:
            return
        state = self._state(size)
        for proc in self._procs:
            try:
                proc.set_state(state)
            except WorkerError as exc:
                log.error("%s", exc)

    def apply_state(self, state: dict[str, Any]) -> None:
        """In a worker process: take the main process's state (``_state``)."""
        if state["size"] != self.backend.size:
            self.backend.follow_resize(state["size"])
        self._read_only = state["read_only"]
        self._writeback = state["writeback"]
        self._negotiated = state["negotiated"]
        self._apply_cache_mode()

    def queue_stats(self, index: int) -> dict[str, Any]:
        """One queue's counters."""
        return self._stats[index].as_dict()

    def _take_stats(self, index: int, snapshot: dict[str, Any]) -> None:
        """Counters a worker process reported become this queue's."""
        stats = self._stats[index]
        for name, value in snapshot.items():
            setattr(stats, name, dict(value) if name == "requests" else value)

    @property
    def worker_pids(self) -> list[int]:
        """The queue worker processes (empty with thread workers)."""
        return [p.pid for p in self._procs] if self._procs is not None else []

    def close(self) -> None:
        """Stop every queue and end the worker processes (the backend stays open: it is
        the caller's)."""
        watch, self._size_watch = self._size_watch, None
        if watch is not None:
            watch.stop(_SIZE_WATCH_STOP)
        self.reset()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        procs, self._procs = self._procs, None
        for proc in procs or ():
            proc.close()

    def worker_died(self, index: int) -> None:
        """A worker process died (the watcher saw its socket hang up): what it held of its
        ring is lost, so the frontend is dropped, as after a crash of the device; the
        worker is replaced when the ring starts again."""
        with self._workers_lock:
            running = index in self._remote
        if running:
            reason = f"queue {index}'s worker process died while serving its ring"
            log.error("%s", reason)
            hook = self.failed
            if hook is not None:
                hook(reason)

    def _replace_worker(self, index: int) -> WorkerProcess:
        """A fresh worker for queue ``index`` in place of a dead one."""
        assert self._procs is not None
        old = self._procs[index]
        old.close()
        new = self._procs[index] = WorkerProcess(index, old.settings, self.backend)
        if self._watcher is not None:
            self._watcher.refresh()
        return new

    def stats(self) -> dict[str, object]:
        """Totals over all queues plus each queue's own counters."""
        with self._workers_lock:
            stopping = list(self._stopping.values())
        for done in stopping:
            done.wait(_STOP_WAIT)
        if self._procs is not None:
            for index in list(self._remote):
                try:
                    snapshot = self._procs[index].stats()
                except (WorkerError, IndexError) as exc:
                    log.error("%s", exc)
                    continue
                with self._workers_lock:
                    # A stop that began meanwhile stores the final counters: this older
                    # snapshot must not overwrite them.
                    if index in self._remote:
                        self._take_stats(index, snapshot)
        queues = [q.as_dict() for q in self._stats]
        requests: dict[str, int] = {}
        for q in self._stats:
            for name, count in list(q.requests.items()):
                requests[name] = requests.get(name, 0) + count
        return {
            "ring": self.ring_kind,
            "requests": requests,
            "bytes_read": sum(q.bytes_read for q in self._stats),
            "bytes_written": sum(q.bytes_written for q in self._stats),
            "errors": {"IOERR": sum(q.ioerr for q in self._stats),
                       "UNSUPP": sum(q.unsupp for q in self._stats)},
            "malformed": sum(q.malformed for q in self._stats),
            "chain_errors": sum(q.chain_errors for q in self._stats),
            "internal_errors": sum(q.internal_errors for q in self._stats),
            "resubmitted": sum(q.resubmitted for q in self._stats),
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

    def execute_batch(
        self, view: memoryview, items: Sequence[Triple | DescriptorChain | ChainError],
        queue: int = 0, offload: Offload | None = None,
    ) -> list[int]:
        """Answer a batch from ``DeviceVirtqueue.pop_batch``; the used entries, flat
        (``[head, length, ...]``), for ``add_used_batch``.

        The usual request (a Triple: 16-byte header, whole-sector data, 1-byte status) that
        reads or writes inside the disk is executed inline: one header unpack, one backend
        call, one status byte.  Everything else, and any request whose backend call fails,
        goes through ``process``, which applies every rule and names what is wrong.  A bug
        costs the request it hit (used length 0), never the rest of the batch.

        With ``offload`` (a backend whose calls block on a disk), those reads and writes
        are handed to it instead, ``offload(write?, buffer, offset, (item, view))``, so
        many are in flight at once; they are answered later by ``complete_offloaded``.
        """
        used: list[int] = []
        stats = self._stats[queue]
        backend = self.backend
        read_into = backend.read_into
        write_from = backend.write_from
        unpack_header = HEADER_FORMAT.unpack_from
        fast = self._inline
        end = (backend.size >> SECTOR_SHIFT) << SECTOR_SHIFT
        writable = not self._read_only
        vectored = self._vectored
        reads = writes = read_bytes = written_bytes = 0
        pos = 0
        count = len(items)
        while pos < count:
            try:
                while pos < count:
                    item = items[pos]
                    pos += 1
                    if isinstance(item, Triple):
                        head, hdr, hdr_len, data, data_len, into, status, status_len = item
                        if fast and hdr_len == 16 and status_len == 1 and not data_len & 511:
                            rtype, _, sector = unpack_header(view, hdr)
                            offset = sector << SECTOR_SHIFT
                            if offset + data_len <= end and (
                                    (rtype == _IN and into)
                                    or (rtype == _OUT and not into and writable)):
                                buf = view[data : data + data_len]
                                if offload is not None:
                                    offload(not into, buf, offset, (item, view))
                                    continue
                                try:
                                    (read_into if into else write_from)(buf, offset)
                                except Exception:
                                    pass  # process() runs it again and answers IOERR
                                else:
                                    view[status] = _OK
                                    if into:
                                        used += (head, data_len + 1)
                                        reads += 1
                                        read_bytes += data_len
                                    else:
                                        used += (head, 1)
                                        writes += 1
                                        written_bytes += data_len
                                    continue
                        used += (head, self._answer(item.chain(view), queue))
                    elif isinstance(item, ChainError):
                        stats.chain_errors += 1
                        log.warning("queue %d: bad descriptor chain: %s", queue, item)
                        if item.head is not None:
                            used += (item.head, 0)
                    else:
                        if fast and offload is not None and (
                                submitv := vectored.get(queue)) and self._offload_chain(
                                    item, submitv):
                            continue
                        used += (item.head, self._answer(item, queue))
            except Exception:  # a bug must cost one request, not the batch behind it
                # The failed item has no used entry yet: every branch adds it last.
                failed = items[pos - 1].head
                log.exception("queue %d: internal error answering the chain at head %s; "
                              "returned with used length 0", queue, failed)
                stats.internal_errors += 1
                if failed is not None:
                    used += (failed, 0)
        stats.count_transfers(reads, read_bytes, writes, written_bytes)
        return used

    def complete_offloaded(
        self, done: Sequence[tuple[Token, BaseException | None]],
        queue: int = 0,
    ) -> list[int]:
        """Answer reads and writes ``execute_batch`` offloaded, once their storage call
        returned (``exc`` None) or failed (then ``process`` runs the request again and
        answers as it always does); the used entries, flat."""
        used: list[int] = []
        stats = self._stats[queue]
        reads = writes = read_bytes = written_bytes = 0
        for (item, view), exc in done:
            try:
                if exc is not None:
                    if isinstance(exc, StorageError):
                        used += (item.head, self._storage_failed(item, view, exc, stats))
                    else:
                        used += (item.head, self._answer(item.chain(view), queue))
                    continue
                view[item.third] = _OK
                if item.second_writable:
                    used += (item.head, item.second_len + 1)
                    reads += 1
                    read_bytes += item.second_len
                else:
                    used += (item.head, 1)
                    writes += 1
                    written_bytes += item.second_len
            except Exception:  # a bug must cost one request
                log.exception("queue %d: internal error answering the chain at head %d; "
                              "returned with used length 0", queue, item.head)
                stats.internal_errors += 1
                used += (item.head, 0)
        stats.count_transfers(reads, read_bytes, writes, written_bytes)
        return used

    def _offload_chain(self, chain: DescriptorChain, submitv: OffloadVector) -> bool:
        """Hand a read or write whose data lies in several buffers (a guest's page-cache
        I/O) to an offloader that takes vectors; False for any other request, or one
        ``process`` must judge (malformed, past the end, a write to a read-only disk)."""
        try:
            req = parse_request(chain)
        except MalformedRequest:
            return False
        rtype = req.type
        if not (rtype == _IN or (rtype == _OUT and not self._read_only)) or not (
                req.data_len and self._in_range(req.sector, req.data_len)):
            return False
        into = rtype == _IN
        submitv(not into, req.data, req.sector << SECTOR_SHIFT,
                (OffloadedChain(chain, into, req.data_len), req.status))
        return True

    @staticmethod
    def _storage_failed(item: Triple | OffloadedChain, view: memoryview, exc: StorageError,
                        stats: QueueStats) -> int:
        """Answer IOERR to an offloaded read or write the storage failed; the used
        length."""
        name = "IN" if item.second_writable else "OUT"
        stats.requests[name] = stats.requests.get(name, 0) + 1
        stats.ioerr += 1
        _storage_failures.error("%s failed: %s", name, exc.strerror or exc)
        view[item.third] = _IOERR
        return 1

    def _answer(self, chain: DescriptorChain, queue: int) -> int:
        """``process``, with a used length the ring can carry: buffers that overlap can add
        up to more than 32 bits, and such a chain is returned with used length 0."""
        used = self.process(chain, queue)
        if used > 0xFFFFFFFF:
            log.error("queue %d: chain at head %d: used length %d does not fit 32 bits; "
                      "returned with used length 0", queue, chain.head, used)
            self._stats[queue].internal_errors += 1
            return 0
        return used

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

    def _do_get_id(self, req: BlkRequest) -> tuple[int, int]:
        # The ID is NUL padded to 20 bytes; a shorter buffer gets what fits, a longer one
        # gets NULs after it, so the whole data area is written.
        scatter(self._id, req.data)
        return _OK, req.data_len + 1

    def _do_get_lifetime(self, req: BlkRequest) -> tuple[int, int]:
        lifetime = self.lifetime
        if lifetime is None:
            return _UNSUPP, 1
        if req.data_len < Lifetime.SIZE:
            log.warning("GET_LIFETIME with a %d-byte buffer, needs %d",
                        req.data_len, Lifetime.SIZE)
            return _IOERR, 1
        scatter(lifetime.pack(), req.data)
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

    def start_queue(self, index: int, vq: Ring, kick_fd: int, call_fd: int) -> None:
        """Serve ``vq`` (a split or packed ring) in a new thread, or in the queue's
        worker process. The fds stay owned by the caller."""
        if not 0 <= index < self.num_queues:
            raise ValueError(f"queue {index} does not exist (num_queues {self.num_queues})")
        with self._workers_lock:
            if index in self._workers or index in self._remote:
                raise ValueError(f"queue {index} is already running")
            self._watch_size()
            stats = self._stats[index]
            stats.broken = False
            if self._procs is not None:
                proc = self._procs[index]
                try:
                    if proc.dead:
                        proc = self._replace_worker(index)
                    proc.start(vq, kick_fd, call_fd, self._state(), self.poll_ns)
                except WorkerError as exc:
                    raise ValueError(str(exc)) from exc
                self._remote[index] = vq
                stats.running = True
                return
            offloader = self._offloader(index, vq.num)
            submitv: OffloadVector | None = getattr(offloader, "submitv", None)
            if submitv is not None:
                self._vectored[index] = submitv
            worker = QueueWorker(QueueServer(self, index, vq, kick_fd, call_fd, stats,
                                             poll_ns=self.poll_ns, offloader=offloader))
            self._workers[index] = worker
        worker.start()

    def _offloader(self, index: int, depth: int) -> Offloader | None:
        """Where a blocking backend's reads and writes go: the backend's own offloader
        when it has one (librbd's asynchronous calls), Linux AIO on its O_DIRECT
        descriptor when it has one, else a pool of ``io_threads`` threads (None: none of
        them, the backend does not block)."""
        backend = self.backend
        if not backend.blocking:
            return None
        own = backend.offloader(index, depth)
        if own is not None:
            return own
        if not self.io_threads:
            return None
        direct_fd = getattr(backend, "direct_fd", -1)
        if self.aio == "native" and direct_fd >= 0 and linux_aio.available():
            try:
                return linux_aio.LinuxAio(
                    depth, direct_fd=direct_fd, align=linux_aio.DIRECT_ALIGN,
                    fallback=lambda write, buf, offset: (
                        backend.write_from(buf, offset) if write else backend.read_into(
                            buf, offset)),
                    rw_flags=lambda: 0 if backend.writeback else linux_aio.RWF_DSYNC)
            except OSError as exc:  # e.g. the AIO limit of the system is reached
                log.warning("queue %d: Linux AIO unavailable (%s); using %d threads", index,
                            exc, self.io_threads)
        return IoPool(self.io_threads, f"virtblk-q{index}", backend.read_into,
                      backend.write_from)

    def stop_queue(self, index: int) -> int:
        """Stop serving queue ``index``; returns where to resume from, the ring's
        ``vring_base`` (a split ring's next avail index, a packed ring's 32-bit base)."""
        with self._workers_lock:
            worker = self._workers.pop(index, None)
            remote = self._remote.pop(index, None)
            if remote is not None:
                done = self._stopping[index] = threading.Event()
        if remote is not None:
            try:
                return self._stop_remote(index, remote)
            finally:
                with self._workers_lock:
                    del self._stopping[index]
                done.set()
        if worker is None:
            raise ValueError(f"queue {index} is not running")
        worker.stop()
        self._vectored.pop(index, None)
        return worker.vq.vring_base

    def _stop_remote(self, index: int, vq: Ring) -> int:
        assert self._procs is not None
        proc = self._procs[index]
        self._stats[index].running = False
        try:
            last_avail = proc.stop()
        except WorkerError as exc:
            # Whatever it had popped and not answered is lost, and where the driver should
            # resume cannot be known (answers go out of order): the frontend is dropped,
            # as after a crash of the whole device, and a fresh worker takes the queue.
            log.error("%s; starting a new worker for queue %d", exc, index)
            hook = self.failed
            if hook is not None:
                hook(f"queue {index}'s worker process failed: {exc}")
            self._replace_worker(index)
            if isinstance(vq, PackedDeviceVirtqueue):
                # A packed ring keeps no index in memory: where it started is all we know
                # (the frontend is being dropped anyway).
                return vq.vring_base
            return vq.used_idx_in_memory()
        self._take_stats(index, proc.last_stats)
        return last_avail

    def running_queues(self) -> list[int]:
        """Indices of the queues that have a worker."""
        with self._workers_lock:
            return sorted([*self._workers, *self._remote])

    def reset(self) -> None:
        """Device reset: stop every queue and forget the negotiation."""
        for index in self.running_queues():
            with contextlib.suppress(ValueError):  # stopped concurrently
                self.stop_queue(index)
        self._negotiated = None
        self._writeback = self._default_writeback
        self._apply_cache_mode()


class _SizeWatch(threading.Thread):
    """Looks at the storage's own size every ``interval`` seconds while the device serves
    and has the device follow a change (``BlkDevice.follow_storage``)."""

    def __init__(self, device: BlkDevice, interval: float) -> None:
        super().__init__(name="virtblk-size-watch", daemon=True)
        self.device = device
        self.interval = interval
        self._stopping = threading.Event()
        self.start()

    def stop(self, timeout: float) -> None:
        """End the thread; wait for it at most ``timeout`` seconds (it may be waiting for
        storage that does not answer)."""
        self._stopping.set()
        self.join(timeout)

    def run(self) -> None:
        failing = False
        while not self._stopping.wait(self.interval):
            try:
                if not self.device.follow_storage():
                    return
            except Exception as exc:  # storage that does not answer: look again later
                if not failing:
                    log.warning("the storage's size cannot be read: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("the storage's size can be read again")
                failing = False


class _WorkerWatcher(threading.Thread):
    """Watches a device's worker processes: one that dies hangs up its socket, and a ring
    it was serving cannot go on (``BlkDevice.worker_died``)."""

    def __init__(self, device: BlkDevice) -> None:
        super().__init__(name="virtblk-worker-watch", daemon=True)
        self.device = device
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.start()

    def refresh(self) -> None:
        """The set of workers changed: watch the new one."""
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """End the thread and release its eventfd."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self.join()
        os.close(self._wake)

    def run(self) -> None:
        reported: set[int] = set()  # pids already reported
        while not self._stopping:
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            watched: dict[int, WorkerProcess] = {}
            for proc in self.device._procs or ():
                if proc.pid not in reported:
                    watched[proc.socket_fd] = proc
                    poller.register(proc.socket_fd, select.POLLRDHUP)
            for fd, mask in poller.poll():
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                elif fd in watched and mask & (select.POLLRDHUP | select.POLLHUP
                                               | select.POLLERR | select.POLLNVAL):
                    proc = watched[fd]
                    reported.add(proc.pid)
                    if not self._stopping:
                        proc.dead = True
                        self.device.worker_died(proc.index)
