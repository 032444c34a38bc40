"""``flush.*``: the volatile write cache (VIRTIO 1.2, 5.2.5.2 and 5.2.6.2): FLUSH offered
with CONFIG_WCE, and a FLUSH that completes and keeps what was written."""

from __future__ import annotations

from virtblk.spec import SECTOR_SIZE, Feature, RequestType, Status
from virtblk.tools.check.framework import (
    BLK_INIT_DEVICE,
    BLK_OPERATION_DEVICE,
    Finding,
    check,
    failed,
    passed,
    warned,
)
from virtblk.tools.check.session import Context, expect, pattern


@check("flush.offered", "FLUSH offered (and with CONFIG_WCE)", BLK_INIT_DEVICE)
def _flush_offered(ctx: Context) -> Finding:
    if ctx.offered(Feature.BLK_FLUSH):
        return passed("FLUSH offered")
    if ctx.offered(Feature.BLK_CONFIG_WCE):
        return failed("CONFIG_WCE offered without FLUSH", "FLUSH offered with CONFIG_WCE (MUST)")
    return warned("FLUSH not offered (devices SHOULD offer it): writes are not crash-safe")


@check("flush.request", "FLUSH completes OK", BLK_OPERATION_DEVICE)
def _flush(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_FLUSH)
    return expect(ctx.session().request(RequestType.FLUSH), "FLUSH", {Status.OK})


@check("flush.after-write", "write, FLUSH, read back", BLK_OPERATION_DEVICE, writes=True)
def _flush_after_write(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_FLUSH)
    ctx.require_writes()
    sector, _ = ctx.scratch()
    with ctx.preserved(sector, ctx.block // SECTOR_SIZE):
        data = pattern(ctx.block, 3)
        ctx.write(sector, data)
        reply = ctx.session().request(RequestType.FLUSH)
        if reply.status != Status.OK:
            return failed(f"FLUSH after a write answered {reply.status_name}", "OK")
        back = ctx.read(sector, ctx.block)
    if back != data and any(back):
        return failed("data read after the flush differs from what was written", "the same")
    return passed("OK" if back == data else "OK (the device reads zeroes: a null device?)")
