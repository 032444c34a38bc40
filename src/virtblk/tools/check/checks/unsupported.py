"""``unsupp.*``: request types the device does not support or did not negotiate
(VIRTIO 1.2, 5.2.6 and 5.2.6.2: UNSUPP)."""

from __future__ import annotations

from virtblk.spec import Feature, Lifetime, RequestType, Status
from virtblk.tools.check.framework import BLK_OPERATION, BLK_OPERATION_DEVICE, Finding, Skip, check
from virtblk.tools.check.session import Context, expect

UNKNOWN_TYPE = 0x7E
"""A request type no VIRTIO version defines (and without the legacy barrier bit)."""


@check("unsupp.unknown-type", "unknown request type answers UNSUPP", BLK_OPERATION)
def _unknown_type(ctx: Context) -> Finding:
    reply = ctx.session().request(UNKNOWN_TYPE)
    return expect(reply, f"request type {UNKNOWN_TYPE:#x}", {Status.UNSUPP})


@check("unsupp.zone-report", "ZONE_REPORT without ZONED answers UNSUPP", BLK_OPERATION_DEVICE)
def _zone_report(ctx: Context) -> Finding:
    if ctx.session().has(Feature.BLK_ZONED):
        raise Skip("ZONED was negotiated")
    reply = ctx.session().request(RequestType.ZONE_REPORT, 0, in_=[128])
    return expect(reply, "ZONE_REPORT without ZONED negotiated", {Status.UNSUPP})


@check("unsupp.not-offered", "a request whose feature is not offered answers UNSUPP", BLK_OPERATION)
def _not_offered(ctx: Context) -> Finding:
    if not ctx.offered(Feature.BLK_LIFETIME):
        reply = ctx.session().request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
        return expect(
            reply,
            "GET_LIFETIME without LIFETIME offered",
            {Status.UNSUPP},
            warn={Status.IOERR},
            why="IOERR is allowed, UNSUPP is what the spec "
            "names for a request the device does not support",
        )
    if not ctx.offered(Feature.BLK_FLUSH):
        reply = ctx.session().request(RequestType.FLUSH)
        return expect(
            reply,
            "FLUSH without FLUSH offered",
            {Status.UNSUPP},
            warn={Status.OK, Status.IOERR},
            why="UNSUPP is what the spec names",
        )
    # Legacy SCSI commands: VIRTIO 1.x devices cannot offer BLK_SCSI.
    reply = ctx.session().request(RequestType.SCSI_CMD)
    return expect(reply, "legacy SCSI_CMD without BLK_SCSI", {Status.UNSUPP})


@check("unsupp.not-negotiated", "a request whose feature was not negotiated", BLK_OPERATION)
def _not_negotiated(ctx: Context) -> Finding:
    """The spec requires UNSUPP only for zone requests without ZONED; for others it says
    nothing, so executing the request is a warning, not a failure."""
    if ctx.offered(Feature.BLK_FLUSH):
        session = ctx.session(withheld=Feature.BLK_FLUSH.mask)
        reply = session.request(RequestType.FLUSH)
        what = "FLUSH with FLUSH offered but not negotiated"
    elif ctx.offered(Feature.BLK_LIFETIME):
        session = ctx.session(withheld=Feature.BLK_LIFETIME.mask)
        reply = session.request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
        what = "GET_LIFETIME with LIFETIME offered but not negotiated"
    else:
        raise Skip("neither FLUSH nor LIFETIME offered")
    ctx.drop_session()
    return expect(
        reply,
        what,
        {Status.UNSUPP, Status.IOERR},
        warn={Status.OK},
        why="the device executed it; the spec requires UNSUPP only for zone "
        "requests without ZONED (5.2.6.2) and is silent here",
    )
