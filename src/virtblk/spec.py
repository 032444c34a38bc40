"""Constants and wire structures of the VIRTIO specification for block devices.

Everything here follows VIRTIO 1.2/1.3 (``content.tex`` and ``device-types/blk``):
names are the spec's, lower-cased where they are fields.  All multi-byte fields
are little-endian.  This module does no I/O, so both the driver and the device,
and the tests, share one definition of the wire format.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import ClassVar, Self

SECTOR_SIZE = 512
"""The unit of ``sector`` fields and of ``capacity``, whatever ``blk_size`` says."""
SECTOR_SHIFT = 9

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_ID_BYTES = 20
"""GET_ID answers at most this many bytes, NUL padded (not terminated when full)."""


class Feature(enum.IntEnum):
    """Feature bits: block-specific (0-23) and device-independent (24+)."""

    # Legacy block bits (not offered by VIRTIO 1.x devices).
    BLK_BARRIER = 0
    BLK_SCSI = 7
    # Block device bits.
    BLK_SIZE_MAX = 1
    BLK_SEG_MAX = 2
    BLK_GEOMETRY = 4
    BLK_RO = 5
    BLK_BLK_SIZE = 6
    BLK_FLUSH = 9  # legacy name: WCE
    BLK_TOPOLOGY = 10
    BLK_CONFIG_WCE = 11
    BLK_MQ = 12
    BLK_DISCARD = 13
    BLK_WRITE_ZEROES = 14
    BLK_LIFETIME = 15
    BLK_SECURE_ERASE = 16
    BLK_ZONED = 17
    # Proposed, not yet in a released spec: a write with Forced Unit Access.
    BLK_OUT_FUA = 18
    # Device-independent bits.
    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VHOST_USER_PROTOCOL_FEATURES = 30  # vhost-user only, never a guest feature
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40

    @property
    def mask(self) -> int:
        """The feature as a bit mask."""
        return 1 << int(self)


def feature_names(bits: int) -> list[str]:
    """Name every set bit; unknown bits are listed as ``bit N`` so nothing is hidden."""
    names: list[str] = []
    for bit in range(64):
        if bits & (1 << bit):
            try:
                names.append(Feature(bit).name)
            except ValueError:
                names.append(f"bit {bit}")
    return names


def has_feature(bits: int, feature: Feature) -> bool:
    """True when ``feature`` is set in ``bits``."""
    return bool(bits & (1 << int(feature)))


class RequestType(enum.IntEnum):
    """``virtio_blk_req.type`` values."""

    IN = 0
    OUT = 1
    SCSI_CMD = 2  # legacy
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14
    ZONE_APPEND = 15
    ZONE_REPORT = 16
    ZONE_OPEN = 18
    ZONE_CLOSE = 20
    ZONE_FINISH = 22
    ZONE_RESET = 24
    ZONE_RESET_ALL = 26
    OUT_FUA = 27  # proposed: VIRTIO_BLK_F_OUT_FUA


class Status(enum.IntEnum):
    """The status byte the device writes last in every request."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    ZONE_INVALID_CMD = 3
    ZONE_UNALIGNED_WP = 4
    ZONE_OPEN_RESOURCE = 5
    ZONE_ACTIVE_RESOURCE = 6


# Split virtqueue (spec 2.7).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8
VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
VIRTQUEUE_MAX_SIZE = 32768

# Packed virtqueue (spec 2.8): NEXT, WRITE and INDIRECT as above, the descriptor 16 bytes.
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
RING_EVENT_WRAP_SHIFT = 15
"""``off_wrap``: the event's descriptor offset in bits 0-14, its wrap counter in bit 15."""
VRING_PACKED_EVENT_SIZE = 4
VRING_PACKED_EVENT_ALIGN = 4
VIRTQUEUE_PACKED_MAX_SIZE = 32768


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The spec's ``vring_need_event``: did ``[old, new)`` pass ``event_idx``? (mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHeader:
    """``struct virtio_blk_outhdr``: the 16 driver-readable bytes that open a request."""

    type: int
    ioprio: int
    sector: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQ")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        """Encode as the wire layout."""
        return self.FORMAT.pack(self.type, self.ioprio, self.sector)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Decode the wire layout; ``data`` must be exactly 16 bytes."""
        return cls(*cls.FORMAT.unpack(data))


DISCARD_FLAG_UNMAP = 1
"""``virtio_blk_discard_write_zeroes.flags``: WRITE_ZEROES may deallocate."""


@dataclasses.dataclass(frozen=True, slots=True)
class DiscardSegment:
    """``struct virtio_blk_discard_write_zeroes``: one range of DISCARD, WRITE_ZEROES or
    SECURE_ERASE."""

    sector: int
    num_sectors: int
    flags: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        """Encode as the wire layout."""
        return self.FORMAT.pack(self.sector, self.num_sectors, self.flags)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Decode the wire layout; ``data`` must be exactly 16 bytes."""
        return cls(*cls.FORMAT.unpack(data))

    @property
    def unmap(self) -> bool:
        """The UNMAP flag: the device may deallocate while zeroing."""
        return bool(self.flags & DISCARD_FLAG_UNMAP)


@dataclasses.dataclass(frozen=True, slots=True)
class Lifetime:
    """``struct virtio_blk_lifetime``: wear information (eMMC/UFS style)."""

    pre_eol_info: int = 0
    device_lifetime_est_typ_a: int = 0
    device_lifetime_est_typ_b: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<HHH")
    SIZE: ClassVar[int] = 6

    PRE_EOL_UNDEFINED: ClassVar[int] = 0
    PRE_EOL_NORMAL: ClassVar[int] = 1
    PRE_EOL_WARNING: ClassVar[int] = 2
    PRE_EOL_URGENT: ClassVar[int] = 3

    def pack(self) -> bytes:
        """Encode as the wire layout."""
        return self.FORMAT.pack(
            self.pre_eol_info, self.device_lifetime_est_typ_a, self.device_lifetime_est_typ_b
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Decode the wire layout; ``data`` must be exactly 6 bytes."""
        return cls(*cls.FORMAT.unpack(data))


# Zoned block devices (spec 5.2.6, VIRTIO_BLK_F_ZONED).
class ZonedModel(enum.IntEnum):
    """``virtio_blk_zoned_characteristics.model``."""

    NONE = 0
    HM = 1  # host managed
    HA = 2  # host aware


class ZoneType(enum.IntEnum):
    """``virtio_blk_zone_descriptor.z_type``."""

    CONV = 1
    SWR = 2  # sequential write required
    SWP = 3  # sequential write preferred


class ZoneState(enum.IntEnum):
    """``virtio_blk_zone_descriptor.z_state``."""

    NOT_WP = 0
    EMPTY = 1
    IOPEN = 2
    EOPEN = 3
    CLOSED = 4
    RDONLY = 13
    FULL = 14
    OFFLINE = 15


@dataclasses.dataclass(frozen=True, slots=True)
class ZoneDescriptor:
    """``struct virtio_blk_zone_descriptor`` (64 bytes)."""

    z_cap: int
    z_start: int
    z_wp: int
    z_type: int
    z_state: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQBB38x")
    SIZE: ClassVar[int] = 64

    def pack(self) -> bytes:
        """Encode as the wire layout."""
        return self.FORMAT.pack(self.z_cap, self.z_start, self.z_wp, self.z_type, self.z_state)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Decode the wire layout; ``data`` must be exactly 64 bytes."""
        return cls(*cls.FORMAT.unpack(data))


ZONE_REPORT_HEADER = struct.Struct("<Q56x")
"""``struct virtio_blk_zone_report`` header: ``nr_zones`` then 56 reserved bytes."""

ZONE_APPEND_SECTOR = struct.Struct("<Q")
"""ZONE_APPEND answers the sector it wrote at in 8 bytes before the status byte."""


@dataclasses.dataclass(slots=True)
class BlkConfig:
    """``struct virtio_blk_config``: the device configuration space (96 bytes).

    A field is meaningful only when its feature is negotiated (``capacity`` always is);
    ``writeback`` is the one field a driver writes (CONFIG_WCE).
    """

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0
    zone_sectors: int = 0
    max_open_zones: int = 0
    max_active_zones: int = 0
    max_append_sectors: int = 0
    write_granularity: int = 0
    model: int = 0

    FORMAT: ClassVar[struct.Struct] = struct.Struct(
        "<Q"  # capacity                       0
        "I"  # size_max                        8
        "I"  # seg_max                        12
        "HBB"  # geometry c/h/s               16
        "I"  # blk_size                       20
        "BBHI"  # topology                    24
        "B"  # writeback                      32
        "x"  # unused0                        33
        "H"  # num_queues                     34
        "III"  # discard                      36
        "II"  # write zeroes sectors/seg      48
        "B3x"  # write_zeroes_may_unmap       56
        "III"  # secure erase                 60
        "IIIII"  # zoned characteristics      72
        "B3x"  # zoned model                  92
    )
    SIZE: ClassVar[int] = 96

    OFFSET_WRITEBACK: ClassVar[int] = 32
    OFFSET_CAPACITY: ClassVar[int] = 0

    def pack(self) -> bytes:
        """Encode all 96 bytes."""
        return self.FORMAT.pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Decode a configuration space; a shorter space (an older device) is zero-extended."""
        raw = bytes(data[: cls.SIZE]).ljust(cls.SIZE, b"\0")
        return cls(*cls.FORMAT.unpack(raw))


_CONFIG_BASE_END = 36  # capacity ... num_queues
_CONFIG_END = (
    (Feature.BLK_ZONED, 96),
    (Feature.BLK_SECURE_ERASE, 72),
    (Feature.BLK_WRITE_ZEROES, 60),
    (Feature.BLK_DISCARD, 48),
)


def config_size(features: int) -> int:
    """How far the config space reaches for ``features``: up to the last field they use.

    Devices size their config space by feature, as QEMU does, and may refuse a larger read
    (qemu-storage-daemon 7.2 has 60 bytes); fields past the end read as zero."""
    for feature, end in _CONFIG_END:
        if has_feature(features, feature):
            return end
    return _CONFIG_BASE_END


assert BlkConfig.FORMAT.size == BlkConfig.SIZE
assert ZoneDescriptor.FORMAT.size == ZoneDescriptor.SIZE
