"""How a device is described before it exists: one place for `virtblk serve` and the
embedded device to turn options into a backend and a :class:`BlkDevice`."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from virtblk.device.backends import Backend, FileBackend, MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.zoned import ZonedMemoryBackend
from virtblk.spec import Lifetime

BackendKind = Literal["memory", "null", "file"]

DEFAULT_POLL_US = 128.0
"""How long a queue worker process polls an empty ring before sleeping, unless told:
long enough to catch a driver's next request at queue depth 1 (its turnaround is 40-60 us
on the development machine), short enough that polling stops by itself under deep queues,
whose batches come further apart (see the README's polling figures)."""


@dataclasses.dataclass
class DeviceOptions:
    """A backend (``memory`` / ``null`` need ``size``; ``file`` needs ``path``, and creates
    the image with ``size`` when it does not exist) plus :class:`BlkDevice` settings."""

    backend: BackendKind = "memory"
    size: int | None = None
    path: str | None = None
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 256
    device: dict[str, Any] = dataclasses.field(default_factory=dict)
    zoned: dict[str, Any] | None = None
    """Make the memory backend a host-managed zoned disk: :class:`ZonedMemoryBackend`
    keyword arguments (``zone_size``, ``max_open_zones``...); None for a regular disk."""
    workers: Literal["thread", "process"] | None = None
    """Where queues are served: None picks a process per queue, except for zoned disks
    (their zone state lives in one process, so their queues are threads)."""

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
        settings = dict(self.device)
        if settings.get("poll_us") is None:
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
    def from_dict(cls, data: dict[str, Any]) -> DeviceOptions:
        """The inverse of :meth:`to_dict`: JSON turned the ``lifetime`` struct into a dict
        (and ``geometry`` into a list), which the device needs back as they were."""
        device = dict(data.get("device", {}))
        if isinstance(device.get("lifetime"), dict):
            device["lifetime"] = Lifetime(**device["lifetime"])
        if isinstance(device.get("geometry"), list):
            device["geometry"] = tuple(device["geometry"])
        return cls(**{**data, "device": device})
