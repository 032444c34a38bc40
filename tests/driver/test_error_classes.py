"""What a misbehaving device makes the driver raise belongs to ``virtblk.errors``: a caller
catches ``VirtblkError`` (or ``OSError`` and its errno) for anything the device did, as the
README promises, whichever layer noticed it.

The devices here are our own device with one fault added, served over a socketpair."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading

import pytest

from virtblk import Disk
from virtblk.aio import AsyncDisk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.request import BlkRequest
from virtblk.driver.queue_api import QueueHandle
from virtblk.errors import DeviceFaultError, VirtblkError
from virtblk.spec import RequestType
from virtblk.vhost_user.server import serve_connected
from virtblk.virtio.split_driver import DeviceProtocolError
from virtblk.virtio.split_layout import VirtqueueError


class OverlongReadDevice(BlkDevice):
    """Our device, but every read reports 4096 bytes more written than the chain holds: a
    used ring entry the driver must refuse (``DeviceProtocolError``)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend(1 << 20))

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        status, used = super().execute(req)
        if req.type == RequestType.IN:
            return status, used + 4096
        return status, used


def _serve(device: BlkDevice) -> tuple[socket.socket, threading.Thread]:
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    t.start()
    return ours, t


def _check_device_fault(exc: BaseException) -> None:
    assert isinstance(exc, DeviceFaultError)
    assert isinstance(exc, VirtblkError)
    assert isinstance(exc, OSError) and exc.errno == errno.EIO
    # Still what the virtqueue layer raised: older handlers keep catching it.
    assert isinstance(exc, DeviceProtocolError) and isinstance(exc, VirtqueueError)


def test_a_broken_used_ring_is_a_virtblk_error_with_eio() -> None:
    ours, t = _serve(OverlongReadDevice())
    disk = Disk.from_socket(ours, num_queues=1)
    try:
        with pytest.raises(VirtblkError) as info:
            disk.pread(512, 0)
        _check_device_fault(info.value)
        assert "exceeds the chain's" in str(info.value)
        # The queue stays broken: later requests say so with the same class.
        with pytest.raises(VirtblkError) as again:
            disk.pread(512, 0)
        _check_device_fault(again.value)
    finally:
        disk.close()
        t.join(10)


def test_a_broken_used_ring_is_a_virtblk_error_for_asyncdisk() -> None:
    async def main() -> BaseException | bytes:
        ours, t = _serve(OverlongReadDevice())
        disk = await asyncio.to_thread(Disk.from_socket, ours, num_queues=1)
        adisk = AsyncDisk(disk)
        try:
            (result,) = await asyncio.wait_for(
                asyncio.gather(adisk.read(512, 0), return_exceptions=True), 10)
            return result
        finally:
            await adisk.aclose()
            t.join(10)

    result = asyncio.run(main())
    assert isinstance(result, BaseException)
    _check_device_fault(result)


@pytest.mark.parametrize("poll", [False, True])
def test_a_broken_used_ring_is_a_virtblk_error_for_queuehandle(poll: bool) -> None:
    ours, t = _serve(OverlongReadDevice())
    disk = Disk.from_socket(ours, num_queues=1)
    try:
        with QueueHandle(disk, 0, poll=poll) as q:
            q.read(0, disk.buffer(512), user_data=0)
            with pytest.raises(VirtblkError) as info:
                q.do_io(1, timeout=10)
            _check_device_fault(info.value)
    finally:
        disk.close()
        t.join(10)
