"""The driver honours the device's limits (SEG_MAX, SIZE_MAX, BLK_SIZE), the seed's queue
depth rule, and the experimental FUA write."""

from __future__ import annotations

import os

import pytest

from virtblk import Disk
from virtblk.errors import FeatureNotNegotiatedError
from virtblk.spec import Feature, config_size

MiB = 1 << 20


def test_requests_are_split_by_seg_max_and_size_max() -> None:
    with Disk.embedded(size=4 * MiB, mode="thread", seg_max=2, size_max=4096) as d:
        assert d.limits.max_segments == 2
        assert d.limits.max_segment_size == 4096
        q = d.device.queues[0]
        before = q.stats_submitted
        data = os.urandom(64 * 1024)  # 16 segments of 4 KiB -> 8 requests of 2 segments
        d.pwrite(data, 0)
        assert q.stats_submitted - before == 8
        assert d.pread(len(data), 0) == data


def test_block_size_is_honoured() -> None:
    with Disk.embedded(size=4 * MiB, mode="thread", blk_size=4096) as d:
        assert d.logical_block_size == 4096
        with pytest.raises(ValueError, match="4096"):
            d.pwrite(b"\0" * 512, 0)
        d.pwrite(b"\1" * 4096, 4096)
        assert d.pread(4096, 4096) == b"\1" * 4096


def test_default_depth_fills_the_ring() -> None:
    with Disk.embedded(size=MiB, mode="thread", queue_size=64) as d:
        assert d.device.queues[0].depth == 64


def test_depth_is_overridable() -> None:
    with Disk.embedded(size=MiB, mode="thread", queue_size=64, queue_depth=10) as d:
        assert d.device.queues[0].depth == 10


def test_fua_write_needs_the_feature() -> None:
    with Disk.embedded(size=MiB, mode="thread") as d:
        assert "BLK_OUT_FUA" not in d.features
        with pytest.raises(FeatureNotNegotiatedError, match="OUT_FUA"):
            d.pwrite(b"\0" * 512, 0, fua=True)


def test_fua_write_round_trip(tmp_path: os.PathLike[str]) -> None:
    img = os.path.join(tmp_path, "img")
    with Disk.embedded(
        size=MiB, backend="file", path=img, mode="thread", experimental_fua=True
    ) as d:
        assert "BLK_OUT_FUA" in d.features
        data = os.urandom(8192)
        d.pwrite(data, 4096, fua=True)
        with open(img, "rb") as f:
            f.seek(4096)
            assert f.read(8192) == data


@pytest.mark.parametrize("size", [0, 2, 3, 100, 65536])
def test_unusable_queue_sizes_are_refused_when_connecting(size: int) -> None:
    with pytest.raises(ValueError, match="queue_size"):
        Disk.embedded(size=MiB, mode="thread", queue_size=size)


def test_queues_are_named_as_the_seed_names_them() -> None:
    with Disk.embedded(size=MiB, mode="thread", num_queues=3) as d:
        assert [q.name for q in d.device.queues] == ["req.0", "req.1", "req.2"]


@pytest.mark.parametrize(
    ("features", "size"),
    [
        (0, 36),
        (Feature.BLK_DISCARD.mask, 48),
        (Feature.BLK_DISCARD.mask | Feature.BLK_WRITE_ZEROES.mask, 60),
        (Feature.BLK_SECURE_ERASE.mask, 72),
        (Feature.BLK_ZONED.mask | Feature.BLK_DISCARD.mask, 96),
    ],
)
def test_config_space_is_read_as_far_as_the_features_reach(features: int, size: int) -> None:
    assert config_size(features) == size
