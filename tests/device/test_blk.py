"""The device model: features, config space and every request type, without a ring."""

from __future__ import annotations

import logging
import os
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
from device_helpers import chain, header

from virtblk.device.backends import FileBackend, MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.spec import (
    DISCARD_FLAG_UNMAP,
    BlkConfig,
    DiscardSegment,
    Feature,
    Lifetime,
    RequestType,
    Status,
    has_feature,
)

MiB = 1 << 20
SECTORS = MiB // 512


def device(**kwargs: object) -> BlkDevice:
    return BlkDevice(MemoryBackend(MiB), **kwargs)  # type: ignore[arg-type]


def run(dev: BlkDevice, readable: list[bytes], writable: list[int]) -> tuple[int, int, bytes]:
    """Process one chain: (status, used len, bytes of the writable area before the status)."""
    c, ins = chain(readable, writable)
    used = dev.process(c)
    area = b"".join(bytes(b) for b in ins)
    return area[-1], used, area[:-1]


def write(dev: BlkDevice, sector: int, data: bytes) -> int:
    return run(dev, [header(RequestType.OUT, sector) + data], [1])[0]


def read(dev: BlkDevice, sector: int, n: int) -> tuple[int, int, bytes]:
    return run(dev, [header(RequestType.IN, sector)], [n, 1])


def segments(rtype: int, *segs: DiscardSegment) -> list[bytes]:
    return [header(rtype) + b"".join(s.pack() for s in segs)]


# -- features and config


def test_default_features_match_what_a_linux_guest_needs() -> None:
    f = device().features
    for feat in (Feature.VERSION_1, Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX,
                 Feature.VHOST_USER_PROTOCOL_FEATURES, Feature.BLK_SEG_MAX,
                 Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH, Feature.BLK_TOPOLOGY,
                 Feature.BLK_CONFIG_WCE, Feature.BLK_MQ, Feature.BLK_DISCARD,
                 Feature.BLK_WRITE_ZEROES, Feature.BLK_SECURE_ERASE):
        assert has_feature(f, feat), feat.name
    for feat in (Feature.BLK_SIZE_MAX, Feature.BLK_RO, Feature.BLK_GEOMETRY,
                 Feature.BLK_LIFETIME, Feature.BLK_OUT_FUA, Feature.BLK_ZONED):
        assert not has_feature(f, feat), feat.name


def test_optional_features_follow_options() -> None:
    f = device(size_max=65536, read_only=True, geometry=(10, 4, 32),
               lifetime=Lifetime(1, 2, 3), fua=True).features
    for feat in (Feature.BLK_SIZE_MAX, Feature.BLK_RO, Feature.BLK_GEOMETRY,
                 Feature.BLK_LIFETIME, Feature.BLK_OUT_FUA):
        assert has_feature(f, feat), feat.name


def test_config_space_fields() -> None:
    dev = device(num_queues=4, serial="abc", blk_size=4096, physical_block_exp=3,
                 min_io_size=8, opt_io_size=64, geometry=(10, 4, 32), size_max=65536,
                 max_discard_seg=8, writeback=False)
    raw = dev.config()
    assert len(raw) == BlkConfig.SIZE
    cfg = BlkConfig.unpack(raw)
    assert cfg.capacity == SECTORS
    assert (cfg.cylinders, cfg.heads, cfg.sectors) == (10, 4, 32)
    assert (cfg.blk_size, cfg.physical_block_exp, cfg.min_io_size, cfg.opt_io_size) == (
        4096, 3, 8, 64)
    assert (cfg.seg_max, cfg.size_max, cfg.num_queues) == (126, 65536, 4)
    assert (cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment) == (
        0x3FFFFF, 8, 8)
    assert cfg.write_zeroes_may_unmap == 1 and cfg.writeback == 0
    assert raw[33] == 0 and raw[57:60] == bytes(3)  # padding


def test_set_features_rejects_what_was_not_offered() -> None:
    dev = device()
    with pytest.raises(ValueError, match="BLK_RO"):
        dev.set_features(dev.features | Feature.BLK_RO.mask)
    dev.set_features(dev.features)
    assert dev.negotiated_features == dev.features


def test_writeback_is_writable_only_with_config_wce(caplog: pytest.LogCaptureFixture) -> None:
    dev = device()
    dev.set_features(dev.features & ~Feature.BLK_CONFIG_WCE.mask)
    with caplog.at_level(logging.WARNING, "virtblk.device"):
        dev.set_config(BlkConfig.OFFSET_WRITEBACK, b"\0")
    assert BlkConfig.unpack(dev.config()).writeback == 1
    assert "without CONFIG_WCE" in caplog.text
    dev.reset()
    dev.set_features(dev.features)
    dev.set_config(BlkConfig.OFFSET_WRITEBACK, b"\0")
    assert BlkConfig.unpack(dev.config()).writeback == 0
    assert not dev.backend.writeback
    dev.set_config(BlkConfig.OFFSET_WRITEBACK, b"\1")
    assert dev.backend.writeback and dev.cache_mode == "write back"


def test_other_config_writes_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    dev = device()
    before = dev.config()
    with caplog.at_level(logging.WARNING, "virtblk.device"):
        dev.set_config(0, b"\xff" * 8)
        dev.set_config(200, b"\1")
    assert dev.config() == before
    assert "read-only config byte 0" in caplog.text and "outside" in caplog.text


def test_without_flush_negotiated_writes_are_write_through() -> None:
    dev = device()
    dev.set_features(dev.features & ~(Feature.BLK_FLUSH.mask | Feature.BLK_CONFIG_WCE.mask))
    assert not dev.backend.writeback


def test_config_wce_without_flush_starts_write_through() -> None:
    dev = device()
    dev.set_features(dev.features & ~Feature.BLK_FLUSH.mask)
    assert BlkConfig.unpack(dev.config()).writeback == 0


def test_runtime_controls_announce_config_changes() -> None:
    dev = device()
    calls: list[int] = []
    dev.config_changed = lambda: calls.append(1)
    dev.resize(2 * MiB)
    assert BlkConfig.unpack(dev.config()).capacity == 2 * SECTORS
    dev.set_cache_mode("write through")
    assert BlkConfig.unpack(dev.config()).writeback == 0 and not dev.backend.writeback
    assert calls == [1, 1]
    with pytest.raises(ValueError):
        dev.set_cache_mode("unsafe")
    dev.set_read_only(True)
    assert write(dev, 0, bytes(512)) == Status.IOERR


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="serial"):
        device(serial="x" * 21)
    with pytest.raises(ValueError, match="blk_size"):
        device(blk_size=1000)
    with pytest.raises(ValueError, match="num_queues"):
        device(num_queues=0)


# -- requests


def test_write_then_read_back() -> None:
    dev = device()
    data = os.urandom(4096)
    assert write(dev, 10, data) == Status.OK
    status, used, got = read(dev, 10, 4096)
    assert (status, used, got) == (Status.OK, 4097, data)
    stats = dev.stats()
    assert stats["bytes_written"] == 4096 and stats["bytes_read"] == 4096
    assert stats["requests"] == {"OUT": 1, "IN": 1}


@pytest.mark.parametrize("sector", [SECTORS, SECTORS - 1, 2**63])
def test_out_of_range_is_ioerr(sector: int) -> None:
    dev = device()
    assert read(dev, sector, 1024)[:2] == (Status.IOERR, 1)
    assert write(dev, sector, bytes(1024)) == Status.IOERR


def test_last_sector_is_in_range() -> None:
    dev = device()
    assert write(dev, SECTORS - 1, b"\x01" * 512) == Status.OK
    assert read(dev, SECTORS - 1, 512)[2] == b"\x01" * 512


def test_write_to_read_only_device_is_ioerr_and_writes_nothing() -> None:
    dev = device(read_only=True)
    assert write(dev, 0, b"\xff" * 512) == Status.IOERR
    assert read(dev, 0, 512)[2] == bytes(512)
    for rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES, RequestType.SECURE_ERASE):
        assert run(dev, segments(rtype, DiscardSegment(0, 1)), [1])[0] == Status.IOERR


def test_read_only_backend_makes_a_read_only_device(tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(MiB))
    dev = BlkDevice(FileBackend(img, read_only=True))
    assert has_feature(dev.features, Feature.BLK_RO)
    assert write(dev, 0, bytes(512)) == Status.IOERR
    with pytest.raises(ValueError):
        dev.set_read_only(False)


def test_flush() -> None:
    assert run(device(), [header(RequestType.FLUSH)], [1])[:2] == (Status.OK, 1)


def test_out_fua_only_when_enabled(tmp_path: Path) -> None:
    data = b"\x42" * 512
    assert write(device(), 0, data) == Status.OK
    assert run(device(), [header(RequestType.OUT_FUA) + data], [1])[0] == Status.UNSUPP
    dev = BlkDevice(FileBackend(tmp_path / "fua.img", create_size=MiB), fua=True)
    assert run(dev, [header(RequestType.OUT_FUA, 3) + data], [1])[:2] == (Status.OK, 1)
    assert read(dev, 3, 512)[2] == data


@pytest.mark.parametrize(
    ("serial", "size", "expected"),
    [
        (b"serial-1", 20, b"serial-1" + bytes(12)),
        (b"x" * 20, 20, b"x" * 20),  # exactly 20: no terminator
        (b"abcdefgh", 4, b"abcd"),  # short buffer: what fits
        (b"abc", 24, b"abc" + bytes(21)),  # long buffer: NUL padded throughout
    ],
)
def test_get_id(serial: bytes, size: int, expected: bytes) -> None:
    dev = device(serial=serial)
    c, ins = chain([header(RequestType.GET_ID)], [size, 1])
    ins[0][:] = b"\xee" * size
    used = dev.process(c)
    assert (ins[1][0], used, bytes(ins[0])) == (Status.OK, size + 1, expected)


def test_get_lifetime() -> None:
    assert run(device(), [header(RequestType.GET_LIFETIME)], [6, 1])[0] == Status.UNSUPP
    dev = device(lifetime=Lifetime(Lifetime.PRE_EOL_WARNING, 3, 11))
    status, used, area = run(dev, [header(RequestType.GET_LIFETIME)], [6, 1])
    assert (status, used, Lifetime.unpack(area)) == (Status.OK, 7, Lifetime(2, 3, 11))
    assert run(dev, [header(RequestType.GET_LIFETIME)], [4, 1])[:2] == (Status.IOERR, 1)


@pytest.mark.parametrize("rtype", [2, 3, 5, 16, 18, 24, 0x80000000, 0x80000001, 99])
def test_unknown_and_unsupported_types_are_unsupp(rtype: int) -> None:
    dev = device()
    assert run(dev, [header(rtype) + bytes(512)], [1])[:2] == (Status.UNSUPP, 1)
    assert dev.stats()["errors"] == {"IOERR": 0, "UNSUPP": 1}


def test_malformed_request_gets_ioerr_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    dev = device()
    with caplog.at_level(logging.WARNING, "virtblk.device"):
        assert run(dev, [header(RequestType.IN)], [100, 1])[:2] == (Status.IOERR, 1)
        c, _ = chain([header(RequestType.OUT) + bytes(512)], [])
        assert dev.process(c) == 0
    assert dev.stats()["malformed"] == 2
    assert "not a multiple of 512" in caplog.text and "no device-writable byte" in caplog.text


def test_discard_and_write_zeroes_clear_data() -> None:
    dev = device()
    write(dev, 0, b"\x11" * 8192)
    assert run(dev, segments(RequestType.DISCARD, DiscardSegment(0, 8)), [1])[0] == Status.OK
    assert run(dev, segments(RequestType.WRITE_ZEROES, DiscardSegment(8, 4, DISCARD_FLAG_UNMAP)),
               [1])[0] == Status.OK
    assert run(dev, segments(RequestType.SECURE_ERASE, DiscardSegment(12, 2)), [1])[0] \
        == Status.OK
    assert read(dev, 0, 8192)[2] == bytes(7168) + b"\x11" * 1024


def test_discard_flags_are_unsupp() -> None:
    dev = device()
    for flags in (DISCARD_FLAG_UNMAP, 2):
        assert run(dev, segments(RequestType.DISCARD, DiscardSegment(0, 1, flags)), [1])[0] \
            == Status.UNSUPP
    assert run(dev, segments(RequestType.WRITE_ZEROES, DiscardSegment(0, 1, 2)), [1])[0] \
        == Status.UNSUPP
    assert run(dev, segments(RequestType.SECURE_ERASE, DiscardSegment(0, 1, 4)), [1])[0] \
        == Status.UNSUPP


def test_segment_limits() -> None:
    dev = device(max_discard_seg=2, max_discard_sectors=16, max_write_zeroes_sectors=8)
    write(dev, 0, b"\x22" * 512)
    ok = [DiscardSegment(100, 16), DiscardSegment(200, 16)]
    assert run(dev, segments(RequestType.DISCARD, *ok), [1])[0] == Status.OK
    three = [*ok, DiscardSegment(300, 1)]
    assert run(dev, segments(RequestType.DISCARD, *three), [1])[0] == Status.IOERR
    assert run(dev, segments(RequestType.DISCARD, DiscardSegment(100, 17)), [1])[0] \
        == Status.IOERR
    assert run(dev, segments(RequestType.WRITE_ZEROES, DiscardSegment(0, 9)), [1])[0] \
        == Status.IOERR
    # A failing segment keeps the others from running: all are checked first.
    mixed = [DiscardSegment(0, 1), DiscardSegment(SECTORS, 1)]
    dev2 = device(max_write_zeroes_seg=2)
    write(dev2, 0, b"\x22" * 512)
    assert run(dev2, segments(RequestType.WRITE_ZEROES, *mixed), [1])[0] == Status.IOERR
    assert read(dev2, 0, 512)[2] == b"\x22" * 512


def test_backend_error_is_ioerr_not_a_crash(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "e.img", create_size=MiB)
    dev = BlkDevice(backend)
    os.close(backend.fd)  # every I/O now fails with EBADF
    assert read(dev, 0, 512)[:2] == (Status.IOERR, 1)
    assert write(dev, 0, bytes(512)) == Status.IOERR  # write-back mode uses the closed fd
    assert run(dev, [header(RequestType.FLUSH)], [1])[0] == Status.IOERR
    backend._fd = -1
    backend.close()


class BuggyBackend(MemoryBackend):
    """A backend with a bug (not an OSError): the device must survive it."""

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        raise ZeroDivisionError("bug")


def test_internal_error_costs_one_request() -> None:
    dev = BlkDevice(BuggyBackend(MiB))
    assert read(dev, 0, 512)[:2] == (Status.IOERR, 1)
    assert write(dev, 0, bytes(512)) == Status.OK
    assert dev.stats()["internal_errors"] == 1


@pytest.mark.parametrize(
    "rtype", [RequestType.DISCARD, RequestType.WRITE_ZEROES, RequestType.SECURE_ERASE])
def test_huge_segment_count_is_refused_before_decoding(rtype: RequestType) -> None:
    """A driver may send far more segments than max_seg (the payload is only bounded by
    guest memory): the count is checked from the length, not by decoding every segment."""
    dev = device()
    c, _ = chain([header(rtype) + bytes(16 * 10**6)], [1])
    tracemalloc.start()
    try:
        used = dev.process(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert used == 1 and c.writable[0][0] == Status.IOERR
    assert peak < MiB, f"{peak} bytes allocated to refuse the request"
