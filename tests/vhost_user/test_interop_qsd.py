"""Our frontend against the real qemu-storage-daemon (must run: a missing daemon fails).

Export: null-co, 1 GiB, read-zeroes, writable, num-queues=2 (see /work/shared/NOTES.md for
what qemu-storage-daemon 7.2 answers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from vhost_user_helpers import AVAIL_OFF, DESC_OFF, USED_OFF

from peers.plugin import QsdFactory
from virtblk.spec import BlkConfig, Feature
from virtblk.vhost_user.errors import NackError, PeerGoneError
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import ProtocolFeature
from virtblk.virtio.memory import MemoryRegion

pytestmark = pytest.mark.interop

GIB = 1 << 30

DOCUMENTED_FEATURES = [
    Feature.BLK_SIZE_MAX, Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH,
    Feature.BLK_TOPOLOGY, Feature.BLK_CONFIG_WCE, Feature.BLK_MQ, Feature.BLK_DISCARD,
    Feature.BLK_WRITE_ZEROES, Feature.NOTIFY_ON_EMPTY,
    Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX, Feature.VHOST_USER_PROTOCOL_FEATURES,
    Feature.VERSION_1,
]  # fmt: skip
# NOTES.md lists ANY_LAYOUT, but 0x175007e46 has bit 26 (VHOST_F_LOG_ALL), not bit 27.
QSD_CONFIG_SIZE = 60
"""qemu-storage-daemon 7.2's struct virtio_blk_config ends after write_zeroes_may_unmap:
GET_CONFIG of more than 60 bytes is refused (an empty reply)."""
DOCUMENTED_PROTOCOL = [
    ProtocolFeature.MQ, ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ, ProtocolFeature.PAGEFAULT, ProtocolFeature.CONFIG,
    ProtocolFeature.BACKEND_SEND_FD, ProtocolFeature.HOST_NOTIFIER,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
]  # fmt: skip


@pytest.fixture
def frontend(qsd_factory: QsdFactory) -> Iterator[VhostUserFrontend]:
    daemon = qsd_factory(null_size=GIB, num_queues=2, writable=True)
    with VhostUserFrontend.connect(str(daemon.socket_path), timeout=5) as fe:
        yield fe


def negotiate(frontend: VhostUserFrontend) -> int:
    offered = frontend.get_protocol_features()
    wanted = (
        ProtocolFeature.MQ.mask
        | ProtocolFeature.REPLY_ACK.mask
        | ProtocolFeature.CONFIG.mask
        | ProtocolFeature.BACKEND_REQ.mask
        | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    )
    frontend.set_protocol_features(offered & wanted)
    frontend.set_owner()
    return offered


def test_features_offered(frontend: VhostUserFrontend) -> None:
    features = frontend.get_features()
    missing = [f.name for f in DOCUMENTED_FEATURES if not features & f.mask]
    assert missing == []


def test_protocol_features_offered(frontend: VhostUserFrontend) -> None:
    offered = negotiate(frontend)
    missing = [f.name for f in DOCUMENTED_PROTOCOL if not offered & f.mask]
    assert missing == []
    assert not offered & ProtocolFeature.INFLIGHT_SHMFD.mask
    assert frontend.reply_ack


def test_queue_num_and_config(frontend: VhostUserFrontend) -> None:
    negotiate(frontend)
    assert frontend.get_queue_num() == 2
    assert frontend.get_max_mem_slots() >= 8
    config = BlkConfig.unpack(frontend.get_config(QSD_CONFIG_SIZE))
    assert config.capacity == GIB // 512 == 2097152
    assert config.seg_max == 126
    assert config.blk_size == 512
    assert config.num_queues == 2
    with pytest.raises(NackError, match="GET_CONFIG"):
        frontend.get_config(BlkConfig.SIZE)
    assert frontend.get_queue_num() == 2  # a refused GET_CONFIG leaves the connection up


def test_ring_setup_and_vring_base_with_reply_ack(frontend: VhostUserFrontend) -> None:
    """Every request below carries NEED_REPLY: the daemon acks each one (or we'd raise)."""
    negotiate(frontend)
    features = frontend.get_features()
    frontend.set_features(
        features
        & (
            Feature.VERSION_1.mask
            | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
            | Feature.RING_EVENT_IDX.mask
        )
    )
    region = MemoryRegion.create(1 << 20)
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        frontend.add_mem_reg(region)
        uva = region.user_addr
        frontend.set_vring_num(0, 128)
        frontend.set_vring_base(0, 5)
        frontend.set_vring_addr(0, uva + DESC_OFF, uva + USED_OFF, uva + AVAIL_OFF)
        frontend.set_vring_call(0, call)
        frontend.set_vring_kick(0, kick)
        frontend.set_vring_enable(0, True)
        assert frontend.get_vring_base(0) == 5
        frontend.rem_mem_reg(region)
    finally:
        region.close()
        os.close(kick)
        os.close(call)


def test_backend_channel_is_accepted(frontend: VhostUserFrontend) -> None:
    negotiate(frontend)
    channel = frontend.open_backend_channel(lambda: None)
    try:
        assert frontend.get_queue_num() == 2
    finally:
        channel.close()


def test_daemon_dying_is_peer_gone(qsd_factory: QsdFactory) -> None:
    daemon = qsd_factory(null_size=GIB, num_queues=1)
    with VhostUserFrontend.connect(str(daemon.socket_path), timeout=5) as fe:
        assert fe.get_queue_num() == 1
        daemon.stop()
        with pytest.raises(PeerGoneError):
            fe.get_features()
