"""``Disk.embedded``: the device's options are checked in the calling process, before any
device starts, so a misspelled one names itself instead of failing in a child."""

from __future__ import annotations

import asyncio
import pathlib

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
    """The device's rules for a value (a serial longer than GET_ID's 20 bytes) are the
    settings': they hold where the settings are made, in the calling process, before the
    child starts."""
    with pytest.raises(ValueError, match="serial is 21 bytes"):
        Disk.embedded(size=MiB, mode="process", serial="x" * 21)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_refused_options_touch_no_storage(tmp_path: pathlib.Path, mode: str) -> None:
    """Judging the options needs no device: the image they name is not created."""
    image = tmp_path / "new.img"
    with pytest.raises(ValueError, match="blk_size must be a power of two"):
        Disk.embedded(size=MiB, backend="file", path=image, mode=mode, blk_size=1000)
    with pytest.raises(ValueError, match=r"num_queues must be in 1\.\.65535"):
        Disk.embedded(size=MiB, backend="file", path=image, mode=mode, num_queues=0)
    assert not image.exists()


def test_what_only_the_storage_can_tell_fails_in_the_caller_as_itself(
        tmp_path: pathlib.Path) -> None:
    """The child opens the storage; when it cannot, the caller gets the child's own error
    (not a connection the child dropped), and the child has exited."""
    missing = tmp_path / "no-such-dir" / "x.img"
    with pytest.raises(FileNotFoundError, match=r"^\[Errno 2\] No such file or directory: "):
        Disk.embedded(backend="file", path=missing, mode="process")
    # the zoned backend judges its zone size when it is made
    with pytest.raises(ValueError, match=r"zone size \(1000\) must be multiples of 512"):
        Disk.embedded(size=MiB, zoned={"zone_size": 1000}, mode="process")
