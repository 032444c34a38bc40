"""A frontend that could shrink its guest memory under the device: `virtblk serve` refuses
memory not sealed against shrinking (a truncate would kill it with SIGBUS at its next access
to that memory), survives the frontend's attempt on sealed memory, and maps unsealed memory
only with --accept-unsealed-memory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from virtblk import Disk
from virtblk.spec import Feature
from virtblk.vhost_user.errors import VhostUserError
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.virtio.memory import MemoryRegion

pytestmark = pytest.mark.interop

SIZE = 1 << 20


@dataclasses.dataclass
class UnsealedRegion:
    """Guest memory as a careless frontend hands it over: a memfd anyone may truncate."""

    fd: int
    size: int = SIZE
    guest_phys_addr: int = 0
    user_addr: int = 0x7F0000000000
    mmap_offset: int = 0


def handshake(sock: Path) -> VhostUserFrontend:
    front = VhostUserFrontend.connect(str(sock))
    front.set_protocol_features(front.get_protocol_features())
    front.set_owner()
    front.set_features(front.get_features() & ~Feature.RING_PACKED.mask)
    return front


def unsealed() -> UnsealedRegion:
    fd = os.memfd_create("careless-frontend", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return UnsealedRegion(fd)


def test_unsealed_memory_is_refused_and_the_device_keeps_serving(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"
    with ServeProcess(sock, ["--memory", "1M"]) as srv:
        region = unsealed()
        try:
            with handshake(sock) as front, pytest.raises(VhostUserError):
                front.set_mem_table([region])
                front.get_queue_num()  # without REPLY_ACK, the refusal shows here
            os.ftruncate(region.fd, 0)  # what would have killed the device
        finally:
            os.close(region.fd)
        assert srv.process is not None and srv.process.poll() is None
        with Disk.connect(str(sock)) as disk:  # the next frontend is served
            disk.pwrite(b"\x5a" * 4096, 0)
            assert disk.pread(4096, 0) == b"\x5a" * 4096


def test_sealed_memory_cannot_be_shrunk_under_the_device(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"
    with ServeProcess(sock, ["--memory", "1M"]) as srv:
        region = MemoryRegion.create(SIZE)
        try:
            with handshake(sock) as front:
                front.set_mem_table([region])
                with pytest.raises(PermissionError):
                    os.ftruncate(region.fd, 0)
                front.get_queue_num()  # the device is alive and answering
        finally:
            region.close()
        assert srv.process is not None and srv.process.poll() is None


def test_unsealed_memory_is_mapped_at_the_users_risk(sock_dir: Path) -> None:
    sock = sock_dir / "d.sock"
    with ServeProcess(sock, ["--memory", "1M", "--accept-unsealed-memory"]):
        region = unsealed()
        try:
            with handshake(sock) as front:
                front.set_mem_table([region])
                assert front.get_queue_num() >= 1
        finally:
            os.close(region.fd)
