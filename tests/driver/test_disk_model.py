"""Random sequences of writes, reads and flushes through a Disk match a bytearray model,
over the packed ring (our device's default), the split ring and a packed ring of 4."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from virtblk import Disk

SECTORS = 256  # a 128 KiB disk: small enough that writes collide often
SIZE = SECTORS * 512


class DiskModel(RuleBasedStateMachine):
    """The disk must behave exactly like a bytearray of the same size."""

    backend = "memory"
    packed: bool | None = None  # our device offers the packed ring: None takes it
    queue_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        path = None
        if self.backend == "file":
            path = str(Path(self.tmp.name) / "img")
            Path(path).write_bytes(bytes(SIZE))
        self.disk = Disk.embedded(size=SIZE, backend=self.backend, path=path, mode="thread",
                                  packed=self.packed, queue_size=self.queue_size)
        assert self.disk.ring == ("split" if self.packed is False else "packed")
        self.model = bytearray(SIZE)

    extent = st.integers(0, SECTORS - 1).flatmap(
        lambda start: st.tuples(st.just(start), st.integers(1, min(64, SECTORS - start)))
    )

    @rule(extent=extent, seed=st.integers(0, 255))
    def write(self, extent: tuple[int, int], seed: int) -> None:
        start, count = extent
        data = bytes((seed + i) % 256 for i in range(count * 512))
        self.disk.pwrite(data, start * 512)
        self.model[start * 512 : (start + count) * 512] = data

    @rule(extent=extent, pieces=st.integers(1, 4))
    def writev(self, extent: tuple[int, int], pieces: int) -> None:
        start, count = extent
        data = bytes((start * 7 + i) % 251 for i in range(count * 512))
        cut = sorted({0, len(data)} | {len(data) * k // pieces for k in range(1, pieces)})
        bufs = [data[a:b] for a, b in itertools.pairwise(cut)]
        self.disk.pwritev(bufs, start * 512)
        self.model[start * 512 : (start + count) * 512] = data

    @rule(extent=extent)
    def read(self, extent: tuple[int, int]) -> None:
        start, count = extent
        got = self.disk.pread(count * 512, start * 512)
        assert got == self.model[start * 512 : (start + count) * 512]

    @rule()
    def flush(self) -> None:
        self.disk.flush()

    @rule(extent=extent)
    def write_zeroes(self, extent: tuple[int, int]) -> None:
        start, count = extent
        self.disk.write_zeroes(start * 512, count * 512)
        self.model[start * 512 : (start + count) * 512] = bytes(count * 512)

    @invariant()
    def size_is_stable(self) -> None:
        assert self.disk.size == SIZE

    def teardown(self) -> None:
        try:
            assert self.disk.pread(SIZE, 0) == self.model
        finally:
            self.disk.close()
            self.tmp.cleanup()


class FileDiskModel(DiskModel):
    backend = "file"


class SplitDiskModel(DiskModel):
    packed = False


class SmallPackedRingDiskModel(DiskModel):
    """A packed ring of 4: the wrap counters flip every few requests."""

    packed = True
    queue_size = 4


TestMemoryDiskModel = DiskModel.TestCase
TestMemoryDiskModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
TestFileDiskModel = FileDiskModel.TestCase
TestFileDiskModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
TestSplitDiskModel = SplitDiskModel.TestCase
TestSplitDiskModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
TestSmallPackedRingDiskModel = SmallPackedRingDiskModel.TestCase
TestSmallPackedRingDiskModel.settings = settings(max_examples=25, stateful_step_count=20,
                                                 deadline=None)
