"""The backend state machine, fed messages directly (no sockets) over a recording device."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from vhost_user_helpers import (
    AVAIL_OFF,
    DESC_OFF,
    GUEST_UVA,
    USED_OFF,
    RecordingDevice,
    describe,
    guest_region,
    is_open,
)

from virtblk.spec import BlkConfig, Feature
from virtblk.vhost_user.backend import (
    DEFAULT_PROTOCOL_FEATURES,
    BackendConnection,
    ProtocolViolation,
    inflight_queue_size,
)
from virtblk.vhost_user.codec import CLOSED, NEED_DATA, Decoder, encode
from virtblk.vhost_user.errors import ProtocolError
from virtblk.vhost_user.fd import OwnedFd
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
    GetProtocolFeatures,
    GetProtocolFeaturesReply,
    GetQueueNum,
    GetQueueNumReply,
    GetVringBase,
    GetVringBaseReply,
    MemRegion,
    ProtocolFeature,
    RemMemReg,
    SetBackendReqFd,
    SetConfig,
    SetFeatures,
    SetMemTable,
    SetOwner,
    SetProtocolFeatures,
    SetVringAddr,
    SetVringBase,
    SetVringCall,
    SetVringEnable,
    SetVringKick,
    SetVringNum,
)
from virtblk.virtio.memory import MemoryRegion
from virtblk.virtio.split_layout import check_queue_size

ALL_PROTOCOL = DEFAULT_PROTOCOL_FEATURES
WITH_PROTOCOL_FEATURES = (
    Feature.VERSION_1.mask | Feature.RING_EVENT_IDX.mask | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
)


@pytest.fixture
def conn(device: RecordingDevice) -> Iterator[BackendConnection]:
    c = BackendConnection(device)
    yield c
    c.close()


def negotiate(conn: BackendConnection, features: int = WITH_PROTOCOL_FEATURES) -> None:
    assert conn.handle(GetFeatures()) == GetFeaturesReply(conn.device.features)
    conn.handle(SetProtocolFeatures(ALL_PROTOCOL))
    conn.handle(SetOwner())
    conn.handle(SetFeatures(features))


def map_memory(conn: BackendConnection, region: MemoryRegion) -> None:
    conn.handle(SetMemTable((describe(region),), (OwnedFd.dup(region.fd),)))


def setup_ring(conn: BackendConnection, index: int, *, num: int = 64) -> tuple[int, int]:
    """Size, base and addresses of ring ``index`` (each ring at its own 64 KiB slot); then
    call and kick eventfds.  Returns (kick, call) as the frontend keeps them."""
    slot = GUEST_UVA + index * 0x10000
    conn.handle(SetVringNum(index, num))
    conn.handle(SetVringBase(index, 0))
    conn.handle(SetVringAddr(index, slot + DESC_OFF, slot + USED_OFF, slot + AVAIL_OFF))
    kick, call = os.eventfd(0), os.eventfd(0)
    conn.handle(SetVringCall(index, OwnedFd.dup(call)))
    conn.handle(SetVringKick(index, OwnedFd.dup(kick)))
    return kick, call


# --------------------------------------------------------------------------- negotiation


def test_negotiation_answers_from_the_device(conn: BackendConnection) -> None:
    assert conn.handle(GetProtocolFeatures()) == GetProtocolFeaturesReply(ALL_PROTOCOL)
    assert conn.handle(GetQueueNum()) == GetQueueNumReply(2)
    negotiate(conn)
    assert conn.device.acked == WITH_PROTOCOL_FEATURES  # type: ignore[attr-defined]
    assert conn.event_idx


def test_features_never_offered_are_refused(conn: BackendConnection) -> None:
    conn.handle(SetOwner())
    with pytest.raises(ProtocolError, match="never offered"):
        conn.handle(SetFeatures(Feature.RING_PACKED.mask))
    with pytest.raises(ProtocolError, match="INBAND_NOTIFICATIONS"):
        conn.handle(SetProtocolFeatures(ProtocolFeature.INBAND_NOTIFICATIONS.mask))


def test_ring_and_memory_requests_need_set_owner(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    fd = os.dup(region.fd)
    with pytest.raises(ProtocolError, match="SET_MEM_TABLE before SET_OWNER"):
        conn.handle(SetMemTable((describe(region),), (OwnedFd(fd),)))
    assert not is_open(fd)  # a rejected message's fds are closed
    with pytest.raises(ProtocolError, match="before SET_OWNER"):
        conn.handle(SetVringNum(0, 64))


def test_feature_gated_requests_need_the_protocol_feature(conn: BackendConnection) -> None:
    with pytest.raises(ProtocolError, match="needs protocol feature CONFIG"):
        conn.handle(GetConfig(0, 8))
    conn.handle(SetOwner())
    with pytest.raises(ProtocolError, match="INFLIGHT_SHMFD"):
        conn.handle(GetInflightFd(2, 64))


# --------------------------------------------------------------------------- rings


def test_ring_starts_on_enable_when_protocol_features_acked(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn)
    map_memory(conn, region)
    kick, call = setup_ring(conn, 1)
    assert device.log == []  # started (kick fd) but disabled
    conn.handle(SetVringEnable(1, True))
    assert device.log == [("start", 1)]
    vq, kick_fd, call_fd = device.running[1]
    slot = 0x10000
    assert (vq.addrs.desc, vq.addrs.avail, vq.addrs.used) == (
        slot + DESC_OFF,
        slot + AVAIL_OFF,
        slot + USED_OFF,
    )
    assert vq.num == 64 and vq.event_idx
    assert kick_fd >= 0 and call_fd >= 0
    assert conn.handle(GetVringBase(1)) == GetVringBaseReply(1, 0)
    assert device.log == [("start", 1), ("stop", 1)]
    assert not is_open(kick_fd) and not is_open(call_fd)  # stopped ring's fds are released
    os.close(kick)
    os.close(call)


def test_ring_starts_on_kick_without_protocol_features(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    kick, call = setup_ring(conn, 0)
    assert device.log == [("start", 0)]
    assert not device.running[0][0].event_idx
    os.close(kick)
    os.close(call)


def test_vring_base_resumes_where_the_device_stopped(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    conn.handle(SetVringNum(0, 64))
    conn.handle(SetVringBase(0, 7))
    conn.handle(SetVringAddr(0, GUEST_UVA + DESC_OFF, GUEST_UVA + USED_OFF, GUEST_UVA + AVAIL_OFF))
    # the driver's used idx says 5 entries were completed before
    region.view[USED_OFF + 2 : USED_OFF + 4].cast("H")[0] = 5
    conn.handle(SetVringKick(0, OwnedFd(os.eventfd(0))))
    vq = device.running[0][0]
    assert (vq.last_avail_idx, vq.used_idx) == (7, 5)
    assert device.running[0][2] == -1  # no call fd: the frontend polls
    assert conn.handle(GetVringBase(0)).num == 7  # type: ignore[union-attr]


def test_new_call_fd_restarts_a_running_ring(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    kick, call = setup_ring(conn, 0)
    old_call = device.running[0][2]
    new = os.eventfd(0)
    conn.handle(SetVringCall(0, OwnedFd(new)))
    assert device.log == [("start", 0), ("stop", 0), ("start", 0)]
    assert device.running[0][2] == new
    assert not is_open(old_call)
    os.close(kick)
    os.close(call)


def test_vring_index_out_of_range(conn: BackendConnection, region: MemoryRegion) -> None:
    negotiate(conn)
    for message in (
        SetVringNum(2, 64),
        SetVringBase(9, 0),
        GetVringBase(2),
        SetVringEnable(5, True),
    ):
        with pytest.raises(ProtocolError, match=r"ring index \d out of range .the device has 2"):
            conn.handle(message)
    fd = os.eventfd(0)
    with pytest.raises(ProtocolError, match="ring index 200 out of range"):
        conn.handle(SetVringKick(200, OwnedFd(fd)))
    assert not is_open(fd)


@pytest.mark.parametrize("num", [0, 1, 2, 3, 100, 256, 32768, 65536, (1 << 32) - 1])
def test_queue_sizes_follow_the_split_layouts_rule(device: RecordingDevice, num: int) -> None:
    """SET_VRING_NUM and GET_INFLIGHT_FD accept exactly the sizes split_layout accepts (the
    one module that knows the ring) and refuse the others with its reason."""
    try:
        check_queue_size(num)
        reason = None
    except ValueError as exc:
        reason = str(exc)
    conn = BackendConnection(
        device, protocol_features=ALL_PROTOCOL | ProtocolFeature.INFLIGHT_SHMFD.mask
    )
    try:
        negotiate(conn)
        conn.handle(SetProtocolFeatures(ProtocolFeature.INFLIGHT_SHMFD.mask))
        for message, what in (
            (SetVringNum(0, num), "SET_VRING_NUM: ring 0"),
            (GetInflightFd(1, num), "GET_INFLIGHT_FD"),
        ):
            if reason is None:
                reply = conn.handle(message)
                if reply is not None:
                    reply.close()
            else:
                with pytest.raises(ProtocolError) as info:
                    conn.handle(message)
                assert str(info.value) == f"{what}: {reason}"
    finally:
        conn.close()


def test_ring_addresses_outside_memory(conn: BackendConnection, region: MemoryRegion) -> None:
    negotiate(conn)
    with pytest.raises(ProtocolError, match="before a memory table"):
        conn.handle(SetVringAddr(0, GUEST_UVA, GUEST_UVA + USED_OFF, GUEST_UVA + AVAIL_OFF))
    map_memory(conn, region)
    conn.handle(SetVringNum(0, 256))
    outside = GUEST_UVA + region.size
    with pytest.raises(ProtocolError, match="ring 0 descriptor table: user address"):
        conn.handle(SetVringAddr(0, outside, GUEST_UVA + USED_OFF, GUEST_UVA + AVAIL_OFF))
    straddling = GUEST_UVA + region.size - 8  # the used ring runs off the end
    with pytest.raises(ProtocolError, match="ring 0 used ring"):
        conn.handle(SetVringAddr(0, GUEST_UVA, straddling, GUEST_UVA + AVAIL_OFF))
    with pytest.raises(ProtocolError, match="not 16-aligned"):
        conn.handle(SetVringAddr(0, GUEST_UVA + 8, GUEST_UVA + USED_OFF, GUEST_UVA + AVAIL_OFF))


def test_kick_without_ring_setup_is_an_error(conn: BackendConnection, region: MemoryRegion) -> None:
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    with pytest.raises(ProtocolError, match="without its size and addresses"):
        conn.handle(SetVringKick(0, OwnedFd(os.eventfd(0))))


# --------------------------------------------------------------------------- memory


def test_overlapping_and_excess_regions(device: RecordingDevice) -> None:
    conn = BackendConnection(device, max_mem_slots=2)
    first, overlapping, third = guest_region(0), guest_region(0x80000, GUEST_UVA * 2), None
    try:
        negotiate(conn)
        conn.handle(AddMemReg(describe(first), OwnedFd.dup(first.fd)))
        fd = os.dup(overlapping.fd)
        with pytest.raises(ProtocolError, match="overlaps"):
            conn.handle(AddMemReg(describe(overlapping), OwnedFd(fd)))
        assert not is_open(fd)
        third = guest_region(1 << 30, GUEST_UVA * 3)
        conn.handle(AddMemReg(describe(third), OwnedFd.dup(third.fd)))
        with pytest.raises(ProtocolError, match="all 2 memory slots are used"):
            conn.handle(AddMemReg(MemRegion(1 << 40, 4096, 1 << 45, 0), OwnedFd.dup(third.fd)))
        regions = tuple(MemRegion(i << 30, 4096, i << 40, 0) for i in range(3))
        with pytest.raises(ProtocolError, match="3 regions, at most 2"):
            conn.handle(SetMemTable(regions, tuple(OwnedFd.dup(first.fd) for _ in range(3))))
        conn.handle(RemMemReg(describe(third)))
        assert conn.memory is not None and len(conn.memory.regions) == 1
        with pytest.raises(ProtocolError, match="no region at gpa"):
            conn.handle(RemMemReg(describe(third)))
    finally:
        conn.close()
        for r in (first, overlapping, third):
            if r is not None:
                r.close()


def test_new_memory_table_restarts_running_rings(
    conn: BackendConnection, device: RecordingDevice, region: MemoryRegion
) -> None:
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    kick, call = setup_ring(conn, 0)
    old_memory = conn.memory
    map_memory(conn, region)
    assert conn.memory is not old_memory
    assert device.log == [("start", 0), ("stop", 0), ("start", 0)]
    os.close(kick)
    os.close(call)


# --------------------------------------------------------------------------- config, acks


def test_config_read_and_write(conn: BackendConnection, device: RecordingDevice) -> None:
    conn.handle(SetProtocolFeatures(ALL_PROTOCOL))
    reply = conn.handle(GetConfig(0, 60))
    assert isinstance(reply, GetConfigReply)
    assert BlkConfig.unpack(reply.data).capacity == 2048
    assert conn.handle(GetConfig(90, 10)) == GetConfigFailed()  # past the 96 bytes
    assert conn.handle(SetConfig(BlkConfig.OFFSET_WRITEBACK, b"\x01", need_reply=True)) == Ack(
        25, 0
    )
    assert device.config_bytes[BlkConfig.OFFSET_WRITEBACK] == 1
    # the device refuses: a NACK, not a protocol violation
    assert conn.handle(SetConfig(0, b"\x01", need_reply=True)) == Ack(25, 1)


def test_reply_ack_and_nack_through_the_byte_interface(conn: BackendConnection) -> None:
    stream = b""
    for message in (
        SetProtocolFeatures(ALL_PROTOCOL),
        SetOwner(need_reply=True),
        SetVringNum(7, 64, need_reply=True),
    ):
        stream += encode(message)[0]
    conn.receive_data(stream)
    assert conn.next_event() == Ack(3, 0)
    assert conn.next_event() == Ack(8, 1)  # answered, then reported
    violation = conn.next_event()
    assert isinstance(violation, ProtocolViolation)
    assert "ring index 7 out of range" in str(violation.error)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


def test_garbage_bytes_become_a_violation(conn: BackendConnection) -> None:
    conn.receive_data(b"\xff" * 12)
    event = conn.next_event()
    assert isinstance(event, ProtocolViolation)
    assert "version" in str(event.error)


def test_config_change_goes_out_on_the_backend_channel(
    conn: BackendConnection, device: RecordingDevice
) -> None:
    woken: list[bool] = []
    conn.wakeup = lambda: woken.append(True)
    conn.handle(SetProtocolFeatures(ALL_PROTOCOL))
    assert device.config_changed is not None
    device.config_changed()  # no channel yet: nothing to send
    assert conn.backend_data_to_send() == []
    ours, theirs = os.pipe()  # any fd will do for the state machine
    conn.handle(SetBackendReqFd(OwnedFd(theirs)))
    device.config_changed()
    (sent,) = conn.backend_data_to_send()
    decoder = Decoder(Channel.BACKEND)
    decoder.receive_data(sent[0], sent[1])
    assert decoder.next_event() == ConfigChangeMsg(need_reply=True)
    assert woken == [True] and conn.backend_acks_pending == 1
    conn.receive_backend_data(encode(Ack(2, 0, Channel.BACKEND))[0])
    assert conn.backend_acks_pending == 0
    with pytest.raises(ProtocolError, match="CONFIG_CHANGE_MSG on the backend channel"):
        conn.receive_backend_data(encode(ConfigChangeMsg())[0])
    os.close(ours)


def test_inflight_buffer_has_the_split_queue_size(device: RecordingDevice) -> None:
    conn = BackendConnection(
        device, protocol_features=ALL_PROTOCOL | ProtocolFeature.INFLIGHT_SHMFD.mask
    )
    try:
        conn.handle(SetProtocolFeatures(ProtocolFeature.INFLIGHT_SHMFD.mask))
        conn.handle(SetOwner())
        reply = conn.handle(GetInflightFd(2, 128))
        assert isinstance(reply, GetInflightFdReply) and reply.fd is not None
        assert inflight_queue_size(128) == 2112  # 16 + 16 * 128 = 2064, rounded up to 64
        assert reply.mmap_size == 2 * inflight_queue_size(128)
        with reply:  # the reply owns its fd (a dup of the buffer the connection keeps)
            assert os.fstat(reply.fd.fileno()).st_size == reply.mmap_size
            sent = reply.fd.fileno()
        assert not is_open(sent)
        assert conn.inflight_fd is not None
        kept = conn.inflight_fd.fileno()
        assert os.fstat(kept).st_size == reply.mmap_size
        with pytest.raises(ProtocolError, match="for 3 queues"):
            conn.handle(GetInflightFd(3, 128))
    finally:
        conn.close()
    assert not is_open(kept)


def test_close_resets_the_device_and_releases_everything(
    device: RecordingDevice, region: MemoryRegion
) -> None:
    conn = BackendConnection(device)
    negotiate(conn, Feature.VERSION_1.mask)
    map_memory(conn, region)
    kick, call = setup_ring(conn, 0)
    _vq, kick_fd, call_fd = device.running[0]
    memory = conn.memory
    assert memory is not None
    mapped_fd = memory.regions[0].fd
    conn.close()
    assert device.resets == 1 and device.running == {}
    assert all(not is_open(fd) for fd in (kick_fd, call_fd, mapped_fd))
    assert device.config_changed is None
    os.close(kick)
    os.close(call)


# --------------------------------------------------------------------------- unsealed memory


def unsealed_memfd(size: int) -> int:
    """Guest memory a frontend could still shrink (and so kill the device with SIGBUS)."""
    fd = os.memfd_create("unsealed-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_memory_a_frontend_could_shrink_is_refused(
    conn: BackendConnection, region: MemoryRegion
) -> None:
    negotiate(conn)
    fd = unsealed_memfd(region.size)
    with pytest.raises(ProtocolError, match="not sealed against shrinking"):
        conn.handle(SetMemTable((describe(region),), (OwnedFd(fd),)))
    assert not is_open(fd)
    assert conn.memory is None
    fd = unsealed_memfd(region.size)
    with pytest.raises(ProtocolError, match="not sealed against shrinking"):
        conn.handle(AddMemReg(describe(region), OwnedFd(fd)))
    map_memory(conn, region)  # sealed (MemoryRegion.create seals): mapped
    assert conn.memory is not None and len(conn.memory.regions) == 1


def test_unsealed_memory_is_mapped_when_the_user_accepts_the_risk(
    device: RecordingDevice, region: MemoryRegion
) -> None:
    conn = BackendConnection(device, accept_unsealed_memory=True)
    try:
        negotiate(conn)
        conn.handle(SetMemTable((describe(region),),
                                (OwnedFd(unsealed_memfd(region.size)),)))
        assert conn.memory is not None and len(conn.memory.regions) == 1
    finally:
        conn.close()
