"""Driver side of zoned block devices (VIRTIO_BLK_F_ZONED): the zoned characteristics,
zone reports as typed :class:`Zone` objects, zone management and zone append.

What Linux's ``virtio_blk.c`` does for a host-managed device, over our queues: reports
are paged (each request covers what its buffer holds; the next one starts after the last
zone received), management commands carry the zone's first sector, ZONE_APPEND reads
back the sector the device chose.  Offsets in this API are bytes, like the rest of
``Disk``.  A zone status becomes a :class:`~virtblk.errors.ZoneError` subclass naming it.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

from virtblk.driver.blkmq import HardwareQueue, raise_for
from virtblk.errors import (
    BlockIOError,
    NegotiationError,
    ZoneActiveResourceError,
    ZoneError,
    ZoneInvalidCommandError,
    ZoneOpenResourceError,
    ZoneUnalignedWriteError,
)
from virtblk.spec import (
    SECTOR_SHIFT,
    ZONE_APPEND_SECTOR,
    ZONE_REPORT_HEADER,
    BlkConfig,
    Feature,
    RequestType,
    ZoneDescriptor,
    ZonedModel,
    ZoneState,
    ZoneType,
    has_feature,
)
from virtblk.virtio.memory import GuestMemory

if TYPE_CHECKING:
    from virtblk.driver.virtio_blk import VirtioBlk

__all__ = [
    "Zone",
    "ZoneActiveResourceError",
    "ZoneError",
    "ZoneInvalidCommandError",
    "ZoneManager",
    "ZoneOpenResourceError",
    "ZoneUnalignedWriteError",
    "ZonedCharacteristics",
    "driver_features",
    "split_at_zones",
]

REPORT_BATCH = 256
"""Zones asked for per ZONE_REPORT request (a 16 KiB buffer)."""

_WP_VALID = frozenset({ZoneState.EMPTY, ZoneState.IOPEN, ZoneState.EOPEN, ZoneState.CLOSED})


@dataclasses.dataclass(frozen=True)
class ZonedCharacteristics:
    """``virtio_blk_zoned_characteristics`` from the config space, in the spec's units
    (sectors, except ``write_granularity`` in bytes); byte properties for convenience."""

    model: ZonedModel
    zone_sectors: int
    max_open_zones: int
    max_active_zones: int
    max_append_sectors: int
    write_granularity: int

    @classmethod
    def from_config(cls, cfg: BlkConfig) -> Self:
        """Read the fields; an unknown model is refused as Linux refuses it."""
        try:
            model = ZonedModel(cfg.model)
        except ValueError:
            raise NegotiationError(f"unsupported zone model {cfg.model}") from None
        if model != ZonedModel.NONE and (cfg.zone_sectors == 0 or cfg.write_granularity == 0):
            raise NegotiationError(
                f"zoned device reports zone_sectors {cfg.zone_sectors} and "
                f"write_granularity {cfg.write_granularity}; both must be non-zero")
        return cls(model, cfg.zone_sectors, cfg.max_open_zones, cfg.max_active_zones,
                   cfg.max_append_sectors, cfg.write_granularity)

    @property
    def zone_size(self) -> int:
        """Bytes per zone (the last zone may be smaller)."""
        return self.zone_sectors << SECTOR_SHIFT

    @property
    def max_append_size(self) -> int:
        """The largest ZONE_APPEND in bytes (0: the device does not support append)."""
        return self.max_append_sectors << SECTOR_SHIFT

    def nr_zones(self, capacity_sectors: int) -> int:
        """The spec's ``(capacity + zone_sectors - 1) / zone_sectors``."""
        return -(-capacity_sectors // self.zone_sectors)


def driver_features(features: int, cfg: BlkConfig) -> int:
    """Adjust the features to accept once the zoned model is known: a driver must not
    negotiate DISCARD with a host-managed device."""
    if has_feature(features, Feature.BLK_ZONED) and cfg.model == ZonedModel.HM:
        return features & ~Feature.BLK_DISCARD.mask
    return features


@dataclasses.dataclass(frozen=True)
class Zone:
    """One zone from a report; offsets and sizes in bytes.

    ``wp`` is None where the spec leaves the write pointer undefined: conventional,
    full, read-only and offline zones."""

    start: int
    length: int
    capacity: int
    wp: int | None
    type: ZoneType
    state: ZoneState

    @property
    def end(self) -> int:
        """The first byte after the zone."""
        return self.start + self.length


def parse_zone(desc: ZoneDescriptor, zone_sectors: int, capacity_sectors: int,
               what: str) -> Zone:
    """A descriptor as a :class:`Zone`; an unknown type or state is a device error (EIO),
    as ``virtblk_parse_zone`` treats it."""
    try:
        ztype = ZoneType(desc.z_type)
        state = ZoneState(desc.z_state)
    except ValueError:
        raise BlockIOError(
            errno.EIO, f"{what}: zone at sector {desc.z_start} has invalid type {desc.z_type:#x} "
               f"or state {desc.z_state:#x}") from None
    length = min(zone_sectors, capacity_sectors - desc.z_start)
    wp = desc.z_wp << SECTOR_SHIFT if state in _WP_VALID else None
    return Zone(desc.z_start << SECTOR_SHIFT, length << SECTOR_SHIFT,
                desc.z_cap << SECTOR_SHIFT, wp, ztype, state)


def split_at_zones(
    views: Sequence[memoryview], offset: int, zone_size: int,
) -> list[tuple[int, list[memoryview]]]:
    """Cut a transfer at zone boundaries: ``(offset, views)`` per zone touched.  Slices
    of shared buffers stay shared, so zero-copy I/O stays zero-copy."""
    pieces: list[tuple[int, list[memoryview]]] = []
    current: list[memoryview] = []
    start = pos = offset
    for view in views:
        while len(view):
            room = zone_size - pos % zone_size
            take = view[:room]
            current.append(take)
            pos += len(take)
            view = view[len(take):]
            if pos % zone_size == 0:
                pieces.append((start, current))
                current, start = [], pos
    if current:
        pieces.append((start, current))
    return pieces


class ZoneManager:
    """Zone requests of one disk; the disk passes its queue choice and shared buffers."""

    def __init__(
        self,
        characteristics: ZonedCharacteristics,
        memory: GuestMemory,
        *,
        capacity_sectors: Callable[[], int],
        queue: Callable[[], HardwareQueue],
        alloc: Callable[[int], int],
        free: Callable[[int], None],
        name: str,
    ) -> None:
        self.characteristics = characteristics
        self.report_batch = REPORT_BATCH
        self._memory = memory
        self._capacity = capacity_sectors
        self._queue = queue
        self._alloc = alloc
        self._free = free
        self._name = name

    @classmethod
    def probe(
        cls,
        dev: VirtioBlk,
        *,
        queue: Callable[[], HardwareQueue],
        alloc: Callable[[int], int],
        free: Callable[[int], None],
        name: str,
    ) -> Self | None:
        """A manager when ZONED was negotiated with a host-managed or host-aware model;
        None otherwise (a drive-managed device is a regular disk, as the spec says)."""
        if not dev.has(Feature.BLK_ZONED):
            return None
        chars = ZonedCharacteristics.from_config(dev.config)
        if chars.model == ZonedModel.NONE:
            return None
        return cls(chars, dev.memory, capacity_sectors=lambda: dev.capacity_sectors,
                   queue=queue, alloc=alloc, free=free, name=name)

    # -- helpers ----------------------------------------------------------------------------
    def _zone_start(self, offset: int, what: str) -> int:
        """The sector of the zone that starts at ``offset``; ValueError otherwise (the
        driver must name a zone by its first sector)."""
        zone_size = self.characteristics.zone_size
        if offset < 0 or offset % zone_size or offset >= self._capacity() << SECTOR_SHIFT:
            raise ValueError(f"{self._name}: {what}: offset {offset} is not the start of a "
                             f"zone (zone size {zone_size} bytes)")
        return offset >> SECTOR_SHIFT

    def _run(self, type_: RequestType, sector: int, what: str,
             out_bufs: list[tuple[int, int]] | None = None,
             in_bufs: list[tuple[int, int]] | None = None) -> int:
        """Run one request; the bytes the device wrote (its used length, status included)."""
        q = self._queue()
        req = q.get_tag()
        try:
            q.submit(req, type_, sector, out_bufs or (), in_bufs or ())
            q.wait_for(req)
            raise_for(req, f"{self._name}: {what}")
            return req.written
        finally:
            if req.done:
                q.put_tag(req)

    # -- report -----------------------------------------------------------------------------
    def report(self, start_offset: int = 0, max_zones: int | None = None) -> list[Zone]:
        """Zones from the one holding ``start_offset``, at most ``max_zones`` (all by
        default), in as many ZONE_REPORT requests as the buffer size needs."""
        chars = self.characteristics
        capacity = self._capacity()
        if not 0 <= start_offset < capacity << SECTOR_SHIFT:
            raise ValueError(f"{self._name}: report_zones: offset {start_offset} is outside "
                             f"the disk ({capacity << SECTOR_SHIFT} bytes)")
        sector = start_offset >> SECTOR_SHIFT
        left = chars.nr_zones(capacity) - sector // chars.zone_sectors
        if max_zones is not None:
            left = min(left, max_zones)
        zones: list[Zone] = []
        if left <= 0:
            return zones
        per = max(1, min(left, self.report_batch))
        length = ZONE_REPORT_HEADER.size + per * ZoneDescriptor.SIZE
        gpa = self._alloc(length)
        try:
            view = self._memory.view(gpa, length)
            while left > 0 and sector < capacity:
                view[:ZONE_REPORT_HEADER.size] = bytes(ZONE_REPORT_HEADER.size)
                written = self._run(RequestType.ZONE_REPORT, sector, "report_zones",
                                    in_bufs=[(gpa, length)])
                (nr,) = ZONE_REPORT_HEADER.unpack_from(view)
                # Only descriptors the used length covers were written by the device.
                covered = (written - 1 - ZONE_REPORT_HEADER.size) // ZoneDescriptor.SIZE
                nr = min(nr, per, left, covered)
                if nr == 0:
                    break
                for i in range(nr):
                    pos = ZONE_REPORT_HEADER.size + i * ZoneDescriptor.SIZE
                    desc = ZoneDescriptor.unpack(view[pos : pos + ZoneDescriptor.SIZE])
                    zones.append(parse_zone(desc, chars.zone_sectors, capacity, "report_zones"))
                    sector = desc.z_start + chars.zone_sectors
                left -= nr
            view.release()
        finally:
            self._free(gpa)
        return zones

    # -- management -------------------------------------------------------------------------
    def open(self, offset: int) -> None:
        """ZONE_OPEN: explicitly open the zone starting at ``offset``."""
        self._run(RequestType.ZONE_OPEN, self._zone_start(offset, "zone_open"), "zone_open")

    def close(self, offset: int) -> None:
        """ZONE_CLOSE: release the zone's open resource (it stays active if written)."""
        self._run(RequestType.ZONE_CLOSE, self._zone_start(offset, "zone_close"), "zone_close")

    def finish(self, offset: int) -> None:
        """ZONE_FINISH: make the zone full."""
        self._run(RequestType.ZONE_FINISH, self._zone_start(offset, "zone_finish"),
                  "zone_finish")

    def reset(self, offset: int) -> None:
        """ZONE_RESET: empty the zone (its write pointer back to its start)."""
        self._run(RequestType.ZONE_RESET, self._zone_start(offset, "zone_reset"), "zone_reset")

    def reset_all(self) -> None:
        """ZONE_RESET_ALL: empty every sequential zone (sector 0, as the spec requires)."""
        self._run(RequestType.ZONE_RESET_ALL, 0, "zone_reset_all")

    # -- append -----------------------------------------------------------------------------
    def append(self, data: bytes | bytearray | memoryview, zone_offset: int) -> int:
        """ZONE_APPEND ``data`` to the zone at ``zone_offset``; returns the byte offset the
        device wrote it at (the zone's write pointer when the request ran)."""
        chars = self.characteristics
        view = memoryview(data).cast("B")
        n = len(view)
        sector = self._zone_start(zone_offset, "zone_append")
        if n == 0 or n % chars.write_granularity or n % (1 << SECTOR_SHIFT):
            raise ValueError(f"{self._name}: zone_append: {n} bytes is not a positive "
                             f"multiple of the write granularity ({chars.write_granularity})")
        if n > chars.max_append_size:
            raise ValueError(f"{self._name}: zone_append: {n} bytes exceeds the device's "
                             f"max append size ({chars.max_append_size} bytes)")
        # Data already in shared memory goes as is; other data is staged before the reply.
        direct = self._memory.guest_address_of(view)
        reply_at = 0 if direct is not None else n
        gpa = self._alloc(reply_at + ZONE_APPEND_SECTOR.size)
        try:
            shared = self._memory.view(gpa, reply_at + ZONE_APPEND_SECTOR.size)
            if direct is None:
                shared[:n] = view
                direct = gpa
            self._run(RequestType.ZONE_APPEND, sector, "zone_append",
                      out_bufs=[(direct, n)],
                      in_bufs=[(gpa + reply_at, ZONE_APPEND_SECTOR.size)])
            (written,) = ZONE_APPEND_SECTOR.unpack_from(shared, reply_at)
            shared.release()
        finally:
            self._free(gpa)
        return int(written) << SECTOR_SHIFT
