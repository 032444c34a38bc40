"""``Disk.topology`` is what Linux reports for the same config space.

The seed hands the device's topology fields to the block layer
(``blk_queue_physical_block_size``, ``blk_queue_alignment_offset``, ``blk_queue_io_min``,
``blk_queue_io_opt``, each only when the field is non-zero), and the block layer clamps
them (block/blk-settings.c of the seed's time; Linux 6.1 applies the same rules):

- the limits start at 512 and ``blk_queue_logical_block_size`` raises the physical block
  and the minimum I/O to the logical block;
- the physical block is never below the logical block, and raises the minimum I/O to it;
- the alignment offset is taken within one physical block (``offset & (physical - 1)``);
- the minimum I/O is at least the logical and the physical block;
- the optimal I/O is kept as given (0: none), in the 32 bits of ``unsigned int``.

Each case runs our real device configured with those fields, and the values are what
``/sys/block/vdX/queue/{physical_block_size,minimum_io_size,optimal_io_size}`` and
``/sys/block/vdX/alignment_offset`` would say.
"""

from __future__ import annotations

from typing import Any

import pytest

from virtblk import Disk
from virtblk.device.options import BlkSettings, DeviceOptions
from virtblk.driver.virtio_blk import Topology, VirtioBlk
from virtblk.embedded import start_embedded
from virtblk.spec import Feature

MiB = 1 << 20
KiB = 1 << 10


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        pytest.param(dict(physical_block_exp=6, min_io_size=2),
                     Topology(32 * KiB, 0, 32 * KiB, 0),
                     id="io_min-raised-to-the-physical-block"),
        pytest.param(dict(physical_block_exp=3),
                     Topology(4 * KiB, 0, 4 * KiB, 0),
                     id="no-io_min-given-so-the-physical-block"),
        pytest.param(dict(physical_block_exp=3, min_io_size=16, opt_io_size=128),
                     Topology(4 * KiB, 0, 8 * KiB, 64 * KiB),
                     id="larger-io_min-and-io_opt-kept"),
        pytest.param(dict(),
                     Topology(512, 0, 512, 0),
                     id="all-zero-fields-leave-the-logical-block"),
        pytest.param(dict(blk_size=4096),
                     Topology(4 * KiB, 0, 4 * KiB, 0),
                     id="the-logical-block-raises-physical-and-io_min"),
        pytest.param(dict(physical_block_exp=1, alignment_offset=3),
                     Topology(1 * KiB, 512, 1 * KiB, 0),
                     id="alignment-within-one-physical-block"),
        pytest.param(dict(alignment_offset=1),
                     Topology(512, 0, 512, 0),
                     id="alignment-of-a-whole-physical-block-is-none"),
        pytest.param(dict(physical_block_exp=3, opt_io_size=6),
                     Topology(4 * KiB, 0, 4 * KiB, 3 * KiB),
                     id="io_opt-below-the-physical-block-kept"),
        pytest.param(dict(physical_block_exp=23, min_io_size=2),
                     Topology(512, 0, 1 * KiB, 0),
                     id="a-physical-block-of-4GiB-wraps-to-0-then-the-logical-block"),
        pytest.param(dict(blk_size=4096, opt_io_size=0xFFFFFFFF),
                     Topology(4 * KiB, 0, 4 * KiB, 0xFFFFF000),
                     id="io_opt-wraps-in-32-bits"),
    ],
)
def test_topology_is_clamped_as_the_block_layer_does(
    device: dict[str, Any], expected: Topology
) -> None:
    with Disk.embedded(size=4 * MiB, mode="thread", **device) as disk:
        assert "BLK_TOPOLOGY" in disk.features
        assert disk.topology == expected


def test_without_the_topology_feature_the_logical_block_is_everything() -> None:
    """A driver that did not negotiate TOPOLOGY ignores the fields the device filled in."""
    embedded = start_embedded(
        DeviceOptions(backend="memory", size=4 * MiB,
                      device=BlkSettings(blk_size=4096, physical_block_exp=3,
                                         alignment_offset=1, min_io_size=16, opt_io_size=64)),
        "thread",
    )
    try:
        dev = VirtioBlk(embedded.sock, exclude_features=Feature.BLK_TOPOLOGY.mask)
        try:
            assert not dev.has(Feature.BLK_TOPOLOGY)
            assert dev.topology == Topology(4 * KiB, 0, 4 * KiB, 0)
        finally:
            dev.close()
    finally:
        embedded.stop()
