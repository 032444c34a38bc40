"""``config.*``: the config space (VIRTIO 1.2, 5.2.4 Device configuration layout and
5.2.5 Device Initialization): capacity, blk_size, limits, topology, geometry, padding and
the writeback toggle."""

from __future__ import annotations

from virtblk.spec import SECTOR_SIZE, Feature
from virtblk.tools.check.framework import (
    BLK_CONFIG,
    BLK_INIT,
    BLK_INIT_DEVICE,
    Finding,
    Skip,
    check,
    failed,
    passed,
    warned,
)
from virtblk.tools.check.session import Context


@check("config.capacity", "capacity is non-zero", BLK_CONFIG)
def _capacity(ctx: Context) -> Finding:
    cap = ctx.dev.config.capacity
    if cap == 0:
        return warned("capacity is 0 sectors: no I/O is possible")
    return passed(f"{cap} sectors ({cap * SECTOR_SIZE} bytes)")


@check("config.blk-size", "blk_size is a power of two >= 512", BLK_INIT)
def _blk_size(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_BLK_SIZE)
    bs = ctx.dev.config.blk_size
    if bs < SECTOR_SIZE or bs & (bs - 1):
        return failed(f"blk_size {bs}", "a power of two of at least 512")
    cap = ctx.dev.config.capacity
    if cap % (bs // SECTOR_SIZE):
        return warned(f"blk_size {bs}, but capacity {cap} sectors is not a multiple of it")
    return passed(f"blk_size {bs}")


@check("config.seg-max", "seg_max >= 1 and size_max >= blk_size", BLK_CONFIG)
def _seg_max(ctx: Context) -> Finding:
    dev = ctx.dev
    if not (dev.has(Feature.BLK_SEG_MAX) or dev.has(Feature.BLK_SIZE_MAX)):
        raise Skip("neither SEG_MAX nor SIZE_MAX offered")
    c = dev.config
    parts = []
    if dev.has(Feature.BLK_SEG_MAX):
        if c.seg_max < 1:
            return failed(f"seg_max {c.seg_max}", "at least one segment per request")
        parts.append(f"seg_max {c.seg_max}")
    if dev.has(Feature.BLK_SIZE_MAX):
        if c.size_max == 0:
            parts.append("size_max 0")
            return warned(
                f"{', '.join(parts)}: SIZE_MAX is offered with no usable limit "
                f"(a driver has to guess that 0 means none)"
            )
        if c.size_max < ctx.block:
            return failed(f"size_max {c.size_max}", f"at least one block ({ctx.block})")
        parts.append(f"size_max {c.size_max}")
    return passed(", ".join(parts))


@check("config.num-queues", "num_queues >= 1", BLK_CONFIG)
def _num_queues(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_MQ)
    nq = ctx.dev.config.num_queues
    if nq < 1:
        return failed(f"num_queues {nq}", "at least 1")
    return passed(f"num_queues {nq}")


@check("config.topology", "topology fields are consistent", BLK_INIT)
def _topology(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_TOPOLOGY)
    c = ctx.dev.config
    seen = (
        f"physical_block_exp {c.physical_block_exp}, alignment_offset {c.alignment_offset}, "
        f"min_io_size {c.min_io_size}, opt_io_size {c.opt_io_size}"
    )
    if c.physical_block_exp > 15:
        return failed(seen, "a physical block of at most 2**15 logical blocks")
    if c.alignment_offset >= 1 << c.physical_block_exp:
        return failed(seen, "alignment_offset smaller than a physical block")
    if c.min_io_size and c.opt_io_size and c.opt_io_size % c.min_io_size:
        return warned(f"{seen}: opt_io_size is not a multiple of min_io_size")
    return passed(seen)


@check("config.geometry", "geometry has heads and sectors", BLK_CONFIG)
def _geometry(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_GEOMETRY)
    c = ctx.dev.config
    seen = f"C/H/S {c.cylinders}/{c.heads}/{c.sectors}"
    if not c.heads or not c.sectors:
        return failed(seen, "non-zero heads and sectors")
    return passed(seen)


def _segment_limits(ctx: Context, feature: Feature, names: tuple[str, str]) -> Finding:
    ctx.require(feature)
    c = ctx.dev.config
    values = {name: getattr(c, name) for name in names}
    seen = ", ".join(f"{k} {v}" for k, v in values.items())
    zero = [k for k, v in values.items() if v == 0]
    if zero:
        return failed(seen, f"non-zero {' and '.join(zero)} when {feature.name} is offered")
    return passed(seen)


@check("config.discard-limits", "discard limits are non-zero", BLK_INIT)
def _discard_limits(ctx: Context) -> Finding:
    return _segment_limits(ctx, Feature.BLK_DISCARD, ("max_discard_sectors", "max_discard_seg"))


@check("config.write-zeroes-limits", "write-zeroes limits are non-zero", BLK_INIT)
def _write_zeroes_limits(ctx: Context) -> Finding:
    return _segment_limits(
        ctx, Feature.BLK_WRITE_ZEROES, ("max_write_zeroes_sectors", "max_write_zeroes_seg")
    )


@check("config.secure-erase-limits", "secure-erase limits are non-zero", BLK_INIT)
def _secure_erase_limits(ctx: Context) -> Finding:
    return _segment_limits(
        ctx, Feature.BLK_SECURE_ERASE, ("max_secure_erase_sectors", "max_secure_erase_seg")
    )


@check("config.padding", "unused0 and unused1 are zero", BLK_INIT_DEVICE)
def _padding(ctx: Context) -> Finding:
    raw = ctx.negotiation.config
    if raw is None:
        raise Skip("the config space could not be read")
    seen = {"unused0": raw[33:34], "unused1": raw[57:60]}
    bad = {k: v.hex() for k, v in seen.items() if any(v)}
    if bad:
        return failed(", ".join(f"{k} = {v}" for k, v in bad.items()), "zero padding (MUST)")
    present = [k for k, v in seen.items() if v]
    return passed(f"{' and '.join(present)} zero")


@check("config.wce", "writeback can be read, toggled and restored", BLK_INIT, writes=True)
def _wce(ctx: Context) -> Finding:
    ctx.require(Feature.BLK_CONFIG_WCE)
    if not ctx.allow_writes:
        raise Skip("config writes disabled (--read-only)")
    dev = ctx.dev
    original = dev.config.writeback
    if original not in (0, 1):
        return failed(f"writeback reads {original}", "0 (writethrough) or 1 (writeback)")
    dev.set_writeback(not original)
    toggled = dev.config.writeback
    dev.set_writeback(bool(original))
    restored = dev.config.writeback
    if toggled != 1 - original or restored != original:
        return failed(
            f"writeback {original} -> wrote {1 - original}, read {toggled} -> wrote "
            f"{original}, read {restored}",
            "the value written to be read back",
        )
    return passed(f"writeback {original}, toggles to {toggled} and back")


@check("config.wce-without-flush", "CONFIG_WCE without FLUSH starts writethrough", BLK_INIT_DEVICE)
def _wce_without_flush(ctx: Context) -> Finding:
    if not (ctx.offered(Feature.BLK_CONFIG_WCE) and ctx.offered(Feature.BLK_FLUSH)):
        raise Skip("needs CONFIG_WCE and FLUSH offered")
    session = ctx.session(withheld=Feature.BLK_FLUSH.mask)
    wb = session.dev.config.writeback
    ctx.drop_session()
    if wb != 0:
        return failed(
            f"writeback {wb} with CONFIG_WCE negotiated and FLUSH not",
            "writeback initialised to 0 (MUST)",
        )
    return passed("writeback 0")
