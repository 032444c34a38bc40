"""``range.*``: requests outside the disk (VIRTIO 1.2, 5.2.6): at capacity, straddling the
end, a sector whose byte offset overflows 64 bits, a DISCARD past the end."""

from __future__ import annotations

from virtblk.spec import SECTOR_SIZE, DiscardSegment, Feature, RequestType, Status
from virtblk.tools.check.framework import BLK_OPERATION, Finding, Skip, check
from virtblk.tools.check.session import Context, expect


@check("range.past-end", "IN starting at capacity fails", BLK_OPERATION)
def _past_end(ctx: Context) -> Finding:
    cap = ctx.dev.capacity_sectors
    reply = ctx.session().request(RequestType.IN, cap, in_=[ctx.block])
    return expect(reply, f"IN at sector {cap} (= capacity)", {Status.IOERR})


@check("range.straddle", "IN straddling the end fails", BLK_OPERATION)
def _straddle(ctx: Context) -> Finding:
    cap = ctx.dev.capacity_sectors
    per_block = ctx.block // SECTOR_SIZE
    if cap < per_block:
        raise Skip("the disk is smaller than a block")
    sector = cap - per_block
    reply = ctx.session().request(RequestType.IN, sector, in_=[2 * ctx.block])
    return expect(
        reply, f"IN of 2 blocks at sector {sector} (1 block before the end)", {Status.IOERR}
    )


@check("range.overflow", "IN at a sector whose byte offset overflows 64 bits", BLK_OPERATION)
def _overflow(ctx: Context) -> Finding:
    sector = (1 << 64) - (ctx.block // SECTOR_SIZE)
    reply = ctx.session().request(RequestType.IN, sector, in_=[ctx.block])
    return expect(reply, f"IN at sector {sector:#x}", {Status.IOERR})


@check("range.discard-past-end", "DISCARD past capacity fails", BLK_OPERATION, writes=True)
def _discard_past_end(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    cap = ctx.dev.capacity_sectors
    align = max(1, ctx.dev.config.discard_sector_alignment)
    reply = ctx.segments(RequestType.DISCARD, [DiscardSegment(cap // align * align + align, align)])
    return expect(
        reply,
        "DISCARD past capacity",
        {Status.IOERR},
        warn={Status.UNSUPP},
        why="the device refused it, but as unsupported rather than as an error",
    )
