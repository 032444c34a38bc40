"""The device side of vhost-user as a sans-IO state machine over a ``VhostUserDevice``.

``BackendConnection`` is fed the bytes and fds the frontend sent (``receive_data``) and
hands back, one at a time, replies to send and protocol violations (``next_event``); or it
is given decoded messages directly (``handle``).  It owns everything the frontend hands
over: the memory table (mapped into a ``GuestMemory``), the per-ring state and every fd,
and it drives the device: ``start_queue`` when a ring becomes ready, ``stop_queue`` on
GET_VRING_BASE, ``reset`` when the session ends.

Ring life cycle (vhost-user.rst "Ring states", as libvhost-user implements it): a ring is
*started* by SET_VRING_KICK and *stopped* by GET_VRING_BASE; it is *enabled* from the
start when VHOST_USER_F_PROTOCOL_FEATURES was not acked, else only after
SET_VRING_ENABLE(1).  The device runs the ring while it is started and enabled; for a
block device "started but disabled" (process without side effects) means "not serving".

Packed rings: when VIRTIO_F_RING_PACKED is acked, every ring is packed (VIRTIO 1.1+ 2.8):
its three areas, sizes and queue size rule are ``packed_layout``'s, SET/GET_VRING_BASE
carry QEMU's 32-bit base (avail position and wrap counter in bits 0-15, used position and
wrap counter in 16-31) and the device is given a ``PackedDeviceVirtqueue``.  The in-flight
buffer is laid out for the rings SET_FEATURES acked when GET_INFLIGHT_FD makes it (QEMU
sends SET_FEATURES first) and checked for them by SET_INFLIGHT_FD: a packed ring records
its chains whole (``inflight_packed``), and a restarted ring resumes where that journal
says, whatever SET_VRING_BASE said (QEMU 7.2 keeps no packed ring position of its own
across a backend crash: it sends the base it last started the ring with).

Errors: every check the spec allows us is made (ring index below ``num_queues``, ring size
as the ring layout's ``check_queue_size`` allows, ring addresses inside the memory table, memory
regions not overlapping and not more than GET_MAX_MEM_SLOTS, ring/memory requests only
after SET_OWNER as the kernel's vhost requires, features that were offered).  A bad message is
answered if an answer is due (a NACK when REPLY_ACK asked for one) and then reported as a
``ProtocolViolation`` event.  The state machine stays consistent, but our server drops the
connection on the first violation, as qemu-storage-daemon does: a frontend that sends
garbage is not trusted with the device.  Requests the device itself refuses (a config
read past its end, a config write it rejects) are answered with a failure, not a
violation.

File descriptors: a message owns its fds (``OwnedFd``).  ``handle`` takes the ones the
connection keeps (``message.fd.take()``, into an ``OwnedFd`` of its own) and closes the
message when it is done, whatever happened, so the fds of a refused message, and the
stray fd an old frontend attaches to REM_MEM_REG, are closed there and nowhere else.  The
device only borrows the ring eventfds: the connection stops a ring before it closes them.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from virtblk.spec import (
    Feature,
    has_feature,
)
from virtblk.vhost_user.codec import CLOSED, Decoder, Event, Sentinel, encode
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd, close_all
from virtblk.vhost_user.messages import (
    Ack,
    AddMemReg,
    Channel,
    ConfigChangeMsg,
    GetConfig,
    GetConfigFailed,
    GetConfigReply,
    GetFeatures,
    GetFeaturesReply,
    GetInflightFd,
    GetInflightFdReply,
    GetMaxMemSlots,
    GetMaxMemSlotsReply,
    GetProtocolFeatures,
    GetProtocolFeaturesReply,
    GetQueueNum,
    GetQueueNumReply,
    GetVringBase,
    GetVringBaseReply,
    Message,
    ProtocolFeature,
    RemMemReg,
    ResetDevice,
    ResetOwner,
    SetBackendReqFd,
    SetConfig,
    SetFeatures,
    SetInflightFd,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringErr,
    SetVringKick,
    SetVringNum,
    protocol_feature_names,
)
from virtblk.virtio import packed_layout, split_layout
from virtblk.virtio.inflight import InflightError, InflightJournal, queue_region_size
from virtblk.virtio.inflight_packed import (
    PackedInflightJournal,
    RecoveredChain,
    inflight_region_size,
)
from virtblk.virtio.memory import GuestMemory, GuestMemoryError, MemoryRegion
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.split_device import DeviceVirtqueue, RingError
from virtblk.virtio.split_layout import VringAddrs

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "DEFAULT_PROTOCOL_FEATURES",
    "WITHOUT_INFLIGHT",
    "BackendConnection",
    "ProtocolViolation",
    "VhostUserDevice",
    "inflight_queue_size",
]

log = logging.getLogger(__name__)

DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.BACKEND_REQ.mask
    | ProtocolFeature.CONFIG.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.RESET_DEVICE.mask
    | ProtocolFeature.INFLIGHT_SHMFD.mask
)
"""What we offer by default.  INFLIGHT_SHMFD: requests in flight are recorded in a buffer
the frontend keeps, and a device restarted on it resubmits them (``virtio.inflight``)."""
SUPPORTED_PROTOCOL_FEATURES = DEFAULT_PROTOCOL_FEATURES
WITHOUT_INFLIGHT = DEFAULT_PROTOCOL_FEATURES & ~ProtocolFeature.INFLIGHT_SHMFD.mask
"""The default without INFLIGHT_SHMFD (``virtblk serve --no-inflight``): as
qemu-storage-daemon 7.2, a restarted device knows nothing of what was in flight."""
DEFAULT_MAX_MEM_SLOTS = 32
"""Regions we accept (libvhost-user's VHOST_USER_MAX_RAM_SLOTS)."""


class VhostUserDevice(Protocol):
    """What a device model offers the vhost-user backend (``BlkDevice`` implements it).

    ``features`` includes VHOST_USER_F_PROTOCOL_FEATURES.  ``start_queue`` serves ``vq``,
    a split or (VIRTIO_F_RING_PACKED acked) a packed ring (kicks arrive on ``kick_fd``;
    ``call_fd`` is -1 when the frontend polls instead of taking notifications); the fds
    stay owned by the connection.  ``stop_queue`` stops serving and returns the ring's
    ``vring_base``: the next avail index of a split ring, the 32-bit packed base of a
    packed one (``packed_layout.encode_vring_base``).  ``config_changed`` is installed by the
    connection: the device calls it when its config space changed by itself.  ``failed``
    too: the device calls it (from any thread) when it can no longer serve this frontend
    correctly (a queue's worker died with requests in hand); the connection then ends.
    """

    features: int
    num_queues: int
    config_changed: Callable[[], None] | None
    failed: Callable[[str], None] | None

    def config(self) -> bytes: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def set_features(self, features: int) -> None: ...
    def start_queue(self, index: int, vq: DeviceVirtqueue | PackedDeviceVirtqueue,
                    kick_fd: int, call_fd: int) -> None: ...
    def stop_queue(self, index: int) -> int: ...
    def reset(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The frontend broke the protocol; the caller should drop the connection."""

    error: ProtocolError


BackendEvent = Message | ProtocolViolation | Sentinel


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one split queue's inflight region: header + one DescStateSplit per entry,
    rounded to 64 (vhost-user.rst "Inflight I/O tracking")."""
    return queue_region_size(queue_size)


@dataclasses.dataclass
class _Inflight:
    """The in-flight buffer SET_INFLIGHT_FD handed over: one region per queue, in the
    layout of the rings acked then (``packed``); nothing in the buffer says which."""

    region: MemoryRegion
    num_queues: int
    queue_size: int
    packed: bool

    @property
    def layout(self) -> str:
        """The ring kind the buffer is laid out for, as the errors name it."""
        return "packed" if self.packed else "split"

    def _offset(self, index: int) -> int:
        return index * inflight_region_size(self.queue_size, packed=self.packed)

    def journal(self, index: int) -> InflightJournal:
        """Queue ``index``'s split region (the caller checked the index, the ring size
        and the layout)."""
        return InflightJournal.in_region(self.region, self._offset(index), self.queue_size)

    def packed_journal(self, index: int) -> PackedInflightJournal:
        """Queue ``index``'s packed region (the caller checked as for ``journal``)."""
        return PackedInflightJournal.in_region(self.region, self._offset(index),
                                               self.queue_size)


@dataclasses.dataclass
class _Vring:
    """What the frontend told us about one ring (addresses are frontend user addresses)."""

    num: int = 0
    base: int | None = None  # None: never set (a split ring's 0, a packed ring's fresh base)
    desc_uva: int | None = None
    avail_uva: int | None = None
    used_uva: int | None = None
    kick_fd: OwnedFd | None = None
    call_fd: OwnedFd | None = None
    err_fd: OwnedFd | None = None
    started: bool = False  # SET_VRING_KICK seen, no GET_VRING_BASE since
    enabled: bool | None = None  # None: never set by SET_VRING_ENABLE
    running: bool = False  # the device serves it

    def close_fds(self) -> None:
        close_all((self.kick_fd, self.call_fd, self.err_fd))
        self.kick_fd = self.call_fd = self.err_fd = None


_NEEDS_OWNER = (
    SetFeatures, SetMemTable, AddMemReg, RemMemReg, SetVringNum, SetVringAddr, SetVringBase,
    GetVringBase, SetVringKick, SetVringCall, SetVringErr, SetVringEnable, GetInflightFd,
    SetInflightFd, ResetOwner, ResetDevice,
)  # fmt: skip
_NEEDS_PROTOCOL_FEATURE: dict[type[Message], ProtocolFeature] = {
    GetConfig: ProtocolFeature.CONFIG,
    SetConfig: ProtocolFeature.CONFIG,
    SetBackendReqFd: ProtocolFeature.BACKEND_REQ,
    GetMaxMemSlots: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    AddMemReg: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    RemMemReg: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    GetInflightFd: ProtocolFeature.INFLIGHT_SHMFD,
    SetInflightFd: ProtocolFeature.INFLIGHT_SHMFD,
    ResetDevice: ProtocolFeature.RESET_DEVICE,
}


def _replace(held: OwnedFd | None, new: OwnedFd | None) -> OwnedFd | None:
    """What to hold instead of ``held`` (closed now): ``new`` taken out of its message, so
    the message's close no longer touches it."""
    if held is not None:
        held.close()
    return None if new is None else OwnedFd(new.take())


_FRESH_PACKED = packed_layout.PackedRingBase(0, True, 0, True)
"""Where a packed ring starts after a reset: position 0, both wrap counters 1."""


def _used_before(descriptor: memoryview) -> bool:
    """Whether a packed ring's first descriptor shows the ring is not fresh: marked used
    in lap 1, or made available in lap 0 (a fresh ring's descriptors are zero, or the first
    made available in lap 1; zero flags cannot tell a fresh ring from one used in lap 0)."""
    flags = descriptor.cast("H")[packed_layout.FLAGS_SLOT] & packed_layout.AVAIL_USED
    return flags in (packed_layout.used_bits(True), packed_layout.avail_bits(False))


class BackendConnection:
    """One frontend session over ``device``.

    Not thread-safe except ``config_changed`` (called by device threads), which only
    queues a message for the backend channel and calls ``wakeup``.
    """

    def __init__(
        self,
        device: VhostUserDevice,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        accept_unsealed_memory: bool = False,
    ) -> None:
        """Serve ``device``, offering ``protocol_features`` (a subset of what we support)."""
        unsupported = protocol_features & ~SUPPORTED_PROTOCOL_FEATURES
        if unsupported:
            raise ValueError(
                f"protocol features not implemented: {protocol_feature_names(unsupported)}"
            )
        self.device = device
        self.offered_protocol_features = protocol_features
        self.max_mem_slots = max_mem_slots
        self.accept_unsealed_memory = accept_unsealed_memory
        """Map guest memory whose file can still be shrunk (a frontend that shrinks it kills
        the device with SIGBUS): off unless the user takes that risk."""
        self.protocol_features = 0
        """What SET_PROTOCOL_FEATURES enabled."""
        self.acked_features: int | None = None
        """What SET_FEATURES acknowledged (None before)."""
        self.owned = False
        self.memory: GuestMemory | None = None
        self.vrings = [_Vring() for _ in range(device.num_queues)]
        self.backend_req: OwnedFd | None = None
        """The backend channel's socket (SET_BACKEND_REQ_FD); the shell sends on a dup."""
        self.inflight_fd: OwnedFd | None = None
        """The buffer GET_INFLIGHT_FD made (until SET_INFLIGHT_FD hands one over)."""
        self.inflight: _Inflight | None = None
        """The buffer SET_INFLIGHT_FD handed over, mapped: rings record requests in it."""
        self.resubmitted = [0] * device.num_queues
        """Requests each ring resubmitted from the in-flight buffer (this session)."""
        self.wakeup: Callable[[], None] = lambda: None
        """Called (from any thread) when ``backend_data_to_send`` has something."""
        self._decoder = Decoder(Channel.MAIN)
        self._backend_decoder = Decoder(Channel.BACKEND)
        self._events: collections.deque[BackendEvent] = collections.deque()
        self._backend_lock = threading.Lock()
        self._backend_outbox: list[tuple[bytes, list[int]]] = []
        self.backend_acks_pending = 0
        self.closed = False
        self.failure: str | None = None
        """Why the device cannot go on with this frontend (``device_failed``), if so."""
        device.config_changed = self.config_changed
        device.failed = self.device_failed

    # ------------------------------------------------------------------ byte interface

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what the main socket returned (``b""`` at EOF); takes ownership of fds."""
        self._decoder.receive_data(data, fds)

    def next_event(self) -> BackendEvent:
        """The next reply to send, a ProtocolViolation, NEED_DATA or CLOSED.

        A reply owns its fds (GET_INFLIGHT_FD's is a dup of the buffer we keep): send it,
        then close it.
        """
        while not self._events:
            try:
                event: Event = self._decoder.next_event()
            except ProtocolError as exc:
                return ProtocolViolation(exc)
            if not isinstance(event, Message):
                return event
            if event.IS_REPLY:
                event.close()
                return ProtocolViolation(
                    ProtocolError(f"frontend sent a reply ({event.name}) on the main channel")
                )
            self._process(event)
        return self._events.popleft()

    def _process(self, message: Message) -> None:
        try:
            reply = self.handle(message)
        except ProtocolError as exc:
            if self._wants_ack(message):
                self._events.append(Ack(message.code, 1))
            self._events.append(ProtocolViolation(exc))
            return
        if reply is not None:
            self._events.append(reply)

    def _wants_ack(self, message: Message) -> bool:
        return message.wants_ack and bool(
            self.protocol_features & ProtocolFeature.REPLY_ACK.mask
        )

    # ------------------------------------------------------------------ message interface

    def handle(self, message: Message) -> Message | None:
        """Apply one frontend request; return the reply to send, if any.

        Takes the message: the fds the connection keeps are taken out of it, the rest
        are closed here (all of them when the request is refused).  Raises ProtocolError
        for a request the protocol forbids.  When REPLY_ACK asked for an ack and the
        request has no reply of its own, the reply is an ``Ack``.
        """
        log.debug("<- %r", message)
        with message:  # closes what the handlers did not take, whatever happens
            self._check_allowed(message)
            reply = self._dispatch(message)
        if reply is None and self._wants_ack(message):
            return Ack(message.code, 0)
        if isinstance(reply, _Nack):
            return Ack(message.code, 1) if self._wants_ack(message) else None
        return reply

    def _check_allowed(self, message: Message) -> None:
        if isinstance(message, _NEEDS_OWNER) and not self.owned:
            raise ProtocolError(f"{message.name} before SET_OWNER")
        feature = _NEEDS_PROTOCOL_FEATURE.get(type(message))
        if feature is not None and not self.protocol_features & feature.mask:
            raise ProtocolError(
                f"{message.name} needs protocol feature {feature.name}, not negotiated"
            )

    def _dispatch(self, message: Message) -> Message | _Nack | None:
        match message:
            case GetFeatures():
                return GetFeaturesReply(self.device.features)
            case SetFeatures(value=features):
                self._set_features(features)
            case GetProtocolFeatures():
                return GetProtocolFeaturesReply(self.offered_protocol_features)
            case SetProtocolFeatures(value=features):
                self._set_protocol_features(features)
            case SetOwner():
                self.owned = True
            case ResetOwner():
                self._stop_all_rings()
            case ResetDevice():
                self._reset_device()
            case GetQueueNum():
                return GetQueueNumReply(self.device.num_queues)
            case GetMaxMemSlots():
                return GetMaxMemSlotsReply(self.max_mem_slots)
            case SetMemTable():
                self._set_mem_table(message)
            case AddMemReg():
                self._add_mem_reg(message)
            case RemMemReg():
                self._rem_mem_reg(message)
            case SetVringNum(index=index, num=num):
                self._set_vring_num(index, num)
            case SetVringBase(index=index, num=num):
                self._set_vring_base(index, num)
            case SetVringAddr():
                self._set_vring_addr(message)
            case GetVringBase(index=index):
                return GetVringBaseReply(index, self._get_vring_base(index))
            case SetVringKick(index=index, fd=fd):
                self._set_vring_kick(index, fd)
            case SetVringCall(index=index, fd=fd):
                self._set_vring_call(index, fd)
            case SetVringErr(index=index, fd=fd):
                ring = self._ring(index, "SET_VRING_ERR")
                ring.err_fd = _replace(ring.err_fd, fd)
            case SetVringEnable(index=index, enable=enable):
                self._set_vring_enable(index, enable)
            case GetConfig():
                return self._get_config(message)
            case SetConfig():
                return self._set_config(message)
            case SetBackendReqFd(fd=fd):
                self._close_backend_channel()
                self.backend_req = _replace(None, fd)
            case GetInflightFd():
                return self._get_inflight_fd(message)
            case SetInflightFd():
                self._set_inflight_fd(message)
            case _:
                raise ProtocolError(f"{message.name} is not supported by this backend")
        return None

    # ------------------------------------------------------------------ features

    def _set_features(self, features: int) -> None:
        extra = features & ~self.device.features
        if extra:
            raise ProtocolError(
                f"SET_FEATURES {features:#x} acks bits never offered: {extra:#x} "
                f"(offered {self.device.features:#x})"
            )
        try:
            self.device.set_features(features)
        except ValueError as exc:
            raise ProtocolError(f"SET_FEATURES {features:#x}: device refused: {exc}") from exc
        self.acked_features = features

    def _set_protocol_features(self, features: int) -> None:
        extra = features & ~self.offered_protocol_features
        if extra:
            raise ProtocolError(
                f"SET_PROTOCOL_FEATURES enables {protocol_feature_names(extra)}, never offered"
            )
        self.protocol_features = features

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was acked: every ring is a packed ring."""
        return self.acked_features is not None and has_feature(
            self.acked_features, Feature.RING_PACKED
        )

    @property
    def _may_be_packed(self) -> bool:
        """Rings may be packed: VIRTIO_F_RING_PACKED was acked, or, before SET_FEATURES
        (QEMU sends it first, other frontends need not), it is offered.  What is judged by
        this is judged again when a ring starts, against what was acked."""
        if self.acked_features is not None:
            return self.packed
        return has_feature(self.device.features, Feature.RING_PACKED)

    def _check_queue_size(self, num: int) -> None:
        """ValueError unless ``num`` is a queue size the ring kind allows."""
        (packed_layout if self._may_be_packed else split_layout).check_queue_size(num)

    @property
    def event_idx(self) -> bool:
        """VIRTIO_F_RING_EVENT_IDX was acked."""
        return self.acked_features is not None and has_feature(
            self.acked_features, Feature.RING_EVENT_IDX
        )

    def _rings_start_enabled(self) -> bool:
        acked = self.acked_features or 0
        return not has_feature(acked, Feature.VHOST_USER_PROTOCOL_FEATURES)

    # ------------------------------------------------------------------ memory

    def _set_mem_table(self, message: SetMemTable) -> None:
        if len(message.regions) > self.max_mem_slots:
            raise ProtocolError(
                f"SET_MEM_TABLE: {len(message.regions)} regions, at most {self.max_mem_slots}"
            )
        memory = GuestMemory()
        try:
            for desc, fd in zip(message.regions, message.fds, strict=True):
                region = MemoryRegion.map_fd(
                    fd.take(),
                    size=desc.memory_size,
                    mmap_offset=desc.mmap_offset,
                    guest_phys_addr=desc.guest_phys_addr,
                    user_addr=desc.userspace_addr,
                    require_sealed=not self.accept_unsealed_memory,
                )
                try:
                    memory.add(region)
                except GuestMemoryError:
                    region.close()
                    raise
        except GuestMemoryError as exc:
            memory.close()
            raise ProtocolError(f"SET_MEM_TABLE: {exc}") from exc
        paused = self._pause_running()
        old, self.memory = self.memory, memory
        if old is not None:
            old.close()
        self._resume(paused)

    def _add_mem_reg(self, message: AddMemReg) -> None:
        count = len(self.memory.regions) if self.memory is not None else 0
        if count >= self.max_mem_slots:
            raise ProtocolError(f"ADD_MEM_REG: all {self.max_mem_slots} memory slots are used")
        desc = message.region
        try:
            region = MemoryRegion.map_fd(
                message.fd.take(),
                size=desc.memory_size,
                mmap_offset=desc.mmap_offset,
                guest_phys_addr=desc.guest_phys_addr,
                user_addr=desc.userspace_addr,
                require_sealed=not self.accept_unsealed_memory,
            )
        except GuestMemoryError as exc:
            raise ProtocolError(f"ADD_MEM_REG: {exc}") from exc
        paused = self._pause_running()
        try:
            if self.memory is None:
                self.memory = GuestMemory()
            self.memory.add(region)
        except GuestMemoryError as exc:
            region.close()
            raise ProtocolError(f"ADD_MEM_REG: {exc}") from exc
        finally:
            self._resume(paused)

    def _rem_mem_reg(self, message: RemMemReg) -> None:
        desc = message.region
        match = [
            r
            for r in (self.memory.regions if self.memory is not None else ())
            if r.guest_phys_addr == desc.guest_phys_addr
            and r.size == desc.memory_size
            and r.user_addr == desc.userspace_addr
        ]
        if self.memory is None or not match:
            raise ProtocolError(
                f"REM_MEM_REG: no region at gpa {desc.guest_phys_addr:#x} size "
                f"{desc.memory_size:#x} user address {desc.userspace_addr:#x}"
            )
        paused = self._pause_running()
        self.memory.remove(desc.guest_phys_addr, desc.memory_size).close()
        self._resume(paused)

    # ------------------------------------------------------------------ rings

    def _ring(self, index: int, what: str) -> _Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(
                f"{what}: ring index {index} out of range "
                f"(the device has {len(self.vrings)} queues)"
            )
        return self.vrings[index]

    @staticmethod
    def _not_running(index: int, ring: _Vring, what: str) -> None:
        if ring.running:
            raise ProtocolError(f"{what}: ring {index} is running; stop it with GET_VRING_BASE")

    def _set_vring_num(self, index: int, num: int) -> None:
        ring = self._ring(index, "SET_VRING_NUM")
        self._not_running(index, ring, "SET_VRING_NUM")
        try:
            self._check_queue_size(num)
        except ValueError as exc:
            raise ProtocolError(f"SET_VRING_NUM: ring {index}: {exc}") from exc
        ring.num = num

    def _set_vring_base(self, index: int, base: int) -> None:
        """A split ring's base is its next avail index (16 bits); a packed ring's is 32
        bits (``packed_layout.decode_vring_base``), checked against the ring when it
        starts."""
        ring = self._ring(index, "SET_VRING_BASE")
        self._not_running(index, ring, "SET_VRING_BASE")
        if base > 0xFFFF and not self._may_be_packed:
            raise ProtocolError(f"SET_VRING_BASE: ring {index} base {base} is not a 16-bit index")
        ring.base = base

    def _ring_base(self, ring: _Vring) -> int:
        """What SET_VRING_BASE said, or where a fresh ring starts: index 0 of a split
        ring, position 0 with both wrap counters 1 of a packed one."""
        if ring.base is not None:
            return ring.base
        if self.packed:
            return packed_layout.encode_vring_base(_FRESH_PACKED)
        return 0

    def _set_vring_addr(self, message: SetVringAddr) -> None:
        ring = self._ring(message.index, "SET_VRING_ADDR")
        self._not_running(message.index, ring, "SET_VRING_ADDR")
        if self.memory is None:
            raise ProtocolError(f"SET_VRING_ADDR for ring {message.index} before a memory table")
        uvas = (message.desc_user_addr, message.avail_user_addr, message.used_user_addr)
        self._translate(message.index, max(ring.num, 1), *uvas)
        ring.desc_uva, ring.avail_uva, ring.used_uva = uvas

    def _translate(self, index: int, num: int, desc: int, avail: int, used: int) -> VringAddrs:
        """Ring user addresses -> guest addresses; the whole of each area must be mapped
        (the areas and their sizes are the negotiated ring kind's)."""
        assert self.memory is not None
        gpas: list[int] = []
        if self.packed:
            areas, sizes = packed_layout.RING_AREAS, packed_layout.ring_sizes(num)
        else:
            areas, sizes = split_layout.RING_AREAS, split_layout.ring_sizes(num)
        for (name, align), uva, length in zip(areas, (desc, avail, used), sizes, strict=True):
            try:
                gpa = self.memory.user_to_guest(uva, length)
            except GuestMemoryError as exc:
                raise ProtocolError(f"ring {index} {name}: {exc}") from exc
            if gpa % align:
                raise ProtocolError(f"ring {index} {name} at {gpa:#x} is not {align}-aligned")
            gpas.append(gpa)
        return VringAddrs(num=num, desc=gpas[0], avail=gpas[1], used=gpas[2])

    def _set_vring_kick(self, index: int, fd: OwnedFd | None) -> None:
        ring = self._ring(index, "SET_VRING_KICK")
        if fd is None:
            raise ProtocolError(f"SET_VRING_KICK: ring {index} without a kick fd (polling mode)")
        self._stop_ring(index)  # a new kick fd for a running ring: restart it on the new fd
        ring.kick_fd = _replace(ring.kick_fd, fd)
        ring.started = True
        self._maybe_start(index)

    def _set_vring_call(self, index: int, fd: OwnedFd | None) -> None:
        ring = self._ring(index, "SET_VRING_CALL")
        # The device has no "swap the call fd" hook: restart the ring around the change.
        was_running = self._stop_ring(index)
        ring.call_fd = _replace(ring.call_fd, fd)
        if was_running:
            self._maybe_start(index)

    def _set_vring_enable(self, index: int, enable: bool) -> None:
        ring = self._ring(index, "SET_VRING_ENABLE")
        ring.enabled = enable
        if enable:
            self._maybe_start(index)
        else:
            self._stop_ring(index)

    def _get_vring_base(self, index: int) -> int:
        ring = self._ring(index, "GET_VRING_BASE")
        self._stop_ring(index)
        ring.started = False
        close_all((ring.kick_fd, ring.call_fd))
        ring.kick_fd = ring.call_fd = None
        return self._ring_base(ring)

    def _maybe_start(self, index: int) -> None:
        """Start the device on ring ``index`` if it is started, enabled and complete."""
        ring = self.vrings[index]
        enabled = ring.enabled if ring.enabled is not None else self._rings_start_enabled()
        if ring.running or not ring.started or not enabled:
            return
        if self.memory is None or ring.num == 0 or ring.desc_uva is None:
            raise ProtocolError(
                f"ring {index} started without "
                + ("a memory table" if self.memory is None else "its size and addresses")
            )
        assert ring.avail_uva is not None and ring.used_uva is not None
        assert ring.kick_fd is not None
        try:
            self._check_queue_size(ring.num)  # SET_VRING_NUM may have come before SET_FEATURES
        except ValueError as exc:
            raise ProtocolError(f"ring {index}: {exc}") from exc
        addrs = self._translate(index, ring.num, ring.desc_uva, ring.avail_uva, ring.used_uva)
        vq = self._packed_ring(index, addrs) if self.packed else self._split_ring(index, addrs)
        call_fd = -1 if ring.call_fd is None else ring.call_fd.fileno()
        try:
            self.device.start_queue(index, vq, ring.kick_fd.fileno(), call_fd)
        except ValueError as exc:
            raise ProtocolError(f"ring {index}: the device refused to start it: {exc}") from exc
        ring.running = True

    def _split_ring(self, index: int, addrs: VringAddrs) -> DeviceVirtqueue:
        """Ring ``index`` as a split ring, where the in-flight buffer or the base says."""
        assert self.memory is not None
        # The used index lives in guest memory: read it (one aligned 16-bit load) so a
        # restarted ring continues where the device left off.
        used_idx = int(self.memory.view(addrs.used + 2, 2).cast("H")[0])
        journal, last_avail, resubmit = self._recover(index, addrs, used_idx)
        try:
            return DeviceVirtqueue(
                self.memory,
                addrs,
                event_idx=self.event_idx,
                last_avail_idx=last_avail,
                used_idx=used_idx,
                inflight=journal,
                resubmit=resubmit,
            )
        except RingError as exc:
            raise ProtocolError(f"ring {index}: {exc}") from exc

    def _packed_ring(self, index: int, addrs: VringAddrs) -> PackedDeviceVirtqueue:
        """Ring ``index`` as a packed ring, where its journal in the in-flight buffer or
        (without one) its base says: a packed ring has no index in memory to read."""
        assert self.memory is not None
        try:
            base = packed_layout.decode_vring_base(self._ring_base(self.vrings[index]))
        except ValueError as exc:
            raise ProtocolError(f"ring {index}: {exc}") from exc
        journal, base, resubmit = self._recover_packed(index, addrs, base)
        try:
            return PackedDeviceVirtqueue(self.memory, addrs, event_idx=self.event_idx,
                                         inflight=journal, resubmit=resubmit,
                                         **base._asdict())
        except RingError as exc:
            raise ProtocolError(f"ring {index}: {exc}") from exc

    def _inflight_for(self, index: int, ring: _Vring) -> _Inflight | None:
        """The in-flight buffer ring ``index`` records in, checked against the ring: None
        when there is none (or no region for this ring); ProtocolError when the buffer
        was made for another ring size or the other ring layout."""
        inflight = self.inflight
        if inflight is None or not self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD.mask:
            return None
        if index >= inflight.num_queues:
            log.warning("ring %d has no region in the in-flight buffer (%d queues): not "
                        "tracked", index, inflight.num_queues)
            return None
        if ring.num != inflight.queue_size:
            raise ProtocolError(
                f"ring {index} has {ring.num} entries, the in-flight buffer was made for "
                f"queues of {inflight.queue_size}")
        if inflight.packed != self.packed:
            raise ProtocolError(
                f"ring {index} is a {'packed' if self.packed else 'split'} ring, the "
                f"in-flight buffer was laid out for {inflight.layout} rings (the features "
                "acked changed after SET_INFLIGHT_FD)")
        return inflight

    def _recover_packed(
        self, index: int, addrs: VringAddrs, base: packed_layout.PackedRingBase
    ) -> tuple[PackedInflightJournal | None, packed_layout.PackedRingBase,
               tuple[RecoveredChain, ...]]:
        """Ring ``index``'s packed journal, where to resume and the chains to resubmit
        (``PackedInflightJournal.recover``).

        Run at every start.  The journal's positions win over ``base``: after a backend
        crash QEMU 7.2 sends the base it last started the ring with (for a first start,
        the initial one), and nothing in a packed ring's memory says where the device
        was.  Without a journal, a ring started at its initial position whose first
        descriptor was used already cannot be resumed, and the log says so.
        """
        assert self.memory is not None
        ring = self.vrings[index]
        inflight = self._inflight_for(index, ring)
        if inflight is None:
            self._check_resumable(index, addrs, base, "the frontend gave no in-flight "
                                  "buffer (INFLIGHT_SHMFD) region for it to resume from")
            return None, base, ()
        journal = inflight.packed_journal(index)
        try:
            recovery = journal.recover(self.memory.view(addrs.desc, 16 * addrs.num), base)
        except InflightError as exc:
            raise ProtocolError(f"ring {index}: in-flight buffer refused: {exc}") from exc
        if recovery.base is None:
            self._check_resumable(index, addrs, base, "the in-flight buffer it gave is "
                                  "new and holds no position")
            return journal, base, ()
        self._log_recovery(index, recovery.settled, len(recovery.resubmit))
        if recovery.base != base:
            log.debug("queue %d: packed ring base %#x from the in-flight buffer (frontend "
                      "said %#x)", index, packed_layout.encode_vring_base(recovery.base),
                      packed_layout.encode_vring_base(base))
        return journal, recovery.base, recovery.resubmit

    def _check_resumable(self, index: int, addrs: VringAddrs,
                         base: packed_layout.PackedRingBase, why: str) -> None:
        """Log an error when a packed ring is started at its initial position while its
        first descriptor shows it was used: a device restarted under a running driver
        with nothing to tell it where the ring is (the ring still starts: the frontend
        decides what to do with a queue that does not answer)."""
        assert self.memory is not None
        if base == _FRESH_PACKED and _used_before(self.memory.view(addrs.desc, 16)):
            log.error("ring %d: the frontend starts a packed ring at its initial position, "
                      "but its first descriptor was used already: a device restarted under "
                      "a running driver, and %s; this queue will not resume", index, why)

    def _log_recovery(self, index: int, settled: int, resubmit: int) -> None:
        """Say what a ring's recovery from the in-flight buffer found, and count it."""
        if settled:
            log.info("queue %d: %d requests answered before the restart settled in the "
                     "in-flight buffer", index, settled)
        if resubmit:
            log.info("queue %d: resubmitting %d in-flight requests", index, resubmit)
            self.resubmitted[index] += resubmit

    def _recover(
        self, index: int, addrs: VringAddrs, used_idx: int
    ) -> tuple[InflightJournal | None, int, tuple[int, ...]]:
        """Ring ``index``'s journal in the in-flight buffer, where to take avail entries
        from and the heads to resubmit (libvhost-user's ``vu_check_queue_inflights``).

        Run at every start, so a ring stopped and started again in one session, or a
        device restarted after a crash, continues from what the buffer says: with requests
        still in flight, the next avail index is the used idx plus their number, whatever
        SET_VRING_BASE said (QEMU sends the used idx after a backend crash).
        """
        ring = self.vrings[index]
        base = self._ring_base(ring)
        inflight = self._inflight_for(index, ring)
        if inflight is None:
            return None, base, ()
        assert self.memory is not None
        avail_idx = int(self.memory.view(addrs.avail + 2, 2).cast("H")[0])
        journal = inflight.journal(index)
        try:
            recovery = journal.recover(used_idx, avail_idx)
        except InflightError as exc:
            raise ProtocolError(f"ring {index}: in-flight buffer refused: {exc}") from exc
        if recovery.last_avail is None:
            return journal, base, ()
        self._log_recovery(index, recovery.settled, len(recovery.resubmit))
        if recovery.last_avail != base:
            log.debug("queue %d: next avail index %d from the in-flight buffer (frontend "
                      "said %d)", index, recovery.last_avail, base)
        return journal, recovery.last_avail, recovery.resubmit

    def _stop_ring(self, index: int) -> bool:
        """Stop the device on ring ``index`` (remembering where to resume); True if it ran."""
        ring = self.vrings[index]
        if not ring.running:
            return False
        ring.base = self.device.stop_queue(index)
        ring.running = False
        return True

    def _pause_running(self) -> list[int]:
        return [index for index in range(len(self.vrings)) if self._stop_ring(index)]

    def _resume(self, indices: list[int]) -> None:
        for index in indices:
            self._maybe_start(index)

    def _stop_all_rings(self) -> None:
        for index, ring in enumerate(self.vrings):
            self._stop_ring(index)
            ring.started = False
            ring.close_fds()

    def _reset_device(self) -> None:
        self._stop_all_rings()
        self.device.reset()
        self._drop_inflight()  # it described rings the reset discarded; QEMU makes anew
        self.acked_features = None
        self.vrings = [_Vring() for _ in range(self.device.num_queues)]

    # ------------------------------------------------------------------ config, inflight

    def _get_config(self, message: GetConfig) -> Message:
        config = self.device.config()
        end = message.offset + message.size
        if end > len(config):
            log.warning(
                "GET_CONFIG offset %d size %d is past the %d-byte config space",
                message.offset,
                message.size,
                len(config),
            )
            return GetConfigFailed()
        return GetConfigReply(message.offset, config[message.offset : end], message.flags)

    def _set_config(self, message: SetConfig) -> _Nack | None:
        try:
            self.device.set_config(message.offset, message.data)
        except ValueError as exc:
            log.warning("SET_CONFIG offset %d refused: %s", message.offset, exc)
            return _NACK
        return None

    def _check_inflight_queues(self, what: str, num_queues: int, queue_size: int) -> None:
        """GET/SET_INFLIGHT_FD's queue count must fit the device, its queue size the
        rule of the ring layout acked."""
        if not 1 <= num_queues <= len(self.vrings):
            raise ProtocolError(
                f"{what} for {num_queues} queues; the device has {len(self.vrings)}")
        try:
            (packed_layout if self.packed else split_layout).check_queue_size(queue_size)
        except ValueError as exc:
            raise ProtocolError(f"{what}: {exc}") from exc

    def _get_inflight_fd(self, message: GetInflightFd) -> Message:
        """A zeroed memfd laid out for the rings SET_FEATURES acked (split ones when it
        has not come, as DPDK decides; QEMU sends it first), sealed so nobody can shrink
        it under a device that maps it (as libvhost-user seals its own).  We keep it, but
        record requests only in what SET_INFLIGHT_FD hands over (QEMU sends this one
        back, mapped at the size we answer)."""
        size = message.queue_size
        self._check_inflight_queues("GET_INFLIGHT_FD", message.num_queues, size)
        mmap_size = message.num_queues * inflight_region_size(size, packed=self.packed)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        with OwnedFd(os.memfd_create("virtblk-inflight", flags)) as fd:
            os.ftruncate(fd.fileno(), mmap_size)
            fcntl.fcntl(fd.fileno(), fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            reply = GetInflightFdReply(
                mmap_size, 0, message.num_queues, size, OwnedFd.dup(fd.fileno())
            )
            self.inflight_fd = _replace(self.inflight_fd, fd)
        return reply

    def _set_inflight_fd(self, message: SetInflightFd) -> None:
        """Map the buffer the frontend hands over; rings record their requests in it and
        recover from it when they start (``_recover``).

        Hostile until checked: the queue count and size must fit the device, the buffer
        must hold a region per queue in the layout of the rings acked (it is that layout
        from now on: a ring of the other kind refuses it), lie inside its file and (unless
        the user accepted unsealed memory) be sealed against shrinking, since a truncate
        under our mapping would kill the device with SIGBUS.  Running rings stop and start
        again around the change, so they move to the new buffer.
        """
        packed = self.packed
        self._check_inflight_queues("SET_INFLIGHT_FD", message.num_queues, message.queue_size)
        needed = message.num_queues * inflight_region_size(message.queue_size, packed=packed)
        if message.mmap_size < needed:
            raise ProtocolError(
                f"SET_INFLIGHT_FD: buffer of {message.mmap_size} bytes, {needed} needed for "
                f"{message.num_queues} queues of {message.queue_size} "
                f"({'packed' if packed else 'split'} layout)"
            )
        try:
            region = MemoryRegion.map_fd(
                message.fd.take(), size=needed, mmap_offset=message.mmap_offset,
                guest_phys_addr=0, user_addr=0,
                require_sealed=not self.accept_unsealed_memory)
        except GuestMemoryError as exc:
            raise ProtocolError(f"SET_INFLIGHT_FD: {exc}") from exc
        paused = self._pause_running()
        self._drop_inflight()
        self.inflight = _Inflight(region, message.num_queues, message.queue_size, packed)
        self._resume(paused)

    def _drop_inflight(self) -> None:
        """Forget the in-flight buffers (ours from GET_INFLIGHT_FD, the mapped one)."""
        self.inflight_fd = _replace(self.inflight_fd, None)
        if self.inflight is not None:
            self.inflight.region.close()
            self.inflight = None

    # ------------------------------------------------------------------ backend channel

    def config_changed(self) -> None:
        """Device hook: tell the frontend its config changed (CONFIG_CHANGE_MSG).

        Only queued here; the shell sends it on ``backend_req_fd`` (never blocking a
        device thread on the frontend, which may answer with GET_CONFIG first).
        """
        needed = ProtocolFeature.CONFIG.mask | ProtocolFeature.BACKEND_REQ.mask
        if self.protocol_features & needed != needed or self.backend_req is None:
            log.info("config changed, but the frontend cannot be told (no backend channel)")
            return
        need_reply = bool(self.protocol_features & ProtocolFeature.REPLY_ACK.mask)
        with self._backend_lock:
            self._backend_outbox.append(encode(ConfigChangeMsg(need_reply=need_reply)))
            if need_reply:
                self.backend_acks_pending += 1
        self.wakeup()

    def device_failed(self, reason: str) -> None:
        """Device hook: the device cannot serve this frontend any more; the shell ends the
        session (the frontend sees the connection close, as after a crash)."""
        self.failure = reason
        self.wakeup()

    def backend_data_to_send(self) -> list[tuple[bytes, list[int]]]:
        """Messages queued for the backend channel, oldest first (drains the queue)."""
        with self._backend_lock:
            out, self._backend_outbox = self._backend_outbox, []
        return out

    def receive_backend_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what the backend channel returned: the frontend's acks.

        Raises ProtocolError for anything else; the shell then closes the channel.
        """
        self._backend_decoder.receive_data(data, fds)
        while True:
            event = self._backend_decoder.next_event()
            if not isinstance(event, Message):
                if event is CLOSED:
                    self._close_backend_channel()
                return
            if not isinstance(event, Ack):
                event.close()
                raise ProtocolError(f"frontend sent {event.name} on the backend channel")
            with self._backend_lock:
                self.backend_acks_pending = max(0, self.backend_acks_pending - 1)
            if not event.ok:
                log.warning("frontend answered %s with status %d", event.name, event.status)

    def _close_backend_channel(self) -> None:
        self.backend_req = _replace(self.backend_req, None)
        self._backend_decoder.close()
        self._backend_decoder = Decoder(Channel.BACKEND)

    def close_backend_channel(self) -> None:
        """Forget the backend channel (it broke); config changes are then only logged."""
        self._close_backend_channel()

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """The session ended: stop the device, reset it, unmap memory, close every fd."""
        if self.closed:
            return
        self.closed = True
        self.device.config_changed = None
        self.device.failed = None
        try:
            self._stop_all_rings()
            self.device.reset()
        finally:
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            self._close_backend_channel()
            self._drop_inflight()
            self._decoder.close()
            self._backend_decoder.close()
            for event in self._events:
                if isinstance(event, Message):
                    event.close()  # a reply never sent (GET_INFLIGHT_FD's dup)
            self._events.clear()


class _Nack:
    """Internal marker: the device refused; answer a failure when an ack is due."""


_NACK = _Nack()
