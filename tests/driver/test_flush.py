"""FLUSH reaches the device only in write-back mode, as in the seed, whose block layer is
given flush support only when ``virtblk_get_cache_mode`` says write-back: in write-through
every completed write is already durable, so a flush completes without a request.  The
device's own per-type counters say what reached it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.device.control import send_command
from virtblk.driver.queue_api import Completion, QueueHandle

MiB = 1 << 20


def flushes(disk: Disk) -> int:
    """FLUSH requests the device has received."""
    assert disk.embedded_device is not None
    return disk.embedded_device.requests().get("FLUSH", 0)


@pytest.fixture(params=["write back", "write through"])
def disk(request: pytest.FixtureRequest) -> Iterator[Disk]:
    """A disk whose device starts in the given cache mode."""
    with Disk.embedded(size=MiB, writeback=request.param == "write back") as d:
        assert d.cache_mode == request.param
        yield d


def test_disk_flush(disk: Disk) -> None:
    disk.pwrite(b"\1" * 512, 0)
    disk.flush()
    assert flushes(disk) == (disk.cache_mode == "write back")


def test_async_disk_flush(disk: Disk) -> None:
    async def main() -> None:
        adisk = AsyncDisk(disk)
        await adisk.write(b"\1" * 512, 0)
        await adisk.flush()
        await adisk.aclose(close_disk=False)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert flushes(disk) == (disk.cache_mode == "write back")


def test_queue_handle_flush(disk: Disk) -> None:
    buf = disk.buffer(512)
    with QueueHandle(disk) as q:
        q.write(0, buf, "write")
        q.flush("flush")
        assert sorted(q.do_io(2)) == [Completion("flush", 0), Completion("write", 0)]
    disk.free_buffer(buf)
    assert flushes(disk) == (disk.cache_mode == "write back")


def test_a_cache_mode_the_host_changes_is_followed() -> None:
    """The host switches the cache (the control socket's set-cache-mode): once the driver
    has re-read the config, flushes follow the new mode."""
    with Disk.embedded(size=MiB) as disk:
        control = disk.embedded_device.control_path
        assert send_command(control, "set-cache-mode", mode="write through")["ok"]
        disk.refresh()  # what the config-change message makes the driver do
        assert disk.cache_mode == "write through"
        disk.flush()
        assert flushes(disk) == 0
        assert send_command(control, "set-cache-mode", mode="write back")["ok"]
        disk.refresh()
        disk.flush()
        assert flushes(disk) == 1
