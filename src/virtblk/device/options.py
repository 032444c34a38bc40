"""How a device is described before it exists: one place for `virtblk serve` and the
embedded device to turn options into a backend and a :class:`BlkDevice`.

The description crosses a process boundary (the embedded device's child gets it as JSON),
so every option is a typed field checked when the description is made: a misspelled or
mistyped option, or a value the device would refuse, fails in the process that gave it,
naming itself, instead of in a child that can only die.  The device's own settings are a
:class:`BlkSettings` (``virtblk.device.settings``, re-exported here), which judges
itself."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from typing import Any, Literal

from virtblk.device.backends import Backend, FileBackend, MemoryBackend, NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.nbd import NbdBackend, nbd_serial
from virtblk.device.rbd import RbdBackend, parse_image_spec  # Ceph's bindings load on use
from virtblk.device.settings import (
    ZONED_WORKERS_ERROR,
    BlkSettings,
    check_queues,
    check_types,
    refuse_unknown,
)
from virtblk.device.zoned import ZonedMemoryBackend
from virtblk.spec import VIRTIO_BLK_ID_BYTES

__all__ = ["DEFAULT_POLL_US", "BackendKind", "BlkSettings", "DeviceOptions"]

BackendKind = Literal["memory", "null", "file", "rbd", "nbd"]

DEFAULT_POLL_US = 128.0
"""How long a queue worker process polls an empty ring before sleeping, unless told:
long enough to catch a driver's next request at queue depth 1 (its turnaround is 40-60 us
on the development machine), short enough that polling stops by itself under deep queues,
whose batches come further apart (see the README's polling figures)."""


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """A backend (``memory`` / ``null`` need ``size``; ``file`` needs ``path``, and creates
    the image with ``size`` when it does not exist; ``rbd`` needs the image as ``path``,
    ``POOL/[NAMESPACE/]IMAGE[@SNAP]``, and creates it with ``size`` when it does not
    exist; ``nbd`` needs the export's URI as ``path``, the server tells the size) plus
    :class:`BlkDevice` settings."""

    backend: BackendKind = "memory"
    size: int | None = None
    path: str | os.PathLike[str] | None = None
    """The image file, the RBD image's spec, or the NBD export's URI. Text once given (a
    path-like is turned into its text)."""
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 256
    device: BlkSettings = dataclasses.field(default_factory=BlkSettings)
    zoned: dict[str, Any] | None = None
    """Make the memory backend a host-managed zoned disk: :class:`ZonedMemoryBackend`
    keyword arguments (``zone_size``, ``max_open_zones``...); None for a regular disk."""
    workers: Literal["thread", "process"] | None = None
    """Where queues are served: None picks a process per queue, except for zoned disks
    (their zone state lives in one process, so their queues are threads), RBD disks of
    several queues (one librbd client for all of them: a client per process would pass the
    image's exclusive lock back and forth at every write from another queue) and NBD disks
    (one connection carries all queues; ``process`` is refused for them)."""
    ceph_conf: str | None = None
    """RBD: the cluster's ``ceph.conf`` (None: librados' search, ``/etc/ceph/ceph.conf``)."""
    ceph_id: str | None = None
    """RBD: the client's name without ``client.`` (None: ``admin``), whose keyring the
    configuration names."""
    rbd_op_timeout: float | None = None
    """RBD: seconds after which a request the cluster does not answer fails (IOERR);
    None waits as librbd does, through any outage."""

    def __post_init__(self) -> None:
        path: object = self.path
        if isinstance(path, os.PathLike):  # a pathlib.Path is as good as its text
            object.__setattr__(self, "path", os.fspath(path))
        check_types(self)
        self._check_values()

    def _check_values(self) -> None:
        """ValueError (TypeError for a zoned option's name) for what the device or its
        storage would refuse and can be judged without opening, creating or allocating
        anything; the settings judged themselves.  What only the storage can tell (the
        image cannot be opened; a zone size that does not divide the disk) is left to
        :meth:`build`."""
        check_queues(self.num_queues, self.queue_size)
        if self.backend == "file":
            if not self.path:
                raise ValueError("the file backend needs a path")
        elif self.backend == "rbd":
            if not self.path:
                raise ValueError("the rbd backend needs an image (POOL/IMAGE)")
            parse_image_spec(os.fspath(self.path))
            if self.size is not None and self.size <= 0:
                raise ValueError(f"the rbd backend's size must be > 0, got {self.size}")
            if self.rbd_op_timeout is not None and self.rbd_op_timeout <= 0:
                raise ValueError(f"rbd_op_timeout must be > 0, got {self.rbd_op_timeout}")
        elif self.backend == "nbd":
            if not self.path:
                raise ValueError("the nbd backend needs an export's URI "
                                 "(nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
            nbd_serial(os.fspath(self.path))  # judges the URI
            if self.size is not None:
                raise ValueError("the nbd backend takes its size from the server, not size")
            if self.workers == "process":
                raise ValueError("the nbd backend serves its queues from threads: one NBD "
                                 "connection carries them all (workers='thread')")
        elif self.size is None or self.size <= 0:
            raise ValueError(f"the {self.backend} backend needs a size > 0")
        if self.backend != "rbd":
            for name in ("ceph_conf", "ceph_id", "rbd_op_timeout"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is an option of the rbd backend, not "
                                     f"{self.backend}")
        if self.zoned is not None:
            if self.backend != "memory":
                raise ValueError(f"zoned devices use the memory backend, not {self.backend}")
            if self.workers == "process":
                raise ValueError(ZONED_WORKERS_ERROR)
            # The names only: binding raises TypeError naming an unknown one.
            inspect.signature(ZonedMemoryBackend).bind(self.size, **self.zoned)

    def make_backend(self) -> Backend:
        """Open or create the storage (``virtblk.device.rbd.RbdError`` when an RBD image
        cannot be opened, ``virtblk.nbd.client.NbdError`` when an NBD export cannot)."""
        if self.backend == "file":
            assert self.path is not None  # _check_values saw to both
            return FileBackend(self.path, read_only=self.read_only, create_size=self.size)
        if self.backend == "nbd":
            assert self.path is not None
            return NbdBackend(os.fspath(self.path), read_only=self.read_only)
        if self.backend == "rbd":
            assert self.path is not None
            return RbdBackend(os.fspath(self.path), conf=self.ceph_conf, client_id=self.ceph_id,
                              read_only=self.read_only, create_size=self.size,
                              op_timeout=self.rbd_op_timeout)
        assert self.size is not None
        if self.zoned is not None:
            return ZonedMemoryBackend(self.size, **self.zoned)
        if self.backend == "memory":
            return MemoryBackend(self.size)
        return NullBackend(self.size)

    def build(self) -> BlkDevice:
        """The device over a new backend."""
        workers = self.workers or (
            "thread" if self.zoned is not None or self.backend == "nbd"
            or (self.backend == "rbd" and self.num_queues > 1) else "process")
        settings = self.device.as_kwargs()
        if self.backend == "rbd" and not settings["serial"]:
            settings["serial"] = rbd_serial(os.fspath(self.path or ""))
        if self.backend == "nbd" and not settings["serial"]:
            settings["serial"] = nbd_serial(os.fspath(self.path or ""))
        if settings["poll_us"] is None:
            # A worker process may spin; a thread would hold the other queues' GIL.
            settings["poll_us"] = DEFAULT_POLL_US if workers == "process" else 0
        backend = self.make_backend()
        if isinstance(backend, NbdBackend) and settings["blk_size"] < backend.export.min_block:
            # The server refuses smaller requests: the guest must not make them.
            settings["blk_size"] = backend.export.min_block
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

    def describe(self) -> str:
        """What is served, for a log line: ``rbd rbd/vm1``, ``file /x.img``, ``memory``."""
        return f"{self.backend} {self.path}" if self.path else self.backend

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, to hand the description to a child process."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceOptions:
        """The inverse of :meth:`to_dict`."""
        refuse_unknown(cls, data, "DeviceOptions field")
        values = dict(data)
        values["device"] = BlkSettings.from_dict(values.get("device", {}))
        return cls(**values)


def rbd_serial(spec: str) -> str:
    """The GET_ID answer of an RBD disk given no serial: the image's name (its last 20
    bytes, where the names of a cloud's images differ), so a guest's
    ``/dev/disk/by-id/virtio-*`` names the image."""
    name = parse_image_spec(spec)[2]
    return name.encode("ascii", "replace").decode("ascii")[-VIRTIO_BLK_ID_BYTES:]
