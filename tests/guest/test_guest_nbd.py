"""A Linux guest whose disk lives behind an NBD server: QEMU's vhost-user-blk-pci and
Linux 6.1's virtio_blk on ``virtblk serve --nbd``, over ``qemu-nbd`` serving a raw file,
with two vCPUs and two queues (one NBD connection carries both).

The workload and its proof are ``remote_disk``'s: the file holds random bytes before the
boot, the guest reads them, writes patterns with O_DIRECT from two pinned writers, and once
it has powered off, while the device and qemu-nbd still run, the file must hold exactly the
seed with the patterns laid over it.  The serial the guest sees is the export's name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.remote_disk import GUEST_TIMEOUT, MiB, RemoteDiskWorkload, failure_report
from interop.serve_process import ServeProcess
from peers.guest import GuestKernel, run_guest
from peers.nbd import QemuNbd
from peers.plugin import NbdServerFactory
from virtblk.device.control import send_command

pytestmark = pytest.mark.guest

# 80 MiB: not a power of two, so a size taken from elsewhere would show.
WORKLOAD = RemoteDiskWorkload("nbd", 80 * MiB, "echo SERIAL=$(cat /sys/block/vda/serial)")


def test_guest_writes_land_in_the_file_behind_qemu_nbd(
    guest_kernel: GuestKernel, nbd_server: NbdServerFactory, tmp_path: Path, sock_dir: Path,
) -> None:
    content = WORKLOAD.content()
    image = tmp_path / "guest.raw"
    image.write_bytes(content)
    server = nbd_server(QemuNbd, image, export="guest-disk")
    control = sock_dir / "ctl.sock"
    args = ["--nbd", server.uri, "--num-queues", "2", "--control", str(control)]
    with ServeProcess(sock_dir / "vb.sock", args) as device:
        result = run_guest(WORKLOAD.script(), disks=[str(device.socket_path)], num_queues=2,
                           smp=2, timeout=GUEST_TIMEOUT, kernel=guest_kernel)  # fmt: skip
        assert result.rc == 0, failure_report(result, device.output)
        # The guest is gone, the device and qemu-nbd still run: the file holds what the
        # guest's writes and its FLUSH made durable, not what a close wrote.
        on_disk = image.read_bytes()
        queues = send_command(control, "stats")["stats"]["queues"]
        assert device.terminate() == 0, device.output
    values = WORKLOAD.check(result, queues, content, on_disk, "the file behind qemu-nbd")
    assert values["SERIAL"] == "guest-disk"
