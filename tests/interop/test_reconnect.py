"""A device restart loses nothing: ``Disk.connect(..., reconnect_timeout=S)`` (issue 11).

The device is killed with SIGKILL under a verified random-write load and started again on
the same socket and image.  The driver reconnects, renegotiates, and resubmits what the
dead device had not completed (neither ``virtblk serve`` on this branch nor
qemu-storage-daemon 7.2 offers the in-flight buffer, so the driver does it alone).  The
caller sees only delay: no error, and every write it was told had completed is on the
device and in the image file afterwards.

The model: each block is owned by one writer thread, which keeps one write in flight on
it at a time and records the pattern it last saw acknowledged; a write not acknowledged
when the device died is resubmitted, so "acknowledged" and "in the image" must agree for
every block at the end.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.qsd import QemuStorageDaemon
from virtblk import Disk
from virtblk.errors import DeviceGoneError, NegotiationError

pytestmark = [
    pytest.mark.interop,
    # The reconnect runs in a thread of its own: an exception there fails the test.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

MiB = 1 << 20
BLOCK = 4096
BLOCKS = 512  # the region written: 2 MiB of a 16 MiB image
IMAGE_SIZE = 16 * MiB
WRITERS = 4  # threads, so up to 4 requests in flight on the disk
RECONNECT_TIMEOUT = 60.0
WRITES_BETWEEN_KILLS = 8
"""Acknowledged writes each incarnation of the device must see before it is killed: the
kill then falls on a loaded device, never on one still starting."""


def pattern(block: int, generation: int) -> bytes:
    """Block ``block``'s contents after its ``generation``-th write (0: never written)."""
    if generation == 0:
        return bytes(BLOCK)
    stamp = block.to_bytes(4, "little") + generation.to_bytes(4, "little")
    return stamp * (BLOCK // len(stamp))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


class Load:
    """``WRITERS`` threads writing (and reading back) their own blocks at random."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.acked = [0] * BLOCKS  # the generation last acknowledged, per block
        self.writes = 0  # acknowledged writes, all threads
        self.reads_verified = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._run, args=(t,), name=f"writer-{t}")
            for t in range(WRITERS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, owner: int) -> None:
        rng = random.Random(owner)
        mine = range(owner, BLOCKS, WRITERS)
        try:
            while not self._stop.is_set():
                block = rng.choice(mine)
                if rng.random() < 0.25:
                    data = self.disk.pread(BLOCK, block * BLOCK)
                    if data != pattern(block, self.acked[block]):
                        raise AssertionError(f"block {block} reads back wrong during the run")
                    with self._lock:
                        self.reads_verified += 1
                    continue
                generation = self.acked[block] + 1
                self.disk.pwrite(pattern(block, generation), block * BLOCK)
                with self._progress:
                    self.acked[block] = generation
                    self.writes += 1
                    self._progress.notify_all()
        except BaseException as exc:  # every error the caller sees fails the test
            with self._progress:
                self.errors.append(exc)
                self._progress.notify_all()

    def wait_writes(self, count: int) -> None:
        """Wait until ``count`` writes in all were acknowledged (or a writer failed)."""
        with self._progress:
            while self.writes < count and not self.errors:
                self._progress.wait()
        assert not self.errors, f"the caller saw errors: {self.errors!r}"

    def verify(self, read: Callable[[int], bytes], where: str) -> int:
        """Compare every block with the model; returns how many were written at all."""
        lost = [b for b in range(BLOCKS) if read(b) != pattern(b, self.acked[b])]
        assert not lost, f"{len(lost)} acknowledged writes lost ({where}): blocks {lost[:10]}"
        return sum(1 for generation in self.acked if generation)


def read_image(image: Path) -> Callable[[int], bytes]:
    data = image.read_bytes()
    return lambda block: data[block * BLOCK : (block + 1) * BLOCK]


def report(disk: Disk, load: Load) -> None:
    """The figures the README quotes (``pytest -s`` shows them)."""
    resubmitted = sum(q.stats_resubmitted for q in disk.device.queues)
    mean_ms = 1000 * disk.device.reconnect_seconds / max(1, disk.reconnects)
    who = "device" if disk.device.device_resubmits else "driver"
    print(f"\n{who} resubmits: reconnects {disk.reconnects} (mean {mean_ms:.0f} ms from loss "
          f"to resumed, the restart included), writes acknowledged {load.writes}, reads "
          f"verified during "
          f"the run {load.reads_verified}, requests resubmitted by the driver {resubmitted}, "
          f"blocks verified {BLOCKS}, lost 0")


def kill_and_restart(
    load: Load, kills: int, kill: Callable[[], None], start: Callable[[], None]
) -> None:
    """``kills`` times: let the load make progress, kill the device, start it again."""
    for _ in range(kills):
        load.wait_writes(load.writes + WRITES_BETWEEN_KILLS)
        kill()
        start()
    load.wait_writes(load.writes + WRITES_BETWEEN_KILLS)  # it runs on the last one too


INFLIGHT = pytest.mark.parametrize(
    "inflight", [True, False], ids=["device-resubmits", "driver-resubmits"])
"""Our device with its in-flight buffer (the default), and without (``--no-inflight``, as
qemu-storage-daemon 7.2): who resubmits after a restart."""


def inflight_args(inflight: bool) -> list[str]:
    return [] if inflight else ["--no-inflight"]


def check_resubmitter(disk: Disk, inflight: bool) -> None:
    """The path the reconnects took: the device's in-flight buffer, or the driver alone."""
    assert disk.device.device_resubmits == inflight
    if inflight:
        assert sum(q.stats_resubmitted for q in disk.device.queues) == 0


@pytest.mark.parametrize(("inflight", "packed", "kills"), [
    (True, None, 100), (False, None, 100), (True, False, 20),
], ids=["device-resubmits", "driver-resubmits", "device-resubmits-split"])
def test_disk_survives_100_sigkills_of_virtblk_serve(
    sock_dir: Path, image: Path, inflight: bool, packed: bool | None, kills: int
) -> None:
    """The default ring (packed, which our device offers) takes the 100 kills; the split
    ring, with the device resubmitting, fewer."""
    sock = sock_dir / "vb.sock"
    args = ["--file", str(image), *inflight_args(inflight)]
    server = [ServeProcess(sock, args).start()]

    def restart() -> None:
        server[0] = ServeProcess(sock, args).start()

    try:
        with Disk.connect(str(sock), reconnect_timeout=RECONNECT_TIMEOUT,
                          packed=packed) as disk:
            assert disk.ring == ("split" if packed is False else "packed")
            with Load(disk) as load:
                kill_and_restart(load, kills, lambda: server[0].kill(), restart)
            assert not load.errors, f"the caller saw errors: {load.errors!r}"
            assert disk.reconnects == kills
            check_resubmitter(disk, inflight)
            load.verify(lambda b: disk.pread(BLOCK, b * BLOCK), "read from the device")
            report(disk, load)
        written = load.verify(read_image(image), "in the image file")
        # 100 kills' load writes most blocks; fewer kills, fewer writes.
        assert written > (BLOCKS // 2 if kills == 100 else 0)
    finally:
        if server[0].process is not None:
            server[0].stop()


def test_disk_survives_sigkills_of_qemu_storage_daemon(sock_dir: Path, image: Path) -> None:
    """qemu-storage-daemon 7.2 has no in-flight buffer: the driver's resubmission alone."""
    sock = sock_dir / "qsd.sock"
    daemon = [QemuStorageDaemon(sock, image=image).start()]

    def kill() -> None:
        process = daemon[0].process
        assert process is not None
        process.kill()
        process.wait()
        daemon[0].stop()

    def restart() -> None:
        daemon[0] = QemuStorageDaemon(sock, image=image).start()

    try:
        with Disk.connect(str(sock), reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            with Load(disk) as load:
                kill_and_restart(load, 100, kill, restart)
            assert not load.errors, f"the caller saw errors: {load.errors!r}"
            assert disk.reconnects == 100
            check_resubmitter(disk, inflight=False)  # the daemon offers no buffer
            load.verify(lambda b: disk.pread(BLOCK, b * BLOCK), "read from the device")
            report(disk, load)
        load.verify(read_image(image), "in the image file")
    finally:
        daemon[0].stop()


@pytest.mark.parametrize(
    ("size", "changed"),
    [(IMAGE_SIZE, ["--blk-size", "4096"]), (IMAGE_SIZE // 2, []),
     (IMAGE_SIZE, ["--read-only"])],
    ids=["block-size", "capacity", "features"],
)
def test_a_device_that_comes_back_different_is_refused(
    sock_dir: Path, tmp_path: Path, size: int, changed: list[str]
) -> None:
    sock = sock_dir / "vb.sock"
    first_image, second_image = tmp_path / "a.img", tmp_path / "b.img"
    for path, length in ((first_image, IMAGE_SIZE), (second_image, size)):
        with path.open("wb") as f:
            f.truncate(length)
    first = ServeProcess(sock, ["--file", str(first_image)]).start()
    try:
        with Disk.connect(str(sock), reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            disk.pwrite(b"x" * 4096, 0)
            first.kill()
            with ServeProcess(sock, ["--file", str(second_image), *changed]):
                with pytest.raises(NegotiationError, match="reconnect"):
                    disk.pread(4096, 0)
                with pytest.raises(NegotiationError):  # and every later request
                    disk.pwrite(b"y" * 4096, 0)
    finally:
        if first.process is not None:
            first.stop()


def _fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def test_a_device_that_never_comes_back_fails_after_the_timeout(sock_dir: Path,
                                                                image: Path) -> None:
    sock = sock_dir / "vb.sock"
    server = ServeProcess(sock, ["--file", str(image)]).start()
    threads_before = set(threading.enumerate())
    fds_before = _fds()
    try:
        disk = Disk.connect(str(sock), reconnect_timeout=1.0)
        disk.pwrite(b"x" * 4096, 0)
        server.kill()
        with pytest.raises(DeviceGoneError) as gone:
            disk.pread(4096, 0)
        assert gone.value.errno == errno.ECONNRESET
        with pytest.raises(DeviceGoneError):
            disk.pwrite(b"y" * 4096, 0)
        disk.close()
        # Views of the ring memory live as long as the disk object, and so the mapping's
        # own dup of the memory fd (mmap keeps one until unmapped): let them go first.
        del gone, disk
        gc.collect()
    finally:
        if server.process is not None:
            server.stop()
    assert set(threading.enumerate()) == threads_before
    left = _fds() - fds_before
    assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left}


class Killer:
    """Kills ``virtblk serve`` and starts it again ``kills`` times from a thread, each time
    once the load has made progress on the device of the moment (``progressed``)."""

    def __init__(self, sock: Path, args: list[str], kills: int) -> None:
        self.sock = sock
        self.args = args
        self.kills = kills
        self.done = 0
        self.server = ServeProcess(sock, args).start()
        self.error: BaseException | None = None
        self._progress = threading.Condition()
        self._count = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="killer")

    def progressed(self) -> None:
        """One more write acknowledged (any thread)."""
        with self._progress:
            self._count += 1
            self._progress.notify_all()

    def _wait_progress(self, since: int) -> bool:
        """False when the test stops the killer instead."""
        with self._progress:
            while self._count < since + WRITES_BETWEEN_KILLS and not self._stopping:
                self._progress.wait()
            return not self._stopping

    def _run(self) -> None:
        try:
            for _ in range(self.kills):
                if not self._wait_progress(self._count):
                    return
                self.server.kill()
                self.server = ServeProcess(self.sock, self.args).start()
                self.done += 1
            self._wait_progress(self._count)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Join the thread (the load has ended) and stop the server."""
        with self._progress:
            self._stopping = True  # no more waiting for progress that may not come
            self._progress.notify_all()
        self._thread.join()
        if self.server.process is not None:
            self.server.stop()


ASYNC_KILLS = 30
"""Kills in the AsyncDisk and QueueHandle tests (the Disk test does 100)."""


@INFLIGHT
def test_async_disk_survives_sigkills_of_virtblk_serve(
    sock_dir: Path, image: Path, inflight: bool
) -> None:
    import asyncio

    from virtblk.aio import AsyncDisk

    killer = Killer(sock_dir / "vb.sock", ["--file", str(image), *inflight_args(inflight)],
                    ASYNC_KILLS)
    acked = [0] * BLOCKS
    errors: list[BaseException] = []

    async def writer(adisk: AsyncDisk, owner: int, stop: asyncio.Event) -> None:
        rng = random.Random(owner)
        mine = range(owner, BLOCKS, 8)
        while not stop.is_set():
            block = rng.choice(mine)
            generation = acked[block] + 1
            try:
                await adisk.write(pattern(block, generation), block * BLOCK)
            except BaseException as exc:
                errors.append(exc)
                raise
            acked[block] = generation
            killer.progressed()

    async def main() -> None:
        async with await AsyncDisk.connect(str(killer.sock),
                                           reconnect_timeout=RECONNECT_TIMEOUT) as adisk:
            stop = asyncio.Event()
            killer.start()
            tasks = [asyncio.create_task(writer(adisk, t, stop)) for t in range(8)]
            while not killer.finished and not errors:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert adisk.disk.reconnects == killer.done
            check_resubmitter(adisk.disk, inflight)
            for block in range(BLOCKS):
                assert await adisk.read(BLOCK, block * BLOCK) == pattern(block, acked[block])

    try:
        asyncio.run(main())
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    assert not errors, f"the caller saw errors: {errors!r}"
    assert killer.done == ASYNC_KILLS
    data = read_image(image)
    assert all(data(b) == pattern(b, acked[b]) for b in range(BLOCKS))


@pytest.mark.parametrize(
    ("poll", "inflight"), [(False, False), (True, False), (False, True)],
    ids=["interrupts-driver-resubmits", "polling-driver-resubmits",
         "interrupts-device-resubmits"])
def test_queue_handle_survives_sigkills_of_virtblk_serve(
    sock_dir: Path, image: Path, poll: bool, inflight: bool
) -> None:
    from virtblk.driver.queue_api import QueueHandle

    killer = Killer(sock_dir / "vb.sock", ["--file", str(image), *inflight_args(inflight)],
                    ASYNC_KILLS)
    acked = [0] * BLOCKS
    depth = 16
    rng = random.Random(0)
    try:
        with Disk.connect(str(killer.sock), reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            buffers = [disk.buffer(BLOCK) for _ in range(depth)]
            free = list(range(depth))
            busy: set[int] = set()  # one write in flight per block
            with QueueHandle(disk, 0, poll=poll) as handle:
                killer.start()
                while not killer.finished or busy:
                    while free and not killer.finished:
                        block = rng.randrange(BLOCKS)
                        if block in busy:
                            continue
                        slot = free.pop()
                        buffers[slot][:] = pattern(block, acked[block] + 1)
                        handle.write(block * BLOCK, buffers[slot], (slot, block))
                        busy.add(block)
                    for completion in handle.do_io(min_completions=1):
                        assert completion.ret == 0, completion.error_msg
                        slot, block = completion.user_data
                        acked[block] += 1
                        busy.discard(block)
                        free.append(slot)
                        killer.progressed()
            assert disk.reconnects == killer.done
            check_resubmitter(disk, inflight)
            for block in range(BLOCKS):
                assert disk.pread(BLOCK, block * BLOCK) == pattern(block, acked[block])
    finally:
        killer.stop()
    assert killer.error is None, killer.error
    assert killer.done == ASYNC_KILLS
    data = read_image(image)
    assert all(data(b) == pattern(b, acked[b]) for b in range(BLOCKS))


def test_a_vhost_user_request_finds_the_device_gone_and_reconnects(sock_dir: Path,
                                                                   image: Path) -> None:
    """No I/O notices the loss first: the config request does, and waits as I/O would."""
    sock = sock_dir / "vb.sock"
    server = ServeProcess(sock, ["--file", str(image)]).start()
    try:
        with Disk.connect(str(sock), reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            disk.pwrite(pattern(1, 1), BLOCK)
            server.kill()
            server = ServeProcess(sock, ["--file", str(image)]).start()
            disk.cache_mode = "write through"  # SET_CONFIG, then GET_CONFIG
            assert disk.cache_mode == "write through"
            disk.refresh()
            assert disk.reconnects == 1
            assert disk.pread(BLOCK, BLOCK) == pattern(1, 1)
            server.kill()
            server = ServeProcess(sock, ["--file", str(image)]).start()
            assert disk.pread(BLOCK, BLOCK) == pattern(1, 1)
            assert disk.reconnects == 2
            # The device restarted with its default (write back): the disk's mode is
            # what the driver set, so it is set again.
            assert disk.cache_mode == "write through"
            disk.refresh()
            assert disk.cache_mode == "write through"
    finally:
        if server.process is not None:
            server.stop()


def test_closing_the_disk_ends_a_reconnect_that_waits(sock_dir: Path, image: Path) -> None:
    """``close`` during a reconnect stops it: the close returns, long before the reconnect
    timeout, and the waiting caller gets DeviceGoneError, or EIO when close's own failing of
    what is left (as ``close`` does to any request still waiting) reaches it first."""
    sock = sock_dir / "vb.sock"
    server = ServeProcess(sock, ["--file", str(image)]).start()
    threads_before = set(threading.enumerate())
    seen: list[BaseException] = []
    try:
        disk = Disk.connect(str(sock), reconnect_timeout=3600)
        disk.pwrite(pattern(0, 1), 0)
        server.kill()

        def read() -> None:
            try:
                disk.pread(BLOCK, 0)
            except BaseException as exc:
                seen.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        while not disk.device.queues[0].lost:  # the reader found the device gone
            threading.Event().wait(0.01)
        disk.close()
        reader.join()
    finally:
        if server.process is not None:
            server.stop()
    assert len(seen) == 1 and isinstance(seen[0], OSError), seen
    assert seen[0].errno in (errno.ECONNRESET, errno.EIO), seen
    assert set(threading.enumerate()) == threads_before


def test_an_async_disk_whose_device_never_comes_back_fails_after_the_timeout(
    sock_dir: Path, image: Path
) -> None:
    import asyncio

    from virtblk.aio import AsyncDisk

    sock = sock_dir / "vb.sock"
    server = ServeProcess(sock, ["--file", str(image)]).start()
    threads_before = set(threading.enumerate())

    async def main() -> None:
        async with await AsyncDisk.connect(str(sock), reconnect_timeout=1.0) as adisk:
            await adisk.write(pattern(0, 1), 0)
            server.kill()
            with pytest.raises(DeviceGoneError) as gone:
                await asyncio.gather(*(adisk.read(BLOCK, b * BLOCK) for b in range(8)))
            assert gone.value.errno == errno.ECONNRESET
            with pytest.raises(DeviceGoneError):
                await adisk.write(pattern(0, 2), 0)

    try:
        asyncio.run(main())
    finally:
        if server.process is not None:
            server.stop()
    assert set(threading.enumerate()) == threads_before


def test_the_config_change_channel_is_reopened(sock_dir: Path, image: Path) -> None:
    """After a reconnect the new device's CONFIG_CHANGE_MSG reaches the disk: a resize
    through its control socket shows in ``size`` and the ``on_resize`` callback."""
    from interop.serve_process import run_virtblk

    sock, control = sock_dir / "vb.sock", sock_dir / "ctl.sock"
    args = ["--file", str(image), "--control", str(control)]
    server = ServeProcess(sock, args).start()
    resized = threading.Event()
    try:
        with Disk.connect(str(sock), reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            disk.on_resize(lambda old, new: resized.set())
            server.kill()
            server = ServeProcess(sock, args).start()
            assert disk.pread(BLOCK, 0) == bytes(BLOCK)  # reconnects
            assert disk.reconnects == 1
            result = run_virtblk("control", str(control), "resize", str(2 * IMAGE_SIZE))
            assert result.returncode == 0, result.stderr
            assert resized.wait(60)
            assert disk.size == 2 * IMAGE_SIZE
    finally:
        if server.process is not None:
            server.stop()


@INFLIGHT
def test_two_queues_survive_sigkills_of_virtblk_serve(
    sock_dir: Path, image: Path, inflight: bool
) -> None:
    """Each writer thread is mapped to one of two hardware queues: both are resumed, each
    with what it had outstanding."""
    sock = sock_dir / "vb.sock"
    args = ["--file", str(image), "--num-queues", "2", *inflight_args(inflight)]
    server = [ServeProcess(sock, args).start()]

    def restart() -> None:
        server[0] = ServeProcess(sock, args).start()

    try:
        with Disk.connect(str(sock), num_queues=2,
                          reconnect_timeout=RECONNECT_TIMEOUT) as disk:
            assert disk.num_queues == 2
            with Load(disk) as load:
                kill_and_restart(load, ASYNC_KILLS, lambda: server[0].kill(), restart)
            assert not load.errors, f"the caller saw errors: {load.errors!r}"
            assert disk.reconnects == ASYNC_KILLS
            assert all(q.stats_submitted for q in disk.device.queues)
            check_resubmitter(disk, inflight)
            load.verify(lambda b: disk.pread(BLOCK, b * BLOCK), "read from the device")
        load.verify(read_image(image), "in the image file")
    finally:
        if server[0].process is not None:
            server[0].stop()
