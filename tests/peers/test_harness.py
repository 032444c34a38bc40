"""The test harness itself, proved against the real peers it drives."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from peers.ceph import CephCluster, CephError
from peers.guest import (
    CpioWriter,
    GuestError,
    GuestKernel,
    GuestTimeout,
    modinfo_depends,
    prepare_guest_kernel,
    resolve_modules,
    run_guest,
    script_archive,
)
from peers.plugin import QsdFactory
from peers.qsd import QemuStorageDaemon, QmpError, QsdError
from peers.threads import run_in_threads

MiB = 1 << 20


def _cpio_listing(archive: bytes) -> list[str]:
    """What cpio(1) itself reads from an archive: the independent check of our writer."""
    result = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    )
    return result.stdout.decode().splitlines()


def test_cpio_writer_output_is_read_by_cpio() -> None:
    writer = CpioWriter()
    writer.directory("dev")
    writer.char_device("dev/console", 5, 1)
    writer.file("init", b"#!/bin/sh\n", mode=0o755)
    archive = writer.finish()
    assert len(archive) % 512 == 0
    listing = _cpio_listing(archive)
    assert [line.split()[-1] for line in listing] == ["dev", "dev/console", "init"]
    assert listing[1].startswith("crw-------") and "5,   1" in listing[1]
    assert listing[2].startswith("-rwxr-xr-x")


def test_script_archive_holds_the_script() -> None:
    archive = script_archive("echo hello\n")
    listing = _cpio_listing(archive)
    assert len(listing) == 1 and listing[0].startswith("-rwxr-xr-x")
    assert listing[0].endswith(" test.sh")
    extracted = subprocess.run(
        ["cpio", "-i", "--quiet", "--to-stdout", "test.sh"], input=archive, capture_output=True
    )
    assert extracted.stdout == b"echo hello\n"


@pytest.mark.interop
def test_qsd_file_export_accepts_and_answers_qmp(qsd_factory: QsdFactory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    daemon = qsd_factory(image=image, num_queues=2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(daemon.socket_path))
    exports = daemon.qmp("query-block-exports")
    assert exports == [
        {"id": "exp0", "type": "vhost-user-blk", "node-name": "disk0", "shutting-down": False}
    ]
    # block_resize is what later tests use to change the device under the driver.
    daemon.qmp("block_resize", node_name="disk0", size=16 * MiB)
    assert image.stat().st_size == 16 * MiB
    with pytest.raises(QmpError, match="CommandNotFound"):
        daemon.qmp("no-such-command")


@pytest.mark.interop
def test_qsd_null_export_reports_its_size(qsd_factory: QsdFactory) -> None:
    daemon = qsd_factory(null_size=64 * MiB, read_zeroes=False, writable=False)
    nodes = daemon.qmp("query-named-block-nodes", flat=True)
    (node,) = [node for node in nodes if node["node-name"] == "disk0"]
    assert node["drv"] == "null-co"
    assert node["image"]["virtual-size"] == 64 * MiB


@pytest.mark.interop
def test_qsd_start_failure_carries_the_daemons_stderr(sock_dir: Path) -> None:
    missing = sock_dir / "missing.img"
    daemon = QemuStorageDaemon(sock_dir / "vu.sock", image=missing)
    with pytest.raises(QsdError, match=r"(?s)exited with status 1.*missing\.img"):
        daemon.start()
    assert daemon.process is not None and daemon.process.returncode == 1


@pytest.mark.guest
def test_guest_kernel_modules_carry_their_dependencies(guest_kernel: GuestKernel) -> None:
    modules = guest_kernel.vmlinuz.parent / "modules"
    blk = (modules / "virtio_blk.ko").read_bytes()
    assert sorted(modinfo_depends(blk)) == ["virtio", "virtio_ring"]
    order = (modules / "load-order").read_text().split()
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_blk")


GUEST_IO_SCRIPT = """
set -e
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=4096 seek=256 oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/tmp/readback bs=4096 skip=256 count=256 iflag=direct 2>/dev/null
cmp /tmp/pattern /tmp/readback
echo "md5=$(md5sum < /tmp/pattern | cut -d' ' -f1)"
echo "size=$(cat /sys/block/vda/size)"
echo "serial=$(cat /sys/block/vda/serial)"
echo "lbs=$(cat /sys/block/vda/queue/logical_block_size)"
echo "ro=$(cat /sys/block/vda/ro)"
echo "mq=$(ls /sys/block/vda/mq | wc -l)"
"""


@pytest.mark.guest
def test_guest_does_direct_io_on_a_qsd_disk(
    guest_kernel: GuestKernel, qsd_factory: QsdFactory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(32 * MiB))
    daemon = qsd_factory(image=image, num_queues=2)

    result = run_guest(
        GUEST_IO_SCRIPT, disks=[str(daemon.socket_path)], num_queues=2, smp=2,
        kernel=guest_kernel, timeout=90,
    )  # fmt: skip

    assert result.rc == 0, result.console
    facts = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    assert facts["size"] == str(32 * MiB // 512)
    assert facts["serial"] == "vhost_user_blk"  # qsd's GET_ID answer, whatever the image
    assert facts["lbs"] == "512"
    assert facts["ro"] == "0"
    assert facts["mq"] == "2"
    on_host = image.read_bytes()[1 * MiB : 2 * MiB]
    assert hashlib.md5(on_host).hexdigest() == facts["md5"]
    assert on_host != bytes(MiB)
    print(f"guest run took {result.elapsed:.1f} s")


@pytest.mark.guest
def test_guest_returns_the_scripts_status_and_output(guest_kernel: GuestKernel) -> None:
    result = run_guest("echo to-stdout; echo to-stderr >&2; exit 3", kernel=guest_kernel)
    assert result.rc == 3
    assert result.output == "to-stdout\nto-stderr\n"
    assert "VIRTBLK-GUEST-EXIT=3" in result.console


@pytest.mark.guest
def test_guest_that_cannot_start_raises_with_qemus_stderr(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    with pytest.raises(GuestError, match=r"(?s)without VIRTBLK-GUEST-EXIT.*nobody-listens"):
        run_guest("true", disks=[str(sock_dir / "nobody-listens.sock")], kernel=guest_kernel)


@pytest.mark.guest
def test_guest_past_its_timeout_is_killed(guest_kernel: GuestKernel) -> None:
    with pytest.raises(GuestTimeout, match="still running after 2 s"):
        run_guest("sleep 600", kernel=guest_kernel, timeout=2)


@pytest.mark.guest
def test_compressed_and_builtin_modules_are_resolved(
    guest_kernel: GuestKernel, tmp_path: Path
) -> None:
    """Kernels that ship .ko.xz, or build a dependency in, still give loadable modules."""
    prepared = guest_kernel.vmlinuz.parent / "modules"
    kernel = tmp_path / "kernel" / "drivers"
    kernel.mkdir(parents=True)
    blk = (prepared / "virtio_blk.ko").read_bytes()
    (kernel / "virtio_blk.ko.xz").write_bytes(lzma.compress(blk))
    (kernel / "virtio.ko").write_bytes((prepared / "virtio.ko").read_bytes())
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    resolved = resolve_modules(tmp_path, ["virtio_blk"])
    assert [name for name, _ in resolved] == ["virtio", "virtio_blk"]
    assert resolved[1][1] == blk


def test_incomplete_cache_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "current").write_text("6.1.0-0-amd64\n")
    with pytest.raises(GuestError, match=f"delete {tmp_path}"):
        prepare_guest_kernel(tmp_path)


@pytest.mark.interop
def test_ceph_cluster_serves_an_rbd_image(ceph_cluster: CephCluster, rbd_image: Any) -> None:
    """The harness's cluster stores what the rbd tool writes and reads it back, and a
    paused OSD holds I/O until it is resumed (what the RBD device's error tests rely on)."""
    spec = rbd_image(size=8 * MiB)
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", spec))
    assert info["size"] == 8 * MiB
    payload = Path(ceph_cluster.workdir) / "payload"
    payload.write_bytes(os.urandom(8 * MiB))
    ceph_cluster.rbd("import", "--no-progress", str(payload), f"{spec}-copy")
    back = Path(ceph_cluster.workdir) / "back"
    ceph_cluster.rbd("export", "--no-progress", f"{spec}-copy", str(back))
    ceph_cluster.rbd("rm", "--no-progress", f"{spec}-copy")
    assert back.read_bytes() == payload.read_bytes()
    ceph_cluster.pause_osd()
    try:
        with pytest.raises(CephError, match="did not answer"):
            ceph_cluster.rbd("export", "--no-progress", spec, str(back), timeout=3)
    finally:
        ceph_cluster.resume_osd()
    ceph_cluster.rbd("export", "--no-progress", spec, str(back) + "2")


def test_run_in_threads_fails_on_a_thread_error_and_on_a_hung_thread() -> None:
    """An exception on a thread is otherwise only printed: the helper must raise it, and
    fail when a thread outlives the timeout."""
    ran: list[int] = []
    run_in_threads(ran.append, 3)
    assert sorted(ran) == [0, 1, 2]

    def fails(index: int) -> None:
        if index == 1:
            raise ValueError("thread 1 failed")

    with pytest.raises(ValueError, match="thread 1 failed"):
        run_in_threads(fails, 2)
    release = threading.Event()

    def hangs(index: int) -> None:
        release.wait(30)

    try:
        with pytest.raises(AssertionError, match="ran past"):
            run_in_threads(hangs, 1, timeout=0.2)
    finally:
        release.set()
