"""Test helpers: a descriptor chain built from plain buffers, as the device sees one; the
driver end of a real ring, to drive a device's queue workers end to end."""

from __future__ import annotations

import dataclasses
import os
import select

from virtblk.device.blk import BlkDevice
from virtblk.spec import RequestHeader
from virtblk.virtio.memory import BufferAllocator, GuestMemory
from virtblk.virtio.split_device import DeviceVirtqueue
from virtblk.virtio.split_driver import DriverVirtqueue
from virtblk.virtio.split_layout import VringAddrs

NUM = 64


@dataclasses.dataclass
class FakeChain:
    """Has the attributes of ``virtblk.virtio.split_device.DescriptorChain`` the device reads."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)


def chain(
    readable: list[bytes | bytearray], writable_sizes: list[int], head: int = 0
) -> tuple[FakeChain, list[bytearray]]:
    """A chain over fresh buffers; returns it and the writable bytearrays to inspect."""
    out = [memoryview(bytearray(b)) for b in readable]
    ins = [bytearray(n) for n in writable_sizes]
    return FakeChain(head, out, [memoryview(b) for b in ins]), ins


def header(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return RequestHeader(rtype, ioprio, sector).pack()


class Driver:
    """The driver end of one queue, with its buffers in guest memory."""

    def __init__(self, memory: GuestMemory, alloc: BufferAllocator, *, event_idx: bool) -> None:
        self.memory = memory
        self.alloc = alloc
        self.addrs = VringAddrs.allocate(alloc, NUM)
        self.vq = DriverVirtqueue(memory, self.addrs, event_idx=event_idx, indirect=True,
                                  allocator=alloc, max_chain=8)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.status: dict[int, int] = {}  # token -> gpa of its status byte
        self.data: dict[int, int] = {}  # token -> gpa of its data buffer

    def buffer(self, data: bytes) -> int:
        gpa = self.alloc.alloc(len(data))
        self.memory.view(gpa, len(data))[:] = data
        return gpa

    def submit(self, token: int, rtype: int, sector: int, *, out: bytes = b"",
               in_len: int = 0) -> None:
        hdr = self.buffer(RequestHeader(rtype, 0, sector).pack())
        status = self.buffer(b"\xff")
        outs = [(hdr, 16)]
        ins: list[tuple[int, int]] = []
        if out:
            self.data[token] = self.buffer(out)
            outs.append((self.data[token], len(out)))
        if in_len:
            self.data[token] = self.buffer(bytes(in_len))
            ins.append((self.data[token], in_len))
        ins.append((status, 1))
        self.status[token] = status
        self.vq.add(outs, ins, token)

    def kick_device(self) -> None:
        if self.vq.kick_prepare():
            os.eventfd_write(self.kick, 1)

    def wait(self, count: int, timeout: float = 60.0) -> dict[int, int]:
        """Completions ``token -> used len`` until ``count`` have arrived; ``TimeoutError``
        when none arrives for ``timeout`` seconds (a bound on a failure only: a worker
        process that starts on a loaded machine may take seconds to answer)."""
        done: dict[int, int] = {}
        poller = select.poll()
        poller.register(self.call, select.POLLIN)
        while len(done) < count:
            done.update(self.vq.get_used())
            if len(done) >= count:
                break
            if not self.vq.enable_cb():
                continue  # completions arrived meanwhile: take them first
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"only {len(done)} of {count} completions: {done}")
            os.eventfd_read(self.call)
        return done

    def status_of(self, token: int) -> int:
        return self.memory.view(self.status[token], 1)[0]

    def data_of(self, token: int, length: int) -> bytes:
        return bytes(self.memory.view(self.data[token], length))

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


def start(dev: BlkDevice, index: int, drv: Driver, *, event_idx: bool,
          last_avail: int = 0) -> None:
    devq = DeviceVirtqueue(drv.memory, drv.addrs, event_idx=event_idx,
                           last_avail_idx=last_avail, used_idx=last_avail)
    dev.start_queue(index, devq, drv.kick, drv.call)
