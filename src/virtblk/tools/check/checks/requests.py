"""``io.*``: every request type the device offers, with the data read back (VIRTIO 1.2,
5.2.6 Device Operation): IN, OUT, GET_ID, DISCARD, WRITE_ZEROES, SECURE_ERASE,
GET_LIFETIME, and writes to a read-only device."""

from __future__ import annotations

from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    DiscardSegment,
    Feature,
    Lifetime,
    RequestType,
    Status,
)
from virtblk.tools.check.framework import (
    BLK_OPERATION,
    BLK_OPERATION_DEVICE,
    Finding,
    Outcome,
    Skip,
    check,
    failed,
    passed,
    warned,
)
from virtblk.tools.check.session import Context, expect, pattern


@check("io.read", "IN of one block", BLK_OPERATION)
def _read(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.IN, 0, in_=[ctx.block])
    finding = expect(reply, f"IN of {ctx.block} bytes at sector 0", {Status.OK})
    if finding.outcome is Outcome.PASS and reply.written != ctx.block + 1:
        return warned(f"OK, but used length {reply.written} (data + status is {ctx.block + 1})")
    return finding


@check("io.round-trip", "OUT then IN returns the data", BLK_OPERATION, writes=True)
def _round_trip(ctx: Context) -> Finding:
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    length = sectors * SECTOR_SIZE
    with ctx.preserved(sector, sectors):
        data = pattern(length, 1)
        ctx.write(sector, data)
        back = ctx.read(sector, length)
    if back == data:
        return passed(f"{length} bytes at sector {sector}")
    if not any(back):
        return warned(f"wrote {length} bytes, read back zeroes (a null device?)")
    return failed("the data read back differs from what was written", "the same data")


@check("io.get-id", "GET_ID answers a NUL-padded 20-byte ID", BLK_OPERATION)
def _get_id(ctx: Context) -> Finding:
    reply = ctx.session().request(RequestType.GET_ID, in_=[VIRTIO_BLK_ID_BYTES], fill=0xFF)
    if reply.status == Status.UNSUPP:
        return warned("GET_ID answered UNSUPP: the device has no serial")
    if reply.status != Status.OK:
        return failed(f"GET_ID answered {reply.status_name}", "OK")
    raw = reply.data
    end = raw.find(b"\0")
    text = raw if end < 0 else raw[:end]
    shown = text.decode("ascii", "replace")
    if any(b < 0x20 or b > 0x7E for b in text):
        return failed(f"ID {raw!r} is not printable ASCII", "an ASCII string")
    if end >= 0 and any(raw[end:]):
        padding = raw[end + 1 :]
        untouched = sum(1 for b in padding if b == 0xFF)
        return warned(
            f"ID {shown!r} ends with a NUL at byte {end}, but {len(padding) - padding.count(0)}"
            f" of the {len(padding)} bytes after it are not NULs ({untouched} still hold the "
            f"driver's 0xff): the spec says NUL-padded"
        )
    return passed(f"ID {shown!r}")


@check("io.discard", "DISCARD of an aligned range", BLK_OPERATION, writes=True)
def _discard(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_DISCARD)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.DISCARD, [DiscardSegment(sector, sectors)])
    return expect(reply, f"DISCARD of {sectors} sectors", {Status.OK})


def _write_zeroes(ctx: Context, flags: int) -> Finding:
    ctx.require(Feature.BLK_WRITE_ZEROES)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    length = sectors * SECTOR_SIZE
    with ctx.preserved(sector, sectors):
        ctx.write(sector, pattern(length, 2))
        reply = ctx.segments(RequestType.WRITE_ZEROES, [DiscardSegment(sector, sectors, flags)])
        if reply.status != Status.OK:
            return failed(f"WRITE_ZEROES (flags {flags}) answered {reply.status_name}", "OK")
        back = ctx.read(sector, length)
    if any(back):
        nonzero = sum(1 for b in back if b)
        return failed(f"{nonzero} of {length} bytes read back non-zero", "zeroes (MUST)")
    return passed(f"{sectors} sectors read back as zeroes")


@check("io.write-zeroes", "WRITE_ZEROES reads back zeroes", BLK_OPERATION_DEVICE, writes=True)
def _write_zeroes_plain(ctx: Context) -> Finding:
    return _write_zeroes(ctx, 0)


@check(
    "io.write-zeroes-unmap",
    "WRITE_ZEROES with UNMAP reads back zeroes",
    BLK_OPERATION_DEVICE,
    writes=True,
)
def _write_zeroes_unmap(ctx: Context) -> Finding:
    return _write_zeroes(ctx, DISCARD_FLAG_UNMAP)


@check("io.secure-erase", "SECURE_ERASE of an aligned range", BLK_OPERATION, writes=True)
def _secure_erase(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_SECURE_ERASE)
    ctx.require_writes()
    sector, sectors = ctx.scratch()
    with ctx.preserved(sector, sectors):
        reply = ctx.segments(RequestType.SECURE_ERASE, [DiscardSegment(sector, sectors)])
    return expect(reply, f"SECURE_ERASE of {sectors} sectors", {Status.OK})


@check("io.get-lifetime", "GET_LIFETIME answers defined values", BLK_OPERATION_DEVICE)
def _get_lifetime(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_LIFETIME)
    reply = ctx.session().request(RequestType.GET_LIFETIME, in_=[Lifetime.SIZE])
    if reply.status != Status.OK:
        return failed(f"GET_LIFETIME answered {reply.status_name}", "OK")
    life = Lifetime.unpack(reply.data)
    seen = (
        f"pre_eol_info {life.pre_eol_info}, typ_a {life.device_lifetime_est_typ_a}, "
        f"typ_b {life.device_lifetime_est_typ_b}"
    )
    if (
        life.pre_eol_info > Lifetime.PRE_EOL_URGENT
        or life.device_lifetime_est_typ_a > 11
        or life.device_lifetime_est_typ_b > 11
    ):
        return failed(seen, "no reserved values (pre_eol_info <= 3, estimates <= 11)")
    return passed(seen)


@check("io.read-only", "writes fail on a read-only device", BLK_OPERATION_DEVICE)
def _read_only(ctx: Context) -> Finding:
    if not ctx.offered(Feature.BLK_RO):
        raise Skip("the device is writable (BLK_RO not offered)")
    before = ctx.read(0, ctx.block)
    # The same data: even a device that wrongly accepts the write changes nothing.
    reply = ctx.session().request(RequestType.OUT, 0, out=[before])
    after = ctx.read(0, ctx.block)
    if after != before:
        return failed("the data changed after a refused write", "no data written (MUST NOT)")
    return expect(reply, "OUT on a read-only device", {Status.IOERR})
