"""vhost-user messages as typed, immutable values (docs/interop/vhost-user.rst in QEMU).

One class per message kind and direction.  A message knows how to turn itself into its
payload and file descriptors (``encode_payload``) and how to be rebuilt from them
(``decode_payload``), checking everything a peer could get wrong: payload size, number
of fds, reserved bits, region overlaps.  Framing (the 12-byte header, buffering, fd
bookkeeping) lives in ``codec``; per-connection rules (queue index in range, feature
negotiated, ordering) live in the backend state machine, because they need state.

Numbers are in the machine's native byte order, as the spec says: both ends share a host.

File descriptors inside messages are ``OwnedFd``s, in typed fields (``fd``, ``fds``), and a
message owns them: whoever holds a message either takes the fds it keeps
(``message.fd.take()``) or leaves them, and closes the message when done with it
(``message.close()`` or ``with message:``), which closes whatever nobody took.  Encoding
only borrows the fds for the send, so a sender closes its message after sending too.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar, Self

from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd, close_all

__all__ = [
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "Ack",
    "AddMemReg",
    "BackendRequest",
    "Channel",
    "ConfigChangeMsg",
    "Flag",
    "GetConfig",
    "GetConfigFailed",
    "GetConfigReply",
    "GetFeatures",
    "GetFeaturesReply",
    "GetInflightFd",
    "GetInflightFdReply",
    "GetMaxMemSlots",
    "GetMaxMemSlotsReply",
    "GetProtocolFeatures",
    "GetProtocolFeaturesReply",
    "GetQueueNum",
    "GetQueueNumReply",
    "GetStatus",
    "GetStatusReply",
    "GetVringBase",
    "GetVringBaseReply",
    "MemRegion",
    "Message",
    "ProtocolFeature",
    "RemMemReg",
    "Request",
    "ResetDevice",
    "ResetOwner",
    "SetBackendReqFd",
    "SetConfig",
    "SetFeatures",
    "SetInflightFd",
    "SetMemTable",
    "SetOwner",
    "SetProtocolFeatures",
    "SetStatus",
    "SetVringAddr",
    "SetVringBase",
    "SetVringCall",
    "SetVringEnable",
    "SetVringErr",
    "SetVringKick",
    "SetVringNum",
    "message_class",
    "protocol_feature_names",
    "request_name",
]

MAX_PAYLOAD = 4096
"""Largest payload we accept; real messages stay under 300 bytes, so a larger size field is
garbage and is refused before anything is buffered."""
MAX_MEM_REGIONS = 8
"""VHOST_MEMORY_BASELINE_NREGIONS: regions (and fds) one SET_MEM_TABLE may carry."""
MAX_CONFIG_SIZE = 256
"""VHOST_USER_MAX_CONFIG_SIZE: largest config-space access."""
MAX_FDS = 8
"""At most this many fds travel with one message (the spec's limit on every channel)."""
VRING_INDEX_MASK = 0xFF
"""SET_VRING_KICK/CALL/ERR: the ring index is the low 8 bits of the u64 payload."""
VRING_NOFD = 1 << 8
"""SET_VRING_KICK/CALL/ERR: no fd attached (poll instead)."""
VRING_F_LOG = 1
"""SET_VRING_ADDR flags: log writes to the used ring (live migration)."""

Fds = tuple[OwnedFd, ...]
"""The fds that arrived with a message, handed to its decoder (which gives them to the message)."""

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_MEMORY_HEADER = struct.Struct("=I4x")
_REGION = struct.Struct("=QQQQ")
_SINGLE_REGION = struct.Struct("=8xQQQQ")
_CONFIG_HEADER = struct.Struct("=III")
# Not QEMU_PACKED in C, so the struct is padded to 8 bytes: 24 on the wire.
_INFLIGHT = struct.Struct("=QQHH4x")


class Flag(enum.IntFlag):
    """Header ``flags`` bits."""

    VERSION = 0x1  # the only version; it occupies the low 2 bits
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3


class Channel(enum.Enum):
    """Which socket a message travels on: request codes overlap between the two."""

    MAIN = "main"  # frontend requests, backend replies
    BACKEND = "backend"  # backend requests (SET_BACKEND_REQ_FD socket), frontend replies


class Request(enum.IntEnum):
    """Frontend message types (the main channel)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Backend message types (the backend channel), formerly VHOST_USER_SLAVE_*."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5  # formerly SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10  # formerly SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16

    @property
    def mask(self) -> int:
        """The feature as a bit mask."""
        return 1 << int(self)


def protocol_feature_names(bits: int) -> list[str]:
    """Name every set bit; unknown bits appear as ``bit N`` so nothing is hidden."""
    names: list[str] = []
    for bit in range(64):
        if bits & (1 << bit):
            try:
                names.append(ProtocolFeature(bit).name)
            except ValueError:
                names.append(f"bit {bit}")
    return names


# --------------------------------------------------------------------------- helpers


def request_name(code: int, channel: Channel) -> str:
    """The spec's name of a request code on ``channel`` (``request N`` if unknown)."""
    enum_type: type[enum.IntEnum] = Request if channel is Channel.MAIN else BackendRequest
    try:
        return enum_type(code).name
    except ValueError:
        return f"request {code}"


def _expect_size(what: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected {size}")


def _expect_fds(what: str, fds: Sequence[OwnedFd], count: int) -> None:
    if len(fds) != count:
        raise ProtocolError(f"{what}: {len(fds)} file descriptors attached, expected {count}")


def _u64(what: str, payload: bytes) -> int:
    _expect_size(what, payload, _U64.size)
    value: int = _U64.unpack(payload)[0]
    return value


def _state(what: str, payload: bytes) -> tuple[int, int]:
    _expect_size(what, payload, _STATE.size)
    index, num = _STATE.unpack(payload)
    return int(index), int(num)


@dataclasses.dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory region description (``VhostUserMemoryRegion``): addresses and size.

    The fd that backs it travels beside it, not inside it, as on the wire.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        """The 32-byte wire layout."""
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode 32 bytes (no validation: see ``validate``)."""
        return cls(*_REGION.unpack(data))

    def validate(self, what: str) -> None:
        """Refuse an empty region or one whose guest or user range wraps past 2**64."""
        if self.memory_size == 0:
            raise ProtocolError(f"{what}: region at gpa {self.guest_phys_addr:#x} has size 0")
        for name, start in (("guest", self.guest_phys_addr), ("user", self.userspace_addr)):
            if start + self.memory_size > 1 << 64:
                raise ProtocolError(
                    f"{what}: region {name} range {start:#x}+{self.memory_size:#x} "
                    "wraps past the end of the address space"
                )

    def overlaps(self, other: MemRegion) -> bool:
        """True when the guest-physical or the user ranges intersect."""
        return (
            self.guest_phys_addr < other.guest_phys_addr + other.memory_size
            and other.guest_phys_addr < self.guest_phys_addr + self.memory_size
        ) or (
            self.userspace_addr < other.userspace_addr + other.memory_size
            and other.userspace_addr < self.userspace_addr + self.memory_size
        )


# --------------------------------------------------------------------------- base classes


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of a message class, computed once per class."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(field.name for field in dataclasses.fields(cls))
    return names


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """Base of every message.

    ``CODE`` is the request field, ``CHANNEL`` the socket it travels on and ``IS_REPLY``
    whether the REPLY flag is set.  ``SIZES`` is the (min, max) payload size, checked on
    the header alone so a bad size is refused before its payload is buffered.
    """

    CODE: ClassVar[int] = 0  # Ack overrides ``code`` instead
    CHANNEL: ClassVar[Channel] = Channel.MAIN
    IS_REPLY: ClassVar[bool] = False
    SIZES: ClassVar[tuple[int, int]] = (0, 0)

    @property
    def code(self) -> int:
        """The header's request field."""
        return self.CODE

    @property
    def channel(self) -> Channel:
        """The channel the message travels on."""
        return self.CHANNEL

    @property
    def name(self) -> str:
        """The spec's name of the request, for messages and logs."""
        return request_name(self.code, self.CHANNEL)

    @property
    def header_flags(self) -> int:
        """Header flags: the version, and REPLY for replies."""
        return int(Flag.VERSION | Flag.REPLY) if self.IS_REPLY else int(Flag.VERSION)

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        """Payload bytes and the fds to attach, borrowed from the message (default: none)."""
        return b"", ()

    @property
    def wants_ack(self) -> bool:
        """True when the sender set NEED_REPLY (only a request can)."""
        return False

    @property
    def owned_fds(self) -> tuple[OwnedFd, ...]:
        """The fds the message carries and owns (those taken from it are empty now).

        Found in the fields, not listed by each class: every field holding an ``OwnedFd``
        or a tuple or list of them, so a new message cannot carry an fd its ``close``
        misses.
        """
        fds: list[OwnedFd] = []
        for name in _field_names(type(self)):
            value = getattr(self, name)
            if isinstance(value, OwnedFd):
                fds.append(value)
            elif isinstance(value, tuple | list):
                fds += [item for item in value if isinstance(item, OwnedFd)]
        return tuple(fds)

    def close(self) -> None:
        """Close every fd of the message nobody took (idempotent)."""
        close_all(self.owned_fds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        """Rebuild the message; raise ProtocolError on anything malformed."""
        what = request_name(code, cls.CHANNEL)
        _expect_size(what, payload, 0)
        _expect_fds(what, fds, 0)
        return cls(**cls._request_kwargs(flags))

    @classmethod
    def _request_kwargs(cls, flags: int) -> dict[str, bool]:
        return {}


@dataclasses.dataclass(frozen=True, slots=True)
class _Request(Message):
    """A request (either channel): the sender may ask for an ack with NEED_REPLY."""

    need_reply: bool = dataclasses.field(default=False, kw_only=True)

    @property
    def wants_ack(self) -> bool:
        """True when the sender set NEED_REPLY."""
        return self.need_reply

    @property
    def header_flags(self) -> int:
        """Header flags: the version, and NEED_REPLY when an ack is wanted."""
        return int(Flag.VERSION | Flag.NEED_REPLY) if self.need_reply else int(Flag.VERSION)

    @classmethod
    def _request_kwargs(cls, flags: int) -> dict[str, bool]:
        return {"need_reply": bool(flags & Flag.NEED_REPLY)}


@dataclasses.dataclass(frozen=True, slots=True)
class _U64Request(_Request):
    """A request whose payload is one u64 (subclasses name the field ``value``)."""

    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    value: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _U64.pack(self.value), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = request_name(code, cls.CHANNEL)
        value = _u64(what, payload)
        _expect_fds(what, fds, 0)
        return cls(value, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class _U64Reply(Message):
    """A reply whose payload is one u64."""

    IS_REPLY: ClassVar[bool] = True
    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    value: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _U64.pack(self.value), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = f"reply to {request_name(code, cls.CHANNEL)}"
        value = _u64(what, payload)
        _expect_fds(what, fds, 0)
        return cls(value)


@dataclasses.dataclass(frozen=True, slots=True)
class _StateRequest(_Request):
    """A request with a vring state payload (index, num)."""

    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    index: int
    num: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _STATE.pack(self.index, self.num), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = request_name(code, cls.CHANNEL)
        index, num = _state(what, payload)
        _expect_fds(what, fds, 0)
        return cls(index, num, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class _VringFdRequest(_Request):
    """SET_VRING_KICK/CALL/ERR: a ring index and an eventfd, or None to poll instead."""

    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    index: int
    fd: OwnedFd | None

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        if self.fd is None:
            return _U64.pack(self.index | VRING_NOFD), ()
        return _U64.pack(self.index), (self.fd.fileno(),)

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = request_name(code, cls.CHANNEL)
        value = _u64(what, payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise ProtocolError(f"{what}: reserved bits set in payload {value:#x}")
        index = value & VRING_INDEX_MASK
        if value & VRING_NOFD:
            _expect_fds(f"{what} with the no-fd flag", fds, 0)
            return cls(index, None, **cls._request_kwargs(flags))
        _expect_fds(what, fds, 1)
        return cls(index, fds[0], **cls._request_kwargs(flags))


# --------------------------------------------------------------------------- frontend requests


@dataclasses.dataclass(frozen=True, slots=True)
class GetFeatures(_Request):
    """Ask for the virtio feature bits the backend offers."""

    CODE: ClassVar[int] = Request.GET_FEATURES


@dataclasses.dataclass(frozen=True, slots=True)
class SetFeatures(_U64Request):
    """Acknowledge virtio feature bits (``value``)."""

    CODE: ClassVar[int] = Request.SET_FEATURES

    @property
    def features(self) -> int:
        """The acknowledged feature bits."""
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class GetProtocolFeatures(_Request):
    """Ask for the vhost-user protocol feature bits."""

    CODE: ClassVar[int] = Request.GET_PROTOCOL_FEATURES


@dataclasses.dataclass(frozen=True, slots=True)
class SetProtocolFeatures(_U64Request):
    """Enable protocol feature bits (``value``)."""

    CODE: ClassVar[int] = Request.SET_PROTOCOL_FEATURES

    @property
    def features(self) -> int:
        """The enabled protocol feature bits."""
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class SetOwner(_Request):
    """Start of a session: the sender owns the device."""

    CODE: ClassVar[int] = Request.SET_OWNER


@dataclasses.dataclass(frozen=True, slots=True)
class ResetOwner(_Request):
    """Deprecated: treated as "disable all rings"."""

    CODE: ClassVar[int] = Request.RESET_OWNER


@dataclasses.dataclass(frozen=True, slots=True)
class ResetDevice(_Request):
    """Disable all rings and reset the device (RESET_DEVICE protocol feature)."""

    CODE: ClassVar[int] = Request.RESET_DEVICE


@dataclasses.dataclass(frozen=True, slots=True)
class SetMemTable(_Request):
    """The whole memory table: one fd per region, in the same order."""

    CODE: ClassVar[int] = Request.SET_MEM_TABLE
    SIZES: ClassVar[tuple[int, int]] = (
        _MEMORY_HEADER.size,
        _MEMORY_HEADER.size + MAX_MEM_REGIONS * _REGION.size,
    )

    regions: tuple[MemRegion, ...]
    fds: tuple[OwnedFd, ...]

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        body = b"".join(region.pack() for region in self.regions)
        return _MEMORY_HEADER.pack(len(self.regions)) + body, tuple(
            fd.fileno() for fd in self.fds
        )

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = "SET_MEM_TABLE"
        if len(payload) < _MEMORY_HEADER.size:
            raise ProtocolError(f"{what}: payload of {len(payload)} bytes has no region count")
        (count,) = _MEMORY_HEADER.unpack_from(payload)
        if count > MAX_MEM_REGIONS:
            raise ProtocolError(f"{what}: {count} regions, at most {MAX_MEM_REGIONS} allowed")
        _expect_size(what, payload, _MEMORY_HEADER.size + count * _REGION.size)
        _expect_fds(f"{what} with {count} regions", fds, count)
        regions = tuple(
            MemRegion.unpack(payload[offset : offset + _REGION.size])
            for offset in range(_MEMORY_HEADER.size, len(payload), _REGION.size)
        )
        for i, region in enumerate(regions):
            region.validate(what)
            for other in regions[:i]:
                if region.overlaps(other):
                    raise ProtocolError(f"{what}: region {region} overlaps region {other}")
        return cls(regions, fds, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class GetMaxMemSlots(_Request):
    """Ask how many regions ADD_MEM_REG may install."""

    CODE: ClassVar[int] = Request.GET_MAX_MEM_SLOTS


@dataclasses.dataclass(frozen=True, slots=True)
class AddMemReg(_Request):
    """Map one more region (CONFIGURE_MEM_SLOTS); exactly one fd."""

    CODE: ClassVar[int] = Request.ADD_MEM_REG
    SIZES: ClassVar[tuple[int, int]] = (_SINGLE_REGION.size, _SINGLE_REGION.size)

    region: MemRegion
    fd: OwnedFd

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        r = self.region
        data = _SINGLE_REGION.pack(
            r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        )
        return data, (self.fd.fileno(),)

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("ADD_MEM_REG", payload, _SINGLE_REGION.size)
        _expect_fds("ADD_MEM_REG", fds, 1)
        region = MemRegion(*_SINGLE_REGION.unpack(payload))
        region.validate("ADD_MEM_REG")
        return cls(region, fds[0], **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class RemMemReg(_Request):
    """Unmap one region, named by guest address, user address and size.

    The spec lets old frontends attach an fd; the receiver must close it unused.
    """

    CODE: ClassVar[int] = Request.REM_MEM_REG
    SIZES: ClassVar[tuple[int, int]] = (_SINGLE_REGION.size, _SINGLE_REGION.size)

    region: MemRegion
    fd: OwnedFd | None = None

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        r = self.region
        data = _SINGLE_REGION.pack(
            r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        )
        return data, (() if self.fd is None else (self.fd.fileno(),))

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("REM_MEM_REG", payload, _SINGLE_REGION.size)
        if len(fds) > 1:
            raise ProtocolError(f"REM_MEM_REG: {len(fds)} file descriptors, expected 0 or 1")
        region = MemRegion(*_SINGLE_REGION.unpack(payload))
        return cls(region, fds[0] if fds else None, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringNum(_StateRequest):
    """Ring ``index`` has ``num`` entries."""

    CODE: ClassVar[int] = Request.SET_VRING_NUM


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringBase(_StateRequest):
    """Ring ``index`` resumes at avail index ``num``; for a packed ring ``num`` is 32 bits,
    both positions and wrap counters (``packed_layout.encode_vring_base``)."""

    CODE: ClassVar[int] = Request.SET_VRING_BASE


@dataclasses.dataclass(frozen=True, slots=True)
class GetVringBase(_Request):
    """Stop ring ``index`` and ask for its next avail index."""

    CODE: ClassVar[int] = Request.GET_VRING_BASE
    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    index: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _STATE.pack(self.index, 0), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        index, _num = _state("GET_VRING_BASE", payload)  # num is unused in requests
        _expect_fds("GET_VRING_BASE", fds, 0)
        return cls(index, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringEnable(_Request):
    """Enable (True) or disable ring ``index``."""

    CODE: ClassVar[int] = Request.SET_VRING_ENABLE
    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    index: int
    enable: bool

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _STATE.pack(self.index, int(self.enable)), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        index, num = _state("SET_VRING_ENABLE", payload)
        _expect_fds("SET_VRING_ENABLE", fds, 0)
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: ring {index} state {num}, expected 0 or 1")
        return cls(index, bool(num), **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringAddr(_Request):
    """Ring addresses, as frontend user addresses; ``log_guest_addr`` is a guest address."""

    CODE: ClassVar[int] = Request.SET_VRING_ADDR
    SIZES: ClassVar[tuple[int, int]] = (_ADDR.size, _ADDR.size)

    index: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0
    flags: int = 0  # VRING_F_LOG

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        data = _ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )
        return data, ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("SET_VRING_ADDR", payload, _ADDR.size)
        _expect_fds("SET_VRING_ADDR", fds, 0)
        index, ring_flags, desc, used, avail, log = _ADDR.unpack(payload)
        if ring_flags & ~VRING_F_LOG:
            raise ProtocolError(f"SET_VRING_ADDR: ring {index} has unknown flags {ring_flags:#x}")
        return cls(index, desc, used, avail, log, ring_flags, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringKick(_VringFdRequest):
    """The eventfd the frontend writes when it made buffers available."""

    CODE: ClassVar[int] = Request.SET_VRING_KICK


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringCall(_VringFdRequest):
    """The eventfd the backend writes when it used buffers."""

    CODE: ClassVar[int] = Request.SET_VRING_CALL


@dataclasses.dataclass(frozen=True, slots=True)
class SetVringErr(_VringFdRequest):
    """The eventfd the backend writes on a ring error."""

    CODE: ClassVar[int] = Request.SET_VRING_ERR


@dataclasses.dataclass(frozen=True, slots=True)
class GetQueueNum(_Request):
    """Ask how many queues the backend supports (MQ protocol feature)."""

    CODE: ClassVar[int] = Request.GET_QUEUE_NUM


def _config_header(what: str, payload: bytes) -> tuple[int, int, int, bytes]:
    if len(payload) < _CONFIG_HEADER.size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes has no config header")
    offset, size, flags = _CONFIG_HEADER.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"{what}: config size {size} over the {MAX_CONFIG_SIZE}-byte limit")
    _expect_size(f"{what} of {size} config bytes", payload, _CONFIG_HEADER.size + size)
    return offset, size, flags, payload[_CONFIG_HEADER.size :]


_CONFIG_SIZES = (_CONFIG_HEADER.size, _CONFIG_HEADER.size + MAX_CONFIG_SIZE)


@dataclasses.dataclass(frozen=True, slots=True)
class GetConfig(_Request):
    """Read ``size`` bytes of config space at ``offset`` (the payload carries zeros)."""

    CODE: ClassVar[int] = Request.GET_CONFIG
    SIZES: ClassVar[tuple[int, int]] = _CONFIG_SIZES

    offset: int
    size: int
    flags: int = 0

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        header = _CONFIG_HEADER.pack(self.offset, self.size, self.flags)
        return header + bytes(self.size), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        offset, size, config_flags, _zeros = _config_header("GET_CONFIG", payload)
        _expect_fds("GET_CONFIG", fds, 0)
        return cls(offset, size, config_flags, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetConfig(_Request):
    """Write ``data`` into config space at ``offset``; ``flags`` 1 = migration."""

    CODE: ClassVar[int] = Request.SET_CONFIG
    SIZES: ClassVar[tuple[int, int]] = _CONFIG_SIZES

    offset: int
    data: bytes
    flags: int = 0

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        header = _CONFIG_HEADER.pack(self.offset, len(self.data), self.flags)
        return header + bytes(self.data), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        offset, _size, config_flags, data = _config_header("SET_CONFIG", payload)
        _expect_fds("SET_CONFIG", fds, 0)
        return cls(offset, data, config_flags, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetBackendReqFd(_Request):
    """The socket on which the backend sends its own requests (CONFIG_CHANGE_MSG)."""

    CODE: ClassVar[int] = Request.SET_BACKEND_REQ_FD

    fd: OwnedFd

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return b"", (self.fd.fileno(),)

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("SET_BACKEND_REQ_FD", payload, 0)
        _expect_fds("SET_BACKEND_REQ_FD", fds, 1)
        return cls(fds[0], **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class GetInflightFd(_Request):
    """Ask for a shared inflight-tracking buffer for ``num_queues`` of ``queue_size``."""

    CODE: ClassVar[int] = Request.GET_INFLIGHT_FD
    SIZES: ClassVar[tuple[int, int]] = (_INFLIGHT.size, _INFLIGHT.size)

    num_queues: int
    queue_size: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _INFLIGHT.pack(0, 0, self.num_queues, self.queue_size), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("GET_INFLIGHT_FD", payload, _INFLIGHT.size)
        _expect_fds("GET_INFLIGHT_FD", fds, 0)
        _size, _offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
        return cls(num_queues, queue_size, **cls._request_kwargs(flags))


@dataclasses.dataclass(frozen=True, slots=True)
class SetInflightFd(_Request):
    """Hand the inflight buffer back to a (restarted) backend."""

    CODE: ClassVar[int] = Request.SET_INFLIGHT_FD
    SIZES: ClassVar[tuple[int, int]] = (_INFLIGHT.size, _INFLIGHT.size)

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: OwnedFd

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        data = _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
        return data, (self.fd.fileno(),)

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_size("SET_INFLIGHT_FD", payload, _INFLIGHT.size)
        _expect_fds("SET_INFLIGHT_FD", fds, 1)
        mmap_size, mmap_offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
        return cls(
            mmap_size, mmap_offset, num_queues, queue_size, fds[0], **cls._request_kwargs(flags)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SetStatus(_U64Request):
    """The virtio device status byte (STATUS protocol feature)."""

    CODE: ClassVar[int] = Request.SET_STATUS


@dataclasses.dataclass(frozen=True, slots=True)
class GetStatus(_Request):
    """Ask for the virtio device status (STATUS protocol feature)."""

    CODE: ClassVar[int] = Request.GET_STATUS


# --------------------------------------------------------------------------- backend replies


@dataclasses.dataclass(frozen=True, slots=True)
class GetFeaturesReply(_U64Reply):
    """The virtio feature bits offered (``value``)."""

    CODE: ClassVar[int] = Request.GET_FEATURES


@dataclasses.dataclass(frozen=True, slots=True)
class GetProtocolFeaturesReply(_U64Reply):
    """The protocol feature bits offered (``value``)."""

    CODE: ClassVar[int] = Request.GET_PROTOCOL_FEATURES


@dataclasses.dataclass(frozen=True, slots=True)
class GetQueueNumReply(_U64Reply):
    """The number of queues the backend supports (``value``)."""

    CODE: ClassVar[int] = Request.GET_QUEUE_NUM


@dataclasses.dataclass(frozen=True, slots=True)
class GetMaxMemSlotsReply(_U64Reply):
    """How many memory regions the backend can map (``value``)."""

    CODE: ClassVar[int] = Request.GET_MAX_MEM_SLOTS


@dataclasses.dataclass(frozen=True, slots=True)
class GetStatusReply(_U64Reply):
    """The device status (``value``)."""

    CODE: ClassVar[int] = Request.GET_STATUS


@dataclasses.dataclass(frozen=True, slots=True)
class GetVringBaseReply(Message):
    """Ring ``index`` stopped; the next avail index is ``num`` (a packed ring's 32-bit
    base, as SET_VRING_BASE carries it)."""

    CODE: ClassVar[int] = Request.GET_VRING_BASE
    IS_REPLY: ClassVar[bool] = True
    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    index: int
    num: int

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _STATE.pack(self.index, self.num), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        index, num = _state("reply to GET_VRING_BASE", payload)
        _expect_fds("reply to GET_VRING_BASE", fds, 0)
        return cls(index, num)


@dataclasses.dataclass(frozen=True, slots=True)
class GetConfigReply(Message):
    """Config bytes read at ``offset``."""

    CODE: ClassVar[int] = Request.GET_CONFIG
    IS_REPLY: ClassVar[bool] = True
    SIZES: ClassVar[tuple[int, int]] = (0, _CONFIG_HEADER.size + MAX_CONFIG_SIZE)

    offset: int
    data: bytes
    flags: int = 0

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        header = _CONFIG_HEADER.pack(self.offset, len(self.data), self.flags)
        return header + bytes(self.data), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        _expect_fds("reply to GET_CONFIG", fds, 0)
        if not payload:  # the spec's way of saying "failed"
            return GetConfigFailed()
        offset, _size, config_flags, data = _config_header("reply to GET_CONFIG", payload)
        return cls(offset, data, config_flags)


@dataclasses.dataclass(frozen=True, slots=True)
class GetConfigFailed(Message):
    """GET_CONFIG failed: the backend answers with an empty payload."""

    CODE: ClassVar[int] = Request.GET_CONFIG
    IS_REPLY: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True, slots=True)
class GetInflightFdReply(Message):
    """The inflight buffer: ``mmap_size`` bytes at ``mmap_offset`` of ``fd``.

    ``mmap_size`` 0 (and no fd) means the backend has no buffer to give.
    """

    CODE: ClassVar[int] = Request.GET_INFLIGHT_FD
    IS_REPLY: ClassVar[bool] = True
    SIZES: ClassVar[tuple[int, int]] = (_INFLIGHT.size, _INFLIGHT.size)

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: OwnedFd | None

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        data = _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)
        return data, (() if self.fd is None else (self.fd.fileno(),))

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        what = "reply to GET_INFLIGHT_FD"
        _expect_size(what, payload, _INFLIGHT.size)
        mmap_size, mmap_offset, num_queues, queue_size = _INFLIGHT.unpack(payload)
        if mmap_size == 0:
            _expect_fds(f"{what} without a buffer", fds, 0)
            return cls(0, mmap_offset, num_queues, queue_size, None)
        _expect_fds(what, fds, 1)
        return cls(mmap_size, mmap_offset, num_queues, queue_size, fds[0])


@dataclasses.dataclass(frozen=True, slots=True)
class Ack(Message):
    """REPLY_ACK answer to request ``request`` (on either channel): 0 is success.

    ``channel`` says which channel's request codes ``request`` belongs to.
    """

    IS_REPLY: ClassVar[bool] = True
    SIZES: ClassVar[tuple[int, int]] = (8, 8)

    request: int
    status: int = 0
    channel: Channel = Channel.MAIN

    @property
    def code(self) -> int:
        return self.request

    @property
    def name(self) -> str:
        return request_name(self.request, self.channel)

    @property
    def ok(self) -> bool:
        """True for success."""
        return self.status == 0

    def encode_payload(self) -> tuple[bytes, tuple[int, ...]]:
        return _U64.pack(self.status), ()

    @classmethod
    def decode_payload(cls, code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        raise AssertionError("Ack is decoded by decode_ack, which knows the channel")


def decode_ack(channel: Channel, code: int, payload: bytes, fds: Fds) -> Ack:
    """Decode a REPLY_ACK answer on ``channel``."""
    what = f"ack of {request_name(code, channel)}"
    status = _u64(what, payload)
    _expect_fds(what, fds, 0)
    return Ack(code, status, channel)


# --------------------------------------------------------------------------- backend channel


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigChangeMsg(_Request):
    """Backend -> frontend: the device's config space changed; fetch it with GET_CONFIG."""

    CODE: ClassVar[int] = BackendRequest.CONFIG_CHANGE_MSG
    CHANNEL: ClassVar[Channel] = Channel.BACKEND


# --------------------------------------------------------------------------- lookup

_REQUESTS: dict[Channel, dict[int, type[Message]]] = {Channel.MAIN: {}, Channel.BACKEND: {}}
_REPLIES: dict[int, type[Message]] = {}

for _cls in (
    GetFeatures, SetFeatures, GetProtocolFeatures, SetProtocolFeatures, SetOwner, ResetOwner,
    ResetDevice, SetMemTable, GetMaxMemSlots, AddMemReg, RemMemReg, SetVringNum, SetVringBase,
    GetVringBase, SetVringEnable, SetVringAddr, SetVringKick, SetVringCall, SetVringErr,
    GetQueueNum, GetConfig, SetConfig, SetBackendReqFd, GetInflightFd, SetInflightFd,
    SetStatus, GetStatus, ConfigChangeMsg,
):  # fmt: skip
    _REQUESTS[_cls.CHANNEL][_cls.CODE] = _cls
for _reply_cls in (
    GetFeaturesReply, GetProtocolFeaturesReply, GetQueueNumReply, GetMaxMemSlotsReply,
    GetStatusReply, GetVringBaseReply, GetConfigReply, GetInflightFdReply,
):  # fmt: skip
    _REPLIES[_reply_cls.CODE] = _reply_cls


PayloadDecoder = Callable[[int, int, bytes, Fds], Message]


def message_class(
    channel: Channel, is_reply: bool, code: int
) -> tuple[tuple[int, int], PayloadDecoder]:
    """The (min, max) payload size and the payload decoder for a header; ProtocolError
    for a request code this end does not know on that channel."""
    if not is_reply:
        cls = _REQUESTS[channel].get(code)
        if cls is None:
            raise ProtocolError(
                f"unknown or unsupported {channel.value}-channel request "
                f"{request_name(code, channel)} (code {code})"
            )
        return cls.SIZES, cls.decode_payload
    reply_cls = _REPLIES.get(code) if channel is Channel.MAIN else None
    if reply_cls is not None:
        return reply_cls.SIZES, reply_cls.decode_payload
    known = Request if channel is Channel.MAIN else BackendRequest
    if code not in known._value2member_map_:
        raise ProtocolError(f"reply to unknown {channel.value}-channel request code {code}")

    def ack(code: int, flags: int, payload: bytes, fds: Fds) -> Message:
        return decode_ack(channel, code, payload, fds)

    return Ack.SIZES, ack
