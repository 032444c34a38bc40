"""A FUA write reaches the device as OUT_FUA, a plain write as OUT.

The device counts each request by its type on the wire (``stats`` on its control socket),
so a driver that sent a plain OUT for ``fua=True`` (the data would land, only not durably)
fails here.  ``AsyncDisk`` and ``QueueHandle`` have no FUA write yet; their plain writes
must still be plain OUTs on a disk that negotiated OUT_FUA.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.driver.queue_api import Completion, QueueHandle

MiB = 1 << 20
BS = 4096


def requests(disk: Disk) -> dict[str, int]:
    """The device's request counters by type, over all its queues."""
    assert disk.embedded_device is not None
    return disk.embedded_device.requests()


@pytest.fixture(params=["memory", "file"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    """A device and a driver that both use OUT_FUA; the file backend also runs the
    device's offloaded path for plain writes."""
    options: dict[str, Any] = {}
    if request.param == "file":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(4 * MiB))
        options = {"backend": "file", "path": str(image)}
    with Disk.embedded(size=4 * MiB, mode="thread", experimental_fua=True, **options) as d:
        assert "BLK_OUT_FUA" in d.features
        yield d


def test_disk_fua_writes_are_out_fua_and_plain_writes_out(disk: Disk) -> None:
    data = os.urandom(2 * BS)
    disk.pwrite(data, 0, fua=True)
    assert requests(disk) == {"OUT_FUA": 1}
    disk.pwritev([data[:BS], data[BS:]], 4 * BS, fua=True)
    assert requests(disk) == {"OUT_FUA": 2}
    disk.pwrite(data, 8 * BS)
    assert requests(disk) == {"OUT_FUA": 2, "OUT": 1}
    assert disk.pread(2 * BS, 0) == data and disk.pread(2 * BS, 4 * BS) == data


def test_a_split_fua_write_is_out_fua_in_every_piece() -> None:
    """seg_max 2 x size_max 4 KiB: 32 KiB is four requests, each of them FUA."""
    with Disk.embedded(size=MiB, mode="thread", experimental_fua=True, seg_max=2,
                       size_max=BS) as disk:
        data = os.urandom(8 * BS)
        disk.pwrite(data, 0, fua=True)
        assert requests(disk) == {"OUT_FUA": 4}
        assert disk.pread(len(data), 0) == data


def test_async_disk_writes_are_plain_out(disk: Disk) -> None:
    async def main() -> None:
        adisk = AsyncDisk(disk)
        await asyncio.gather(*(adisk.write(bytes([i]) * BS, i * BS) for i in range(8)))
        await adisk.aclose(close_disk=False)

    asyncio.run(main())
    assert requests(disk) == {"OUT": 8}


def test_queue_handle_writes_are_plain_out(disk: Disk) -> None:
    buf = disk.buffer(BS)
    buf[:] = b"\x42" * BS
    with QueueHandle(disk) as q:
        q.write(0, buf, "w")
        assert q.do_io(1, timeout=30) == [Completion("w", 0)]
    disk.free_buffer(buf)
    assert requests(disk) == {"OUT": 1}
