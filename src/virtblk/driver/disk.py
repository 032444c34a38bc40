"""The ``Disk``: a virtio-blk device as a file-like object with block-device rules.

``Disk.connect(path)`` drives any vhost-user-blk device; ``Disk.embedded(...)`` starts our
own device first.  I/O must be aligned to the logical block size and inside the disk;
data is staged through shared memory unless the caller passes buffers that already live
there (:meth:`Disk.buffer`), in which case the device reads and writes them directly.

A bounce buffer lives as long as its request: a wait that ends early (Ctrl-C, any
exception) leaves it to the request's completion to free, so memory the device may still
write is never handed to another request.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from virtblk import unixsock
from virtblk.driver.blklayer import Bio, Plug, QueueLimits
from virtblk.driver.blkmq import HardwareQueue, Request, raise_for
from virtblk.driver.naming import DiskIndex
from virtblk.driver.requests import CHUNK, Buffer, RequestBuilder
from virtblk.driver.virtio_blk import (
    CACHE_TYPES,
    Geometry,
    Limits,
    RingKind,
    Topology,
    VirtioBlk,
    cache_type_index,
)
from virtblk.driver.zoned import Zone, ZonedCharacteristics, ZoneManager, split_at_zones
from virtblk.errors import BlockIOError, FeatureNotNegotiatedError
from virtblk.spec import (
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    Feature,
    Lifetime,
    RequestType,
    feature_names,
)

if TYPE_CHECKING:  # typing only: the driver never loads the composition root
    from virtblk.embedded import EmbeddedDevice


class Disk:
    """A virtio-blk disk.  Thread-safe; each thread is mapped to one hardware queue.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, dev: VirtioBlk, *, on_close: Callable[[], None] | None = None) -> None:
        self._dev = dev
        self._on_close = on_close
        self._closed = False
        self._alloc_lock = dev.alloc_lock  # a reconnect allocates rings from it too
        self._thread_queue = threading.local()
        self._next_queue = 0
        self._serial: str | None = None
        self.embedded_device: EmbeddedDevice | None = None
        """The device this disk started (``Disk.embedded``), else None."""
        self.requests = RequestBuilder(dev)
        """The request rules (range checks, buffer addresses, splitting by the limits,
        range payloads) this disk, its ``AsyncDisk`` and its queue handles share."""
        self._handles: list[Any] = []  # open queue handles, closed before the disk
        self._index = DiskIndex.acquire()
        self.name = DiskIndex.name(self._index)
        dev.name_for_errors = self.name
        self._zones = ZoneManager.probe(
            dev, queue=self._queue, alloc=self._alloc, free=self._free, name=self.name)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        num_queues: int | None = None,
        queue_size: int = 256,
        queue_depth: int | None = None,
        timeout: float = 10.0,
        experimental_fua: bool = False,
        reconnect_timeout: float | None = None,
        request_timeout: float | None = None,
        packed: bool | None = None,
    ) -> Self:
        """Connect to a vhost-user-blk device listening on ``socket_path``.

        ``packed`` picks the virtqueue layout: None (the default) uses the packed ring
        when the device offers VIRTIO_F_RING_PACKED and the split ring otherwise (with
        ``reconnect_timeout``, the in-flight buffer the device offers is used on either ring),
        True requires the packed ring (``NegotiationError`` naming RING_PACKED when the device
        does not offer it), False keeps the split ring.  :attr:`ring` says which it got.

        ``num_queues=None`` takes as many queues as the device offers, at most one per CPU
        (as Linux does).  ``queue_depth`` overrides the seed's rule (fill the ring; half of
        it without indirect descriptors).  ``timeout`` bounds the connection and every
        vhost-user reply.  ``request_timeout`` (seconds, None: wait forever) bounds how
        long the device may keep a request: past it the request fails with
        :class:`~virtblk.errors.RequestTimeoutError` (ETIMEDOUT) and its queue's ring is
        reset (``HardwareQueue.expire`` says what happens to the others on it).

        ``reconnect_timeout`` (seconds) survives a device restart: when the device goes
        away, ``socket_path`` is dialled again until it answers or the timeout passes;
        the device must come back with the same features and config, and the requests it
        had not completed are sent again (by the device from its in-flight buffer when it
        offers one, else by the driver).  Callers only wait meanwhile.  Past the timeout
        every waiter gets ``DeviceGoneError`` (ECONNRESET), as without the option at once;
        a device that comes back different gives ``NegotiationError``.  ``from_socket`` and
        ``embedded`` have no such option: they have no path to dial again.
        """
        if reconnect_timeout is not None and reconnect_timeout < 0:
            raise ValueError(f"reconnect_timeout must be >= 0, not {reconnect_timeout}")
        sock = unixsock.connect(socket_path, timeout)
        return cls._open(
            sock,
            num_queues=num_queues,
            queue_size=queue_size,
            queue_depth=queue_depth,
            timeout=timeout,
            experimental_fua=experimental_fua,
            redial=lambda: unixsock.connect(socket_path, timeout),
            reconnect_timeout=reconnect_timeout,
            request_timeout=request_timeout,
            packed=packed,
        )

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        *,
        num_queues: int | None = None,
        queue_size: int = 256,
        queue_depth: int | None = None,
        timeout: float = 10.0,
        experimental_fua: bool = False,
        on_close: Callable[[], None] | None = None,
        request_timeout: float | None = None,
        packed: bool | None = None,
    ) -> Self:
        """Drive the device on an already-connected vhost-user socket (takes ownership).

        The options are :meth:`connect`'s.  A socket cannot be dialled again: a device lost
        here fails every request with ``DeviceGoneError`` (``connect`` with
        ``reconnect_timeout`` reconnects)."""
        return cls._open(
            sock,
            num_queues=num_queues,
            queue_size=queue_size,
            queue_depth=queue_depth,
            timeout=timeout,
            experimental_fua=experimental_fua,
            on_close=on_close,
            request_timeout=request_timeout,
            packed=packed,
        )

    @classmethod
    def _open(
        cls,
        sock: socket.socket,
        *,
        num_queues: int | None,
        queue_size: int,
        queue_depth: int | None,
        timeout: float,
        experimental_fua: bool,
        on_close: Callable[[], None] | None = None,
        request_timeout: float | None = None,
        redial: Callable[[], socket.socket] | None = None,
        reconnect_timeout: float | None = None,
        packed: bool | None = None,
    ) -> Self:
        """``connect`` and ``from_socket`` both: probe the device on ``sock``; ``redial``
        gives a new socket to the same device (``connect`` only)."""
        sock.settimeout(None)
        extra = Feature.BLK_OUT_FUA.mask if experimental_fua else 0
        dev = VirtioBlk(
            sock,
            num_queues=num_queues,
            queue_size=queue_size,
            queue_depth=queue_depth,
            extra_features=extra,
            reply_timeout=timeout,
            redial=redial,
            reconnect_timeout=reconnect_timeout,
            request_timeout=request_timeout,
            packed=packed,
        )
        return cls(dev, on_close=on_close)

    @classmethod
    def embedded(
        cls,
        size: int = 64 << 20,
        backend: Literal["memory", "null", "file", "rbd", "nbd"] = "memory",
        path: str | os.PathLike[str] | None = None,
        *,
        mode: Literal["process", "thread"] = "process",
        num_queues: int = 1,
        queue_size: int = 256,
        queue_depth: int | None = None,
        experimental_fua: bool = False,
        read_only: bool = False,
        zoned: dict[str, Any] | None = None,
        request_timeout: float | None = None,
        ceph_conf: str | None = None,
        ceph_id: str | None = None,
        rbd_op_timeout: float | None = None,
        packed: bool | None = None,
        offer_packed: bool = True,
        **device_options: Any,
    ) -> Self:
        """Start our own device (a child process by default) and connect to it.

        ``device_options`` are :class:`virtblk.device.settings.BlkSettings` fields
        (``serial``, ``blk_size``, ``seg_max``, ``writeback``...); ``zoned`` makes a
        host-managed zoned disk (``ZonedMemoryBackend`` arguments). An unknown or mistyped
        option raises TypeError here, before the device starts.  ``experimental_fua``
        makes both ends use VIRTIO_BLK_F_OUT_FUA.  ``request_timeout`` and ``packed`` are
        :meth:`connect`'s; ``offer_packed=False`` makes the device hide the packed ring
        (the device setting ``packed``, which the driver's option of that name shadows).
        The device stops when the disk is closed.

        ``backend="rbd"`` serves a Ceph RBD image, ``path="POOL/IMAGE"`` (created with
        ``size`` when missing, else its own size), from the cluster ``ceph_conf`` names as
        client ``ceph_id``; ``rbd_op_timeout`` fails requests the cluster leaves
        unanswered that long (IOERR) instead of waiting. It needs Ceph's Python bindings
        (Debian's ``python3-rados`` and ``python3-rbd``); an image that cannot be opened
        raises ``virtblk.device.rbd.RbdError`` with the reason.

        ``backend="nbd"`` serves an NBD export, ``path="nbd://HOST[:PORT]/EXPORT"`` or
        ``"nbd+unix:///EXPORT?socket=PATH"``, whose server tells the size (``size`` is not
        used); one that cannot be reached raises ``virtblk.nbd.client.NbdError``.
        """
        # The composition lives in virtblk.embedded, which knows the device; imported
        # here, when called, so that the driver's modules import nothing of it.
        from virtblk.embedded import open_embedded

        disk = open_embedded(
            cls, size=size, backend=backend, path=path, mode=mode, num_queues=num_queues,
            queue_size=queue_size, queue_depth=queue_depth,
            experimental_fua=experimental_fua, read_only=read_only, zoned=zoned,
            ceph_conf=ceph_conf, ceph_id=ceph_id, rbd_op_timeout=rbd_op_timeout,
            packed=packed, offer_packed=offer_packed, **device_options)
        if request_timeout is not None:
            try:
                disk.device.set_request_timeout(request_timeout)
            except BaseException:
                disk.close()
                raise
        return disk

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> VirtioBlk:
        """The driver core underneath (features, config, queues)."""
        return self._dev

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self._dev.size

    @property
    def logical_block_size(self) -> int:
        """The unit of I/O alignment."""
        return self._dev.logical_block_size

    @property
    def request_timeout(self) -> float | None:
        """Seconds the device may keep a request before it fails with ETIMEDOUT (None:
        forever)."""
        return self._dev.request_timeout

    @property
    def read_only(self) -> bool:
        """Whether the device refuses writes."""
        return self._dev.read_only

    @property
    def features(self) -> list[str]:
        """Negotiated feature names."""
        return feature_names(self._dev.features)

    @property
    def ring(self) -> RingKind:
        """The virtqueue layout in use, ``"packed"`` or ``"split"`` (``connect``'s
        ``packed``)."""
        return self._dev.ring

    @property
    def num_queues(self) -> int:
        """Hardware queues in use."""
        return len(self._dev.queues)

    @property
    def geometry(self) -> Geometry:
        """CHS geometry (the host's, or the 64/32 fallback)."""
        return self._dev.geometry

    @property
    def topology(self) -> Topology:
        """Physical block size, alignment, minimum and optimal I/O size."""
        return self._dev.topology

    @property
    def limits(self) -> Limits:
        """Per-request limits from the device."""
        return self._dev.limits

    @property
    def cache_mode(self) -> str:
        """``"write back"`` or ``"write through"``, like the seed's ``cache_type``."""
        return CACHE_TYPES[int(self._dev.writeback)]

    @cache_mode.setter
    def cache_mode(self, mode: str) -> None:
        writeback = bool(cache_type_index(mode))
        self._check_open()
        self._dev.set_writeback(writeback)

    @property
    def serial(self) -> str:
        """The device's serial (GET_ID), empty when the device does not support it."""
        if self._serial is None:
            raw = self._get_id()
            self._serial = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        return self._serial

    @property
    def lifetime(self) -> Lifetime:
        """Wear information (GET_LIFETIME); needs VIRTIO_BLK_F_LIFETIME."""
        self._dev.require(Feature.BLK_LIFETIME, "GET_LIFETIME")
        data = self._command(RequestType.GET_LIFETIME, Lifetime.SIZE, "GET_LIFETIME")
        return Lifetime.unpack(data)

    def on_resize(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(old_size, new_size)`` when the device reports a new capacity."""
        self._dev.on_config_change(callback)

    def freeze(self, timeout: float | None = None) -> None:
        """Quiesce: wait for in-flight requests, stop the queues, reset the device.

        I/O issued while frozen waits and completes after :meth:`restore` (the seed's
        ``virtblk_freeze``, used around suspend)."""
        self._check_open()
        self._dev.freeze(timeout)

    def restore(self) -> None:
        """Negotiate with the device again and resume, sending the I/O that waited."""
        self._check_open()
        self._dev.restore()

    @property
    def reconnects(self) -> int:
        """How many times the device went away and the disk reached it again
        (``connect(..., reconnect_timeout=...)``)."""
        return self._dev.reconnects

    @property
    def frozen(self) -> bool:
        """Between :meth:`freeze` and :meth:`restore`."""
        return self._dev.frozen

    # -- zoned devices (VIRTIO_BLK_F_ZONED) -----------------------------------------------------
    @property
    def zoned(self) -> ZonedCharacteristics | None:
        """The zoned characteristics (model, zone size, limits), or None for a regular disk."""
        return None if self._zones is None else self._zones.characteristics

    @property
    def zone_size(self) -> int:
        """Bytes per zone (the last may be smaller); 0 for a regular disk."""
        return 0 if self._zones is None else self._zones.characteristics.zone_size

    def _zone_ops(self, what: str) -> ZoneManager:
        self._check_open()
        if self._zones is None:
            raise FeatureNotNegotiatedError(f"{self.name}: {what} needs a zoned device")
        return self._zones

    def report_zones(self, start_offset: int = 0, max_zones: int | None = None) -> list[Zone]:
        """The zones from the one holding ``start_offset`` (ZONE_REPORT, paged)."""
        return self._zone_ops("report_zones").report(start_offset, max_zones)

    def zone_open(self, offset: int) -> None:
        """Explicitly open the zone starting at ``offset`` (ZONE_OPEN)."""
        self._zone_ops("zone_open").open(offset)

    def zone_close(self, offset: int) -> None:
        """Close the zone starting at ``offset`` (ZONE_CLOSE)."""
        self._zone_ops("zone_close").close(offset)

    def zone_finish(self, offset: int) -> None:
        """Make the zone starting at ``offset`` full (ZONE_FINISH)."""
        self._zone_ops("zone_finish").finish(offset)

    def zone_reset(self, offset: int) -> None:
        """Empty the zone starting at ``offset`` (ZONE_RESET)."""
        self._zone_ops("zone_reset").reset(offset)

    def zone_reset_all(self) -> None:
        """Empty every sequential zone (ZONE_RESET_ALL)."""
        self._zone_ops("zone_reset_all").reset_all()

    def zone_append(self, data: Buffer, zone_offset: int) -> int:
        """Append ``data`` to the zone at ``zone_offset`` (ZONE_APPEND); returns the byte
        offset where the device wrote it."""
        self._check_writable("zone_append")
        return self._zone_ops("zone_append").append(data, zone_offset)

    def refresh(self) -> None:
        """Re-read the device's config space (for devices that resize without notice)."""
        self._check_open()
        self._dev.refresh_config()

    # -- data path -------------------------------------------------------------------------------
    def buffer(self, size: int) -> memoryview:
        """A buffer in shared memory: I/O into or out of it is zero-copy, and the disk
        remembers where it lies, so the fast paths never look its address up.  Free with
        :meth:`free_buffer` (or let :meth:`close` reclaim it)."""
        self._check_open()
        gpa = self._alloc(size)
        view = self._dev.memory.view(gpa, size)
        self.requests.register(view, gpa)
        return view

    def free_buffer(self, buf: memoryview) -> None:
        """Return a buffer from :meth:`buffer`."""
        gpa = self.buffer_address(buf)
        if gpa is None:
            raise ValueError("not a buffer from Disk.buffer()")
        self.requests.unregister(buf)
        buf.release()
        self._free(gpa)

    def buffer_address(self, buf: Buffer) -> int | None:
        """The guest-physical address of a buffer in shared memory (one from
        :meth:`buffer`, or a part of one), else None."""
        return self.requests.address_of(buf)

    def _register_handle(self, handle: Any) -> None:
        self._handles.append(handle)

    def _unregister_handle(self, handle: Any) -> None:
        if handle in self._handles:
            self._handles.remove(handle)

    @property
    def queue_limits(self) -> QueueLimits:
        """What one request may carry: the device's seg_max and size_max, Linux's default
        cap on a request's size, the logical block size."""
        return self.requests.queue_limits

    def plug(self, *, merge: bool = True) -> Plug:
        """A plug on the calling thread's hardware queue (``blk_start_plug``): bios added
        to it are sorted, merged and split by :attr:`queue_limits`, and submitted with one
        kick when it is flushed or its ``with`` block ends.  Bios carry guest-physical
        segments: use buffers from :meth:`buffer` (``device.memory.guest_address_of``)."""
        self._check_open()
        return Plug(self._queue(), self.queue_limits, merge=merge)

    def pread(self, length: int, offset: int) -> bytes:
        """Read ``length`` bytes at ``offset``."""
        out = bytearray(length)
        self.preadv([out], offset)
        return bytes(out)

    def pwrite(self, data: Buffer, offset: int, *, fua: bool = False) -> int:
        """Write ``data`` at ``offset``; returns the bytes written.

        ``fua`` (experimental, VIRTIO_BLK_F_OUT_FUA) makes this write durable on completion
        without flushing the whole cache."""
        return self.pwritev([data], offset, fua=fua)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Read into ``buffers`` (in order) from ``offset``; returns the bytes read."""
        views = [memoryview(b).cast("B") for b in buffers]
        for v in views:
            if v.readonly:
                raise TypeError("preadv needs writable buffers")
        return self._rw(False, views, offset, [self.buffer_address(b) for b in buffers])

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, fua: bool = False) -> int:
        """Write ``buffers`` (in order) at ``offset``; returns the bytes written."""
        self._check_writable("write")
        if fua:
            self._dev.require(Feature.BLK_OUT_FUA, "a FUA write (experimental)")
        views = [memoryview(b).cast("B") for b in buffers]
        return self._rw(True, views, offset, [self.buffer_address(b) for b in buffers], fua=fua)

    def flush(self) -> None:
        """Make every completed write durable: FLUSH in write-back mode; in write-through
        (or without the FLUSH feature) writes are durable on completion, and, as in the
        seed, nothing is sent."""
        self._check_open()
        if not self.requests.flush_needed:
            return
        q = self._queue()
        req = q.get_tag()
        try:
            q.submit(req, RequestType.FLUSH, 0)
            q.wait_for(req)
            raise_for(req, f"{self.name}: flush")
        finally:
            self._release(q, req)

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is unused (DISCARD)."""
        self._dev.require(Feature.BLK_DISCARD, "discard")
        self._check_writable("discard")
        self._ranges(RequestType.DISCARD, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero the range (WRITE_ZEROES); ``unmap`` lets the device deallocate it."""
        self._dev.require(Feature.BLK_WRITE_ZEROES, "write_zeroes")
        self._check_writable("write_zeroes")
        self._ranges(RequestType.WRITE_ZEROES, offset, length, unmap=unmap)

    def secure_erase(self, offset: int, length: int) -> None:
        """Erase the range so it cannot be recovered (SECURE_ERASE)."""
        self._dev.require(Feature.BLK_SECURE_ERASE, "secure_erase")
        self._check_writable("secure_erase")
        self._ranges(RequestType.SECURE_ERASE, offset, length)

    # -- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"I/O on closed disk {self.name}")

    def _check_writable(self, what: str) -> None:
        self.requests.check_writable(f"{self.name}: {what}")

    def _queue(self) -> HardwareQueue:
        """The hardware queue of the calling thread (blk-mq maps each CPU to one)."""
        q: HardwareQueue | None = getattr(self._thread_queue, "q", None)
        if q is None or q.owner is not None:
            if not self._dev.queues:
                raise ValueError(f"I/O on closed disk {self.name}")
            # A queue a QueueHandle drives is its alone: use the others.
            queues = [hq for hq in self._dev.queues if hq.owner is None]
            if not queues:
                raise ValueError(
                    f"{self.name}: every hardware queue is driven by a QueueHandle; close one "
                    "(or connect with more queues) for blocking I/O")
            q = queues[self._next_queue % len(queues)]
            self._next_queue += 1
            self._thread_queue.q = q
        return q

    def use_queue(self, index: int) -> None:
        """Pin the calling thread to hardware queue ``index`` instead of the round-robin
        choice: a benchmark job, or a process forked per queue (``virtblk bench
        --numjobs``), must drive its own queue and no other."""
        queues = self._dev.queues
        if not 0 <= index < len(queues):
            raise ValueError(f"queue index {index} out of range: the disk has {len(queues)}")
        self._thread_queue.q = queues[index]

    def check_range(self, offset: int, length: int, what: str) -> None:
        """Refuse I/O on a closed disk, negative, misaligned or past the end (ValueError)."""
        self._check_open()
        self.requests.check_range(offset, length, what)

    def _alloc(self, size: int) -> int:
        with self._alloc_lock:
            return self._dev.allocator.alloc(size, align=4096)

    def _free(self, gpa: int) -> None:
        if self._dev.lost is not None:
            return  # the device may still write it: never hand it out again
        with self._alloc_lock:
            self._dev.allocator.free(gpa)

    def _rw(
        self, write: bool, views: list[memoryview], offset: int,
        direct: Sequence[int | None], *, fua: bool = False,
    ) -> int:
        """Read or write ``views`` at ``offset``; ``direct`` holds each view's gpa when it
        lies in shared memory (then the device uses it in place), else None."""
        total = sum(len(v) for v in views)
        what = f"{self.name}: {'write' if write else 'read'}"
        self.check_range(offset, total, what)
        if total == 0:
            return 0
        if self._zones is not None and offset // self.zone_size != (offset + total - 1) // \
                self.zone_size:
            # One request per zone, as Linux's chunk_sectors = zone size makes it.
            memory = self._dev.memory
            for piece_offset, piece in split_at_zones(views, offset, self.zone_size):
                self._rw(write, piece, piece_offset,
                         [memory.guest_address_of(v) for v in piece], fua=fua)
            return total
        memory = self._dev.memory
        bs = self.logical_block_size
        if all(g is not None for g in direct) and all(len(v) % bs == 0 for v in views):
            # One bio per buffer: the plug merges neighbours into requests as large as the
            # limits allow and splits a buffer that exceeds them.
            bios: list[Bio] = []
            sector = offset >> SECTOR_SHIFT
            for g, v in zip(direct, views, strict=True):
                if len(v):
                    assert g is not None
                    bios.append(Bio(write, sector, [(g, len(v))], fua=fua))
                    sector += len(v) >> SECTOR_SHIFT
            self._transfer(bios, what)
            return total
        done = 0
        staged = _Cursor(views)
        while done < total:
            n = min(CHUNK, total - done)
            q = self._queue()
            gpa = self._alloc(n)
            ours = True  # the bounce buffer is ours to free (not its request's)
            try:
                bounce = memory.view(gpa, n)
                if write:
                    staged.copy_out(bounce)
                bio = Bio(write, (offset + done) >> SECTOR_SHIFT, [(gpa, n)], fua=fua)
                try:
                    self._transfer([bio], what, q)
                except BaseException:
                    ours = not self._free_when_ended(q, bio, gpa)
                    raise
                if not write:
                    staged.copy_in(bounce)
                bounce.release()
            finally:
                if ours:
                    self._free(gpa)
            done += n
        return total

    def _transfer(self, bios: list[Bio], what: str, q: HardwareQueue | None = None) -> None:
        """Run ``bios`` through a plug on ``q`` (the calling thread's queue by default):
        merged, split by the limits, one kick; raise the first error any of them ended
        with.  A wait that ends early ends the bios the plug still held (they never reached
        the ring); those on the ring end when the device completes them."""
        plug = Plug(q or self._queue(), self.queue_limits, max_count=len(bios) + 1)
        try:
            for bio in bios:
                plug.add(bio)
            plug.wait(bios)
        except BaseException:
            plug.abandon()
            raise
        for bio in bios:
            exc = bio.error(what)
            if exc is not None:
                raise exc

    def _ranges(
        self, type_: RequestType, offset: int, length: int, *, unmap: bool = False
    ) -> None:
        """DISCARD / WRITE_ZEROES / SECURE_ERASE, one request per payload, in order."""
        what = f"{self.name}: {type_.name.lower()}"
        self.check_range(offset, length, what)
        q = self._queue()
        for payload in self.requests.range_payloads(type_, offset, length, unmap=unmap):
            gpa = self._alloc(len(payload))
            req = q.get_tag()
            try:
                self._dev.memory.view(gpa, len(payload))[:] = payload
                q.submit(req, type_, 0, out_bufs=[(gpa, len(payload))])
                q.wait_for(req)
                raise_for(req, what)
            finally:
                self._release(q, req, gpa)

    def _command(self, type_: RequestType, in_len: int, what: str) -> bytes:
        """A request whose answer is ``in_len`` bytes of device-written data."""
        self._check_open()
        q = self._queue()
        gpa = self._alloc(in_len)
        req = q.get_tag()
        try:
            q.submit(req, type_, 0, in_bufs=[(gpa, in_len)])
            q.wait_for(req)
            raise_for(req, f"{self.name}: {what}")
            return bytes(self._dev.memory.view(gpa, in_len))
        finally:
            self._release(q, req, gpa)

    def _release(self, q: HardwareQueue, req: Request, gpa: int | None = None) -> None:
        """Give back ``req``'s tag and its buffer at ``gpa``: now when it is done, else
        (the wait ended early: Ctrl-C, an exception) when it completes, so that neither is
        reused while the device may still write the buffer or answer on the tag."""

        def release(done: Request) -> None:
            q.put_tag(done)
            if gpa is not None:
                self._free(gpa)

        with q.cond:  # the lock the completion runs under: it cannot slip in between
            if req.queued and not req.done:
                req.callback = release
                return
        release(req)

    def _free_when_ended(self, q: HardwareQueue, bio: Bio, gpa: int) -> bool:
        """A wait for ``bio`` ended early: have its end free the bounce buffer at ``gpa``
        instead of the caller; False when it has ended already (the caller frees it)."""
        with q.cond:
            if bio.done:
                return False
            bio.end_io = lambda _bio: self._free(gpa)
            return True

    def _get_id(self) -> bytes:
        try:
            return self._command(RequestType.GET_ID, VIRTIO_BLK_ID_BYTES, "GET_ID")
        except BlockIOError:
            return b""  # "Unsupported? Make it empty." (virtblk_serial_show)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight I/O (up to 10 s a queue; what is left fails with EIO),
        disconnect, and stop an embedded device."""
        if self._closed:
            return
        for handle in list(self._handles):
            handle.close()
        self._closed = True
        self.requests.buffers.clear()
        try:
            self._dev.close()
        finally:
            DiskIndex.release(self._index)
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<Disk {self.name} {state}>"


class _Cursor:
    """Copies between a list of caller buffers and contiguous bounce buffers, in order."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._i = 0
        self._off = 0

    def _walk(self, n: int) -> list[tuple[memoryview, int, int]]:
        spans: list[tuple[memoryview, int, int]] = []
        while n:
            v = self._views[self._i]
            take = min(n, len(v) - self._off)
            if take:
                spans.append((v, self._off, take))
            n -= take
            self._off += take
            if self._off == len(v):
                self._i += 1
                self._off = 0
        return spans

    def copy_out(self, bounce: memoryview) -> None:
        """Fill ``bounce`` from the next bytes of the caller's buffers."""
        pos = 0
        for v, off, n in self._walk(len(bounce)):
            bounce[pos : pos + n] = v[off : off + n]
            pos += n

    def copy_in(self, bounce: memoryview) -> None:
        """Spread ``bounce`` over the next bytes of the caller's buffers."""
        pos = 0
        for v, off, n in self._walk(len(bounce)):
            v[off : off + n] = bounce[pos : pos + n]
            pos += n


__all__ = ["SECTOR_SIZE", "Disk"]
