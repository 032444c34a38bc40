"""A :class:`BlkDevice`'s settings as one typed value, judged where it is made.

The device makes its keyword arguments one of these, and a description of a device
(``virtblk.device.options``) holds one: so each rule about a setting (its type, and the
values the device accepts) is written once and holds in whichever process gives the
setting, long before any storage is opened or any child process starts.  This module
imports nothing of the device, so the device can import it."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from virtblk.spec import SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, Lifetime

ZONED_WORKERS_ERROR = ("zoned devices and devices with their own execute() serve their "
                       "queues from threads")
"""Why worker processes are refused: a zoned device's zone state, and a subclass's own
``execute``, live in the one process that made the device."""


@dataclasses.dataclass(frozen=True)
class BlkSettings:
    """The :class:`BlkDevice` settings other than the storage and the queues, with its
    defaults (tests/device/test_options.py keeps the two lists equal)."""

    serial: str = ""
    """GET_ID's answer, ASCII, at most 20 bytes."""
    blk_size: int = SECTOR_SIZE
    """The logical block size: a power of two >= 512."""
    seg_max: int | None = None
    """None: as many as the queue size allows (at most 126)."""
    size_max: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    geometry: tuple[int, int, int] | None = None
    max_discard_sectors: int = 0x3FFFFF
    max_discard_seg: int = 1
    discard_sector_alignment: int | None = None
    max_write_zeroes_sectors: int = 0x3FFFFF
    max_write_zeroes_seg: int = 1
    max_secure_erase_sectors: int = 0x3FFFFF
    max_secure_erase_seg: int = 1
    secure_erase_sector_alignment: int | None = None
    writeback: bool = True
    lifetime: Lifetime | None = None
    fua: bool = False
    poll_us: float | None = None
    """None: ``virtblk.device.options.DEFAULT_POLL_US`` with worker processes, 0 with
    threads (a :class:`BlkDevice` is given a number)."""
    io_threads: int = 32
    aio: Literal["native", "threads"] = "native"
    packed: bool = True
    """Offer VIRTIO_F_RING_PACKED; False hides it, so every driver uses split rings."""

    def __post_init__(self) -> None:
        serial: object = self.serial
        if isinstance(serial, bytes | bytearray):  # BlkDevice takes bytes; JSON carries text
            try:
                object.__setattr__(self, "serial", bytes(serial).decode("ascii"))
            except UnicodeDecodeError:
                raise ValueError(f"serial must be ASCII, not {serial!r}") from None
        check_types(self)
        self._check_values()

    def _check_values(self) -> None:
        """ValueError for the first setting the device could not serve as given."""
        if not self.serial.isascii():
            raise ValueError(f"serial must be ASCII, not {self.serial!r}")
        if len(self.serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial is {len(self.serial)} bytes; GET_ID answers at most "
                             f"{VIRTIO_BLK_ID_BYTES}")
        if self.blk_size < SECTOR_SIZE or self.blk_size & (self.blk_size - 1):
            raise ValueError(f"blk_size must be a power of two >= 512, got {self.blk_size}")
        for name in ("max_discard_seg", "max_write_zeroes_seg", "max_secure_erase_seg"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.poll_us is not None and self.poll_us < 0:
            raise ValueError(f"poll_us must be >= 0, got {self.poll_us}")
        if self.io_threads < 0:
            raise ValueError(f"io_threads must be >= 0, got {self.io_threads}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlkSettings:
        """Settings from keyword-style options or from :meth:`to_dict`'s JSON (which made
        the ``lifetime`` struct a dict and ``geometry`` a list).  An unknown name raises
        TypeError naming it, with the closest known one."""
        refuse_unknown(cls, data, "device option")
        values = dict(data)
        if isinstance(values.get("lifetime"), Mapping):
            values["lifetime"] = Lifetime(**values["lifetime"])
        if isinstance(values.get("geometry"), list):
            values["geometry"] = tuple(values["geometry"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (:meth:`from_dict` is its inverse)."""
        return dataclasses.asdict(self)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as :class:`BlkDevice` keyword arguments (the values themselves:
        ``lifetime`` stays a :class:`Lifetime`)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def check_queues(num_queues: int, queue_size: int) -> None:
    """ValueError unless the queues are ones virtio-blk can have."""
    if not 1 <= num_queues <= 0xFFFF:
        raise ValueError(f"num_queues must be in 1..65535, got {num_queues}")
    if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
        raise ValueError(f"queue_size must be a power of two in 2..32768, got {queue_size}")


def refuse_unknown(cls: type[Any], data: Mapping[str, Any], kind: str) -> None:
    """TypeError for the first name ``cls`` has no field for, with the closest one."""
    known = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def check_types(instance: Any) -> None:
    """TypeError for the first field of a dataclass whose value its annotation does not
    admit."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not _admits(hints[field.name], value):
            raise TypeError(
                f"{type(instance).__name__}: {field.name} must be {_describe(hints[field.name])}"
                f", not {value!r}")


def _admits(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the annotated type (the few forms the options use)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_admits(arg, value) for arg in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_admits(a, v) for a, v in zip(args, value, strict=True)))
    if origin is not None:  # dict[str, Any]: the container is what can be checked here
        return isinstance(value, origin)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False  # True is an int to Python, never a size or a count to us
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(hint))
    return str(hint).replace("typing.", "").replace("virtblk.spec.", "")
