"""How a device is described before it exists: one place for `virtblk serve` and the
embedded device to turn options into a backend and a :class:`BlkDevice`.

The description crosses a process boundary (the embedded device's child gets it as JSON),
so every option is a typed field checked when the description is made: a misspelled or
mistyped option fails in the process that gave it, naming itself, instead of in a child
that can only die."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from virtblk.device.backends import Backend, FileBackend, MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.zoned import ZonedMemoryBackend
from virtblk.spec import SECTOR_SIZE, Lifetime

BackendKind = Literal["memory", "null", "file"]

DEFAULT_POLL_US = 128.0
"""How long a queue worker process polls an empty ring before sleeping, unless told:
long enough to catch a driver's next request at queue depth 1 (its turnaround is 40-60 us
on the development machine), short enough that polling stops by itself under deep queues,
whose batches come further apart (see the README's polling figures)."""


@dataclasses.dataclass(frozen=True)
class BlkSettings:
    """The :class:`BlkDevice` settings other than the storage and the queues, with its
    defaults (tests/device/test_options.py keeps the two lists equal)."""

    serial: str = ""
    """GET_ID's answer, ASCII, at most 20 bytes."""
    blk_size: int = SECTOR_SIZE
    seg_max: int | None = None
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
    """None: :data:`DEFAULT_POLL_US` with worker processes, 0 with threads."""
    io_threads: int = 32
    aio: Literal["native", "threads"] = "native"

    def __post_init__(self) -> None:
        serial: object = self.serial
        if isinstance(serial, bytes | bytearray):  # BlkDevice takes bytes; JSON carries text
            try:
                object.__setattr__(self, "serial", bytes(serial).decode("ascii"))
            except UnicodeDecodeError:
                raise ValueError(f"serial must be ASCII, not {serial!r}") from None
        _check_types(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlkSettings:
        """Settings from keyword-style options or from :meth:`to_dict`'s JSON (which made
        the ``lifetime`` struct a dict and ``geometry`` a list).  An unknown name raises
        TypeError naming it, with the closest known one."""
        _refuse_unknown(cls, data, "device option")
        values = dict(data)
        if isinstance(values.get("lifetime"), Mapping):
            values["lifetime"] = Lifetime(**values["lifetime"])
        if isinstance(values.get("geometry"), list):
            values["geometry"] = tuple(values["geometry"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (:meth:`from_dict` is its inverse)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """A backend (``memory`` / ``null`` need ``size``; ``file`` needs ``path``, and creates
    the image with ``size`` when it does not exist) plus :class:`BlkDevice` settings."""

    backend: BackendKind = "memory"
    size: int | None = None
    path: str | os.PathLike[str] | None = None
    """Text once given (a path-like is turned into its text)."""
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 256
    device: BlkSettings = dataclasses.field(default_factory=BlkSettings)
    zoned: dict[str, Any] | None = None
    """Make the memory backend a host-managed zoned disk: :class:`ZonedMemoryBackend`
    keyword arguments (``zone_size``, ``max_open_zones``...); None for a regular disk."""
    workers: Literal["thread", "process"] | None = None
    """Where queues are served: None picks a process per queue, except for zoned disks
    (their zone state lives in one process, so their queues are threads)."""

    def __post_init__(self) -> None:
        path: object = self.path
        if isinstance(path, os.PathLike):  # a pathlib.Path is as good as its text
            object.__setattr__(self, "path", os.fspath(path))
        _check_types(self)

    def make_backend(self) -> Backend:
        """Open or create the storage."""
        if self.zoned is not None and self.backend != "memory":
            raise ValueError(f"zoned devices use the memory backend, not {self.backend}")
        if self.backend == "file":
            if not self.path:
                raise ValueError("the file backend needs a path")
            return FileBackend(self.path, read_only=self.read_only, create_size=self.size)
        if self.size is None or self.size <= 0:
            raise ValueError(f"the {self.backend} backend needs a size > 0")
        if self.zoned is not None:
            return ZonedMemoryBackend(self.size, **self.zoned)
        if self.backend == "memory":
            return MemoryBackend(self.size)
        if self.backend == "null":
            return NullBackend(self.size)
        raise ValueError(f"unknown backend {self.backend!r}: use memory, null or file")

    def build(self) -> BlkDevice:
        """The device over a new backend."""
        workers = self.workers or ("thread" if self.zoned is not None else "process")
        settings = dataclasses.asdict(self.device)
        settings["lifetime"] = self.device.lifetime  # asdict made it a dict
        if settings["poll_us"] is None:
            # A worker process may spin; a thread would hold the other queues' GIL.
            settings["poll_us"] = DEFAULT_POLL_US if workers == "process" else 0
        backend = self.make_backend()
        try:
            return BlkDevice(
                backend,
                num_queues=self.num_queues,
                queue_size=self.queue_size,
                read_only=self.read_only,
                workers=workers,
                **settings,
            )
        except BaseException:
            backend.close()
            raise

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, to hand the description to a child process."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceOptions:
        """The inverse of :meth:`to_dict`."""
        _refuse_unknown(cls, data, "DeviceOptions field")
        values = dict(data)
        values["device"] = BlkSettings.from_dict(values.get("device", {}))
        return cls(**values)


def _refuse_unknown(cls: type[Any], data: Mapping[str, Any], kind: str) -> None:
    """TypeError for the first name ``cls`` has no field for, with the closest one."""
    known = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def _check_types(instance: Any) -> None:
    """TypeError for the first field whose value its annotation does not admit."""
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
