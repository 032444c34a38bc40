"""``vu.*``: the vhost-user handshake before any queue runs (QEMU's vhost-user protocol:
protocol features, GET_QUEUE_NUM, GET_CONFIG) and VIRTIO_F_VERSION_1 (VIRTIO 1.2, 6.2)."""

from __future__ import annotations

from virtblk.spec import BlkConfig, Feature, feature_names
from virtblk.tools.check.framework import (
    RESERVED_FEATURES,
    VU_CONFIG,
    VU_MQ,
    VU_PROTOCOL,
    Finding,
    check,
    failed,
    passed,
    skipped,
)
from virtblk.tools.check.session import Context
from virtblk.vhost_user.messages import ProtocolFeature, protocol_feature_names


@check("vu.version-1", "VIRTIO_F_VERSION_1 offered", RESERVED_FEATURES)
def _version_1(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.error and not n.features:
        return failed(f"negotiation failed: {n.error}", "GET_FEATURES to answer")
    if not ctx.offered(Feature.VERSION_1):
        return failed(f"features {n.features:#x} lack VERSION_1", "a device to offer it (MUST)")
    return passed(f"features {n.features:#x}: {' '.join(feature_names(n.features))}")


@check("vu.protocol-features", "protocol features with CONFIG", VU_PROTOCOL)
def _protocol_features(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.protocol_features is None:
        return failed(
            "VHOST_USER_F_PROTOCOL_FEATURES not offered",
            "it, so the frontend can read the config space (capacity)",
        )
    names = " ".join(protocol_feature_names(n.protocol_features))
    if not n.protocol_features & ProtocolFeature.CONFIG.mask:
        return failed(f"protocol features {names}", "CONFIG: without it the capacity is unknown")
    return passed(f"{n.protocol_features:#x}: {names}")


@check("vu.queue-num", "GET_QUEUE_NUM covers num_queues", VU_MQ)
def _queue_num(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.queue_num is None:
        return skipped("the MQ protocol feature is not offered")
    if n.queue_num < 1:
        return failed(f"GET_QUEUE_NUM answered {n.queue_num}", "at least 1")
    if ctx.offered(Feature.BLK_MQ) and n.config is not None:
        num_queues = BlkConfig.unpack(n.config).num_queues
        if n.queue_num < num_queues:
            return failed(
                f"GET_QUEUE_NUM {n.queue_num} < config num_queues {num_queues}",
                "the backend to support every queue the config announces",
            )
        return passed(f"GET_QUEUE_NUM {n.queue_num}, config num_queues {num_queues}")
    return passed(f"GET_QUEUE_NUM {n.queue_num}")


@check("vu.get-config", "GET_CONFIG of the feature-sized config space", VU_CONFIG)
def _get_config(ctx: Context) -> Finding:
    n = ctx.negotiation
    if n.protocol_features is None or not n.protocol_features & ProtocolFeature.CONFIG.mask:
        return skipped("the CONFIG protocol feature is not offered")
    if n.config is None:
        return failed(
            f"GET_CONFIG({n.config_size}) failed: {n.config_error or n.error}",
            "the config space up to the last negotiated field",
        )
    detail = f"{n.config_size} bytes"
    if n.full_config_error:
        detail += f"; a {BlkConfig.SIZE}-byte read is refused ({n.full_config_error})"
    return passed(detail)
