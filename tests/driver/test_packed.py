"""The driver over packed rings against our device: ``Disk.connect(path, packed=...)``.

None takes the packed ring when the device offers it, True requires it (a clear
NegotiationError naming RING_PACKED when it is not offered), False keeps the split ring;
``Disk.ring`` says which.  Over the packed ring every request type, several queues, a
small ring lapped many times by a full queue, a request timeout's ring reset and the
asyncio disk work as over the split ring.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Literal

import pytest

from peers.faulty import faulty_disk
from peers.threads import run_in_threads
from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.virtio_blk import FRESH_PACKED_BASE
from virtblk.errors import NegotiationError, RequestTimeoutError
from virtblk.spec import Feature
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.split_driver import DriverVirtqueue

MiB = 1 << 20
BS = 4096
MODES = pytest.mark.parametrize("mode", ["thread", "process"])
Mode = Literal["thread", "process"]


def test_a_fresh_packed_ring_starts_at_both_wrap_counters_set() -> None:
    """SET_VRING_BASE for a fresh packed ring: positions 0, wrap counters 1 (QEMU's
    32-bit layout), not the split ring's 0."""
    assert FRESH_PACKED_BASE == 0x80008000


@MODES
@pytest.mark.parametrize(("packed", "ring"), [(None, "packed"), (True, "packed"),
                                              (False, "split")])
def test_packed_option_picks_the_ring(mode: Mode, packed: bool | None, ring: str) -> None:
    with Disk.embedded(4 * MiB, mode=mode, packed=packed) as disk:
        assert disk.ring == ring
        assert ("RING_PACKED" in disk.features) == (ring == "packed")
        vq_type = PackedDriverVirtqueue if ring == "packed" else DriverVirtqueue
        assert all(type(q.vq) is vq_type for q in disk.device.queues)
        data = os.urandom(BS)
        disk.pwrite(data, BS)
        assert disk.pread(BS, BS) == data


@MODES
def test_packed_true_without_the_offer_names_ring_packed(mode: Mode) -> None:
    with pytest.raises(NegotiationError, match="does not offer VIRTIO_F_RING_PACKED"):
        Disk.embedded(4 * MiB, mode=mode, packed=True, offer_packed=False)
    with Disk.embedded(4 * MiB, mode=mode, offer_packed=False) as disk:
        assert disk.ring == "split"
        assert not disk.device.has(Feature.RING_PACKED)


@MODES
def test_every_request_type_over_the_packed_ring(mode: Mode) -> None:
    with Disk.embedded(8 * MiB, mode=mode, packed=True, serial="packed-serial") as disk:
        assert disk.ring == "packed"
        data = os.urandom(64 * 1024)
        disk.pwrite(data, MiB)
        assert disk.pread(len(data), MiB) == data
        parts = [bytearray(BS), bytearray(3 * BS)]
        assert disk.preadv(parts, MiB) == 4 * BS
        assert bytes(parts[0] + parts[1]) == data[: 4 * BS]
        assert disk.pwritev([data[:BS], data[BS : 2 * BS]], 2 * MiB) == 2 * BS
        assert disk.pread(2 * BS, 2 * MiB) == data[: 2 * BS]
        disk.flush()
        disk.write_zeroes(MiB, BS)
        assert disk.pread(BS, MiB) == bytes(BS)
        disk.write_zeroes(MiB + BS, BS, unmap=True)
        assert disk.pread(BS, MiB + BS) == bytes(BS)
        disk.discard(MiB + 2 * BS, BS)
        assert disk.serial == "packed-serial"
        # A request past the end is refused by the driver, and the ring keeps working.
        with pytest.raises(ValueError):
            disk.pread(BS, disk.size)
        assert disk.pread(BS, MiB + 3 * BS) == data[3 * BS : 4 * BS]


@MODES
def test_two_packed_queues_serve_their_own_threads(mode: Mode) -> None:
    with Disk.embedded(8 * MiB, mode=mode, num_queues=2) as disk:
        assert disk.ring == "packed" and disk.num_queues == 2

        def work(index: int) -> None:
            rng = random.Random(index)
            for _ in range(200):
                block = rng.randrange(256) * 2 + index  # each thread its own blocks
                data = rng.randbytes(BS)
                disk.pwrite(data, block * BS)
                assert disk.pread(BS, block * BS) == data

        run_in_threads(work, 2)
        assert all(q.stats_submitted > 0 for q in disk.device.queues)


@MODES
def test_depth_32_laps_a_small_packed_ring_many_times(mode: Mode) -> None:
    """32 requests in flight on a ring of 32, round after round: the ring wraps (and the
    wrap counters flip) on every round, with completions in any order."""

    async def run() -> int:
        async with await AsyncDisk.embedded(4 * MiB, mode=mode, queue_size=32,
                                            packed=True) as adisk:
            assert adisk.ring == "packed"
            q = adisk.disk.device.queues[0]
            assert q.depth == 32
            rounds = 40
            for r in range(rounds):
                blocks = [(r * 32 + i) % 1024 for i in range(32)]
                datas = [bytes([r % 251 + 1]) * 8 + os.urandom(BS - 8) for _ in blocks]
                await asyncio.gather(*(adisk.write(d, b * BS)
                                       for d, b in zip(datas, blocks, strict=True)))
                got = await asyncio.gather(*(adisk.read(BS, b * BS) for b in blocks))
                assert got == datas, f"round {r}"
            return q.stats_submitted

    submitted = asyncio.run(run())
    assert submitted >= 40 * 64  # 80 laps of the 32-descriptor ring at least


def test_a_request_timeout_resets_a_packed_ring() -> None:
    """The device never answers one request: it fails with ETIMEDOUT, the packed ring is
    stopped (GET_VRING_BASE) and set up afresh at 0x80008000, and the queue serves again."""
    lost = 8
    with faulty_disk(lost_sector=lost, disk_options={"request_timeout": 0.5,
                                                     "packed": True}) as (disk, device, _):
        assert disk.ring == "packed"
        q = disk.device.queues[0]
        data = os.urandom(BS)
        disk.pwrite(data, 0)
        with pytest.raises(RequestTimeoutError):
            disk.pread(512, lost * 512)
        assert device.lost == 1 and q.stats_timeouts == 1
        assert isinstance(q.vq, PackedDriverVirtqueue)
        assert disk.pread(BS, 0) == data
        assert q.vq.in_flight == 0 and q.tags_free == q.depth
        device.lost_sector = None
        disk.pwrite(b"\7" * 512, lost * 512)
        assert disk.pread(512, lost * 512) == b"\7" * 512
