"""``Disk.embedded``: the device's options are checked in the calling process, before any
device starts, so a misspelled one names itself instead of failing in a child."""

from __future__ import annotations

import asyncio

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk

MiB = 1 << 20


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_misspelled_device_option_fails_in_the_caller(mode: str) -> None:
    with pytest.raises(TypeError, match=r"'serail'.*did you mean 'serial'"):
        Disk.embedded(size=MiB, mode=mode, serail="x")


def test_a_device_option_of_the_wrong_type_fails_in_the_caller() -> None:
    with pytest.raises(TypeError, match="blk_size"):
        Disk.embedded(size=MiB, blk_size="4096")


def test_the_async_disk_checks_them_too() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="'serail'"):
            await AsyncDisk.embedded(size=MiB, serail="x")

    asyncio.run(asyncio.wait_for(main(), 120))


def test_the_options_reach_the_device() -> None:
    with Disk.embedded(size=MiB, serial="typed", blk_size=4096, writeback=False) as disk:
        assert disk.serial == "typed"
        assert disk.logical_block_size == 4096
        assert disk.cache_mode == "write through"


def test_a_value_the_device_refuses_fails_in_the_caller() -> None:
    """Values are the device's to judge (a serial longer than GET_ID's 20 bytes): it judges
    them in the calling process too, before the child starts."""
    with pytest.raises(ValueError, match="serial is 21 bytes"):
        Disk.embedded(size=MiB, mode="process", serial="x" * 21)
