"""Our driver and our device sharing one memfd: every request arrives intact, every
completion returns to its token, and neither side ever sleeps through the other's work."""

from __future__ import annotations

import dataclasses

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

from virtblk.virtio.split_device import DescriptorChain, DeviceVirtqueue
from virtblk.virtio.split_driver import DriverVirtqueue, QueueFull
from virtblk.virtio.split_layout import VringAddrs

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
    """Random interleavings of add / kick / pop / add_used / flush / get_used."""

    @initialize(num=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans(),
                indirect=st.booleans())
    def setup(self, num: int, event_idx: bool, indirect: bool) -> None:
        self.guest = Guest()
        addrs = VringAddrs.allocate(self.guest.allocator, num)
        self.num = num
        self.indirect = indirect
        self.driver = DriverVirtqueue(
            self.guest.memory, addrs, event_idx=event_idx, indirect=indirect,
            allocator=self.guest.allocator, max_chain=MAX_CHAIN, max_tokens=MAX_TOKENS,
        )
        self.device = DeviceVirtqueue(self.guest.memory, addrs, event_idx=event_idx)
        self.free_tokens = list(range(MAX_TOKENS))
        self.requests: dict[int, Request] = {}
        self.descs_used = 0
        self.unpublished: list[int] = []  # added, kick_prepare not yet called
        self.published: list[int] = []  # visible to the device, not popped
        self.popped: list[tuple[int, DescriptorChain]] = []  # the device holds them
        self.unflushed: list[tuple[int, int]] = []  # add_used done, not flushed
        self.completed: list[tuple[int, int]] = []  # visible to the driver
        self.device_sleeping = False
        self.driver_waiting = False

    def teardown(self) -> None:
        if hasattr(self, "guest"):
            self.driver.close()
            self.guest.close()

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
        count = len(out) + len(in_)
        needed = 1 if self.indirect and count > 1 else count
        request = Request(token, out, in_, data)
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

    @rule()
    def pop(self) -> None:
        chain = self.device.pop()
        if not self.published:
            assert chain is None
            return
        assert chain is not None
        token = self.published.pop(0)
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

    @precondition(lambda self: self.popped)
    @rule(which=st.integers(0, 100), fraction=st.floats(0, 1))
    def add_used(self, which: int, fraction: float) -> None:
        token, chain = self.popped.pop(which % len(self.popped))
        written = int(chain.writable_len * fraction)
        self.device.add_used(chain.head, written)
        self.unflushed.append((token, written))

    @rule()
    def flush(self) -> None:
        self.device.flush_used()
        self.completed += self.unflushed
        new = bool(self.unflushed)
        self.unflushed = []
        notify = self.device.needs_notification()
        if new and self.driver_waiting:
            assert notify, "the driver waits but was not interrupted for completions"
        if not new:
            assert not notify
        if notify:
            self.driver_waiting = False

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
            count = len(request.out) + len(request.in_)
            self.descs_used -= 1 if self.indirect and count > 1 else count
            self.free_tokens.append(token)

    @rule()
    def device_sleeps(self) -> None:
        self.device.disable_notifications()
        more = self.device.enable_notifications()
        assert more == bool(self.published)
        self.device_sleeping = not more

    @rule()
    def driver_waits(self) -> None:
        self.driver.disable_cb()
        idle = self.driver.enable_cb()
        assert idle == (not self.completed)
        assert self.driver.pending() == bool(self.completed)
        self.driver_waiting = idle

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "driver"):
            return
        assert self.driver.in_flight == len(self.requests)
        assert self.driver.num_free == self.num - self.descs_used
        assert not self.driver.broken and not self.device.broken


TestRoundTrip = RoundTrip.TestCase
TestRoundTrip.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
def test_indices_wrap_past_65535(guest: Guest, event_idx: bool, indirect: bool) -> None:
    """70000 requests through a 4-entry queue, in batches of three, out of order."""
    addrs = VringAddrs.allocate(guest.allocator, 4)
    driver = DriverVirtqueue(guest.memory, addrs, event_idx=event_idx, indirect=indirect,
                             allocator=guest.allocator, max_chain=3, max_tokens=3)
    device = DeviceVirtqueue(guest.memory, addrs, event_idx=event_idx)
    header = guest.allocator.alloc(16)
    status = [guest.allocator.alloc(1) for _ in range(3)]
    chain_len = 1 if indirect else 2
    total = 0
    while total < 70_000:
        batch = min(3, 4 // chain_len)
        for token in range(batch):
            guest.memory.view(header, 2)[:] = token.to_bytes(2, "little")
            driver.add([(header, 16)], [(status[token], 1)], token)
        driver.kick_prepare()
        chains = []
        while (chain := device.pop()) is not None:
            chains.append(chain)
        assert len(chains) == batch
        for chain in reversed(chains):
            chain.writable[0][0] = chain.head & 0xFF
            device.add_used(chain.head, 1)
        device.flush_used()
        device.needs_notification()
        done = driver.get_used()
        assert sorted(token for token, _ in done) == list(range(batch))
        assert all(length == 1 for _, length in done)
        total += batch
    assert device.last_avail_idx == total & 0xFFFF and device.used_idx == total & 0xFFFF
    assert total > 0xFFFF and driver.in_flight == 0 and driver.num_free == 4


def test_a_delayed_callback_sleeps_through_the_first_completions(guest: Guest) -> None:
    """``enable_cb(delay)`` (EVENT_IDX): the device, deciding as the spec says, signals
    only at the completion the driver waits for, not at each one before it."""
    addrs = VringAddrs.allocate(guest.allocator, 8)
    vq = DriverVirtqueue(guest.memory, addrs, event_idx=True, indirect=True,
                         allocator=guest.allocator, max_chain=4)
    dev = DeviceVirtqueue(guest.memory, addrs, event_idx=True)
    for token in range(8):
        vq.add([(0x1000, 16)], [(0x3000, 1)], token)
    vq.kick_prepare()
    _view, chains = dev.pop_batch(8)
    assert len(chains) == 8
    dev.add_used(0, 1)  # a fresh device queue signals its first decision, whatever
    dev.flush_used()
    assert dev.needs_notification()
    assert vq.get_used() == [(0, 1)]
    assert vq.enable_cb(3)  # wake me at the 4th completion from here
    signals = []
    for head in range(1, 8):
        dev.add_used(head, 1)
        dev.flush_used()
        signals.append(dev.needs_notification())
    assert signals == [False, False, False, True, False, False, False]
    assert not vq.enable_cb(3)  # 7 already there: more than the delay, drain first
    assert len(vq.get_used()) == 7 and vq.enable_cb(3)
