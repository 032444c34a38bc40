"""The packed ring's event suppression decides as the split ring's does.

Packed runs of ``benchmarks/packed_vs_split.py`` take about twice the interrupts per I/O
of split runs.  These tests settle whether the rings' notification decisions are the
cause: the same random interleaving of driver and device steps (submit and kick, reap,
``enable_cb(delay)`` and sleep, pop a round, answer it, notify, sleep when idle) is played
over both rings, and every interrupt and kick must happen at the same step on both.  Rings
of 4 and 8 flip their wrap counters every few requests; chains of three direct
descriptors move the packed event position three slots per completion.  So a wrong event
position, a wrap-counter slip or an off-by-one on either end shows up as a step where the
rings differ; the extra interrupts measured are a consequence of timing, not of the
decisions.
"""

from __future__ import annotations

import random

import pytest
from virtq_helpers import Guest

from virtblk.virtio import packed_layout
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_driver import PackedDriverVirtqueue
from virtblk.virtio.split_device import DescriptorChain, DeviceVirtqueue
from virtblk.virtio.split_driver import DriverVirtqueue
from virtblk.virtio.split_layout import VringAddrs


def play(ring: str, *, seed: int, num: int, depth: int, indirect: bool, keep_cb: bool,
         steps: int = 3000) -> tuple[list[int], list[int], int]:
    """One interleaving over ``ring``; returns the steps that interrupted, that kicked, and
    the completions the driver took."""
    guest = Guest()
    driver: DriverVirtqueue | PackedDriverVirtqueue
    device: DeviceVirtqueue | PackedDeviceVirtqueue
    kw = {"event_idx": True, "indirect": indirect, "allocator": guest.allocator,
          "max_chain": 3, "max_tokens": depth}
    if ring == "packed":
        addrs = packed_layout.allocate(guest.allocator, num)
        driver = PackedDriverVirtqueue(guest.memory, addrs, **kw)  # type: ignore[arg-type]
        device = PackedDeviceVirtqueue(guest.memory, addrs, event_idx=True)
    else:
        addrs = VringAddrs.allocate(guest.allocator, num)
        driver = DriverVirtqueue(guest.memory, addrs, **kw)  # type: ignore[arg-type]
        device = DeviceVirtqueue(guest.memory, addrs, event_idx=True)
    alloc = guest.allocator
    for token in range(depth):
        driver.prepare(token, [(alloc.alloc(16, 8), 16)],
                       [(alloc.alloc(512, 8), 512), (alloc.alloc(1, 1), 1)])
    rng = random.Random(seed)
    interrupts: list[int] = []
    kicks: list[int] = []
    done = 0
    free = list(range(depth))
    # Armed from the start: a split device's first decision interrupts whatever the event
    # says (it has nothing to count from), a packed device's honours a DISABLE first.
    assert driver.enable_cb()
    driver_asleep = False
    device_asleep = not device.enable_notifications()
    try:
        for step in range(steps):
            if rng.random() < 0.5:  # the device's turn
                if device_asleep:
                    continue
                _, items = device.pop_batch(rng.randint(1, 8))
                if not items:
                    if device.enable_notifications():
                        device.disable_notifications()
                    else:
                        device_asleep = True
                    continue
                used: list[int] = []
                for item in items:
                    assert not isinstance(item, Exception), item
                    used += [item.head if isinstance(item, DescriptorChain) else item[0], 513]
                device.add_used_batch(used)
                device.flush_used()
                if device.needs_notification():
                    interrupts.append(step)
                    if driver_asleep:
                        driver_asleep = False
                        if not keep_cb:
                            driver.disable_cb()
            elif driver_asleep:
                continue
            elif rng.random() < 0.5:  # reap, refill, kick
                got = driver.get_used()
                done += len(got)
                free += [token for token, _ in got]
                if free:
                    driver.add_prepared_batch(free)
                    free = []
                    if driver.kick_prepare():
                        kicks.append(step)
                        if device_asleep:
                            device_asleep = False
                            device.disable_notifications()
            elif driver.in_flight:  # wait for 1 + delay completions
                delay = rng.randrange(driver.in_flight)
                if driver.enable_cb(delay):
                    driver_asleep = True
                elif not keep_cb:
                    driver.disable_cb()
    finally:
        driver.close()
        guest.close()
    return interrupts, kicks, done


@pytest.mark.parametrize("keep_cb", [False, True], ids=["disable-cb", "keep-cb"])
@pytest.mark.parametrize(("num", "depth", "indirect"), [
    (4, 4, True), (8, 8, True), (256, 32, True), (16, 5, False), (256, 32, False)])
@pytest.mark.parametrize("seed", range(4))
def test_same_interleaving_same_notifications(
    seed: int, num: int, depth: int, indirect: bool, keep_cb: bool
) -> None:
    split = play("split", seed=seed, num=num, depth=depth, indirect=indirect, keep_cb=keep_cb)
    packed = play("packed", seed=seed, num=num, depth=depth, indirect=indirect,
                  keep_cb=keep_cb)
    assert split[2] > 20 * num // 4  # the rings went round many times
    assert packed[0] == split[0], "interrupts at different steps"
    assert packed[1] == split[1], "kicks at different steps"
    assert packed[2] == split[2]
