"""A Linux guest whose disk lives in Ceph: QEMU's vhost-user-blk-pci and Linux 6.1's
virtio_blk on ``virtblk serve --rbd``, with two vCPUs and two queues.

The workload and its proof are ``remote_disk``'s: the image is filled through ``rbd
import`` before the boot, so the guest's first reads come from RADOS objects that Ceph's
own tool wrote; the guest writes patterns with O_DIRECT from two pinned writers, across
RADOS object boundaries (4 MiB); once it has powered off, while the device still runs,
``rbd export`` must show exactly the imported content with the patterns laid over it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.remote_disk import GUEST_TIMEOUT, MiB, RemoteDiskWorkload, failure_report
from interop.serve_process import ServeProcess
from peers.ceph import POOL, CephCluster
from peers.guest import GuestKernel, run_guest
from virtblk.device.control import send_command

pytestmark = pytest.mark.guest

# 96 MiB: not a power of two, so a size taken from elsewhere would show.
WORKLOAD = RemoteDiskWorkload("rbd", 96 * MiB, "echo RO=$(cat /sys/block/vda/ro)")


@pytest.fixture
def imported(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[tuple[str, bytearray]]:
    """An image whose content (zeros, random bytes at the seed) came in through ``rbd
    import``; its ``POOL/NAME`` and that content."""
    content = WORKLOAD.content()
    source = tmp_path / "source"
    source.write_bytes(content)
    spec = f"{POOL}/g{uuid.uuid4().hex[:12]}"
    ceph_cluster.rbd("import", "--no-progress", str(source), spec)
    source.unlink()
    yield spec, content
    ceph_cluster.rbd("rm", "--no-progress", spec)


def test_guest_writes_land_in_ceph(
    guest_kernel: GuestKernel, ceph_cluster: CephCluster, imported: tuple[str, bytearray],
    sock_dir: Path,
) -> None:  # fmt: skip
    spec, content = imported
    control = sock_dir / "ctl.sock"
    args = ["--rbd", spec, "--ceph-conf", str(ceph_cluster.conf), "--num-queues", "2",
            "--control", str(control)]  # fmt: skip
    with ServeProcess(sock_dir / "vb.sock", args) as server:
        result = run_guest(WORKLOAD.script(), disks=[str(server.socket_path)], num_queues=2,
                           smp=2, timeout=GUEST_TIMEOUT, kernel=guest_kernel)  # fmt: skip
        assert result.rc == 0, failure_report(result, server.output)
        # The guest is gone and the device still holds the image open: what Ceph has now
        # is what the guest's writes and its FLUSH made durable, not what a close wrote.
        image = ceph_cluster.export(spec)
        queues = send_command(control, "stats")["stats"]["queues"]
        assert server.terminate() == 0, server.output
    values = WORKLOAD.check(result, queues, content, image, "the exported image")
    assert values["RO"] == "0"
