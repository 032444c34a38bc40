"""``malformed.*``: requests a driver must not send (VIRTIO 1.2, 5.2.6.1 Driver
Requirements) and flags the device must refuse (5.2.6.2); last, a descriptor outside
guest memory (2.7), which may make the device drop the connection."""

from __future__ import annotations

from virtblk.errors import DeviceGoneError
from virtblk.spec import DISCARD_FLAG_UNMAP, DiscardSegment, Feature, RequestType, Status
from virtblk.tools.check.framework import (
    BLK_OPERATION_DEVICE,
    BLK_OPERATION_DRIVER,
    SPLIT_QUEUE,
    Finding,
    Skip,
    check,
    failed,
    passed,
    warned,
)
from virtblk.tools.check.session import Context, expect


@check("malformed.in-length", "IN whose length is not a multiple of 512", BLK_OPERATION_DRIVER)
def _odd_in(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.IN, 0, in_=[100])
    return expect(
        reply,
        "IN of 100 bytes",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check(
    "malformed.out-length",
    "OUT whose length is not a multiple of 512",
    BLK_OPERATION_DRIVER,
    writes=True,
)
def _odd_out(ctx: Context) -> Finding:
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors) as original:
        reply = ctx.session().request(RequestType.OUT, sector, out=[original[:100]])
    return expect(
        reply,
        "OUT of 100 bytes",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check(
    "malformed.discard-unmap",
    "DISCARD with the UNMAP flag answers UNSUPP",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _discard_unmap(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(
            RequestType.DISCARD, [DiscardSegment(sector, sectors, DISCARD_FLAG_UNMAP)]
        )
    return expect(reply, "DISCARD with UNMAP", {Status.UNSUPP})


@check(
    "malformed.unknown-flags",
    "WRITE_ZEROES with an unknown flag answers UNSUPP",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _unknown_flags(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_WRITE_ZEROES)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.WRITE_ZEROES, [DiscardSegment(sector, sectors, 2)])
    return expect(reply, "WRITE_ZEROES with flags 0x2", {Status.UNSUPP})


@check(
    "malformed.discard-segments",
    "DISCARD with more than max_discard_seg segments",
    BLK_OPERATION_DRIVER,
    writes=True,
)
def _too_many_segments(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    max_seg = ctx.dev.config.max_discard_seg
    if max_seg > 256:
        raise Skip(f"max_discard_seg {max_seg} is too large to exceed cheaply")
    sector, sectors = ctx.scratch()
    segs = [DiscardSegment(sector, sectors)] * (max_seg + 1)
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.DISCARD, segs)
    return expect(
        reply,
        f"DISCARD with {max_seg + 1} segments (max {max_seg})",
        {Status.IOERR, Status.UNSUPP},
        warn={Status.OK},
        why="the driver MUST NOT send it, the device need not refuse it",
    )


@check("malformed.bad-address", "a descriptor outside guest memory", SPLIT_QUEUE, disruptive=True)
def _bad_address(ctx: Context) -> Finding:
    session = ctx.session()
    outside = session.dev.region.guest_phys_addr + session.dev.region.size + (1 << 30)
    try:
        reply = session.request(RequestType.IN, 0, raw_in=[(outside, ctx.block)])
    except DeviceGoneError:
        ctx.drop_session()
        return warned("the device dropped the connection (it has to be reconnected)")
    except TimeoutError:
        ctx.drop_session()
        return failed("the request never completed", "an error completion or a hang-up")
    if reply.status == Status.OK and reply.written:
        return failed(f"answered OK with used length {reply.written}", "an error")
    alive = session.request(RequestType.IN, 0, in_=[ctx.block])
    if alive.status != Status.OK:
        return failed(f"the queue is unusable afterwards ({alive.status_name})", "it to work")
    return passed(f"answered with used length {reply.written} and kept serving")
