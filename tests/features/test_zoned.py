"""Zoned block devices (VIRTIO_BLK_F_ZONED, host-managed): the device's zone state
machine and statuses, the driver's zone API, and both against each other.

Linux 6.1 here predates virtio-blk zoned support (6.3), so the driver is tested against
our device only: the device model directly (every status), the embedded device through
``Disk``, and ``virtblk serve --zoned`` over a socket.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interop.serve_process import ServeProcess
from virtblk import Disk
from virtblk.device.blk import BlkDevice
from virtblk.device.zoned import ZonedMemoryBackend, ZoneTable
from virtblk.driver.zoned import Zone, split_at_zones
from virtblk.errors import (
    BlockIOError,
    FeatureNotNegotiatedError,
    ZoneActiveResourceError,
    ZoneError,
    ZoneInvalidCommandError,
    ZoneOpenResourceError,
    ZoneUnalignedWriteError,
)
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    BlkConfig,
    DiscardSegment,
    Feature,
    RequestHeader,
    RequestType,
    Status,
    ZoneDescriptor,
    ZonedModel,
    ZoneState,
    ZoneType,
    has_feature,
)

S = ZoneState
T = RequestType
ZS = 64  # zone size in sectors for the device-level tests (32 KiB)


# -- device-level harness -------------------------------------------------------------------
@dataclasses.dataclass
class Chain:
    """A descriptor chain over plain buffers (what ``DeviceVirtqueue.pop`` hands over)."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


def zoned_device(
    zones: int = 8, *, conventional: int = 1, zone_sectors: int = ZS, **kwargs: int
) -> BlkDevice:
    backend = ZonedMemoryBackend(
        zones * zone_sectors * 512, zone_size=zone_sectors * 512,
        conventional_zones=conventional, **kwargs)
    return BlkDevice(backend)


def run(dev: BlkDevice, rtype: int, sector: int = 0, out: bytes = b"",
        in_len: int = 0) -> tuple[Status, bytes]:
    """One request through parsing and execution: (status, device-written data)."""
    data = bytearray(in_len + 1)
    c = Chain(0, [memoryview(RequestHeader(rtype, 0, sector).pack() + out)],
              [memoryview(data)])
    dev.process(c)
    return Status(data[-1]), bytes(data[:-1])


def write(dev: BlkDevice, sector: int, nsectors: int, fill: int = 0xAB) -> Status:
    return run(dev, T.OUT, sector, bytes([fill]) * (nsectors * 512))[0]


def read(dev: BlkDevice, sector: int, nsectors: int) -> tuple[Status, bytes]:
    return run(dev, T.IN, sector, in_len=nsectors * 512)


def append(dev: BlkDevice, zone_sector: int, nsectors: int, fill: int = 0xCD) -> tuple[Status,
                                                                                          int]:
    status, reply = run(dev, T.ZONE_APPEND, zone_sector, bytes([fill]) * (nsectors * 512),
                        in_len=8)
    return status, struct.unpack("<Q", reply)[0]


def report(dev: BlkDevice, sector: int = 0, slots: int = 64,
           extra: int = 0) -> tuple[Status, list[ZoneDescriptor]]:
    status, data = run(dev, T.ZONE_REPORT, sector, in_len=64 + slots * 64 + extra)
    if status != Status.OK:
        return status, []
    (nr,) = struct.unpack_from("<Q", data)
    assert nr <= slots
    return status, [ZoneDescriptor.unpack(data[64 + 64 * i : 128 + 64 * i]) for i in range(nr)]


def zone(dev: BlkDevice, index: int) -> ZoneDescriptor:
    return report(dev, index * ZS, 1)[1][0]


def states(dev: BlkDevice) -> list[ZoneState]:
    return [ZoneState(d.z_state) for d in report(dev)[1]]


def segments(dev: BlkDevice, rtype: int, sector: int, n: int, flags: int = 0) -> Status:
    """A one-segment DISCARD / WRITE_ZEROES / SECURE_ERASE."""
    return run(dev, rtype, 0, DiscardSegment(sector, n, flags).pack())[0]


# -- features and config ----------------------------------------------------------------------
def test_config_and_features_of_a_host_managed_device() -> None:
    dev = zoned_device(8, conventional=2, max_open_zones=2, max_active_zones=3,
                       write_granularity=4096, zone_capacity=48 * 512, max_append_size=16 * 512)
    assert has_feature(dev.features, Feature.BLK_ZONED)
    assert not has_feature(dev.features, Feature.BLK_DISCARD)  # not with a HM model
    cfg = BlkConfig.unpack(dev.config())
    assert (cfg.zone_sectors, cfg.max_open_zones, cfg.max_active_zones, cfg.max_append_sectors,
            cfg.write_granularity, cfg.model) == (ZS, 2, 3, 16, 4096, ZonedModel.HM)
    assert cfg.capacity == 8 * ZS
    assert cfg.secure_erase_sector_alignment % ZS == 0 and cfg.max_secure_erase_sectors % ZS == 0
    assert dev.config()[93:96] == b"\0\0\0"  # unused2


def test_host_managed_device_refuses_a_driver_without_zoned() -> None:
    dev = zoned_device()
    with pytest.raises(ValueError, match="must accept VIRTIO_BLK_F_ZONED"):
        dev.set_features(dev.features & ~Feature.BLK_ZONED.mask)
    dev.set_features(dev.features)


@pytest.mark.parametrize("rtype", [T.ZONE_REPORT, T.ZONE_APPEND, T.ZONE_OPEN, T.ZONE_CLOSE,
                                   T.ZONE_FINISH, T.ZONE_RESET, T.ZONE_RESET_ALL])
def test_regular_device_answers_zone_requests_unsupp(rtype: int) -> None:
    from virtblk.device.backends import MemoryBackend

    dev = BlkDevice(MemoryBackend(1 << 20))
    assert not has_feature(dev.features, Feature.BLK_ZONED)
    assert run(dev, rtype, 0, bytes(512), in_len=8)[0] == Status.UNSUPP
    assert run(dev, rtype)[0] == Status.UNSUPP


def test_backend_options_are_validated() -> None:
    with pytest.raises(ValueError, match="conventional zones"):
        ZonedMemoryBackend(1 << 20, zone_size=1 << 19, conventional_zones=3)
    with pytest.raises(ValueError, match="zone capacity"):
        ZonedMemoryBackend(1 << 20, zone_size=1 << 19, zone_capacity=1 << 20)
    with pytest.raises(ValueError, match="granularity"):
        ZonedMemoryBackend(1 << 20, zone_size=1 << 19, write_granularity=1000)
    with pytest.raises(ValueError, match="cannot be resized"):
        ZonedMemoryBackend(1 << 20, zone_size=1 << 19).resize(2 << 20)


# -- report ---------------------------------------------------------------------------------------
def test_report_describes_every_zone() -> None:
    dev = zoned_device(4, conventional=1, zone_capacity=48 * 512)
    status, descs = report(dev)
    assert status == Status.OK
    assert [(d.z_start, d.z_type, d.z_state) for d in descs] == [
        (0, ZoneType.CONV, S.NOT_WP), (ZS, ZoneType.SWR, S.EMPTY),
        (2 * ZS, ZoneType.SWR, S.EMPTY), (3 * ZS, ZoneType.SWR, S.EMPTY)]
    assert [d.z_cap for d in descs] == [ZS, 48, 48, 48]
    assert [d.z_wp for d in descs[1:]] == [ZS, 2 * ZS, 3 * ZS]


def test_partial_report_buffer_carries_only_whole_descriptors() -> None:
    dev = zoned_device(8)
    status, data = run(dev, T.ZONE_REPORT, 0, in_len=64 + 2 * 64 + 40)
    assert status == Status.OK and struct.unpack_from("<Q", data)[0] == 2
    assert data[64 + 2 * 64 :] == bytes(40)  # the partial slot is not written
    # Pages: a report may start at any sector inside its first zone.
    assert [d.z_start for d in report(dev, 3 * ZS + 5, 2)[1]] == [3 * ZS, 4 * ZS]
    assert [d.z_start for d in report(dev, 6 * ZS, 64)[1]] == [6 * ZS, 7 * ZS]
    assert report(dev, 0, 0) == (Status.OK, [])


def test_report_errors() -> None:
    dev = zoned_device(4)
    assert run(dev, T.ZONE_REPORT, 0, in_len=63)[0] == Status.IOERR  # no room for the header
    assert report(dev, 4 * ZS)[0] == Status.IOERR  # past the capacity


def test_short_last_zone() -> None:
    backend = ZonedMemoryBackend((3 * ZS + 24) * 512, zone_size=ZS * 512)
    dev = BlkDevice(backend)
    last = report(dev)[1][-1]
    assert (last.z_start, last.z_cap) == (3 * ZS, 24)
    assert write(dev, 3 * ZS, 24) == Status.OK
    assert zone(dev, 3).z_state == S.FULL


# -- writes and reads ------------------------------------------------------------------------------
def test_sequential_writes_follow_the_write_pointer() -> None:
    dev = zoned_device(4)
    assert write(dev, ZS, 8, 1) == Status.OK
    z = zone(dev, 1)
    assert (z.z_state, z.z_wp) == (S.IOPEN, ZS + 8)
    assert write(dev, ZS + 16, 8) == Status.ZONE_UNALIGNED_WP  # a gap
    assert write(dev, ZS, 8) == Status.ZONE_UNALIGNED_WP  # a rewrite
    assert write(dev, ZS + 8, 8, 2) == Status.OK
    status, data = read(dev, ZS, 24)
    assert status == Status.OK
    assert data == b"\1" * 4096 + b"\2" * 4096 + bytes(4096)  # past the wp: zeros
    assert run(dev, T.OUT, ZS + 16, b"")[0] == Status.OK  # no data: no transition
    assert zone(dev, 1).z_wp == ZS + 16


def test_write_granularity() -> None:
    dev = zoned_device(4, write_granularity=4096)
    assert write(dev, ZS, 1) == Status.ZONE_UNALIGNED_WP
    assert zone(dev, 1).z_state == S.EMPTY  # a refused write opens nothing
    assert write(dev, ZS, 8) == Status.OK
    assert write(dev, 3, 1) == Status.OK  # conventional zones: any sector


def test_zone_capacity_and_full() -> None:
    dev = zoned_device(4, zone_capacity=48 * 512)
    assert write(dev, ZS, 56) == Status.ZONE_INVALID_CMD  # beyond the capacity
    assert write(dev, ZS, 40) == Status.OK
    assert write(dev, ZS + 40, 16) == Status.ZONE_INVALID_CMD
    assert write(dev, ZS + 40, 8) == Status.OK
    assert zone(dev, 1).z_state == S.FULL
    assert write(dev, ZS + 48, 8) == Status.ZONE_INVALID_CMD  # a full zone takes nothing
    assert read(dev, ZS, ZS)[0] == Status.OK  # but reads the whole zone


def test_requests_spanning_zones() -> None:
    dev = zoned_device(4, conventional=2)
    assert write(dev, ZS - 8, 16) == Status.OK  # conventional into conventional
    assert read(dev, ZS - 8, 16)[0] == Status.OK
    assert write(dev, 2 * ZS - 8, 16) == Status.ZONE_INVALID_CMD  # into a sequential zone
    assert write(dev, 2 * ZS, 8) == Status.OK
    assert read(dev, 3 * ZS - 8, 16)[0] == Status.ZONE_INVALID_CMD
    assert read(dev, 2 * ZS - 8, 16)[0] == Status.ZONE_INVALID_CMD
    assert write(dev, 4 * ZS, 8) == Status.IOERR  # past the capacity


def test_conventional_zones_are_random_access_and_refuse_zone_commands() -> None:
    dev = zoned_device(4, conventional=1)
    assert write(dev, 16, 8, 7) == Status.OK
    assert write(dev, 0, 8, 8) == Status.OK
    assert read(dev, 0, 24)[1] == b"\x08" * 4096 + bytes(4096) + b"\x07" * 4096
    for rtype in (T.ZONE_OPEN, T.ZONE_CLOSE, T.ZONE_FINISH, T.ZONE_RESET):
        assert run(dev, rtype, 0)[0] == Status.ZONE_INVALID_CMD
    assert append(dev, 0, 8)[0] == Status.ZONE_INVALID_CMD
    assert run(dev, T.ZONE_RESET_ALL)[0] == Status.OK
    assert read(dev, 16, 8)[1] == b"\x07" * 4096  # reset-all leaves conventional data


# -- append -------------------------------------------------------------------------------------
def test_append_answers_the_sector_written() -> None:
    dev = zoned_device(4)
    assert append(dev, ZS, 8, 1) == (Status.OK, ZS)
    assert append(dev, ZS, 16, 2) == (Status.OK, ZS + 8)
    assert zone(dev, 1).z_wp == ZS + 24
    assert read(dev, ZS, 24)[1] == b"\1" * 4096 + b"\2" * 8192
    data = bytearray(9)
    c = Chain(0, [memoryview(RequestHeader(T.ZONE_APPEND, 0, 2 * ZS).pack() + bytes(512))],
              [memoryview(data)])
    assert dev.process(c) == 9  # append_sector and status
    assert struct.unpack_from("<Q", data)[0] == 2 * ZS


def test_append_errors() -> None:
    dev = zoned_device(4, max_append_size=8 * 512, zone_capacity=16 * 512)
    assert append(dev, ZS + 8, 8)[0] == Status.ZONE_INVALID_CMD  # not the zone start
    assert append(dev, ZS, 16)[0] == Status.ZONE_INVALID_CMD  # over max_append_sectors
    assert append(dev, ZS, 8) == (Status.OK, ZS)
    assert append(dev, ZS, 8) == (Status.OK, ZS + 8)
    assert append(dev, ZS, 8)[0] == Status.ZONE_INVALID_CMD  # the zone is full
    no_append = zoned_device(4, max_append_size=0)
    assert BlkConfig.unpack(no_append.config()).max_append_sectors == 0
    assert append(no_append, ZS, 8)[0] == Status.UNSUPP
    # append_sector needs its 8 bytes: anything else is a malformed request.
    assert run(dev, T.ZONE_APPEND, 2 * ZS, bytes(512), in_len=4)[0] == Status.IOERR


# -- zone management state machine -------------------------------------------------------------
def prepare(dev: BlkDevice, index: int, state: ZoneState) -> None:
    """Bring SWR zone ``index`` (ZS-sector zones) into ``state``."""
    start = index * ZS
    if state == S.IOPEN:
        assert write(dev, start, 8) == Status.OK
    elif state == S.EOPEN:
        assert run(dev, T.ZONE_OPEN, start)[0] == Status.OK
    elif state == S.CLOSED:
        assert write(dev, start, 8) == Status.OK
        assert run(dev, T.ZONE_CLOSE, start)[0] == Status.OK
    elif state == S.FULL:
        assert run(dev, T.ZONE_FINISH, start)[0] == Status.OK
    assert zone(dev, index).z_state == state


_OK, _INV = Status.OK, Status.ZONE_INVALID_CMD
TRANSITIONS = [
    # (request, from state, status, to state)
    (T.ZONE_OPEN, S.EMPTY, _OK, S.EOPEN), (T.ZONE_OPEN, S.IOPEN, _OK, S.EOPEN),
    (T.ZONE_OPEN, S.EOPEN, _OK, S.EOPEN), (T.ZONE_OPEN, S.CLOSED, _OK, S.EOPEN),
    (T.ZONE_OPEN, S.FULL, _INV, S.FULL),
    (T.ZONE_CLOSE, S.EMPTY, _INV, S.EMPTY), (T.ZONE_CLOSE, S.IOPEN, _OK, S.CLOSED),
    (T.ZONE_CLOSE, S.EOPEN, _OK, S.EMPTY), (T.ZONE_CLOSE, S.CLOSED, _OK, S.CLOSED),
    (T.ZONE_CLOSE, S.FULL, _INV, S.FULL),
    (T.ZONE_FINISH, S.EMPTY, _OK, S.FULL), (T.ZONE_FINISH, S.IOPEN, _OK, S.FULL),
    (T.ZONE_FINISH, S.EOPEN, _OK, S.FULL), (T.ZONE_FINISH, S.CLOSED, _OK, S.FULL),
    (T.ZONE_FINISH, S.FULL, _OK, S.FULL),
    (T.ZONE_RESET, S.EMPTY, _OK, S.EMPTY), (T.ZONE_RESET, S.IOPEN, _OK, S.EMPTY),
    (T.ZONE_RESET, S.EOPEN, _OK, S.EMPTY), (T.ZONE_RESET, S.CLOSED, _OK, S.EMPTY),
    (T.ZONE_RESET, S.FULL, _OK, S.EMPTY),
]


@pytest.mark.parametrize(("rtype", "before", "status", "after"), TRANSITIONS,
                         ids=[f"{t.name}-{b.name}" for t, b, _, _ in TRANSITIONS])
def test_zone_state_machine(rtype: RequestType, before: ZoneState, status: Status,
                            after: ZoneState) -> None:
    dev = zoned_device(4)
    prepare(dev, 2, before)
    assert run(dev, rtype, 2 * ZS)[0] == status
    z = zone(dev, 2)
    assert z.z_state == after
    if after == S.EMPTY:
        assert z.z_wp == 2 * ZS
    if after == S.FULL:
        assert write(dev, 2 * ZS + 8, 8) == Status.ZONE_INVALID_CMD


def test_explicitly_open_zone_closed_after_writes_becomes_closed() -> None:
    dev = zoned_device(4)
    prepare(dev, 1, S.EOPEN)
    assert write(dev, ZS, 8) == Status.OK
    assert zone(dev, 1).z_state == S.EOPEN  # a write keeps it explicitly open
    assert run(dev, T.ZONE_CLOSE, ZS)[0] == Status.OK
    assert zone(dev, 1).z_state == S.CLOSED
    assert write(dev, ZS + 8, 8) == Status.OK
    assert zone(dev, 1).z_state == S.IOPEN  # a closed zone reopens implicitly


def test_management_needs_a_zone_start() -> None:
    dev = zoned_device(4)
    for rtype in (T.ZONE_OPEN, T.ZONE_CLOSE, T.ZONE_FINISH, T.ZONE_RESET):
        assert run(dev, rtype, ZS + 1)[0] == Status.ZONE_INVALID_CMD
        assert run(dev, rtype, 4 * ZS)[0] == Status.IOERR  # past the capacity


def test_reset_and_reset_all_forget_the_data() -> None:
    dev = zoned_device(4)
    for index in (1, 2, 3):
        assert write(dev, index * ZS, 8, index) == Status.OK
    prepare(dev, 3, S.FULL)
    assert run(dev, T.ZONE_RESET, ZS)[0] == Status.OK
    assert read(dev, ZS, 8)[1] == bytes(4096)
    assert read(dev, 2 * ZS, 8)[1] == b"\2" * 4096
    assert run(dev, T.ZONE_RESET_ALL)[0] == Status.OK
    assert states(dev)[1:] == [S.EMPTY] * 3
    assert read(dev, 2 * ZS, ZS)[1] == bytes(ZS * 512)
    assert read(dev, 3 * ZS, ZS)[1] == bytes(ZS * 512)


# -- resources ----------------------------------------------------------------------------------
def test_open_resource_limit() -> None:
    dev = zoned_device(6, max_open_zones=2)
    prepare(dev, 1, S.EOPEN)
    prepare(dev, 2, S.EOPEN)
    assert run(dev, T.ZONE_OPEN, 3 * ZS)[0] == Status.ZONE_OPEN_RESOURCE
    assert write(dev, 3 * ZS, 8) == Status.ZONE_OPEN_RESOURCE
    assert append(dev, 3 * ZS, 8)[0] == Status.ZONE_OPEN_RESOURCE
    assert zone(dev, 3).z_state == S.EMPTY
    assert write(dev, ZS, 8) == Status.OK  # already open zones take writes
    assert run(dev, T.ZONE_CLOSE, ZS)[0] == Status.OK  # frees one open resource
    assert write(dev, 3 * ZS, 8) == Status.OK


def test_open_limit_closes_the_oldest_implicitly_open_zone() -> None:
    dev = zoned_device(6, max_open_zones=2)
    assert write(dev, ZS, 8) == Status.OK
    assert write(dev, 2 * ZS, 8) == Status.OK
    assert write(dev, 3 * ZS, 8) == Status.OK  # zone 1 (the oldest) is closed for it
    assert states(dev)[1:4] == [S.CLOSED, S.IOPEN, S.IOPEN]
    assert run(dev, T.ZONE_OPEN, 4 * ZS)[0] == Status.OK  # explicit open closes zone 2
    assert states(dev)[1:5] == [S.CLOSED, S.CLOSED, S.IOPEN, S.EOPEN]
    assert write(dev, ZS + 8, 8) == Status.OK  # zone 1 reopens, zone 3 closes
    assert states(dev)[1:5] == [S.IOPEN, S.CLOSED, S.CLOSED, S.EOPEN]


def test_active_resource_limit() -> None:
    dev = zoned_device(6, max_active_zones=2)
    prepare(dev, 1, S.CLOSED)
    prepare(dev, 2, S.EOPEN)
    assert write(dev, 3 * ZS, 8) == Status.ZONE_ACTIVE_RESOURCE
    assert run(dev, T.ZONE_OPEN, 3 * ZS)[0] == Status.ZONE_ACTIVE_RESOURCE
    assert append(dev, 3 * ZS, 8)[0] == Status.ZONE_ACTIVE_RESOURCE
    assert write(dev, ZS + 8, 8) == Status.OK  # a closed zone is already active
    assert run(dev, T.ZONE_FINISH, 2 * ZS)[0] == Status.OK  # full zones are not active
    assert write(dev, 3 * ZS, 8) == Status.OK


def test_both_limits_exceeded_is_active_resource() -> None:
    dev = zoned_device(6, max_open_zones=1, max_active_zones=1)
    prepare(dev, 1, S.EOPEN)
    assert run(dev, T.ZONE_OPEN, 2 * ZS)[0] == Status.ZONE_ACTIVE_RESOURCE
    dev2 = zoned_device(6, max_open_zones=1, max_active_zones=2)
    prepare(dev2, 1, S.EOPEN)
    assert run(dev2, T.ZONE_OPEN, 2 * ZS)[0] == Status.ZONE_OPEN_RESOURCE


# -- other request types on a zoned device -----------------------------------------------------
def test_discard_is_not_offered_and_answered_unsupp() -> None:
    dev = zoned_device(4)
    assert segments(dev, T.DISCARD, ZS, 8) == Status.UNSUPP


def test_write_zeroes_is_a_write_in_sequential_zones() -> None:
    dev = zoned_device(4)
    assert write(dev, 0, 8, 9) == Status.OK
    assert segments(dev, T.WRITE_ZEROES, 0, 8) == Status.OK  # conventional: zeroed
    assert read(dev, 0, 8)[1] == bytes(4096)
    assert segments(dev, T.WRITE_ZEROES, ZS + 8, 8) == Status.ZONE_UNALIGNED_WP
    assert segments(dev, T.WRITE_ZEROES, ZS, 8, DISCARD_FLAG_UNMAP) == Status.OK
    z = zone(dev, 1)
    assert (z.z_state, z.z_wp) == (S.IOPEN, ZS + 8)
    assert segments(dev, T.WRITE_ZEROES, ZS + 8, 8, 2) == Status.UNSUPP  # unknown flag


def test_secure_erase_resets_whole_zones() -> None:
    dev = zoned_device(4)
    assert write(dev, 8, 8, 3) == Status.OK
    assert write(dev, ZS, 8, 4) == Status.OK
    assert segments(dev, T.SECURE_ERASE, 0, ZS + 8) == Status.ZONE_INVALID_CMD
    assert segments(dev, T.SECURE_ERASE, 8, ZS) == Status.ZONE_INVALID_CMD
    assert segments(dev, T.SECURE_ERASE, 0, 2 * ZS) == Status.OK
    assert states(dev)[:2] == [S.NOT_WP, S.EMPTY]
    assert read(dev, 0, 16)[1] == bytes(8192)


@pytest.mark.parametrize("rtype", [T.WRITE_ZEROES, T.SECURE_ERASE])
def test_huge_segment_count_is_refused_before_decoding(rtype: RequestType) -> None:
    """The payload is bounded only by guest memory: the segment count is checked from its
    length, not by decoding a million segments first."""
    dev = zoned_device(4)
    status = bytearray(1)
    c = Chain(0, [memoryview(RequestHeader(rtype, 0, 0).pack() + bytes(16 * 10**6))],
              [memoryview(status)])
    tracemalloc.start()
    try:
        dev.process(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status[0] == Status.IOERR
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse the request"


def test_offline_and_read_only_zones() -> None:
    dev = zoned_device(4)
    assert dev.zoned is not None
    assert write(dev, ZS, 8, 5) == Status.OK
    dev.zoned.table.set_condition(1, S.RDONLY)
    assert read(dev, ZS, 8) == (Status.OK, b"\5" * 4096)
    assert write(dev, ZS + 8, 8) == Status.ZONE_INVALID_CMD
    assert append(dev, ZS, 8)[0] == Status.ZONE_INVALID_CMD
    assert run(dev, T.ZONE_RESET, ZS)[0] == Status.ZONE_INVALID_CMD
    dev.zoned.table.set_condition(2, S.OFFLINE)
    for rtype in (T.IN, T.ZONE_OPEN, T.ZONE_RESET, T.ZONE_FINISH):
        assert run(dev, rtype, 2 * ZS, in_len=4096 if rtype == T.IN else 0)[0] == \
            Status.ZONE_INVALID_CMD
    assert run(dev, T.ZONE_RESET_ALL)[0] == Status.OK
    assert states(dev)[1:3] == [S.RDONLY, S.OFFLINE]  # hardware failures stay
    with pytest.raises(ValueError, match="conventional"):
        dev.zoned.table.set_condition(0, S.OFFLINE)


def test_read_only_device_refuses_zone_changes() -> None:
    dev = zoned_device(4)
    dev.set_read_only(True)
    for rtype in (T.ZONE_OPEN, T.ZONE_CLOSE, T.ZONE_FINISH, T.ZONE_RESET, T.ZONE_RESET_ALL):
        assert run(dev, rtype, ZS)[0] == Status.IOERR
    assert append(dev, ZS, 8)[0] == Status.IOERR
    assert write(dev, ZS, 8) == Status.IOERR
    assert report(dev)[0] == Status.OK


# -- a reference model for random sequences ----------------------------------------------------
class Model:
    """What the spec says happens, written independently of the device's code."""

    def __init__(self, zones: int, conventional: int, cap: int, max_open: int,
                 max_active: int, max_append: int) -> None:
        self.conv = conventional
        self.cap, self.max_open, self.max_active = cap, max_open, max_active
        self.max_append = max_append
        self.state = [S.NOT_WP] * conventional + [S.EMPTY] * (zones - conventional)
        self.wp = [i * ZS for i in range(zones)]
        self.implicit: list[int] = []  # implicitly open zones, oldest first
        self.data = bytearray(zones * ZS * 512)

    def _set(self, z: int, state: ZoneState) -> None:
        if z in self.implicit:
            self.implicit.remove(z)
        if state == S.IOPEN:
            self.implicit.append(z)
        self.state[z] = state

    def _open_room(self, z: int) -> Status | None:
        st_ = self.state[z]
        active = sum(s in (S.IOPEN, S.EOPEN, S.CLOSED) for s in self.state)
        opened = sum(s in (S.IOPEN, S.EOPEN) for s in self.state)
        if st_ == S.EMPTY and self.max_active and active >= self.max_active:
            return Status.ZONE_ACTIVE_RESOURCE
        if st_ not in (S.IOPEN, S.EOPEN) and self.max_open and opened >= self.max_open:
            if not self.implicit:
                return Status.ZONE_OPEN_RESOURCE
            self._set(self.implicit[0], S.CLOSED)
        return None

    def write(self, sector: int, n: int, fill: int) -> Status:
        z, last = sector // ZS, (sector + n - 1) // ZS
        if z < self.conv and last < self.conv:
            self.data[sector * 512 : (sector + n) * 512] = bytes([fill]) * (n * 512)
            return Status.OK
        if z != last:
            return Status.ZONE_INVALID_CMD
        return self._seq_write(z, sector, n, fill)

    def _seq_write(self, z: int, sector: int, n: int, fill: int) -> Status:
        if self.state[z] not in (S.EMPTY, S.IOPEN, S.EOPEN, S.CLOSED):
            return Status.ZONE_INVALID_CMD
        if sector != self.wp[z]:
            return Status.ZONE_UNALIGNED_WP
        if sector + n > z * ZS + self.cap:
            return Status.ZONE_INVALID_CMD
        if self.state[z] not in (S.IOPEN, S.EOPEN):
            refused = self._open_room(z)
            if refused is not None:
                return refused
            self._set(z, S.IOPEN)
        self.data[sector * 512 : (sector + n) * 512] = bytes([fill]) * (n * 512)
        self.wp[z] += n
        if self.wp[z] == z * ZS + self.cap:
            self._set(z, S.FULL)
        return Status.OK

    def append(self, z: int, n: int, fill: int) -> tuple[Status, int]:
        if n > self.max_append or z < self.conv:
            return Status.ZONE_INVALID_CMD, 0
        at = self.wp[z]
        return self._seq_write(z, at, n, fill), at * 512

    def manage(self, rtype: RequestType, z: int) -> Status:
        if z < self.conv:
            return Status.ZONE_INVALID_CMD
        st_ = self.state[z]
        if rtype == T.ZONE_OPEN:
            if st_ == S.EOPEN:
                return Status.OK
            if st_ == S.FULL:
                return Status.ZONE_INVALID_CMD
            refused = self._open_room(z)
            if refused is not None:
                return refused
            self._set(z, S.EOPEN)
        elif rtype == T.ZONE_CLOSE:
            if st_ == S.CLOSED:
                return Status.OK
            if st_ not in (S.IOPEN, S.EOPEN):
                return Status.ZONE_INVALID_CMD
            self._set(z, S.EMPTY if self.wp[z] == z * ZS else S.CLOSED)
        elif rtype == T.ZONE_FINISH:
            if st_ != S.FULL:
                self._set(z, S.FULL)
                self.wp[z] = z * ZS + self.cap
        else:
            self._reset(z)
        return Status.OK

    def _reset(self, z: int) -> None:
        if self.state[z] != S.EMPTY:
            self._set(z, S.EMPTY)
            self.wp[z] = z * ZS
            self.data[z * ZS * 512 : (z + 1) * ZS * 512] = bytes(ZS * 512)

    def reset_all(self) -> None:
        for z in range(self.conv, len(self.state)):
            self._reset(z)


ZONES, CONV, CAP = 6, 1, 56
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, ZONES - 1), st.sampled_from([0, 0, 0, 8, -8]),
              st.sampled_from([8, 16, 24, 56]), st.booleans()),
    st.tuples(st.just("append"), st.integers(0, ZONES - 1), st.sampled_from([8, 16, 32])),
    st.tuples(st.sampled_from([T.ZONE_OPEN, T.ZONE_CLOSE, T.ZONE_FINISH, T.ZONE_RESET]),
              st.integers(0, ZONES - 1)),
    st.tuples(st.just("reset_all")),
), max_size=40)
limits = st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from([CAP, ZS]))


def _target(model: Model, op: tuple[object, ...]) -> tuple[int, int]:
    """(sector, nsectors) of a random write: at the wp (or off it), maybe crossing zones."""
    _, z, delta, n, cross = op
    assert isinstance(z, int) and isinstance(delta, int) and isinstance(n, int)
    if cross:
        return z * ZS + ZS - 8, n if z < ZONES - 1 else 8
    base = model.wp[z] if model.state[z] not in (S.NOT_WP, S.FULL) else z * ZS
    return max(z * ZS, min(base + delta, (z + 1) * ZS - n)), n


@settings(max_examples=150, deadline=None)
@given(ops=ops, limit=limits)
def test_random_zone_sequences_match_the_model(ops: list[tuple[object, ...]],
                                               limit: tuple[int, int, int]) -> None:
    max_open, max_active, cap = limit
    dev = zoned_device(ZONES, conventional=CONV, zone_capacity=cap * 512,
                       max_open_zones=max_open, max_active_zones=max_active,
                       max_append_size=16 * 512)
    model = Model(ZONES, CONV, cap, max_open, max_active, 16)
    for i, op in enumerate(ops):
        fill = i % 250 + 1
        if op[0] == "write":
            sector, n = _target(model, op)
            assert write(dev, sector, n, fill) == model.write(sector, n, fill), op
        elif op[0] == "append":
            z, n = op[1], op[2]
            assert isinstance(z, int) and isinstance(n, int)
            status, at = append(dev, z * ZS, n, fill)
            expected, expected_at = model.append(z, n, fill)
            assert status == expected, op
            if status == Status.OK:
                assert at * 512 == expected_at
        elif op[0] == "reset_all":
            assert run(dev, T.ZONE_RESET_ALL)[0] == Status.OK
            model.reset_all()
        else:
            rtype, z = op
            assert isinstance(rtype, RequestType) and isinstance(z, int)
            assert run(dev, rtype, z * ZS)[0] == model.manage(rtype, z), op
        descs = report(dev)[1]
        assert [ZoneState(d.z_state) for d in descs] == model.state
        for d, wp, state in zip(descs, model.wp, model.state, strict=True):
            if state in (S.EMPTY, S.IOPEN, S.EOPEN, S.CLOSED):
                assert d.z_wp == wp
        table = dev.zoned.table if dev.zoned is not None else None
        assert table is not None
        assert table.open_zones == sum(s in (S.IOPEN, S.EOPEN) for s in model.state)
        assert table.active_zones == sum(s in (S.IOPEN, S.EOPEN, S.CLOSED) for s in model.state)
        if max_open:
            assert table.open_zones <= max_open
        if max_active:
            assert table.active_zones <= max_active
    for z in range(ZONES):
        assert read(dev, z * ZS, ZS)[1] == bytes(model.data[z * ZS * 512 : (z + 1) * ZS * 512])


def test_zone_table_alone() -> None:
    table = ZoneTable(4 * ZS, ZS, conventional_zones=1, max_open_zones=1)
    zone1 = table.prepare_write(ZS, 8, "OUT")
    assert zone1 is not None and zone1.state == S.IOPEN
    table.complete_write(zone1, 8)
    assert table.prepare_write(3, 8, "OUT") is None  # conventional
    table.open(2 * ZS)  # closes zone 1, the implicitly open one
    assert [z.state for z in table.zones] == [S.NOT_WP, S.CLOSED, S.EOPEN, S.EMPTY]
    assert [d.z_start for d in table.report(ZS + 3, 2)] == [ZS, 2 * ZS]


# -- the driver against the device -------------------------------------------------------------
ZONE = 64 << 10


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    with Disk.embedded(16 * ZONE, mode="thread", zoned={
            "zone_size": ZONE, "conventional_zones": 2, "max_open_zones": 2,
            "max_active_zones": 3, "max_append_size": 32 << 10}) as d:
        yield d


@pytest.fixture
def fresh(disk: Disk) -> Disk:
    disk.zone_reset_all()
    return disk


def test_disk_reads_the_zoned_characteristics(disk: Disk) -> None:
    chars = disk.zoned
    assert chars is not None
    assert (chars.model, chars.zone_size, chars.max_open_zones, chars.max_active_zones,
            chars.max_append_size, chars.write_granularity) == (
        ZonedModel.HM, ZONE, 2, 3, 32 << 10, 512)
    assert disk.zone_size == ZONE
    assert "BLK_ZONED" in disk.features and "BLK_DISCARD" not in disk.features


def test_disk_report_zones(fresh: Disk) -> None:
    zones = fresh.report_zones()
    assert len(zones) == 16
    assert zones[0] == Zone(0, ZONE, ZONE, None, ZoneType.CONV, S.NOT_WP)
    assert zones[2] == Zone(2 * ZONE, ZONE, ZONE, 2 * ZONE, ZoneType.SWR, S.EMPTY)
    assert [z.start for z in fresh.report_zones(5 * ZONE + 4096, 3)] == [
        5 * ZONE, 6 * ZONE, 7 * ZONE]
    assert fresh.report_zones(15 * ZONE, 10)[0].start == 15 * ZONE
    with pytest.raises(ValueError, match="outside"):
        fresh.report_zones(16 * ZONE)


def test_disk_report_pages_through_many_zones() -> None:
    with Disk.embedded(600 * 4096, mode="thread", zoned={"zone_size": 4096}) as d:
        assert d.zone_append(b"x" * 4096, 599 * 4096) == 599 * 4096
        zones = d.report_zones()  # 600 zones: three ZONE_REPORT requests of 256
        assert [z.start for z in zones] == [i * 4096 for i in range(600)]
        assert zones[-1].state == S.FULL and zones[-1].wp is None
        assert len(d.report_zones(100 * 4096, 300)) == 300


def test_disk_writes_appends_and_management(fresh: Disk) -> None:
    z2, z3 = 2 * ZONE, 3 * ZONE
    fresh.pwrite(b"a" * 8192, z2)
    assert fresh.zone_append(b"b" * 4096, z2) == z2 + 8192
    assert fresh.zone_append(b"c" * 4096, z2) == z2 + 12288
    assert fresh.pread(16384, z2) == b"a" * 8192 + b"b" * 4096 + b"c" * 4096
    assert fresh.report_zones(z2, 1)[0].wp == z2 + 16384
    fresh.zone_open(z3)
    assert fresh.report_zones(z3, 1)[0].state == S.EOPEN
    fresh.zone_close(z3)
    assert fresh.report_zones(z3, 1)[0].state == S.EMPTY
    fresh.zone_finish(z3)
    assert fresh.report_zones(z3, 1)[0].state == S.FULL
    fresh.zone_reset(z2)
    assert fresh.report_zones(z2, 1)[0].state == S.EMPTY
    assert fresh.pread(4096, z2) == bytes(4096)


def test_disk_splits_io_at_zone_boundaries(fresh: Disk) -> None:
    # Conventional zones 0 and 1 take one write across their boundary (two requests).
    fresh.pwrite(b"q" * 8192, ZONE - 4096)
    assert fresh.pread(8192, ZONE - 4096) == b"q" * 8192
    fresh.pwrite(b"r" * 4096, 4 * ZONE)
    fresh.pwrite(b"s" * 4096, 5 * ZONE)
    data = fresh.pread(2 * ZONE, 4 * ZONE)  # reads of sequential zones, one per zone
    assert data[:4096] == b"r" * 4096 and data[ZONE : ZONE + 4096] == b"s" * 4096
    assert data[4096:ZONE] == bytes(ZONE - 4096)
    assert [len(p[1][0]) for p in split_at_zones([memoryview(bytes(3 * ZONE))], ZONE // 2,
                                                 ZONE)] == [ZONE // 2, ZONE, ZONE, ZONE // 2]


def test_disk_zone_errors_name_the_status(fresh: Disk) -> None:
    z = 4 * ZONE
    fresh.pwrite(b"x" * 4096, z)
    with pytest.raises(ZoneUnalignedWriteError, match="ZONE_UNALIGNED_WP") as unaligned:
        fresh.pwrite(b"x" * 4096, z + 8192)
    assert unaligned.value.errno == errno.EIO and unaligned.value.status == Status.ZONE_UNALIGNED_WP
    with pytest.raises(ZoneInvalidCommandError, match="ZONE_INVALID_CMD"):
        fresh.zone_open(0)  # a conventional zone
    fresh.zone_finish(z)
    with pytest.raises(ZoneInvalidCommandError):
        fresh.zone_append(b"x" * 4096, z)  # full
    fresh.zone_open(5 * ZONE)
    fresh.zone_open(6 * ZONE)
    with pytest.raises(ZoneOpenResourceError, match="ZONE_OPEN_RESOURCE") as open_res:
        fresh.zone_open(7 * ZONE)
    assert open_res.value.errno == errno.ETOOMANYREFS
    with pytest.raises(ZoneOpenResourceError):
        fresh.pwrite(b"x" * 4096, 7 * ZONE)  # no implicitly open zone to close for it
    fresh.zone_close(5 * ZONE)  # EOPEN, nothing written: back to EMPTY
    fresh.pwrite(b"x" * 4096, 7 * ZONE)
    fresh.zone_close(7 * ZONE)
    fresh.pwrite(b"x" * 4096, 8 * ZONE)  # three active: 6 (EOPEN), 7 (CLOSED), 8 (IOPEN)
    with pytest.raises(ZoneActiveResourceError, match="ZONE_ACTIVE_RESOURCE") as active:
        fresh.pwrite(b"x" * 4096, 9 * ZONE)
    assert active.value.errno == errno.EOVERFLOW
    assert isinstance(active.value, ZoneError) and isinstance(active.value, BlockIOError)


def test_disk_validates_zone_arguments(fresh: Disk) -> None:
    with pytest.raises(ValueError, match="not the start of a zone"):
        fresh.zone_reset(ZONE + 512)
    with pytest.raises(ValueError, match="max append size"):
        fresh.zone_append(bytes(64 << 10), 2 * ZONE)
    with pytest.raises(ValueError, match="granularity"):
        fresh.zone_append(b"", 2 * ZONE)


def test_zero_copy_append(fresh: Disk) -> None:
    buf = fresh.buffer(8192)
    try:
        buf[:] = b"z" * 8192
        assert fresh.zone_append(buf, 10 * ZONE) == 10 * ZONE
        assert fresh.pread(8192, 10 * ZONE) == b"z" * 8192
    finally:
        fresh.free_buffer(buf)


def test_appends_from_two_queues_never_overlap() -> None:
    """Zone append is what lets writers share a zone: the device orders them."""
    with Disk.embedded(4 * ZONE, mode="thread", num_queues=2,
                       zoned={"zone_size": ZONE}) as d:
        assert d.num_queues == 2
        placed: dict[int, int] = {}
        lock = threading.Lock()

        def writer(first: int) -> None:
            for fill in range(first, first + 14):
                offset = d.zone_append(bytes([fill]) * 2048, ZONE)
                with lock:
                    placed[offset] = fill

        threads = [threading.Thread(target=writer, args=(base,)) for base in (1, 101)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(placed) == [ZONE + i * 2048 for i in range(28)]
        data = d.pread(28 * 2048, ZONE)
        for offset, fill in placed.items():
            pos = offset - ZONE
            assert data[pos : pos + 2048] == bytes([fill]) * 2048


def test_regular_disk_has_no_zone_api() -> None:
    with Disk.embedded(1 << 20, mode="thread") as d:
        assert d.zoned is None and d.zone_size == 0
        with pytest.raises(FeatureNotNegotiatedError):
            d.report_zones()
        with pytest.raises(FeatureNotNegotiatedError):
            d.zone_append(b"x" * 512, 0)


def test_driver_declines_discard_from_a_host_managed_device() -> None:
    from virtblk.vhost_user.server import serve_connected

    device = BlkDevice(ZonedMemoryBackend(4 * ZONE, zone_size=ZONE))
    device.features |= Feature.BLK_DISCARD.mask  # a device that offers it anyway
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    thread.start()
    with Disk.from_socket(ours) as d:
        assert "BLK_ZONED" in d.features and "BLK_DISCARD" not in d.features
        negotiated = device.negotiated_features
        assert negotiated is not None and not has_feature(negotiated, Feature.BLK_DISCARD)
    thread.join(10)
    theirs.close()


def _disk_target(model: Model, op: tuple[object, ...]) -> tuple[int, int]:
    _, z, delta, n, _ = op
    assert isinstance(z, int) and isinstance(delta, int) and isinstance(n, int)
    base = model.wp[z] if model.state[z] not in (S.NOT_WP, S.FULL) else z * ZS
    return max(z * ZS, min(base + delta, (z + 1) * ZS - n)), n


def test_random_sequences_through_the_driver() -> None:
    """The same model, through Disk and the vhost-user device: statuses arrive as the
    matching exceptions and reports as Zone objects."""
    with Disk.embedded(ZONES * ZS * 512, mode="thread", zoned={
            "zone_size": ZS * 512, "zone_capacity": CAP * 512, "conventional_zones": CONV,
            "max_open_zones": 2, "max_active_zones": 3, "max_append_size": 16 * 512}) as d:

        def status_of(call: object, *args: object) -> Status:
            assert callable(call)
            try:
                call(*args)
            except ZoneError as exc:
                return exc.status
            return Status.OK

        @settings(max_examples=40, deadline=None)
        @given(ops=ops)
        def check(ops: list[tuple[object, ...]]) -> None:
            d.zone_reset_all()
            d.pwrite(bytes(CONV * ZS * 512), 0)
            model = Model(ZONES, CONV, CAP, 2, 3, 16)
            for i, op in enumerate(ops):
                fill = i % 250 + 1
                if op[0] == "write":
                    sector, n = _disk_target(model, op)
                    assert status_of(d.pwrite, bytes([fill]) * (n * 512), sector * 512) == \
                        model.write(sector, n, fill)
                elif op[0] == "append":
                    z, n = op[1], op[2]
                    assert isinstance(z, int) and isinstance(n, int)
                    if n > 16:  # the driver refuses it before the device sees it
                        with pytest.raises(ValueError, match="max append size"):
                            d.zone_append(bytes(n * 512), z * ZS * 512)
                        continue
                    expected, at = model.append(z, n, fill)
                    try:
                        got = d.zone_append(bytes([fill]) * (n * 512), z * ZS * 512)
                    except ZoneError as exc:
                        assert exc.status == expected
                    else:
                        assert (expected, got) == (Status.OK, at)
                elif op[0] == "reset_all":
                    d.zone_reset_all()
                    model.reset_all()
                else:
                    rtype, z = op
                    assert isinstance(z, int)
                    call = {T.ZONE_OPEN: d.zone_open, T.ZONE_CLOSE: d.zone_close,
                            T.ZONE_FINISH: d.zone_finish, T.ZONE_RESET: d.zone_reset}[rtype]
                    assert status_of(call, z * ZS * 512) == model.manage(rtype, z)
            zones = d.report_zones()
            assert [z.state for z in zones] == model.state
            assert [z.wp for z in zones] == [
                wp * 512 if s in (S.EMPTY, S.IOPEN, S.EOPEN, S.CLOSED) else None
                for wp, s in zip(model.wp, model.state, strict=True)]
            assert d.pread(ZONES * ZS * 512 // 2, 0) + d.pread(ZONES * ZS * 512 // 2,
                                                               ZONES * ZS * 512 // 2) == \
                bytes(model.data)

        check()


# -- virtblk serve --zoned ---------------------------------------------------------------------
def test_serve_zoned_over_a_socket(sock_dir: Path) -> None:
    path = str(sock_dir / "zoned.sock")
    args = ["--memory", "8M", "--zoned", "--zone-size", "1M", "--conventional-zones", "1",
            "--max-open-zones", "1", "--max-active-zones", "3", "--zone-capacity", "768K"]
    with ServeProcess(path, args) as server, Disk.connect(path) as d:
        chars = d.zoned
        assert chars is not None
        assert (chars.zone_size, chars.max_open_zones, chars.max_active_zones) == (1 << 20, 1, 3)
        zones = d.report_zones()
        assert [z.type for z in zones] == [ZoneType.CONV] + [ZoneType.SWR] * 7
        assert zones[1].capacity == 768 << 10
        assert d.zone_append(b"m" * 4096, 1 << 20) == 1 << 20
        with pytest.raises(ZoneUnalignedWriteError):
            d.pwrite(b"m" * 4096, 1 << 20)
        d.zone_open(2 << 20)  # closes zone 1, the implicitly open one
        assert [z.state for z in d.report_zones(1 << 20, 2)] == [S.CLOSED, S.EOPEN]
        with pytest.raises(ZoneOpenResourceError):
            d.zone_open(3 << 20)
        assert "zoned" in server.output
