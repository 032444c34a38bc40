"""A host-managed zoned block device (VIRTIO_BLK_F_ZONED): zone state machine, memory
backend and the execution of zoned requests.

The layers mirror the rest of the device: :class:`ZoneTable` is the state machine alone
(zones, write pointers, open/active accounting; no I/O, so every transition is tested with
plain values), :class:`ZonedMemoryBackend` is a :class:`MemoryBackend` that carries a
table, and :class:`ZonedRequests` turns parsed requests into table transitions plus data
movement, answering the spec's statuses.

Rules followed (spec 5.2.6, "ZBD standards" where the spec defers to them):

* the device is host-managed: optional conventional zones first, then sequential write
  required (SWR) zones; the last zone may be smaller;
* writes (OUT, WRITE_ZEROES, ZONE_APPEND) to an SWR zone go at its write pointer
  (else ZONE_UNALIGNED_WP), end on a ``write_granularity`` boundary (else
  ZONE_UNALIGNED_WP), stay inside the zone capacity (else ZONE_INVALID_CMD) and open an
  EMPTY or CLOSED zone implicitly;
* opening a zone needs an active resource when it was EMPTY and an open resource when it
  was not open; the active limit is checked first (both exceeded means
  ZONE_ACTIVE_RESOURCE); at the open limit the device closes its oldest implicitly open
  zone, as the spec allows, and only fails with ZONE_OPEN_RESOURCE when every open zone
  is explicitly open;
* ZONE_FINISH is accepted from EMPTY and CLOSED too (ZBC and ZNS allow it; the spec's
  transition lists name only the open states); ZONE_CLOSE of an EMPTY or FULL zone is
  ZONE_INVALID_CMD, as the spec's state machine has no such transition;
* reads are not limited by the write pointer: unwritten sectors read as zeros (the
  "device-specific byte pattern" the spec prefers), which holds because a reset zeroes
  what the zone held;
* DISCARD is not offered (a driver must not negotiate it with a host-managed device);
  SECURE_ERASE works on whole zones and resets the sequential ones, as the spec says.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from virtblk.device.backends import MemoryBackend
from virtblk.device.request import BlkRequest, read_segments
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    ZONE_APPEND_SECTOR,
    ZONE_REPORT_HEADER,
    BlkConfig,
    DiscardSegment,
    Feature,
    RequestType,
    Status,
    ZoneDescriptor,
    ZonedModel,
    ZoneState,
    ZoneType,
    has_feature,
)

log = logging.getLogger("virtblk.device.zoned")

DEFAULT_ZONE_SIZE = 4 << 20

_OPEN = frozenset({ZoneState.IOPEN, ZoneState.EOPEN})
_ACTIVE = frozenset({ZoneState.IOPEN, ZoneState.EOPEN, ZoneState.CLOSED})
_WRITABLE = frozenset({ZoneState.EMPTY, ZoneState.IOPEN, ZoneState.EOPEN, ZoneState.CLOSED})

Handler = Callable[[BlkRequest], tuple[int, int]]


class SegmentLimitsView(Protocol):
    """The limits of DISCARD-style requests the device advertises."""

    @property
    def max_sectors(self) -> int: ...
    @property
    def max_seg(self) -> int: ...


class DeviceView(Protocol):
    """What zoned execution reads from :class:`BlkDevice` (a Protocol: no import cycle)."""

    @property
    def read_only(self) -> bool: ...
    @property
    def write_zeroes_limits(self) -> SegmentLimitsView: ...
    @property
    def secure_erase_limits(self) -> SegmentLimitsView: ...


class ZoneStatusError(Exception):
    """A zoned request cannot be done; ``status`` is what the device answers."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(f"{status.name}: {reason}")
        self.status = status
        self.reason = reason


@dataclasses.dataclass(slots=True)
class Zone:
    """One zone as the device tracks it; sectors are 512-byte units."""

    index: int
    start: int
    length: int
    capacity: int
    type: ZoneType
    state: ZoneState
    wp: int
    opened_at: int = 0
    """When the zone last became implicitly open: the oldest is closed first."""

    @property
    def end(self) -> int:
        """First sector after the zone."""
        return self.start + self.length

    @property
    def writable_end(self) -> int:
        """First sector past the zone capacity."""
        return self.start + self.capacity

    def descriptor(self) -> ZoneDescriptor:
        """The zone as a report describes it."""
        return ZoneDescriptor(self.capacity, self.start, self.wp, int(self.type), int(self.state))


def _fail(status: Status, reason: str) -> ZoneStatusError:
    return ZoneStatusError(status, reason)


class ZoneTable:
    """The zone state machine of a host-managed device (no I/O; not thread-safe by itself:
    :class:`ZonedRequests` serialises the transitions with :attr:`lock`)."""

    def __init__(
        self,
        capacity_sectors: int,
        zone_sectors: int,
        *,
        zone_capacity_sectors: int | None = None,
        conventional_zones: int = 0,
        max_open_zones: int = 0,
        max_active_zones: int = 0,
        write_granularity: int = SECTOR_SIZE,
    ) -> None:
        if zone_sectors <= 0:
            raise ValueError(f"zone size must be at least one sector, got {zone_sectors}")
        if write_granularity <= 0 or write_granularity % SECTOR_SIZE:
            raise ValueError(
                f"write granularity must be a positive multiple of 512, got {write_granularity}")
        granularity_sectors = write_granularity >> SECTOR_SHIFT
        if zone_sectors % granularity_sectors:
            raise ValueError(f"zone size ({zone_sectors} sectors) is not a multiple of the "
                             f"write granularity ({write_granularity} bytes)")
        cap = zone_sectors if zone_capacity_sectors is None else zone_capacity_sectors
        if not 0 < cap <= zone_sectors or cap % granularity_sectors:
            raise ValueError(f"zone capacity must be in 1..{zone_sectors} sectors and a "
                             f"multiple of the write granularity, got {cap}")
        if capacity_sectors <= 0:
            raise ValueError("a zoned device needs at least one sector")
        nr_zones = -(-capacity_sectors // zone_sectors)
        if not 0 <= conventional_zones <= nr_zones:
            raise ValueError(f"{conventional_zones} conventional zones requested; the device "
                             f"has {nr_zones} zones")
        for name, value in (("max_open_zones", max_open_zones),
                            ("max_active_zones", max_active_zones)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be in 0..2**32-1 (0: no limit), got {value}")
        self.capacity_sectors = capacity_sectors
        self.zone_sectors = zone_sectors
        self.max_open_zones = max_open_zones
        self.max_active_zones = max_active_zones
        self.write_granularity = write_granularity
        self._granularity_sectors = granularity_sectors
        self.zones: list[Zone] = []
        for index in range(nr_zones):
            start = index * zone_sectors
            length = min(zone_sectors, capacity_sectors - start)
            if index < conventional_zones:
                self.zones.append(Zone(index, start, length, length, ZoneType.CONV,
                                       ZoneState.NOT_WP, start + length))
            else:
                # A short last zone cannot hold more than it has, rounded to the granularity.
                zcap = min(cap, length - length % granularity_sectors)
                self.zones.append(Zone(index, start, length, zcap, ZoneType.SWR,
                                       ZoneState.EMPTY if zcap else ZoneState.FULL,
                                       start if zcap else start + length))
        self.open_zones = 0
        self.active_zones = 0
        self._clock = itertools.count(1)
        self.lock = threading.Lock()

    # -- lookup ----------------------------------------------------------------------------
    def zone_of(self, sector: int) -> Zone:
        """The zone holding ``sector``; IOERR past the capacity."""
        if not 0 <= sector < self.capacity_sectors:
            raise _fail(Status.IOERR, f"sector {sector} is past the capacity "
                                      f"({self.capacity_sectors} sectors)")
        return self.zones[sector // self.zone_sectors]

    def _managed_zone(self, sector: int, what: str) -> Zone:
        """The sequential zone that starts at ``sector`` (zone management commands)."""
        zone = self.zone_of(sector)
        if zone.start != sector:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"{what}: sector {sector} is not the start of zone {zone.index} "
                        f"(sector {zone.start})")
        if zone.type == ZoneType.CONV:
            raise _fail(Status.ZONE_INVALID_CMD, f"{what}: zone {zone.index} is conventional")
        if zone.state == ZoneState.OFFLINE:
            raise _fail(Status.ZONE_INVALID_CMD, f"{what}: zone {zone.index} is offline")
        return zone

    # -- accounting ------------------------------------------------------------------------
    def _set_state(self, zone: Zone, state: ZoneState) -> None:
        old = zone.state
        self.open_zones += (state in _OPEN) - (old in _OPEN)
        self.active_zones += (state in _ACTIVE) - (old in _ACTIVE)
        zone.state = state
        if state == ZoneState.IOPEN:
            zone.opened_at = next(self._clock)

    def _reserve_open(self, zone: Zone, what: str) -> None:
        """Make room for ``zone`` to become open, or raise the resource status."""
        if (zone.state == ZoneState.EMPTY and self.max_active_zones
                and self.active_zones >= self.max_active_zones):
            raise _fail(Status.ZONE_ACTIVE_RESOURCE,
                        f"{what}: zone {zone.index} would exceed max_active_zones "
                        f"({self.max_active_zones})")
        if (zone.state not in _OPEN and self.max_open_zones
                and self.open_zones >= self.max_open_zones):
            implicit = [z for z in self.zones if z.state == ZoneState.IOPEN]
            if not implicit:
                raise _fail(Status.ZONE_OPEN_RESOURCE,
                            f"{what}: zone {zone.index} would exceed max_open_zones "
                            f"({self.max_open_zones}), all open zones are explicitly open")
            victim = min(implicit, key=lambda z: z.opened_at)
            log.debug("closing implicitly open zone %d to open zone %d",
                      victim.index, zone.index)
            self._set_state(victim, ZoneState.CLOSED)

    # -- zone management -------------------------------------------------------------------
    def open(self, sector: int) -> None:
        """ZONE_OPEN: the zone becomes explicitly open."""
        zone = self._managed_zone(sector, "ZONE_OPEN")
        if zone.state == ZoneState.EOPEN:
            return
        if zone.state not in _WRITABLE:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"ZONE_OPEN: zone {zone.index} is {zone.state.name}")
        self._reserve_open(zone, "ZONE_OPEN")
        self._set_state(zone, ZoneState.EOPEN)

    def close(self, sector: int) -> None:
        """ZONE_CLOSE: an open zone becomes closed (EMPTY when nothing was written)."""
        zone = self._managed_zone(sector, "ZONE_CLOSE")
        if zone.state == ZoneState.CLOSED:
            return
        if zone.state not in _OPEN:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"ZONE_CLOSE: zone {zone.index} is {zone.state.name}")
        self._set_state(zone, ZoneState.EMPTY if zone.wp == zone.start else ZoneState.CLOSED)

    def finish(self, sector: int) -> None:
        """ZONE_FINISH: the zone becomes full; the rest of its capacity reads as unwritten."""
        zone = self._managed_zone(sector, "ZONE_FINISH")
        if zone.state == ZoneState.FULL:
            return
        if zone.state not in _WRITABLE:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"ZONE_FINISH: zone {zone.index} is {zone.state.name}")
        self._set_state(zone, ZoneState.FULL)
        zone.wp = zone.writable_end

    def reset(self, sector: int) -> Zone | None:
        """ZONE_RESET: the zone becomes empty; returns it when its data must be zeroed."""
        zone = self._managed_zone(sector, "ZONE_RESET")
        if zone.state == ZoneState.RDONLY:
            raise _fail(Status.ZONE_INVALID_CMD, f"ZONE_RESET: zone {zone.index} is read-only")
        return self._empty(zone)

    def _empty(self, zone: Zone) -> Zone | None:
        if zone.state == ZoneState.EMPTY:
            return None
        self._set_state(zone, ZoneState.EMPTY)
        zone.wp = zone.start
        return zone

    def reset_all(self) -> list[Zone]:
        """ZONE_RESET_ALL: every open, closed or full sequential zone becomes empty."""
        reset: list[Zone] = []
        for zone in self.zones:
            if zone.type != ZoneType.CONV and zone.state in (*_ACTIVE, ZoneState.FULL):
                self._empty(zone)
                reset.append(zone)
        return reset

    # -- data ------------------------------------------------------------------------------
    def check_read(self, sector: int, nsectors: int) -> None:
        """IN: one zone when sequential zones are involved; never an offline zone."""
        if nsectors == 0:
            return
        first, last = self.zone_of(sector), self.zone_of(sector + nsectors - 1)
        if first is not last and any(
                self.zones[i].type != ZoneType.CONV for i in range(first.index, last.index + 1)):
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"read of sectors {sector}+{nsectors} spans zones {first.index}.."
                        f"{last.index}")
        for index in range(first.index, last.index + 1):
            if self.zones[index].state == ZoneState.OFFLINE:
                raise _fail(Status.ZONE_INVALID_CMD, f"read from offline zone {index}")

    def prepare_write(self, sector: int, nsectors: int, what: str) -> Zone | None:
        """Check a write of ``nsectors`` at ``sector`` and open its zone implicitly.

        Returns the sequential zone, whose write pointer :meth:`complete_write` advances
        once the data is stored, or None when the range lies in conventional zones."""
        zone = self.zone_of(sector)
        last = self.zone_of(sector + max(nsectors, 1) - 1)
        if zone.type == ZoneType.CONV and last.type == ZoneType.CONV:
            return None
        if last is not zone:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"{what} of sectors {sector}+{nsectors} spans zones {zone.index}.."
                        f"{last.index}")
        if zone.state not in _WRITABLE:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"{what} to zone {zone.index}, which is {zone.state.name}")
        if sector != zone.wp:
            raise _fail(Status.ZONE_UNALIGNED_WP,
                        f"{what} at sector {sector}; zone {zone.index}'s write pointer is "
                        f"{zone.wp}")
        if (sector + nsectors) % self._granularity_sectors:
            raise _fail(Status.ZONE_UNALIGNED_WP,
                        f"{what} ends at sector {sector + nsectors}, not a multiple of the "
                        f"write granularity ({self.write_granularity} bytes)")
        if sector + nsectors > zone.writable_end:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"{what} of {nsectors} sectors at {sector} exceeds zone {zone.index}'s "
                        f"capacity (ends at sector {zone.writable_end})")
        if nsectors and zone.state not in _OPEN:
            self._reserve_open(zone, what)
            self._set_state(zone, ZoneState.IOPEN)
        return zone

    def prepare_append(self, sector: int, nsectors: int) -> tuple[Zone, int]:
        """Check a ZONE_APPEND to the zone starting at ``sector``: ``(zone, sector the
        data goes to)``, the zone opened implicitly as for a write."""
        zone = self.zone_of(sector)
        if zone.start != sector or zone.type != ZoneType.SWR:
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"ZONE_APPEND to sector {sector}: not the start of a sequential "
                        f"write required zone")
        if zone.state not in _WRITABLE:  # the write pointer is not valid
            raise _fail(Status.ZONE_INVALID_CMD,
                        f"ZONE_APPEND to zone {zone.index}, which is {zone.state.name}")
        self.prepare_write(zone.wp, nsectors, "ZONE_APPEND")
        return zone, zone.wp

    def complete_write(self, zone: Zone, nsectors: int) -> None:
        """Advance the write pointer after the data is stored; a zone at capacity is full."""
        zone.wp += nsectors
        if zone.wp >= zone.writable_end and zone.state != ZoneState.FULL:
            self._set_state(zone, ZoneState.FULL)

    # -- report and host-side controls -----------------------------------------------------
    def report(self, sector: int, max_zones: int) -> list[ZoneDescriptor]:
        """Up to ``max_zones`` descriptors from the zone holding ``sector``."""
        first = self.zone_of(sector).index
        return [z.descriptor() for z in self.zones[first : first + max(0, max_zones)]]

    def set_condition(self, index: int, state: ZoneState) -> None:
        """Host-side fault injection: a zone turns read-only or offline (a hardware
        failure, the only way a zone gets there); resources it held are released."""
        if state not in (ZoneState.RDONLY, ZoneState.OFFLINE):
            raise ValueError(f"a zone can only be made RDONLY or OFFLINE, not {state.name}")
        zone = self.zones[index]
        if zone.type == ZoneType.CONV:
            raise ValueError(f"zone {index} is conventional: it is always NOT_WP")
        if zone.state == ZoneState.OFFLINE:
            raise ValueError(f"zone {index} is offline; it cannot change state any more")
        self._set_state(zone, state)


class ZonedMemoryBackend(MemoryBackend):
    """A RAM disk divided into zones; zone state lives only as long as the memory does."""

    def __init__(
        self,
        size: int,
        *,
        zone_size: int = DEFAULT_ZONE_SIZE,
        zone_capacity: int | None = None,
        conventional_zones: int = 0,
        max_open_zones: int = 0,
        max_active_zones: int = 0,
        max_append_size: int | None = None,
        write_granularity: int = SECTOR_SIZE,
    ) -> None:
        if size % SECTOR_SIZE or zone_size % SECTOR_SIZE:
            raise ValueError(f"disk size ({size}) and zone size ({zone_size}) must be "
                             f"multiples of 512")
        if zone_capacity is not None and zone_capacity % SECTOR_SIZE:
            raise ValueError(f"zone capacity ({zone_capacity}) must be a multiple of 512")
        self.zones = ZoneTable(
            size >> SECTOR_SHIFT, zone_size >> SECTOR_SHIFT,
            zone_capacity_sectors=None if zone_capacity is None else zone_capacity >> SECTOR_SHIFT,
            conventional_zones=conventional_zones,
            max_open_zones=max_open_zones, max_active_zones=max_active_zones,
            write_granularity=write_granularity)
        append = (zone_capacity or zone_size) if max_append_size is None else max_append_size
        if append % SECTOR_SIZE or not 0 <= append >> SECTOR_SHIFT <= 0xFFFFFFFF:
            raise ValueError(f"max append size must be a multiple of 512 below 2 TiB, "
                             f"got {append}")
        if append and append < write_granularity:
            raise ValueError(f"max append size ({append}) is below the write granularity "
                             f"({write_granularity})")
        self.max_append_sectors = append >> SECTOR_SHIFT
        super().__init__(size)

    def resize(self, new_size: int) -> None:
        """Zones are laid out over the capacity: a zoned disk keeps its size."""
        raise ValueError("a zoned device cannot be resized")


class ZonedRequests:
    """Executes requests on a :class:`ZonedMemoryBackend` for :class:`BlkDevice`: the
    features, config fields and request handlers that differ from a regular device."""

    def __init__(self, backend: ZonedMemoryBackend, device: DeviceView) -> None:
        self.backend = backend
        self.table = backend.zones
        self._device = device
        self.model = ZonedModel.HM

    def _read_only(self) -> bool:
        return self._device.read_only

    # -- negotiation and config ----------------------------------------------------------------
    def offered_features(self, bits: int) -> int:
        """ZONED on; DISCARD off (a host-managed device's driver must not negotiate it)."""
        return (bits | Feature.BLK_ZONED.mask) & ~Feature.BLK_DISCARD.mask

    def check_features(self, features: int) -> None:
        """A host-managed device fails FEATURES_OK for a driver that does not know zones."""
        if not has_feature(features, Feature.BLK_ZONED):
            raise ValueError("host-managed zoned device: the driver must accept "
                             "VIRTIO_BLK_F_ZONED")

    @property
    def secure_erase_alignment(self) -> int:
        """Secure erase works on whole zones (spec: a multiple of ``zone_sectors``)."""
        return self.table.zone_sectors

    def fill_config(self, cfg: BlkConfig) -> None:
        """The zoned characteristics, plus the secure-erase fields zones constrain."""
        table = self.table
        zs = table.zone_sectors
        cfg.zone_sectors = zs
        cfg.max_open_zones = table.max_open_zones
        cfg.max_active_zones = table.max_active_zones
        cfg.max_append_sectors = self.backend.max_append_sectors
        cfg.write_granularity = table.write_granularity
        cfg.model = int(self.model)
        cfg.secure_erase_sector_alignment = zs
        cfg.max_secure_erase_sectors = max(zs, cfg.max_secure_erase_sectors // zs * zs)

    def install(self, handlers: dict[int, Handler]) -> None:
        """Replace the handlers whose meaning changes on a zoned device, add the zone ones."""
        handlers.pop(RequestType.DISCARD, None)
        handlers[RequestType.IN] = self._do_in
        handlers[RequestType.OUT] = self._do_out
        if RequestType.OUT_FUA in handlers:
            handlers[RequestType.OUT_FUA] = self._do_out_fua
        handlers[RequestType.WRITE_ZEROES] = self._do_write_zeroes
        handlers[RequestType.SECURE_ERASE] = self._do_secure_erase
        handlers[RequestType.ZONE_REPORT] = self._do_report
        handlers[RequestType.ZONE_APPEND] = self._do_append
        handlers[RequestType.ZONE_OPEN] = self._management(self.table.open)
        handlers[RequestType.ZONE_CLOSE] = self._management(self.table.close)
        handlers[RequestType.ZONE_FINISH] = self._management(self.table.finish)
        handlers[RequestType.ZONE_RESET] = self._do_reset
        handlers[RequestType.ZONE_RESET_ALL] = self._do_reset_all

    # -- handlers -----------------------------------------------------------------------------
    @staticmethod
    def _answer(exc: ZoneStatusError) -> tuple[int, int]:
        log.info("zoned request failed: %s", exc)
        return int(exc.status), 1

    def _sectors(self, req: BlkRequest) -> int:
        return req.data_len >> SECTOR_SHIFT

    def _in_range(self, sector: int, nsectors: int) -> bool:
        return sector + nsectors <= self.table.capacity_sectors

    def _do_in(self, req: BlkRequest) -> tuple[int, int]:
        nsectors = self._sectors(req)
        if not self._in_range(req.sector, nsectors):
            return int(Status.IOERR), 1
        try:
            self.table.check_read(req.sector, nsectors)
            self.backend.preadv(req.data, req.sector << SECTOR_SHIFT)
        except ZoneStatusError as exc:
            return self._answer(exc)
        except OSError as exc:
            log.error("zoned read at sector %d failed: %s", req.sector, exc)
            return int(Status.IOERR), 1
        return int(Status.OK), req.data_len + 1

    def _store(self, sector: int, nsectors: int, what: str,
               store: Callable[[], object]) -> tuple[int, int]:
        """Check, store and advance as one step, so writes from several queues to one
        zone are ordered by the write pointer they saw."""
        table = self.table
        if self._read_only():
            return int(Status.IOERR), 1
        if not self._in_range(sector, nsectors):
            return int(Status.IOERR), 1
        with table.lock:
            try:
                zone = table.prepare_write(sector, nsectors, what)
            except ZoneStatusError as exc:
                return self._answer(exc)
            if nsectors:
                try:
                    store()
                except OSError as exc:
                    log.error("%s at sector %d failed: %s", what, sector, exc)
                    return int(Status.IOERR), 1
                if zone is not None:
                    table.complete_write(zone, nsectors)
        return int(Status.OK), 1

    def _write(self, req: BlkRequest, fua: bool) -> tuple[int, int]:
        return self._store(
            req.sector, self._sectors(req), type_name_of(req),
            lambda: self.backend.pwritev(req.data, req.sector << SECTOR_SHIFT, fua=fua))

    def _do_out(self, req: BlkRequest) -> tuple[int, int]:
        return self._write(req, False)

    def _do_out_fua(self, req: BlkRequest) -> tuple[int, int]:
        return self._write(req, True)

    def _do_write_zeroes(self, req: BlkRequest) -> tuple[int, int]:
        """Each segment is a write of zeros: in a sequential zone it goes at the write
        pointer and advances it, like OUT."""
        limits = self._device.write_zeroes_limits
        # Count from the length before decoding: the payload is bounded only by guest memory.
        count = req.data_len // DiscardSegment.SIZE
        if count > limits.max_seg:
            log.warning("WRITE_ZEROES with %d segments, max %d", count, limits.max_seg)
            return int(Status.IOERR), 1
        segments = read_segments(req)
        for seg in segments:
            if seg.flags & ~DISCARD_FLAG_UNMAP:
                return int(Status.UNSUPP), 1
            if seg.num_sectors > limits.max_sectors:
                return int(Status.IOERR), 1
        for seg in segments:
            store = functools.partial(
                self.backend.write_zeroes, seg.sector << SECTOR_SHIFT,
                seg.num_sectors << SECTOR_SHIFT, unmap=seg.unmap)
            status, used = self._store(seg.sector, seg.num_sectors, "WRITE_ZEROES", store)
            if status != Status.OK:
                return status, used
        return int(Status.OK), 1

    def _do_secure_erase(self, req: BlkRequest) -> tuple[int, int]:
        """Whole zones only; sequential zones are reset, conventional ones overwritten."""
        if self._read_only():
            return int(Status.IOERR), 1
        limits = self._device.secure_erase_limits
        if req.data_len // DiscardSegment.SIZE > limits.max_seg:
            return int(Status.IOERR), 1
        segments = read_segments(req)
        table = self.table
        for seg in segments:
            if seg.flags:
                return int(Status.UNSUPP), 1
            end = seg.sector + seg.num_sectors
            if seg.num_sectors > limits.max_sectors or not self._in_range(
                    seg.sector, seg.num_sectors):
                return int(Status.IOERR), 1
            if seg.sector % table.zone_sectors or (
                    end % table.zone_sectors and end != table.capacity_sectors):
                log.info("SECURE_ERASE of sectors %d+%d is not whole zones",
                         seg.sector, seg.num_sectors)
                return int(Status.ZONE_INVALID_CMD), 1
        with table.lock:
            for seg in segments:
                for sector in range(seg.sector, seg.sector + seg.num_sectors, table.zone_sectors):
                    zone = table.zone_of(sector)
                    try:
                        if zone.type == ZoneType.CONV:
                            self._zero(zone, secure=True)
                        else:
                            reset = table.reset(zone.start)
                            if reset is not None:
                                self._zero(reset, secure=True)
                    except ZoneStatusError as exc:
                        return self._answer(exc)
                    except OSError as exc:
                        log.error("SECURE_ERASE of zone %d failed: %s", zone.index, exc)
                        return int(Status.IOERR), 1
        return int(Status.OK), 1

    def _zero(self, zone: Zone, *, secure: bool = False) -> None:
        offset, length = zone.start << SECTOR_SHIFT, zone.length << SECTOR_SHIFT
        if secure:
            self.backend.secure_erase(offset, length)
        else:
            self.backend.discard(offset, length)

    def _do_append(self, req: BlkRequest) -> tuple[int, int]:
        table = self.table
        nsectors = self._sectors(req)
        max_append = self.backend.max_append_sectors
        if nsectors > max_append:
            if not max_append:
                return int(Status.UNSUPP), 1
            log.info("ZONE_APPEND of %d sectors, max %d", nsectors, max_append)
            return int(Status.ZONE_INVALID_CMD), 1
        if self._read_only():
            return int(Status.IOERR), 1
        with table.lock:
            try:
                zone, sector = table.prepare_append(req.sector, nsectors)
            except ZoneStatusError as exc:
                return self._answer(exc)
            if nsectors:
                try:
                    self.backend.pwritev(req.data, sector << SECTOR_SHIFT)
                except OSError as exc:
                    log.error("ZONE_APPEND to zone %d failed: %s", zone.index, exc)
                    return int(Status.IOERR), 1
                table.complete_write(zone, nsectors)
        _scatter(req.reply, ZONE_APPEND_SECTOR.pack(sector))
        return int(Status.OK), ZONE_APPEND_SECTOR.size + 1

    def _do_report(self, req: BlkRequest) -> tuple[int, int]:
        header = ZONE_REPORT_HEADER.size
        if req.data_len < header:
            log.warning("ZONE_REPORT with a %d-byte buffer, smaller than the header",
                        req.data_len)
            return int(Status.IOERR), 1
        fits = (req.data_len - header) // ZoneDescriptor.SIZE
        with self.table.lock:
            try:
                zones = self.table.report(req.sector, fits)
            except ZoneStatusError as exc:
                return self._answer(exc)
        payload = ZONE_REPORT_HEADER.pack(len(zones)) + b"".join(z.pack() for z in zones)
        _scatter(req.data, payload)
        return int(Status.OK), len(payload) + 1

    def _management(self, transition: Callable[[int], None]) -> Handler:
        def handler(req: BlkRequest) -> tuple[int, int]:
            if self._read_only():
                return int(Status.IOERR), 1
            with self.table.lock:
                try:
                    transition(req.sector)
                except ZoneStatusError as exc:
                    return self._answer(exc)
            return int(Status.OK), 1
        return handler

    def _do_reset(self, req: BlkRequest) -> tuple[int, int]:
        if self._read_only():
            return int(Status.IOERR), 1
        with self.table.lock:
            try:
                zone = self.table.reset(req.sector)
                if zone is not None:
                    self._zero(zone)
            except ZoneStatusError as exc:
                return self._answer(exc)
        return int(Status.OK), 1

    def _do_reset_all(self, req: BlkRequest) -> tuple[int, int]:
        if self._read_only():
            return int(Status.IOERR), 1
        with self.table.lock:
            for zone in self.table.reset_all():
                self._zero(zone)
        return int(Status.OK), 1


def type_name_of(req: BlkRequest) -> str:
    """The request type's name for messages."""
    try:
        return RequestType(req.type).name
    except ValueError:
        return f"type {req.type:#x}"


def _scatter(views: Sequence[memoryview], payload: bytes) -> None:
    """Copy ``payload`` over the views in order (as much as fits)."""
    pos = 0
    for view in views:
        chunk = payload[pos : pos + len(view)]
        view[: len(chunk)] = chunk
        pos += len(chunk)
        if pos >= len(payload):
            return
