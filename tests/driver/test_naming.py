"""Disk names follow the seed's legacy scheme at every boundary."""

import pytest

from virtblk.driver.naming import DiskIndex, name_format


@pytest.mark.parametrize(
    ("index", "name"),
    [
        (0, "vda"),
        (1, "vdb"),
        (25, "vdz"),
        (26, "vdaa"),
        (27, "vdab"),
        (51, "vdaz"),
        (52, "vdba"),
        (701, "vdzz"),
        (702, "vdaaa"),
        (18277, "vdzzz"),
        (18278, "vdaaaa"),
    ],
)
def test_index_to_name_at_the_boundaries(index: int, name: str) -> None:
    assert name_format(index) == name


def test_names_are_unique_and_bijective_over_a_range() -> None:
    names = [name_format(i) for i in range(20000)]
    assert len(set(names)) == len(names)


def test_negative_index_is_refused() -> None:
    with pytest.raises(ValueError, match="index"):
        name_format(-1)


def test_indices_are_reused_lowest_first() -> None:
    a = DiskIndex.acquire()
    b = DiskIndex.acquire()
    assert b > a
    DiskIndex.release(a)
    c = DiskIndex.acquire()
    assert c == a
    DiskIndex.release(b)
    DiskIndex.release(c)
