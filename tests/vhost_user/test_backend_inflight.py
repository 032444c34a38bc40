"""INFLIGHT_SHMFD in the backend state machine: offered, the buffer handed over and checked,
each ring started on its region and recovered from it (QEMU 7.2's order after a restart:
SET_FEATURES, SET_INFLIGHT_FD, SET_MEM_TABLE, then per ring NUM, BASE = used idx, ADDR,
CALL, KICK)."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from test_backend import map_memory, negotiate, setup_ring
from vhost_user_helpers import AVAIL_OFF, USED_OFF, RecordingDevice, is_open

from virtblk.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    WITHOUT_INFLIGHT,
    BackendConnection,
    inflight_queue_size,
)
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
from virtblk.vhost_user.messages import (
    GetInflightFd,
    GetInflightFdReply,
    GetProtocolFeatures,
    GetProtocolFeaturesReply,
    ProtocolFeature,
    ResetDevice,
    SetInflightFd,
    SetVringEnable,
)
from virtblk.virtio.memory import MemoryRegion

INFLIGHT = ProtocolFeature.INFLIGHT_SHMFD.mask
NUM = 64
REGION = inflight_queue_size(NUM)


@pytest.fixture
def conn(device: RecordingDevice) -> Iterator[BackendConnection]:
    c = BackendConnection(device)
    negotiate(c)
    yield c
    c.close()


def buffer(conn: BackendConnection, num_queues: int = 2) -> tuple[OwnedFd, mmap.mmap]:
    """GET_INFLIGHT_FD's buffer, as the frontend keeps it: its fd and a mapping."""
    reply = conn.handle(GetInflightFd(num_queues, NUM))
    assert isinstance(reply, GetInflightFdReply) and reply.fd is not None
    fd = OwnedFd(reply.fd.take())
    return fd, mmap.mmap(fd.fileno(), reply.mmap_size)


def hand_back(conn: BackendConnection, fd: OwnedFd, num_queues: int = 2,
              size: int | None = None, offset: int = 0) -> None:
    size = num_queues * REGION if size is None else size
    conn.handle(SetInflightFd(size, offset, num_queues, NUM, OwnedFd.dup(fd.fileno())))


def start_ring(conn: BackendConnection, index: int, num: int = NUM) -> tuple[int, int]:
    kick, call = setup_ring(conn, index, num=num)
    conn.handle(SetVringEnable(index, True))
    return kick, call


def test_inflight_shmfd_is_offered_unless_hidden(device: RecordingDevice) -> None:
    assert DEFAULT_PROTOCOL_FEATURES & INFLIGHT
    assert WITHOUT_INFLIGHT == DEFAULT_PROTOCOL_FEATURES & ~INFLIGHT
    for offered in (DEFAULT_PROTOCOL_FEATURES, WITHOUT_INFLIGHT):
        conn = BackendConnection(device, protocol_features=offered)
        assert conn.handle(GetProtocolFeatures()) == GetProtocolFeaturesReply(offered)
        conn.close()


def test_the_buffer_we_make_is_sealed(conn: BackendConnection) -> None:
    fd, mem = buffer(conn)
    seals = fcntl.fcntl(fd.fileno(), fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    with pytest.raises(PermissionError):
        os.ftruncate(fd.fileno(), 64)
    mem.close()
    fd.close()


def test_a_fresh_buffer_is_initialised_when_the_ring_starts(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    fd, mem = buffer(conn)
    hand_back(conn, fd)
    assert conn.inflight_fd is None  # the one GET_INFLIGHT_FD made is superseded
    map_memory(conn, region)
    kick, call = start_ring(conn, 1)
    vq = device.running[1][0]
    assert vq.inflight is not None and vq.resubmit_pending == []
    # Queue 1's region: version 1, desc_num NUM; queue 0's untouched (not started yet).
    assert struct.unpack_from("<QHHHH", mem, REGION) == (0, 1, NUM, 0, 0)
    assert struct.unpack_from("<QHHHH", mem, 0) == (0, 0, 0, 0, 0)
    for f in (kick, call):
        os.close(f)
    mem.close()
    fd.close()


def test_a_restarted_device_resubmits_what_the_buffer_holds_in_counter_order(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    """Four offered, one answered (used idx 1), three in flight: 9, 4, 30 by counter 7,
    2, 5.  QEMU's SET_VRING_BASE says 1 (the used idx); the avail ring resumes at 4."""
    fd, mem = buffer(conn, 1)
    struct.pack_into("<QHHHH", mem, 0, 0, 1, NUM, 0, 1)
    for head, counter in ((9, 7), (4, 2), (30, 5)):
        struct.pack_into("<B5xHQ", mem, 16 + 16 * head, 1, 0, counter)
    view = region.view
    struct.pack_into("<H", view, AVAIL_OFF + 2, 5)  # one more offered, never popped
    struct.pack_into("<H", view, USED_OFF + 2, 1)
    hand_back(conn, fd, 1)
    map_memory(conn, region)
    kick, call = start_ring(conn, 0)  # base 0: overridden by the buffer
    vq = device.running[0][0]
    assert vq.resubmit_pending == [4, 30, 9]
    assert vq.last_avail_idx == 4 and vq.used_idx == 1
    assert conn.resubmitted == [3, 0]
    for f in (kick, call):
        os.close(f)
    mem.close()
    fd.close()


@pytest.mark.parametrize(
    ("num_queues", "size", "offset", "message"),
    [
        (3, 3 * REGION, 0, "for 3 queues"),
        (0, 0, 0, "for 0 queues"),
        (2, REGION, 0, "needed for 2 queues"),
        (2, 2 * REGION, 4096, "runs past the end"),
    ],
)
def test_a_buffer_that_does_not_fit_is_refused(
    conn: BackendConnection, num_queues: int, size: int, offset: int, message: str
) -> None:
    fd, mem = buffer(conn)
    with pytest.raises(ProtocolError, match=message):
        hand_back(conn, fd, num_queues, size, offset)
    assert conn.inflight is None
    mem.close()
    fd.close()


def test_an_unsealed_buffer_is_refused(conn: BackendConnection) -> None:
    fd = OwnedFd(os.memfd_create("unsealed-inflight", os.MFD_CLOEXEC))
    os.ftruncate(fd.fileno(), 2 * REGION)
    with pytest.raises(ProtocolError, match="sealed"):
        hand_back(conn, fd)
    fd.close()


def test_a_hostile_buffer_refuses_the_ring(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    fd, mem = buffer(conn, 1)
    struct.pack_into("<QHHHH", mem, 0, 0, 1, NUM, 0, 0)
    struct.pack_into("<B", mem, 16 + 16 * 3, 7)
    hand_back(conn, fd, 1)
    map_memory(conn, region)
    with pytest.raises(ProtocolError, match="in-flight buffer refused: descriptor 3 has"):
        start_ring(conn, 0)
    assert 0 not in device.running
    mem.close()
    fd.close()


def test_a_ring_of_another_size_is_refused(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    fd, mem = buffer(conn, 1)
    hand_back(conn, fd, 1)
    map_memory(conn, region)
    with pytest.raises(ProtocolError, match="made for queues of 64"):
        start_ring(conn, 0, 32)
    mem.close()
    fd.close()


def test_reset_and_close_release_the_buffer(
    conn: BackendConnection, device: RecordingDevice
) -> None:
    fd, mem = buffer(conn)
    hand_back(conn, fd)
    assert conn.inflight is not None
    mapped = conn.inflight.region.fd
    conn.handle(ResetDevice())
    assert conn.inflight is None and not is_open(mapped)
    hand_back(conn, fd)
    assert conn.inflight is not None
    mapped = conn.inflight.region.fd
    conn.close()
    assert not is_open(mapped)
    mem.close()
    fd.close()
