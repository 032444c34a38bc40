"""``Disk.cache_mode`` takes what the seed's ``cache_type`` store takes.

The store compares with Linux's ``sysfs_streq``: the two strings are equal, or equal but
for one newline ending either of them (``echo "write back" > cache_type`` writes the
newline).  Nothing else is forgiven: no other whitespace, no case, no second newline.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtblk import Disk
from virtblk.driver.virtio_blk import sysfs_streq

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk() -> Iterator[Disk]:
    with Disk.embedded(size=MiB, mode="thread") as d:
        assert "BLK_CONFIG_WCE" in d.features
        yield d


@pytest.mark.parametrize(
    ("given", "mode"),
    [
        ("write through", "write through"),
        ("write through\n", "write through"),
        ("write back", "write back"),
        ("write back\n", "write back"),
    ],
)
def test_a_trailing_newline_is_accepted(disk: Disk, given: str, mode: str) -> None:
    other = "write back" if mode == "write through" else "write through"
    disk.cache_mode = other
    disk.cache_mode = given
    assert disk.cache_mode == mode
    assert disk.device.config.writeback == (mode == "write back")


@pytest.mark.parametrize(
    "given",
    ["write back\n\n", "write back ", " write back", "\nwrite back", "write back\r\n",
     "Write back", "writeback", "write", "", "\n"],
)
def test_anything_else_is_refused_and_changes_nothing(disk: Disk, given: str) -> None:
    disk.cache_mode = "write through"
    with pytest.raises(ValueError, match="cache mode"):
        disk.cache_mode = given
    assert disk.cache_mode == "write through"


@pytest.mark.parametrize(
    ("s1", "s2", "equal"),
    [
        ("a", "a", True),
        ("a\n", "a", True),
        ("a", "a\n", True),
        ("a\n", "a\n", True),
        ("", "", True),
        ("\n", "", True),
        ("a\n\n", "a", False),
        ("a", "a\n\n", False),
        ("a\n", "a\r", False),
        ("a ", "a", False),
        ("ab", "a", False),
        ("a", "ab", False),
    ],
)
def test_sysfs_streq_is_linuxs(s1: str, s2: str, equal: bool) -> None:
    assert sysfs_streq(s1, s2) is equal
