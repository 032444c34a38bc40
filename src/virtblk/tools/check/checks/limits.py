"""``limits.*``: requests as large as the config space says they may be (VIRTIO 1.2, 5.2.4:
seg_max segments, a segment of size_max bytes)."""

from __future__ import annotations

from virtblk.spec import SECTOR_SIZE, Feature, RequestType, Status
from virtblk.tools.check.framework import BLK_CONFIG, Finding, Outcome, Skip, check, passed
from virtblk.tools.check.session import Context, expect


@check("limits.seg-max", "a request with seg_max segments", BLK_CONFIG)
def _seg_max_request(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SEG_MAX)
    dev = ctx.dev
    seg_max = dev.config.seg_max
    usable = dev.sg_elems
    count = min(seg_max, usable, dev.capacity_sectors * SECTOR_SIZE // ctx.block)
    if count < 1:
        raise Skip("no usable segment count")
    reply = ctx.session().request(RequestType.IN, 0, in_=[ctx.block] * count)
    finding = expect(reply, f"IN with {count} segments of {ctx.block} bytes", {Status.OK})
    if finding.outcome is Outcome.PASS and count < seg_max:
        return passed(
            f"{finding.detail} (seg_max {seg_max}; our queue of "
            f"{dev.queue_size} limits a chain to {usable})"
        )
    return finding


@check("limits.size-max", "a segment of size_max bytes", BLK_CONFIG)
def _size_max_request(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SIZE_MAX)
    dev = ctx.dev
    size = min(dev.config.size_max, 1 << 20, dev.size) // ctx.block * ctx.block
    if size < ctx.block:
        raise Skip(f"size_max {dev.config.size_max} is smaller than a block")
    reply = ctx.session().request(RequestType.IN, 0, in_=[size])
    return expect(reply, f"IN of one {size}-byte segment", {Status.OK})
