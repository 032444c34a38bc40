"""Probe a virtio-blk device over vhost-user: what the seed's ``virtblk_probe`` does.

Negotiate features (we offer only what we implement and require VERSION_1), read the
configuration space, share our memory, set up one virtqueue per hardware queue, and
expose the device's properties the way the Linux driver derives them (block size,
topology, geometry with the sd fallback, cache mode, read-only, limits).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from virtblk.driver.blkmq import DriverRing, HardwareQueue
from virtblk.driver.zoned import driver_features as zoned_driver_features
from virtblk.errors import DeviceGoneError, FeatureNotNegotiatedError, NegotiationError
from virtblk.spec import (
    SECTOR_SIZE,
    BlkConfig,
    Feature,
    config_size,
    feature_names,
    has_feature,
)
from virtblk.vhost_user.errors import PeerGoneError, VhostUserError
from virtblk.vhost_user.frontend import BackendChannel, VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature
from virtblk.virtio import packed_layout
from virtblk.virtio.inflight_packed import inflight_region_size
from virtblk.virtio.memory import BufferAllocator, GuestMemory, MemoryRegion
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.packed_layout import PackedRingBase, encode_vring_base
from virtblk.virtio.split_driver import DriverVirtqueue
from virtblk.virtio.split_layout import VringAddrs

log = logging.getLogger("virtblk.driver")

_T = TypeVar("_T")

DRIVER_FEATURES = (
    Feature.VERSION_1.mask
    | Feature.RING_INDIRECT_DESC.mask
    | Feature.RING_EVENT_IDX.mask
    | Feature.BLK_SIZE_MAX.mask
    | Feature.BLK_SEG_MAX.mask
    | Feature.BLK_GEOMETRY.mask
    | Feature.BLK_RO.mask
    | Feature.BLK_BLK_SIZE.mask
    | Feature.BLK_FLUSH.mask
    | Feature.BLK_TOPOLOGY.mask
    | Feature.BLK_CONFIG_WCE.mask
    | Feature.BLK_MQ.mask
    | Feature.BLK_DISCARD.mask
    | Feature.BLK_WRITE_ZEROES.mask
    | Feature.BLK_SECURE_ERASE.mask
    | Feature.BLK_LIFETIME.mask
    | Feature.BLK_ZONED.mask
)
"""Every feature this driver implements but the ring layout.  OUT_FUA is experimental and
opt-in; RING_PACKED is asked for by ``packed`` (see ``VirtioBlk``)."""

FRESH_PACKED_BASE = encode_vring_base(PackedRingBase(0, True, 0, True))
"""SET_VRING_BASE for a fresh packed ring (0x80008000): both positions 0, both wrap
counters 1, as the spec starts them."""

RingKind = Literal["split", "packed"]
"""Which virtqueue layout a disk's rings use."""

PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.BACKEND_REQ)
    | (1 << ProtocolFeature.RESET_DEVICE)
)
"""vhost-user protocol features the frontend uses."""

DEFAULT_MEMORY_SIZE = 256 << 20
"""Shared memory for rings and bounce buffers; a memfd, so untouched pages cost nothing."""

MAX_CAPACITY_SECTORS = ((1 << 63) - 1) >> 9
"""The largest capacity whose byte size fits a signed 64-bit file offset (``loff_t``):
``Disk`` offsets are byte offsets, so a larger capacity is truncated with a warning."""

_UINT_MAX = (1 << 32) - 1
"""The block layer keeps its topology limits in C ``unsigned int``."""

CACHE_TYPES = ("write through", "write back")
"""The seed's ``virtblk_cache_types``: index 1 means the device has a volatile cache."""


def sysfs_streq(s1: str, s2: str) -> bool:
    """Linux's ``sysfs_streq``: equal, or equal but for one newline ending either string
    (``echo`` ends what it writes to a sysfs file with one)."""
    return s1 == s2 or s1 == s2 + "\n" or s2 == s1 + "\n"


def cache_type_index(mode: str) -> int:
    """The index in ``CACHE_TYPES`` of ``mode``, matched as the seed's
    ``virtblk_cache_type_store`` matches what is written to ``cache_type``."""
    for index, name in enumerate(CACHE_TYPES):
        if sysfs_streq(mode, name):
            return index
    raise ValueError(f"cache mode must be one of {CACHE_TYPES}, not {mode!r}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Legacy CHS geometry (``virtblk_getgeo``)."""

    cylinders: int
    heads: int
    sectors: int


@dataclasses.dataclass(frozen=True)
class Topology:
    """I/O topology in bytes, as Linux reports it once the block layer has clamped what
    the seed handed it (``queue/physical_block_size``, ``alignment_offset``,
    ``queue/minimum_io_size``, ``queue/optimal_io_size``): never 0 but ``opt_io_size``
    and ``alignment_offset``."""

    physical_block_size: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry, from the device's limits."""

    max_segments: int
    max_segment_size: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: bool
    max_secure_erase_sectors: int
    max_secure_erase_seg: int
    secure_erase_sector_alignment: int


ConfigCallback = Callable[[int, int], None]
"""Called with (old size, new size) in bytes after a config change that resized the disk."""

Redial = Callable[[], socket.socket]
"""Connects a new socket to the device (``Disk.connect``'s path) for a reconnect."""

RECONNECT_FIRST_DELAY = 0.01
RECONNECT_MAX_DELAY = 0.25
"""Seconds between two attempts to reach a lost device: from the first, doubling up to
the second (a restarted ``virtblk serve`` listens within a fraction of a second)."""


def string_get_size(size: int, base: int) -> str:
    """Linux's ``string_get_size``: three significant digits, rounded half up, so
    ``8.00 GiB`` / ``8.59 GB``, ``10.0 GiB``, ``512 MiB``; ``UNK`` past the units."""
    units = (
        ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
        if base == 2
        else ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    )
    if size == 0:
        return "0 B"
    div = 1024 if base == 2 else 1000
    unit = remainder = 0
    while size >= div:
        size, remainder = divmod(size, div)
        unit += 1
    digits = 0  # decimals printed: as many as keep three significant digits
    scaled = size
    while scaled * 10 < 1000:
        scaled *= 10
        digits += 1
    if base == 2:
        remainder = remainder * 1000 >> 10
    remainder += (500, 50, 5, 0)[digits]  # round half up at the last printed digit
    if remainder >= 1000:
        remainder -= 1000
        size += 1
    fraction = f".{remainder:03d}"[: digits + 1] if digits else ""
    name = units[unit] if unit < len(units) else "UNK"
    return f"{size}{fraction} {name}"


class VirtioBlk:
    """A probed virtio-blk device: negotiated features, config, hardware queues.

    This is the driver core under :class:`virtblk.Disk`; it knows the device, not files.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        num_queues: int | None = None,
        queue_size: int = 256,
        queue_depth: int | None = None,
        memory_size: int = DEFAULT_MEMORY_SIZE,
        extra_features: int = 0,
        exclude_features: int = 0,
        reply_timeout: float = 10.0,
        redial: Redial | None = None,
        reconnect_timeout: float | None = None,
        request_timeout: float | None = None,
        packed: bool | None = None,
    ) -> None:
        """``packed`` chooses the ring layout: None takes VIRTIO_F_RING_PACKED when the
        device offers it, True requires it (NegotiationError when not offered), False
        keeps the split ring.

        ``redial`` and ``reconnect_timeout`` together make a lost device (its socket hung
        up) be dialled again until the timeout passes, and the requests it had not
        completed resubmitted (see ``_reconnect``); without them, a lost device fails every
        request with ``DeviceGoneError``.  ``request_timeout`` (seconds, None: forever)
        bounds how long the device may keep a request (:meth:`HardwareQueue.expire`);
        ``reply_timeout`` bounds each vhost-user reply, GET_VRING_BASE's included, so a
        reset of a stuck ring ends too."""
        if queue_size < 4 or queue_size > 32768 or queue_size & (queue_size - 1):
            # A request is at least header + data + status: 3 descriptors, and a split
            # ring's size is a power of two.
            sock.close()
            raise ValueError(f"queue_size must be a power of two from 4 to 32768, not {queue_size}")
        self._sock = sock
        self.frontend = VhostUserFrontend(sock, timeout=reply_timeout)
        self._lock = threading.RLock()  # one vhost-user request at a time
        self._config_lock = threading.Lock()  # one re-read (or switch) of the config at a time
        self._config_callbacks: list[ConfigCallback] = []
        self.config_generation = 0
        """Bumped each time the config is re-read: a fast path that caches the size (a
        queue handle) compares one integer per I/O instead of re-deriving the size."""
        self._requested_queues = num_queues
        self.queue_size = queue_size
        self._queue_depth = queue_depth
        # ``exclude_features`` leaves offered features unnegotiated (conformance checks
        # send requests whose feature the device offered but we did not accept).
        self._wanted = (DRIVER_FEATURES | extra_features) & ~exclude_features
        self._packed = packed
        if packed is not False:
            self._wanted |= Feature.RING_PACKED.mask
        self._backend_channel: BackendChannel | None = None
        self.queues: list[HardwareQueue] = []
        self._vrings: list[tuple[VringAddrs, int, int]] = []  # ring memory, kick, call
        self.packed = False
        """True when the rings are packed (VIRTIO_F_RING_PACKED negotiated)."""
        self.frozen = False
        self._redial = redial if reconnect_timeout is not None else None
        self.reconnect_timeout = reconnect_timeout
        self.name_for_errors = "virtblk"
        """How reconnect errors name the device (the disk sets its own name)."""
        self.reconnects = 0
        """How many times the device was lost and reached again."""
        self.reconnect_seconds = 0.0
        """The time those reconnects took in all, from the loss seen to the queues resumed
        (the device's restart included)."""
        self._reconnecting = False  # a reconnect thread is at work
        self._reconnect_thread: threading.Thread | None = None  # the last one, to join
        self._closing = threading.Event()
        self._inflight_buffer: tuple[int, int, int] | None = None  # fd, size, offset
        self.alloc_lock = threading.Lock()
        """Held around every use of ``allocator`` once the disk runs (the ``Disk``'s
        buffers and a reconnect's rings are taken from it on different threads)."""
        self._request_timeout = request_timeout
        self.lost: BaseException | None = None
        """Why the connection was given up while the device may still write our memory (a
        ring it would not stop), else None: from then on nothing freed is reused."""
        self._fds: list[int] = []
        self.region = MemoryRegion.create(memory_size, name="virtblk-driver")
        self.memory = GuestMemory([self.region])
        self.allocator = BufferAllocator(self.region)
        try:
            self._negotiate()
            self._start_queues()
        except BaseException:
            self.close()
            raise

    # -- probe ------------------------------------------------------------------------------
    def _negotiate(self) -> None:
        fe = self.frontend
        fe.set_owner()
        self.offered_features = fe.get_features()
        if not has_feature(self.offered_features, Feature.VERSION_1):
            raise NegotiationError(
                "device does not offer VIRTIO_F_VERSION_1; legacy devices are not supported"
            )
        self.protocol_features = 0
        if has_feature(self.offered_features, Feature.VHOST_USER_PROTOCOL_FEATURES):
            offered_protocol = fe.get_protocol_features()
            self._choose_ring()
            wanted = PROTOCOL_FEATURES
            if self._redial is not None:
                # A device that keeps its in-flight requests in a buffer we hand back
                # resubmits them itself after a restart (vhost-user "Inflight I/O tracking"),
                # on either ring: the device lays the buffer out for the ring acked (SET_FEATURES
                # comes before GET_INFLIGHT_FD, in ``_start_queues``).
                wanted |= 1 << ProtocolFeature.INFLIGHT_SHMFD
            self.protocol_features = offered_protocol & wanted
            fe.set_protocol_features(self.protocol_features)
        else:
            self._choose_ring()
        if not self._has_protocol(ProtocolFeature.CONFIG):
            raise NegotiationError(
                "device cannot expose its config space (no VHOST_USER_PROTOCOL_F_CONFIG): "
                "the capacity is unknown"
            )
        self.device_max_queues = (
            fe.get_queue_num() if self._has_protocol(ProtocolFeature.MQ) else 1
        )
        self.features = self.offered_features & self._wanted
        if self.has(Feature.BLK_ZONED):
            # The zoned model, read before accepting, decides on DISCARD (not with HM).
            self.features = zoned_driver_features(self.features, self._read_config())
        vhost_bit = self.offered_features & Feature.VHOST_USER_PROTOCOL_FEATURES.mask
        fe.set_features(self.features | vhost_bit)
        self.config = self._validate_config(self._read_config())
        if self._has_protocol(ProtocolFeature.BACKEND_REQ):
            self._backend_channel = fe.open_backend_channel(self._on_config_change)
            self._backend_channel.start()

    def _choose_ring(self) -> None:
        """Decide the ring layout from what the device offers and what ``packed`` asked
        for, before anything depends on it.  Once decided it is fixed: a reconnect to a
        device that no longer offers the packed ring is refused (``_renegotiate``), and a
        disk that went split stays split (the rings were laid out for it).  Whether the
        disk reconnects plays no part: the in-flight buffer has a layout for either ring."""
        offered = has_feature(self.offered_features, Feature.RING_PACKED)
        if self._packed and not offered:
            raise NegotiationError(
                "packed=True, but the device does not offer VIRTIO_F_RING_PACKED "
                "(connect with packed=None to fall back to the split ring)")
        if self._packed is None:
            self.packed = offered
        else:
            self.packed = self._packed
        if not self.packed:
            self._wanted &= ~Feature.RING_PACKED.mask

    @property
    def ring(self) -> RingKind:
        """The virtqueue layout in use: ``"packed"`` or ``"split"``."""
        return "packed" if self.packed else "split"

    def _allocate_ring(self) -> VringAddrs:
        """Ring memory for one queue in the negotiated layout (caller holds
        ``alloc_lock`` once the disk runs)."""
        if self.packed:
            return packed_layout.allocate(self.allocator, self.queue_size)
        return VringAddrs.allocate(self.allocator, self.queue_size)

    @property
    def _fresh_base(self) -> int:
        """SET_VRING_BASE for a fresh ring of the negotiated layout."""
        return FRESH_PACKED_BASE if self.packed else 0

    def _validate_config(self, c: BlkConfig) -> BlkConfig:
        """Refuse a config space no block device can have, as Linux's probe does, rather
        than misbehave later (everything the device says is checked, not trusted); returns
        ``c`` when it is usable."""
        if self.has(Feature.BLK_BLK_SIZE) and not (
            SECTOR_SIZE <= c.blk_size <= 65536 and c.blk_size & (c.blk_size - 1) == 0
        ):
            raise NegotiationError(
                f"invalid block size {c.blk_size}: a power of two from 512 to 65536 is needed"
            )
        if self.has(Feature.BLK_MQ) and c.num_queues == 0:
            raise NegotiationError("the device offers MQ but reports zero queues")
        if c.capacity == 0:
            # Linux would show an empty disk; here every request would fail as "past the
            # end" (a ValueError, the caller's error): say at connect that the device is
            # unusable, and why.
            raise NegotiationError(
                "the device reports a capacity of 0 sectors: no block can be read or written"
            )
        return c

    def _has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features & (1 << feature))

    def has(self, feature: Feature) -> bool:
        """True when ``feature`` was negotiated."""
        return has_feature(self.features, feature)

    def require(self, feature: Feature, what: str) -> None:
        """Refuse, up front, a request the device did not agree to (the seed never sends it)."""
        if not self.has(feature):
            raise FeatureNotNegotiatedError(
                f"{what} needs VIRTIO_{feature.name}, which the device does not offer"
            )

    def _config_size(self) -> int:
        """How much config space to read: as far as our negotiated features reach."""
        return config_size(self.features)

    def _read_config(self) -> BlkConfig:
        with self._lock:
            return BlkConfig.unpack(self.frontend.get_config(self._config_size()))

    def _num_vqs(self) -> int:
        available = self.config.num_queues if self.has(Feature.BLK_MQ) else 1
        available = max(1, min(available, self.device_max_queues))
        if self._requested_queues is None:
            return min(available, os.cpu_count() or 1)
        if self._requested_queues < 1 or self._requested_queues > available:
            raise NegotiationError(
                f"{self._requested_queues} queues requested; the device offers {available}"
            )
        return self._requested_queues

    @property
    def sg_elems(self) -> int:
        """Data segments one request may use (``seg_max``; at least one, whatever they say)."""
        seg_max = self.config.seg_max if self.has(Feature.BLK_SEG_MAX) else 0
        return max(1, min(seg_max, self.queue_size - 2))

    def _depth(self) -> int:
        if self._queue_depth is not None:
            return max(1, min(self._queue_depth, self.queue_size))
        # Default queue sizing fills the ring, but without indirect descs a request uses
        # at least 2 descriptors.
        depth = self.queue_size
        if not self.has(Feature.RING_INDIRECT_DESC):
            depth //= 2
        return depth

    def _start_queues(self) -> None:
        if self._has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            self._get_inflight_buffer(self._num_vqs())
            self._set_inflight_buffer(self.frontend)
        self.frontend.set_mem_table([self.region])
        depth = self._depth()
        for index in range(self._num_vqs()):
            addrs = self._allocate_ring()
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds.append(kick)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds.append(call)
            self._vrings.append((addrs, kick, call))
            vq = self._setup_vring(index, depth)
            self.queues.append(
                HardwareQueue(
                    index,
                    vq,
                    self.memory,
                    self.allocator,
                    depth=depth,
                    kick_fd=kick,
                    call_fd=call,
                    hangup_fd=self._sock.fileno(),
                    rings=self,
                    request_timeout=self._request_timeout,
                )
            )
            if self._redial is not None:
                self.queues[-1].on_lost = self._on_lost

    def _setup_vring(self, index: int, depth: int) -> DriverRing:
        """A fresh (zeroed) ring for queue ``index``, announced to the device."""
        vq = self._new_vq(index, depth)
        try:
            self._announce_vring(self.frontend, index, self._fresh_base)
        except BaseException:
            vq.close()
            raise
        return vq

    def _new_vq(self, index: int, depth: int) -> DriverRing:
        """A fresh (zeroed) ring for queue ``index``, not yet announced."""
        addrs, _kick, _call = self._vrings[index]
        ring = PackedDriverVirtqueue if self.packed else DriverVirtqueue
        with self.alloc_lock:
            return ring(
                self.memory,
                addrs,
                event_idx=self.has(Feature.RING_EVENT_IDX),
                indirect=self.has(Feature.RING_INDIRECT_DESC),
                allocator=self.allocator,
                max_tokens=depth,
                max_chain=self.sg_elems + 2,
            )

    def _announce_vring(self, fe: VhostUserFrontend, index: int, base: int) -> None:
        """Tell the device where ring ``index`` is, that it starts at ``base`` (a split
        ring's avail index, a packed ring's positions and wrap counters, see
        ``packed_layout.encode_vring_base``), its eventfds, and enable it."""
        addrs, kick, call = self._vrings[index]
        uva_offset = self.region.user_addr - self.region.guest_phys_addr
        fe.set_vring_num(index, self.queue_size)
        fe.set_vring_base(index, base)
        fe.set_vring_addr(
            index,
            desc_uva=addrs.desc + uva_offset,
            used_uva=addrs.used + uva_offset,
            avail_uva=addrs.avail + uva_offset,
        )
        fe.set_vring_call(index, call)
        fe.set_vring_kick(index, kick)
        if has_feature(self.offered_features, Feature.VHOST_USER_PROTOCOL_FEATURES):
            fe.set_vring_enable(index, True)

    # -- ring resets after a request timeout (RingControl, for HardwareQueue) ---------------------
    # Not under ``self._lock``: a queue calls these holding its own lock, and ``freeze``
    # takes the two the other way round.  The frontend keeps each request and its reply
    # together; the messages name their ring, so another ring's or a config request may
    # come between them.
    def stop_ring(self, index: int) -> None:
        """GET_VRING_BASE: the device stops ring ``index`` and lets go of its buffers; a
        device that does not answer within the reply timeout raises ``ReplyTimeoutError``."""
        self.frontend.get_vring_base(index)

    def start_ring(self, index: int, depth: int) -> DriverRing:
        """A fresh ring for queue ``index`` (as ``restore`` sets one up), its region of
        the in-flight buffer emptied first (``_clear_inflight``)."""
        self._clear_inflight(index)
        return self._setup_vring(index, depth)

    def _clear_inflight(self, index: int | None = None) -> None:
        """Zero ring ``index``'s region of the in-flight buffer (None: every ring's), for a
        ring the driver starts afresh on a device that stopped it.

        The device recovers a ring from its region at every start; a region that still
        described the old ring would make it resubmit the old ring's descriptors into the
        new one (or refuse the buffer: more in flight than the fresh ring holds), and a
        restarted device would not know the new ring's requests.  Version 0 makes it
        start the region afresh (vhost-user "Inflight I/O tracking").  Written with
        ``pwrite``, not through a mapping: a device that shrank its memfd makes this fail
        (the reset then fails), never SIGBUS."""
        if self._inflight_buffer is None:
            return
        fd, size, offset = self._inflight_buffer
        if index is None:
            start, length = offset, size
        else:
            length = inflight_region_size(self.queue_size, packed=self.packed)
            start = offset + index * length
        os.pwrite(fd, bytes(length), start)

    def ring_lost(self, index: int, exc: BaseException) -> None:
        """Ring ``index`` could not be stopped or set up again (``exc``): the device is
        alive enough to keep its socket open but does not answer, so it may still write
        into our memory.  From now on nothing freed is reused (``lost``), and our socket
        is shut down: every queue's waiters see the hang-up (``DeviceGoneError``), as when
        the device goes away, and a device that still reads its socket ends the session.

        A disk with ``reconnect_timeout`` does not dial such a device again (``_on_lost``
        gives every queue up): it has not died, it hangs, and what it still holds (our
        memory, a ring, its in-flight records) could not be handed to a successor
        safely."""
        log.error("req.%d: the device did not stop the ring (%s); giving the connection up",
                  index, exc)
        if self.lost is None:
            self.lost = exc
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut down or closed: the hang-up is there already

    def set_request_timeout(self, seconds: float | None) -> None:
        """Set (or, None, remove) every queue's request timeout; while idle."""
        for q in self.queues:
            q.set_request_timeout(seconds)
        self._request_timeout = seconds

    @property
    def request_timeout(self) -> float | None:
        """Seconds the device may keep a request (None: forever)."""
        return self._request_timeout

    # -- freeze and restore (the seed's virtblk_freeze / virtblk_restore) ------------------------
    def freeze(self, timeout: float | None = None) -> None:
        """Wait for in-flight requests, stop the queues and reset the device.

        Requests submitted while frozen wait (parked on their hardware queue) and complete
        after :meth:`restore`."""
        with self._lock:
            if self.frozen:
                return
            try:
                for q in self.queues:
                    q.freeze(timeout)
            except BaseException:
                # Not frozen after all: resume every queue on its ring (nothing was reset
                # yet), or what was parked, and all later I/O, would wait forever.  A
                # broken ring takes nothing (its waiters raise why it broke).
                for q in self.queues:
                    if not q.vq.broken:
                        q.thaw(q.vq)
                raise
            for index in range(len(self.queues)):
                self.frontend.get_vring_base(index)  # stops the ring on the device
            if self._has_protocol(ProtocolFeature.RESET_DEVICE):
                self.frontend.reset_device()
            for q in self.queues:
                q.vq.close()
            self.frozen = True

    def restore(self) -> None:
        """Negotiate again, set the rings up afresh and resume the parked requests."""
        with self._lock:
            if not self.frozen:
                return
            fe = self.frontend
            offered = fe.get_features()
            if offered & self.features != self.features:
                raise NegotiationError(
                    f"after reset the device offers {offered:#x}, which lacks features "
                    f"negotiated before ({self.features:#x})"
                )
            if self.protocol_features:
                fe.set_protocol_features(self.protocol_features)
            vhost_bit = offered & Feature.VHOST_USER_PROTOCOL_FEATURES.mask
            fe.set_features(self.features | vhost_bit)
            # Checked as at probe before it replaces the config the disk runs with: a
            # device that comes back from reset with a block size of 0 is refused here,
            # not met as a ZeroDivisionError at the next request.
            self.config = self._validate_config(
                BlkConfig.unpack(fe.get_config(self._config_size()))
            )
            # Every ring starts afresh: the in-flight buffer too (a device reset forgets
            # it, and one without RESET_DEVICE would recover the old rings from it).
            self._clear_inflight()
            self._set_inflight_buffer(fe)
            fe.set_mem_table([self.region])
            for index, q in enumerate(self.queues):
                q.thaw(self._setup_vring(index, q.depth))
            self.frozen = False

    # -- reconnect (issue 11) -----------------------------------------------------------------
    # With ``reconnect_timeout``, a device that hangs up is dialled again until the timeout
    # passes.  QEMU's vhost-user-blk order: features, the in-flight buffer (GET_INFLIGHT_FD
    # once, SET_INFLIGHT_FD at every start), the memory table, then each ring.  What must
    # agree with the first connection (features, protocol features, queues, the config the
    # disk runs with) is checked, and a device that differs is a NegotiationError for every
    # waiter, never a silent change.  Requests the dead device did not complete go out
    # again: the device resubmits them from the in-flight buffer when it has one (the ring
    # is left as it is and starts at its used idx), else the driver does (``salvage``: a
    # fresh ring, the requests in their original order).  Callers only wait meanwhile.
    @property
    def device_resubmits(self) -> bool:
        """True when the device keeps its in-flight requests in a buffer the driver hands
        back after a reconnect (it then resubmits them); False: the driver resubmits."""
        return self._inflight_buffer is not None

    def _get_inflight_buffer(self, num_queues: int) -> None:
        """GET_INFLIGHT_FD, once: the buffer the device keeps its in-flight state in, kept
        to hand to its next incarnation."""
        with self.frontend.get_inflight_fd(num_queues, self.queue_size) as reply:
            if reply.mmap_size and reply.fd is not None:
                fd = reply.fd.take()
                self._fds.append(fd)
                self._inflight_buffer = (fd, reply.mmap_size, reply.mmap_offset)

    def _set_inflight_buffer(self, fe: VhostUserFrontend) -> None:
        """SET_INFLIGHT_FD: hand the device the buffer (at every start, as QEMU does)."""
        if self._inflight_buffer is not None:
            fd, size, offset = self._inflight_buffer
            fe.set_inflight_fd(size, offset, len(self._vrings) or self._num_vqs(),
                               self.queue_size, fd)

    def _request(self, call: Callable[[VhostUserFrontend], _T]) -> _T:
        """One vhost-user request after the probe.  A connection found dead is, with a
        ``reconnect_timeout``, reconnected as for I/O (the caller waits) and the request
        sent again on the new one; else (or when no device came back) the error is raised."""
        try:
            with self._lock:
                return call(self.frontend)
        except PeerGoneError:
            if self._redial is None or not self.queues:
                raise
        self._on_lost(None)
        for q in self.queues:
            q.wait_resumed()
        with self._lock:
            return call(self.frontend)

    def _on_lost(self, _queue: HardwareQueue | None) -> None:
        """A queue saw the device hang up: stop every queue and reconnect in a thread (once
        per loss; the queues resume or fail when it ends)."""
        if self.lost is not None:
            # A device that would not stop a ring is alive and may still write our memory:
            # it is given up (``ring_lost``), not dialled again.
            gone = DeviceGoneError(errno.ECONNRESET, f"{self.name_for_errors}: the device "
                                   f"stopped answering and was given up ({self.lost})")
            for q in self.queues:
                q.give_up(gone)
            return
        with self._lock:
            if self._reconnecting or self._closing.is_set():
                return
            hung_up = select.poll()
            hung_up.register(self._sock.fileno(), select.POLLRDHUP)
            if not hung_up.poll(0):
                return  # that was the connection a reconnect has replaced already
            for q in self.queues:
                q.suspend()
            if self._reconnect_thread is not None:
                self._reconnect_thread.join()  # done with the last loss: it is ending
            self._reconnecting = True
            thread = threading.Thread(target=self._reconnect, name="virtblk-reconnect",
                                      daemon=True)
            thread.start()
            self._reconnect_thread = thread

    def _reconnect(self) -> None:
        """The reconnect thread: take the requests off the dead device's rings (unless it
        resubmits them itself), then dial until a device answers that agrees with the
        first, or the timeout passes (every waiter then gets DeviceGoneError), or the disk
        is closed."""
        assert self._redial is not None and self.reconnect_timeout is not None
        started = time.monotonic()
        deadline = started + self.reconnect_timeout
        device_resubmits = self.device_resubmits
        with self._lock:
            if self._backend_channel is not None:
                self._backend_channel.close()
                self._backend_channel = None
            self.frontend.close()
            if not device_resubmits:
                for index, q in enumerate(self.queues):
                    if q.owner is None:
                        old = q.salvage()
                        with self.alloc_lock:
                            old.close()
                    else:
                        # A queue handle takes its requests off its old ring itself, when
                        # it next runs: its new ring lies elsewhere, the old one is its.
                        self._move_ring(index)
        delay = RECONNECT_FIRST_DELAY
        why = "no attempt"
        while not self._closing.is_set():
            try:
                sock = self._redial()
            except OSError as exc:
                why = str(exc)
            else:
                try:
                    with self._lock:
                        self._resume_on(sock, device_resubmits)
                except NegotiationError as exc:
                    self._give_up(NegotiationError(f"{self.name_for_errors}: after a reconnect: "
                                                   f"{exc}"))
                    return
                except (VhostUserError, OSError) as exc:
                    why = str(exc)  # lost again while renegotiating: try again
                else:
                    self.reconnect_seconds += time.monotonic() - started
                    log.info("%s: reconnected to the device (%d requests resubmitted by the "
                             "driver so far)",
                             self.name_for_errors, sum(q.stats_resubmitted for q in self.queues))
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._closing.wait(min(delay, remaining))
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
        self._give_up(DeviceGoneError(
            errno.ECONNRESET, f"{self.name_for_errors}: the device went away and did not come "
            f"back within {self.reconnect_timeout:g} s ({why})"))

    def _give_up(self, exc: BaseException) -> None:
        with self._lock:
            self._reconnecting = False
            for q in self.queues:
                q.give_up(exc)

    def _resume_on(self, sock: socket.socket, device_resubmits: bool) -> None:
        """Renegotiate on ``sock`` as the first connection did, check the device agrees,
        re-register memory and rings, and resume every queue (under ``_lock``)."""
        fe = VhostUserFrontend(sock, timeout=self.frontend.timeout)
        vqs: list[DriverRing] = []
        try:
            self._renegotiate(fe)
            channel = None
            if self._has_protocol(ProtocolFeature.BACKEND_REQ):
                channel = fe.open_backend_channel(self._on_config_change)
            try:
                self._set_inflight_buffer(fe)
                fe.set_mem_table([self.region])
                for index, q in enumerate(self.queues):
                    if device_resubmits:
                        self._announce_vring(fe, index, self._resume_base(index))
                        continue
                    vqs.append(self._new_vq(index, q.depth))
                    self._announce_vring(fe, index, self._fresh_base)
            except BaseException:
                if channel is not None:
                    channel.close()
                raise
        except BaseException:
            for vq in vqs:
                vq.close()
            fe.close()
            raise
        self.frontend = fe
        self._sock = sock
        self._backend_channel = channel
        if channel is not None:
            channel.start()
        self.reconnects += 1
        self._reconnecting = False
        for index, q in enumerate(self.queues):
            q.resume(vqs[index] if vqs else q.vq, sock.fileno())

    def _renegotiate(self, fe: VhostUserFrontend) -> None:
        """The first connection's negotiation again on ``fe``; NegotiationError when the
        device now differs in what the disk runs with."""
        fe.set_owner()
        offered = fe.get_features()
        # The zoned model decided on DISCARD at probe (not with host-managed zones).
        same = ~Feature.BLK_DISCARD.mask if self.has(Feature.BLK_ZONED) else ~0
        wanted = offered & self._wanted
        if (wanted ^ self.features) & same:
            raise NegotiationError(
                f"the device now offers features {offered:#x}: negotiated {wanted:#x}, "
                f"not {self.features:#x} as before (differs in "
                f"{', '.join(feature_names((wanted ^ self.features) & same))})")
        if self.protocol_features and not has_feature(
                offered, Feature.VHOST_USER_PROTOCOL_FEATURES):
            raise NegotiationError("the device now offers no vhost-user protocol features")
        if self.protocol_features:
            offered_protocol = fe.get_protocol_features()
            if offered_protocol & self.protocol_features != self.protocol_features:
                raise NegotiationError(
                    f"the device now offers protocol features {offered_protocol:#x}, lacking "
                    f"{self.protocol_features & ~offered_protocol:#x} used before")
            fe.set_protocol_features(self.protocol_features)
        if self._has_protocol(ProtocolFeature.MQ) and fe.get_queue_num() < len(self.queues):
            raise NegotiationError(f"the device now has fewer than {len(self.queues)} queues")
        vhost_bit = offered & Feature.VHOST_USER_PROTOCOL_FEATURES.mask
        fe.set_features(self.features | vhost_bit)
        config = self._validate_config(BlkConfig.unpack(fe.get_config(self._config_size())))
        if dataclasses.replace(config, writeback=self.config.writeback) != self.config:
            changed = [field.name for field in dataclasses.fields(BlkConfig)
                       if field.name != "writeback"
                       and getattr(config, field.name) != getattr(self.config, field.name)]
            raise NegotiationError(
                "the device's config differs from the one the disk runs with: "
                + ", ".join(f"{name} {getattr(config, name)} (was "
                            f"{getattr(self.config, name)})" for name in changed))
        if config.writeback != self.config.writeback and self.has(Feature.BLK_CONFIG_WCE):
            # The cache mode the disk was switched to, not the device's default.
            fe.set_config(BlkConfig.OFFSET_WRITEBACK, bytes([self.config.writeback]))

    def _move_ring(self, index: int) -> None:
        """Give ring ``index`` fresh memory (the old ring's is freed by its owner)."""
        _addrs, kick, call = self._vrings[index]
        with self.alloc_lock:
            addrs = self._allocate_ring()
        self._vrings[index] = (addrs, kick, call)

    def _resume_base(self, index: int) -> int:
        """SET_VRING_BASE for ring ``index`` kept as it is for a device that resubmits.

        A split ring's is its used idx as it is in ring memory (the second u16 of the used
        ring, ``struct virtq_used``): what the device finished publishing, where it goes on.
        A packed ring has no index in memory: its base is the position after the last used
        element the driver reaped, as avail and used position both (what QEMU does for a
        backend that died: ``virtio_queue_packed_restore_last_avail_idx``).  The device's
        in-flight journal says where it really was and wins (vhost-user "Inflight I/O
        tracking"); the base only has to be a valid position for the ring."""
        if self.packed:
            vq = self.queues[index].vq
            assert isinstance(vq, PackedDriverVirtqueue)
            position, wrap = vq.next_used
            return encode_vring_base(PackedRingBase(position, wrap, position, wrap))
        addrs, _kick, _call = self._vrings[index]
        return int(self.memory.view(addrs.used + 2, 2).cast("H")[0])  # one 16-bit load

    # -- properties the seed derives -----------------------------------------------------------
    @property
    def logical_block_size(self) -> int:
        """``blk_size`` when offered (validated at probe), else 512."""
        if self.has(Feature.BLK_BLK_SIZE):
            return self.config.blk_size
        return SECTOR_SIZE

    _truncated_capacity: int | None = None  # the too-large capacity last warned about

    @property
    def capacity_sectors(self) -> int:
        """Capacity in 512-byte sectors (always in the config space), truncated to
        ``MAX_CAPACITY_SECTORS`` with one warning per offending value."""
        cap = self.config.capacity
        if cap > MAX_CAPACITY_SECTORS:
            if cap != self._truncated_capacity:
                log.warning("Capacity %d too large: truncating to %d", cap, MAX_CAPACITY_SECTORS)
                self._truncated_capacity = cap
            cap = MAX_CAPACITY_SECTORS
        return cap

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.capacity_sectors * SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        """The host says the disk is read-only, and the driver obeys."""
        return self.has(Feature.BLK_RO)

    @property
    def writeback(self) -> bool:
        """The seed's ``virtblk_get_cache_mode``: config ``wce``, else the FLUSH feature."""
        if self.has(Feature.BLK_CONFIG_WCE):
            return bool(self.config.writeback)
        return self.has(Feature.BLK_FLUSH)

    def set_writeback(self, writeback: bool) -> None:
        """Switch the device cache (``cache_type`` store); needs CONFIG_WCE."""
        self.require(Feature.BLK_CONFIG_WCE, "switching the cache mode")
        with self._config_lock:
            self._request(lambda fe: fe.set_config(BlkConfig.OFFSET_WRITEBACK,
                                                   bytes([int(writeback)])))
            self._reread_config()

    @property
    def geometry(self) -> Geometry:
        """The host's CHS geometry, else the sd fallback (64 heads, 32 sectors)."""
        if self.has(Feature.BLK_GEOMETRY):
            c = self.config
            return Geometry(c.cylinders, c.heads, c.sectors)
        return Geometry(self.capacity_sectors >> 11, 1 << 6, 1 << 5)

    @property
    def topology(self) -> Topology:
        """The seed's topology calls, each clamped as block/blk-settings.c clamps it.

        The seed calls ``blk_queue_physical_block_size``, ``blk_queue_alignment_offset``,
        ``blk_queue_io_min`` and ``blk_queue_io_opt`` in that order, each only for a
        non-zero field, on limits that start at 512 and that
        ``blk_queue_logical_block_size`` has raised to the logical block.  The products
        are ``unsigned int`` there, so they wrap at 32 bits (a physical block of 4 GiB or
        more becomes 0, then the logical block; a shift of 32 or more is undefined in C
        and wraps the same way here)."""
        logical = self.logical_block_size
        # blk_set_default_limits, then blk_queue_logical_block_size.
        physical = io_min = logical
        alignment = io_opt = 0
        if not self.has(Feature.BLK_TOPOLOGY):
            return Topology(physical, alignment, io_min, io_opt)
        c = self.config
        if c.physical_block_exp:
            # blk_queue_physical_block_size: never below the logical block, and the
            # minimum I/O never below the physical block.
            physical = max((logical << c.physical_block_exp) & _UINT_MAX, logical)
            io_min = max(io_min, physical)
        if c.alignment_offset:
            # blk_queue_alignment_offset: an offset within one physical block.
            alignment = logical * c.alignment_offset & (physical - 1)
        if c.min_io_size:
            # blk_limits_io_min: at least the logical and the physical block.
            io_min = max(logical * c.min_io_size, logical, physical)
        if c.opt_io_size:
            # blk_limits_io_opt: taken as given.
            io_opt = logical * c.opt_io_size & _UINT_MAX
        return Topology(physical, alignment, io_min, io_opt)

    @property
    def limits(self) -> Limits:
        """Request limits; unlimited (``2**32 - 1``) where the device names none."""
        c = self.config
        size_max = c.size_max if self.has(Feature.BLK_SIZE_MAX) and c.size_max else (1 << 32) - 1
        # A segment smaller than a block could not carry a whole block; Linux likewise
        # raises a tiny limit (to a page).
        size_max = max(size_max, self.logical_block_size)
        return Limits(
            max_segments=self.sg_elems,
            max_segment_size=size_max,
            max_discard_sectors=c.max_discard_sectors,
            max_discard_seg=max(1, c.max_discard_seg),
            discard_sector_alignment=c.discard_sector_alignment,
            max_write_zeroes_sectors=c.max_write_zeroes_sectors,
            max_write_zeroes_seg=max(1, c.max_write_zeroes_seg),
            write_zeroes_may_unmap=bool(c.write_zeroes_may_unmap),
            max_secure_erase_sectors=c.max_secure_erase_sectors,
            max_secure_erase_seg=max(1, c.max_secure_erase_seg),
            secure_erase_sector_alignment=c.secure_erase_sector_alignment,
        )

    # -- config change -----------------------------------------------------------------------
    def on_config_change(self, callback: ConfigCallback) -> None:
        """Register ``callback(old_size, new_size)``, called after a resize."""
        self._config_callbacks.append(callback)

    def refresh_config(self) -> None:
        """Re-read the config space (what the seed's ``virtblk_config_changed_work`` does).

        Called on CONFIG_CHANGE_MSG; also callable by hand for devices that resize
        without telling (qemu-storage-daemon 7.2 after QMP ``block_resize``).
        """
        with self._config_lock:  # the config work thread and a caller may refresh at once
            old = self.size
            self._reread_config()
            new = self.size
        if new != old:
            bs = self.logical_block_size
            log.info(
                "new size: %d %d-byte logical blocks (%s/%s), old size: %d %d-byte logical "
                "blocks (%s/%s)",
                new // bs, bs, string_get_size(new, 10), string_get_size(new, 2),
                old // bs, bs, string_get_size(old, 10), string_get_size(old, 2),
            )
            for callback in self._config_callbacks:
                callback(old, new)

    def _reread_config(self) -> None:
        """Take the capacity and the cache mode from the device's config space now, as
        Linux's config work and cache-mode reads do; the limits and the block size stay
        those of the probe, which the rings were built for and users align to."""
        size = self._config_size()
        fresh = BlkConfig.unpack(self._request(lambda fe: fe.get_config(size)))
        with self._lock:
            self.config = dataclasses.replace(
                self.config, capacity=fresh.capacity, writeback=fresh.writeback
            )
            self.config_generation += 1

    def _on_config_change(self) -> None:
        """CONFIG_CHANGE_MSG arrived: re-read the config in a worker thread, as the seed
        queues ``config_work``.  Re-reading here would send GET_CONFIG before we have
        acknowledged the message, which deadlocks a device that waits for that ack."""
        threading.Thread(target=self._config_work, name="virtblk-config", daemon=True).start()

    def _config_work(self) -> None:
        try:
            self.refresh_config()
        except Exception:
            log.exception("re-reading the config space after a config change failed")

    # -- teardown ------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` per queue) for requests on the rings, fail what is left
        with EIO, then tear down the queues, the connection and the shared memory."""
        with self._lock:  # a loss being noticed now either starts its thread first or not
            self._closing.set()
            thread = self._reconnect_thread
        if thread is not None:
            thread.join()
            for q in self.queues:
                if q.lost:  # the device is gone: nothing on the rings will complete
                    q.give_up(DeviceGoneError(errno.ECONNRESET, "the disk was closed while "
                                              "reconnecting to its device"))
        for q in self.queues:
            try:
                q.freeze(timeout)
            except Exception as exc:  # a dead device or a stuck request must not block close
                # The text, not the exception: a handler that keeps records (pytest's,
                # a MemoryHandler) would keep its traceback, the disk and its memory with it.
                log.warning("%s: closing with requests in flight (%s); they fail with EIO",
                            q.name, str(exc))
            q.abort_all()
            q.close()
        self.queues = []
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None
        self.frontend.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.memory.close()
