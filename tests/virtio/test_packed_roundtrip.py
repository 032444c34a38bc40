"""Our packed driver and our packed device sharing one memfd: every request arrives intact,
every completion returns to its token whatever the completion order, the ring wraps lap
after lap, and neither side sleeps through the other's work.  And the two rings offer one
interface, so what drives or serves one drives or serves the other."""

from __future__ import annotations

import dataclasses
import os
import random
import select
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from virtq_helpers import Guest

from virtblk.virtio import packed_layout
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_driver import PackedDriverVirtqueue, QueueFull
from virtblk.virtio.split_device import ChainError, DescriptorChain, DeviceVirtqueue, Triple
from virtblk.virtio.split_driver import DriverVirtqueue

MAX_TOKENS = 12
MAX_CHAIN = 6


@dataclasses.dataclass
class Request:
    token: int
    out: list[tuple[int, int]]
    in_: list[tuple[int, int]]
    data: bytes

    @property
    def gpas(self) -> list[int]:
        return [gpa for gpa, _ in self.out + self.in_]


def pattern(token: int, length: int) -> bytes:
    return bytes((token * 7 + i) & 0xFF for i in range(length))


class RoundTrip(RuleBasedStateMachine):
    """Random interleavings of add / kick / pop / add_used / flush / get_used, with an
    oracle of where every request is (not yet kicked, offered, held by the device,
    answered but not published, visible to the driver)."""

    @initialize(num=st.sampled_from([1, 2, 3, 4, 8, 256]), event_idx=st.booleans(),
                indirect=st.booleans())
    def setup(self, num: int, event_idx: bool, indirect: bool) -> None:
        self.guest = Guest()
        addrs = packed_layout.allocate(self.guest.allocator, num)
        self.num = num
        self.indirect = indirect
        self.driver = PackedDriverVirtqueue(
            self.guest.memory, addrs, event_idx=event_idx, indirect=indirect,
            allocator=self.guest.allocator, max_chain=MAX_CHAIN, max_tokens=MAX_TOKENS,
        )
        self.device = PackedDeviceVirtqueue(self.guest.memory, addrs, event_idx=event_idx)
        self.free_tokens = list(range(MAX_TOKENS))
        self.requests: dict[int, Request] = {}
        self.descs_used = 0
        self.unpublished: list[int] = []  # added, kick_prepare not yet called
        self.published: list[int] = []  # visible to the device, not popped
        self.popped: list[tuple[int, DescriptorChain]] = []  # the device holds them
        self.unflushed: list[tuple[int, int]] = []  # add_used done, not flushed
        self.completed: list[tuple[int, int]] = []  # visible to the driver
        self.device_sleeping = False
        self.driver_waits_for = 0  # completions the driver sleeps until (0: awake)
        self.cycles_done = 0

    def teardown(self) -> None:
        if hasattr(self, "guest"):
            self.driver.close()
            self.guest.close()

    def descs(self, request: Request) -> int:
        count = len(request.out) + len(request.in_)
        return 1 if self.indirect and count > 1 else count

    @rule(
        out_sizes=st.lists(st.integers(1, 600), min_size=1, max_size=3),
        in_sizes=st.lists(st.integers(1, 600), max_size=3),
        seed=st.integers(0, 255),
    )
    def add(self, out_sizes: list[int], in_sizes: list[int], seed: int) -> None:
        if not self.free_tokens:
            return
        token = self.free_tokens[0]
        if len(out_sizes) + len(in_sizes) > self.num:
            with pytest.raises(ValueError, match="queue size"):
                self.driver.add([(0, 1)] * len(out_sizes), [(0, 1)] * len(in_sizes), token)
            return
        out_sizes[0] = max(out_sizes[0], 2)  # room for the token, so the device can check
        data = token.to_bytes(2, "little") + bytes(
            (seed + i) & 0xFF for i in range(sum(out_sizes) - 2)
        )
        alloc = self.guest.allocator
        out = [(alloc.alloc(size, 1), size) for size in out_sizes]
        in_ = [(alloc.alloc(size, 1), size) for size in in_sizes]
        offset = 0
        for gpa, size in out:
            self.guest.memory.view(gpa, size)[:] = data[offset : offset + size]
            offset += size
        for gpa, size in in_:
            self.guest.memory.view(gpa, size)[:] = b"\xee" * size
        request = Request(token, out, in_, data)
        needed = self.descs(request)
        try:
            self.driver.add(out, in_, token)
        except QueueFull:
            assert needed > self.num - self.descs_used
            for gpa in request.gpas:
                alloc.free(gpa)
            return
        assert needed <= self.num - self.descs_used
        self.descs_used += needed
        self.free_tokens.pop(0)
        self.requests[token] = request
        self.unpublished.append(token)

    @rule(shapes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 2)), min_size=1,
                          max_size=5))
    def add_prepared(self, shapes: list[tuple[int, int]]) -> None:
        """Tokens submitted as a queue handle does: ``prepare`` each chain (out buffers,
        in buffers), then one ``add_prepared_batch``; it queues as many as fit."""
        alloc = self.guest.allocator
        batch: list[Request] = []
        for n_out, n_in in shapes:
            if len(batch) == len(self.free_tokens):
                break
            token = self.free_tokens[len(batch)]
            if n_out + n_in > self.num:
                continue
            out = [(alloc.alloc(16, 1), 16) for _ in range(n_out)]
            in_ = [(alloc.alloc(8, 1), 8) for _ in range(n_in)]
            data = b"".join(token.to_bytes(2, "little") + bytes(14) for _ in out)
            for k, (gpa, _) in enumerate(out):
                self.guest.memory.view(gpa, 16)[:] = data[16 * k : 16 * k + 16]
            self.driver.prepare(token, out, in_)
            batch.append(Request(token, out, in_, data))
        queued = self.driver.add_prepared_batch([r.token for r in batch])
        room = self.num - self.descs_used
        fitted = 0
        for request in batch:  # the model: in order, while descriptors last
            if self.descs(request) > room:
                break
            room -= self.descs(request)
            fitted += 1
        assert queued == fitted
        for request in batch[:queued]:
            self.descs_used += self.descs(request)
            self.free_tokens.remove(request.token)
            self.requests[request.token] = request
            self.unpublished.append(request.token)
        for request in batch[queued:]:
            for gpa in request.gpas:
                alloc.free(gpa)

    @rule()
    def kick(self) -> None:
        notify = self.driver.kick_prepare()
        if self.unpublished and self.device_sleeping:
            assert notify, "the device sleeps but was not kicked for new requests"
        if not self.unpublished:
            assert not notify
        if notify:
            self.device_sleeping = False
        self.published += self.unpublished
        self.unpublished = []

    def check_chain(self, token: int, chain: DescriptorChain) -> None:
        request = self.requests[token]
        readable = b"".join(bytes(b) for b in chain.readable)
        assert readable == request.data and chain.readable_len == len(request.data)
        assert [len(b) for b in chain.writable] == [size for _, size in request.in_]
        # Fill every writable byte, as a device answering a read would.
        offset = 0
        expected = pattern(token, chain.writable_len)
        for buf in chain.writable:
            buf[:] = expected[offset : offset + len(buf)]
            offset += len(buf)
        self.popped.append((token, chain))

    @rule()
    def pop(self) -> None:
        chain = self.device.pop()
        if not self.published:
            assert chain is None
            return
        assert chain is not None
        self.check_chain(self.published.pop(0), chain)

    @rule(limit=st.integers(1, 6))
    def pop_batch(self, limit: int) -> None:
        view, items = self.device.pop_batch(limit)
        assert len(items) == min(limit, len(self.published))
        for item in items:
            if isinstance(item, Triple):
                item = item.chain(view)
            assert not isinstance(item, ChainError), item
            self.check_chain(self.published.pop(0), item)

    @precondition(lambda self: self.popped)
    @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=4), fraction=st.floats(0, 1))
    def add_used(self, picks: list[int], fraction: float) -> None:
        """Answer some of what the device holds, in any order (one batch call)."""
        used: list[int] = []
        for pick in picks:
            if not self.popped:
                break
            token, chain = self.popped.pop(pick % len(self.popped))
            written = int(chain.writable_len * fraction)
            used += [chain.head, written]
            self.unflushed.append((token, written))
        self.device.add_used_batch(used)

    @rule()
    def flush(self) -> None:
        self.device.flush_used()
        self.completed += self.unflushed
        new = bool(self.unflushed)
        self.unflushed = []
        notify = self.device.needs_notification()
        if not new:
            assert not notify
        if notify:
            self.driver_waits_for = 0
        elif self.driver_waits_for:
            assert len(self.completed) < self.driver_waits_for, (
                "the driver waits for completions that are there but was not interrupted")

    @rule(limit=st.integers(0, 5))
    def get_used(self, limit: int) -> None:
        got = self.driver.get_used(limit)
        expected = self.completed[: limit or len(self.completed)]
        assert got == expected
        self.completed = self.completed[len(got) :]
        for token, _ in got:
            request = self.requests.pop(token)
            written = b"".join(bytes(self.guest.memory.view(gpa, n)) for gpa, n in request.in_)
            assert written == pattern(token, len(written))
            for gpa in request.gpas:
                self.guest.allocator.free(gpa)
            self.descs_used -= self.descs(request)
            self.free_tokens.append(token)

    @rule()
    def device_sleeps(self) -> None:
        self.device.disable_notifications()
        more = self.device.enable_notifications()
        assert more == bool(self.published)
        self.device_sleeping = not more

    @rule(delay=st.integers(0, 3))
    def driver_waits(self, delay: int) -> None:
        self.driver.disable_cb()
        idle = self.driver.enable_cb(delay)
        if not self.driver.event_idx:
            delay = 0
        assert idle == (len(self.completed) <= delay)
        assert self.driver.pending() == bool(self.completed)
        self.driver_waits_for = delay + 1 if idle else 0

    @precondition(lambda self: not self.requests and not self.popped)
    @rule(rounds=st.integers(1, 40), seed=st.integers(0, 2**32))
    def cycles(self, rounds: int, seed: int) -> None:
        """Whole rounds of requests, as many as fit, answered in a shuffled order: the
        ring laps again and again between the other rules."""
        rng = random.Random(seed)
        memory = self.guest.memory
        header = self.guest.allocator.alloc(16)
        status = [self.guest.allocator.alloc(1) for _ in range(MAX_TOKENS)]
        try:
            for _ in range(rounds):
                tokens = list(range(rng.randint(1, MAX_TOKENS)))
                added = []
                for token in tokens:
                    out = [(header, 16)] if self.num > 1 else []  # a queue of 1: one buffer
                    try:
                        self.driver.add(out, [(status[token], 1)], token)
                    except QueueFull:
                        break
                    added.append(token)
                self.driver.kick_prepare()
                _view, items = self.device.pop_batch(len(added))
                assert len(items) == len(added)
                rng.shuffle(items)
                used: list[int] = []
                for item in items:
                    assert not isinstance(item, ChainError)
                    used += [item.head, 1]
                self.device.add_used_batch(used)
                self.device.flush_used()
                self.device.needs_notification()
                got = self.driver.get_used()
                assert sorted(token for token, _ in got) == added
                assert all(memory.view(status[t], 1) is not None for t in added)
        finally:
            for gpa in (header, *status):
                self.guest.allocator.free(gpa)
        self.cycles_done += rounds
        self.driver_waits_for = 0

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "driver"):
            return
        assert self.driver.in_flight == len(self.requests)
        assert self.driver.num_free == self.num - self.descs_used
        assert not self.driver.broken and not self.device.broken
        if not self.requests:  # nothing anywhere: both ends stand at the same place
            device = self.device
            assert (device.last_avail_idx, device.avail_wrap_counter) == (
                device.used_idx, device.used_wrap_counter)


TestRoundTrip = RoundTrip.TestCase
TestRoundTrip.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("num", [2, 3, 4, 8])
def test_the_ring_laps_thousands_of_times(
    guest: Guest, num: int, event_idx: bool, indirect: bool
) -> None:
    """12000 requests through a small queue, in batches, answered in reverse order."""
    addrs = packed_layout.allocate(guest.allocator, num)
    driver = PackedDriverVirtqueue(guest.memory, addrs, event_idx=event_idx, indirect=indirect,
                                   allocator=guest.allocator, max_chain=3, max_tokens=3)
    device = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=event_idx)
    header = guest.allocator.alloc(16)
    status = [guest.allocator.alloc(1) for _ in range(3)]
    chain_len = 1 if indirect else 2
    batch = min(3, num // chain_len)
    total = laps = 0
    while total < 12_000:
        for token in range(batch):
            guest.memory.view(header, 2)[:] = token.to_bytes(2, "little")
            driver.add([(header, 16)], [(status[token], 1)], token)
        driver.kick_prepare()
        chains = []
        while (chain := device.pop()) is not None:
            chains.append(chain)
        assert len(chains) == batch
        wrap = device.used_wrap_counter
        for chain in reversed(chains):
            chain.writable[0][0] = chain.head & 0xFF
            device.add_used(chain.head, 1)
        device.flush_used()
        device.needs_notification()
        laps += device.used_wrap_counter != wrap
        done = driver.get_used()
        assert sorted(token for token, _ in done) == list(range(batch))
        assert all(length == 1 for _, length in done)
        total += batch
    assert laps >= total * chain_len // num - 1
    assert driver.in_flight == 0 and driver.num_free == num
    assert (device.last_avail_idx, device.avail_wrap_counter) == (
        device.used_idx, device.used_wrap_counter)


def test_a_delayed_callback_sleeps_through_the_first_completions(guest: Guest) -> None:
    """``enable_cb(delay)`` (EVENT_IDX): the device, deciding as the spec says, signals
    only at the completion the driver waits for, not at each one before it."""
    addrs = packed_layout.allocate(guest.allocator, 8)
    vq = PackedDriverVirtqueue(guest.memory, addrs, event_idx=True, indirect=True,
                               allocator=guest.allocator, max_chain=4)
    dev = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=True)
    header, status = guest.allocator.alloc(16), guest.allocator.alloc(1)
    for token in range(8):
        vq.add([(header, 16)], [(status, 1)], token)
    vq.kick_prepare()
    _view, chains = dev.pop_batch(8)
    ids = [chain.head for chain in chains if not isinstance(chain, ChainError)]
    assert len(ids) == 8
    dev.add_used(ids[0], 1)  # a fresh device queue signals its first decision, whatever
    dev.flush_used()
    assert dev.needs_notification()
    assert vq.get_used() == [(0, 1)]
    assert vq.enable_cb(3)  # wake me at the 4th completion from here
    signals = []
    for bid in ids[1:]:
        dev.add_used(bid, 1)
        dev.flush_used()
        signals.append(dev.needs_notification())
    assert signals == [False, False, False, True, False, False, False]
    assert not vq.enable_cb(3)  # 7 already there: more than the delay, drain first
    assert len(vq.get_used()) == 7 and vq.enable_cb(3)


def test_kicks_follow_the_device_through_the_laps(guest: Guest) -> None:
    """With EVENT_IDX the device asks for a kick at its next descriptor: the driver kicks
    exactly when that descriptor is among what it made available, lap after lap."""
    addrs = packed_layout.allocate(guest.allocator, 3)
    vq = PackedDriverVirtqueue(guest.memory, addrs, event_idx=True, indirect=False,
                               allocator=guest.allocator, max_chain=2)
    dev = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=True)
    buf = guest.allocator.alloc(1)
    for _ in range(10):
        vq.add([(buf, 1)], [], 0)
        assert vq.kick_prepare()  # the device waits at exactly this descriptor
        dev.disable_notifications()  # the device works: no kicks wanted
        vq.add([(buf, 1)], [], 1)
        assert not vq.kick_prepare()
        _view, items = dev.pop_batch(4)
        dev.add_used_batch([items[1].head, 0, items[0].head, 0])
        dev.flush_used()
        assert not dev.enable_notifications()  # nothing more: sleep
        assert len(vq.get_used()) == 2


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(
    ("split", "packed", "packed_only", "split_only"),
    [
        # next_used: a packed ring's base after a reconnect (a split ring's is in memory).
        (DriverVirtqueue, PackedDriverVirtqueue, {"next_used"}, set()),
        (DeviceVirtqueue, PackedDeviceVirtqueue,
         # resubmit_chains: a recovered packed chain is more than a head (its descriptors
         # come from the in-flight journal), and a worker process must be handed them.
         # (``vring_base`` is on both: GET_VRING_BASE's answer, 16 bits or 32.)
         {"avail_wrap_counter", "used_wrap_counter", "resubmit_chains"},
         # The used position of a packed ring cannot be read back from its memory: a used
         # descriptor does not say how many descriptors its chain held.
         {"used_idx_in_memory"}),
    ],
)
def test_both_rings_offer_one_interface(
    split: type, packed: type, packed_only: set[str], split_only: set[str]
) -> None:
    assert public_names(packed) - public_names(split) == packed_only
    assert public_names(split) - public_names(packed) == split_only


def test_both_rings_share_their_instance_attributes(guest: Guest) -> None:
    """What callers read off a queue object (``vq.num``, ``vq.addrs``, ...)."""
    packed_addrs = packed_layout.allocate(guest.allocator, 4)
    from virtblk.virtio.split_layout import VringAddrs
    split_addrs = VringAddrs.allocate(guest.allocator, 4)
    kw = {"event_idx": True, "indirect": True, "allocator": guest.allocator, "max_chain": 2}
    drivers = [cls(guest.memory, addrs, **kw) for cls, addrs in
               ((DriverVirtqueue, split_addrs), (PackedDriverVirtqueue, packed_addrs))]
    assert public_names(type(drivers[0])) | set(vars(drivers[0])) >= {
        "num", "addrs", "event_idx", "indirect", "max_chain", "max_tokens"}
    assert {n for n in vars(drivers[0]) if not n.startswith("_")} == {
        n for n in vars(drivers[1]) if not n.startswith("_")}
    devices = [DeviceVirtqueue(guest.memory, split_addrs, event_idx=True),
               PackedDeviceVirtqueue(guest.memory, packed_addrs, event_idx=True)]
    split_attrs = {n for n in vars(devices[0]) if not n.startswith("_")}
    packed_attrs = {n for n in vars(devices[1]) if not n.startswith("_")}
    assert split_attrs == packed_attrs
    assert devices[1].inflight is None and devices[1].resubmit_pending == []
    for vq in drivers:
        vq.close()


def _wait(fd: int, what: str) -> None:
    """Sleep on an eventfd as a queue does; a missed notification fails, it does not hang."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(5000):
        raise AssertionError(f"slept 5 s waiting for {what}: a notification was missed")
    os.eventfd_read(fd)


@pytest.mark.parametrize(("num", "event_idx", "indirect"),
                         [(3, True, True), (4, False, True), (8, True, False), (5, False, False)])
def test_driver_and_device_in_two_threads(guest: Guest, num: int, event_idx: bool,
                                          indirect: bool) -> None:
    """The two ends on two threads, kicking and interrupting through eventfds and sleeping
    when there is nothing to do: every request comes back with its own answer and neither
    end sleeps through the other's work (the interpreter switches threads between any two
    bytecodes, so the stores of one end interleave with the loads of the other)."""
    addrs = packed_layout.allocate(guest.allocator, num)
    depth = 4
    driver = PackedDriverVirtqueue(guest.memory, addrs, event_idx=event_idx, indirect=indirect,
                                   allocator=guest.allocator, max_chain=3, max_tokens=depth)
    device = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=event_idx)
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    memory = guest.memory
    headers = [guest.allocator.alloc(8) for _ in range(depth)]
    answers = [guest.allocator.alloc(8) for _ in range(depth)]
    total = 3000
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            while not stop.is_set():
                view, items = device.pop_batch(num)
                if not items:
                    if device.enable_notifications():
                        device.disable_notifications()
                        continue
                    poller = select.poll()
                    poller.register(kick, select.POLLIN)
                    if poller.poll(100):
                        os.eventfd_read(kick)
                    device.disable_notifications()
                    continue
                used: list[int] = []
                for item in items:
                    assert not isinstance(item, ChainError), item
                    chain = item.chain(view) if isinstance(item, Triple) else item
                    seq = bytes(chain.readable[0])
                    chain.writable[0][:] = seq[::-1]
                    used += [chain.head, 8]
                device.add_used_batch(used)
                device.flush_used()
                if device.needs_notification():
                    os.eventfd_write(call, 1)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        sent = done = 0
        free = list(range(depth))
        seq_of: dict[int, int] = {}
        while done < total:
            while free and sent < total:
                token = free.pop()
                memory.view(headers[token], 8)[:] = sent.to_bytes(8, "little")
                memory.view(answers[token], 8)[:] = bytes(8)
                try:
                    driver.add([(headers[token], 8)], [(answers[token], 8)], token)
                except QueueFull:
                    free.append(token)
                    break
                seq_of[token] = sent
                sent += 1
            if driver.kick_prepare():
                os.eventfd_write(kick, 1)
            driver.disable_cb()
            got = driver.get_used()
            for token, written in got:
                assert written == 8
                answer = bytes(memory.view(answers[token], 8))
                assert answer == seq_of.pop(token).to_bytes(8, "little")[::-1]
                free.append(token)
            done += len(got)
            if not got and done < total:
                if driver.enable_cb(min(1, len(seq_of) - 1) if len(seq_of) > 1 else 0):
                    _wait(call, "completions")
                assert not errors, errors
    finally:
        stop.set()
        worker.join(10)
        os.close(kick)
        os.close(call)
        driver.close()
    assert not worker.is_alive() and not errors, errors
    assert driver.in_flight == 0 and driver.num_free == num
