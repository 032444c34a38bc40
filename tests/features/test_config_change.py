"""Config change and resize, on both sides, with the real peers.

Our device: ``virtblk serve --control`` takes JSON-lines requests and sends
CONFIG_CHANGE_MSG; ``virtblk control`` is its client.  Our driver: a config change from
any device re-reads the config, updates ``Disk.size`` at once, fires ``Disk.on_resize``
and logs the old and new size as Linux does.  qemu-storage-daemon 7.2 resizes without a
message (``Disk.refresh`` is the way there), and a Linux guest behind QEMU's own
vhost-user-blk frontend sees our resize: QEMU 7.2 forwards the message for capacity.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from interop.serve_process import ServeProcess, run_virtblk
from peers.guest import GuestKernel, run_guest
from peers.process import eventually
from peers.qsd import QemuStorageDaemon
from virtblk import Disk
from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.control import handle_line, handle_request, send_command
from virtblk.driver.virtio_blk import MAX_CAPACITY_SECTORS, string_get_size
from virtblk.vhost_user.server import serve_connected

MiB = 1 << 20


@pytest.fixture
def served(sock_dir: Path) -> Iterator[tuple[ServeProcess, str]]:
    """``virtblk serve --memory 8M --control`` and the control socket's path."""
    control = str(sock_dir / "ctl.sock")
    with ServeProcess(sock_dir / "blk.sock", ["--memory", "8M", "--control", control]) as sp:
        yield sp, control


# -- the control protocol, without sockets -----------------------------------------------


def test_control_requests_change_the_device_and_answer_its_state() -> None:
    dev = BlkDevice(MemoryBackend(4 * MiB))
    notified: list[int] = []
    dev.config_changed = lambda: notified.append(1)
    answer = handle_request(dev, {"command": "resize", "size": "8M"})
    assert answer == {"ok": True, "old_size": 4 * MiB, "size": 8 * MiB,
                      "capacity": 8 * MiB // 512, "read_only": False,
                      "cache_mode": "write back", "frontend_connected": True}
    answer = handle_request(dev, {"command": "set-cache-mode", "mode": "writethrough"})
    assert answer["cache_mode"] == "write through" and not dev.backend.writeback
    assert "warning" not in answer  # towards write through is always safe
    answer = handle_request(dev, {"command": "set-cache-mode", "mode": "write back"})
    assert "will not send flushes" in answer["warning"] and dev.backend.writeback
    handle_request(dev, {"command": "set-cache-mode", "mode": "write-through"})
    assert handle_request(dev, {"command": "set-read-only", "read_only": True})["read_only"]
    assert dev.read_only and len(notified) == 5
    config = handle_request(dev, {"command": "get-config"})
    assert config["config"]["capacity"] == 8 * MiB // 512 and config["config"]["writeback"] == 0
    assert "BLK_FLUSH" in config["features_offered"] and config["features_negotiated"] is None
    assert handle_request(dev, {"command": "stats"})["stats"]["bytes_written"] == 0


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not a JSON request"),
        (b"[1, 2]", "JSON object"),
        (b'{"command": "explode"}', "unknown command"),
        (b'{"command": "resize"}', "needs a size"),
        (b'{"command": "resize", "size": 1000}', "multiple of the 512-byte"),
        (b'{"command": "resize", "size": "lots"}', "lots"),
        (b'{"command": "resize", "size": true}', "size must be"),
        (b'{"command": "set-read-only", "read_only": "yes"}', "true or false"),
        (b'{"command": "set-cache-mode", "mode": "unsafe"}', "unknown cache mode"),
    ],
)
def test_bad_requests_are_answered_not_obeyed(line: bytes, error: str) -> None:
    dev = BlkDevice(MemoryBackend(4 * MiB))
    answer = json.loads(handle_line(dev, line))
    assert answer["ok"] is False and error in answer["error"]
    assert dev.backend.size == 4 * MiB and not dev.read_only and dev.cache_mode == "write back"


# -- string_get_size, as Linux prints it ------------------------------------------------


@pytest.mark.parametrize(
    ("size", "base10", "base2"),
    [
        # The first two pairs are what Linux 6.1 printed for our device (guest console).
        (64 * MiB, "67.1 MB", "64.0 MiB"),
        (128 * MiB, "134 MB", "128 MiB"),
        (8 << 30, "8.59 GB", "8.00 GiB"),
        (0, "0 B", "0 B"),
        (512, "512 B", "512 B"),
        (999_999, "1000 kB", "977 KiB"),  # Linux rounds the remainder only
        (2**90, "1.24 UNK", "1.00 UNK"),
    ],
)
def test_string_get_size_matches_linux(size: int, base10: str, base2: str) -> None:
    assert (string_get_size(size, 10), string_get_size(size, 2)) == (base10, base2)


# -- our driver and our device ----------------------------------------------------------


def test_resize_through_virtblk_control_reaches_our_driver(
    served: tuple[ServeProcess, str], caplog: pytest.LogCaptureFixture
) -> None:
    sp, control = served
    caplog.set_level(logging.INFO, logger="virtblk.driver")
    with Disk.connect(str(sp.socket_path)) as disk:
        seen: list[tuple[int, int]] = []
        disk.on_resize(lambda old, new: seen.append((old, new)))
        with pytest.raises(ValueError, match="past the end"):
            disk.pwrite(b"\x5a" * 4096, 12 * MiB)
        result = run_virtblk("control", control, "resize", "16M")
        assert result.returncode == 0, result.stderr
        assert "8.00 MiB -> 16.00 MiB" in result.stdout and "frontend notified" in result.stdout
        assert eventually(lambda: seen == [(8 * MiB, 16 * MiB)], 10.0), seen
        assert disk.size == 16 * MiB
        disk.pwrite(b"\x5a" * 4096, 12 * MiB)  # beyond the old end: now in range
        assert disk.pread(4096, 12 * MiB) == b"\x5a" * 4096
    assert ("new size: 32768 512-byte logical blocks (16.8 MB/16.0 MiB), old size: 16384 "
            "512-byte logical blocks (8.39 MB/8.00 MiB)") in caplog.text


def test_shrink_keeps_the_driver_inside_the_disk(served: tuple[ServeProcess, str]) -> None:
    sp, control = served
    with Disk.connect(str(sp.socket_path)) as disk:
        disk.pwrite(b"\x01" * 512, 0)
        assert send_command(control, "resize", size=4 * MiB)["ok"]
        assert eventually(lambda: disk.size == 4 * MiB, 10.0)
        with pytest.raises(ValueError, match="past the end"):
            disk.pread(512, 6 * MiB)
        assert disk.pread(512, 0) == b"\x01" * 512


def test_a_capacity_that_does_not_fit_is_truncated_with_a_warning(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    control = str(sock_dir / "ctl.sock")
    with ServeProcess(sock_dir / "blk.sock", ["--null", "1G", "--control", control]) as sp, \
            Disk.connect(str(sp.socket_path)) as disk:
        caplog.set_level(logging.WARNING, logger="virtblk.driver")
        answer = send_command(control, "resize", size=1 << 64)  # 2**55 sectors
        assert answer["ok"] and answer["capacity"] == 1 << 55
        assert eventually(lambda: disk.size == MAX_CAPACITY_SECTORS * 512, 10.0)
        assert disk.size < 1 << 63  # every byte offset fits a signed 64-bit off_t
        assert f"Capacity {1 << 55} too large: truncating" in caplog.text
        disk.pread(512, disk.size - 512)  # the last sector is addressable


def test_control_socket_keeps_answering_on_one_connection(
    served: tuple[ServeProcess, str],
) -> None:
    _, control = served
    # ServeProcess's readiness probe is served as a short session of its own: wait for the
    # server to see it end (it once answered frontend_connected True here).
    assert eventually(lambda: not send_command(control, "stats")["frontend_connected"], 10.0)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(control)
        sock.sendall(b'{"command": "stats"}\nnonsense\n{"command": "get-config"}\n')
        data = b""
        while data.count(b"\n") < 3:
            data += sock.recv(65536)
    answers = [json.loads(line) for line in data.splitlines()]
    assert [a["ok"] for a in answers] == [True, False, True]
    assert answers[0]["frontend_connected"] is False
    assert answers[2]["config"]["capacity"] == 8 * MiB // 512


def test_virtblk_control_reports_errors_with_a_status(served: tuple[ServeProcess, str]) -> None:
    _, control = served
    bad = run_virtblk("control", control, "set-cache-mode", "sometimes")
    assert bad.returncode == 1 and "unknown cache mode" in bad.stderr
    missing = run_virtblk("control", control + ".nope", "stats")
    assert missing.returncode == 1 and "No such file" in missing.stderr
    stats = run_virtblk("control", control, "stats", "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["stats"]["requests"] == {}


# -- devices that resize without telling ------------------------------------------------


def test_refresh_picks_up_a_silent_resize() -> None:
    """A device that changes capacity without CONFIG_CHANGE_MSG: ``Disk.refresh``."""
    dev = BlkDevice(MemoryBackend(8 * MiB))
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=serve_connected, args=(theirs, dev), daemon=True)
    server.start()
    with Disk.from_socket(ours) as disk:
        seen: list[tuple[int, int]] = []
        disk.on_resize(lambda old, new: seen.append((old, new)))
        dev.backend.resize(16 * MiB)  # the backend alone: no config change is sent
        assert disk.size == 8 * MiB
        disk.refresh()
        assert disk.size == 16 * MiB and seen == [(8 * MiB, 16 * MiB)]
        disk.refresh()  # nothing changed: no second callback
        assert seen == [(8 * MiB, 16 * MiB)]
    server.join(timeout=10)


@pytest.mark.interop
def test_qsd_block_resize_is_invisible_until_the_export_is_recreated(
    qsd_factory: Callable[..., QemuStorageDaemon], tmp_path: Path
) -> None:
    """qemu-storage-daemon 7.2 computes its config space when the export is created:
    after QMP ``block_resize`` it sends no CONFIG_CHANGE_MSG and GET_CONFIG keeps the
    old capacity, so ``Disk.refresh`` (and even a new connection) sees the old size.
    Deleting and re-adding the export is what publishes the new size."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    qsd = qsd_factory(image=image)
    with Disk.connect(str(qsd.socket_path)) as disk:
        seen: list[tuple[int, int]] = []
        disk.on_resize(lambda old, new: seen.append((old, new)))
        qsd.qmp("block_resize", node_name=qsd.node_name, size=16 * MiB)
        assert image.stat().st_size == 16 * MiB
        disk.refresh()
        # If this starts failing, the daemon learnt to update its config (QEMU 8.x).
        assert disk.size == 8 * MiB and seen == []
    qsd.qmp("block-export-del", id=qsd.export_id)
    eventually(lambda: not qsd.qmp("query-block-exports"), 10.0)
    qsd.qmp("block-export-add", {
        "type": "vhost-user-blk", "id": qsd.export_id, "node-name": qsd.node_name,
        "addr": {"type": "unix", "path": str(qsd.socket_path)}, "writable": True})
    with Disk.connect(str(qsd.socket_path)) as disk:
        assert disk.size == 16 * MiB
        disk.pwrite(b"\xa5" * 4096, 12 * MiB)
        assert disk.pread(4096, 12 * MiB) == b"\xa5" * 4096


# -- a Linux guest behind QEMU's vhost-user-blk frontend ----------------------------------

# The guest signals the host through the device: reading the serial is a GET_ID request,
# which nothing else in this guest sends, so the host sees "GET_ID: 1" in `stats` once
# the guest has printed its state and switched the cache to write through.
GUEST_SCRIPT = r"""
B=/sys/block/vda
echo TOPO=$(cat $B/queue/logical_block_size),$(cat $B/queue/physical_block_size),\
$(cat $B/queue/minimum_io_size),$(cat $B/queue/optimal_io_size),$(cat $B/alignment_offset)
echo CACHE_BEFORE=$(cat $B/cache_type)
echo "write through" > $B/cache_type
echo CACHE_AFTER=$(cat $B/cache_type)
echo WRITE_CACHE=$(cat $B/queue/write_cache)
dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; echo WRITE_BEFORE=$?
old=$(cat $B/size)
echo SIZE_BEFORE=$old
echo SERIAL=$(cat $B/serial)
i=0
while [ $i -lt 300 ]; do
    [ "$(cat $B/size)" != "$old" ] && break
    usleep 100000; i=$((i+1))
done
echo SIZE_AFTER=$(cat $B/size)
echo KLOG=$(dmesg | grep -o 'new size: .*' | tail -1)
cfg_irqs() { grep virtio0-config /proc/interrupts | awk '{print $2}'; }
echo CONFIG_IRQS_RESIZED=$(cfg_irqs)
cat $B/serial >/dev/null
i=0
while [ $i -lt 300 ]; do
    dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null || break
    usleep 100000; i=$((i+1))
done
sleep 1
echo CONFIG_IRQS_LATER=$(cfg_irqs)
echo RO=$(cat $B/ro)
echo CACHE_LATER=$(cat $B/cache_type)
dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1 | head -1
dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; echo READ_AFTER=$?
"""


def _values(output: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)=(.*)$", output, re.MULTILINE))


@pytest.mark.guest
def test_linux_guest_sees_resize_cache_switch_topology_and_runtime_read_only(
    sock_dir: Path, guest_kernel: GuestKernel
) -> None:
    control = str(sock_dir / "ctl.sock")
    args = ["--memory", "64M", "--control", control, "--serial", "guest-resize",
            "--physical-block-size", "4k", "--min-io-size", "8k", "--opt-io-size", "64k",
            "--alignment-offset", "1k"]
    host: dict[str, Any] = {}

    def wait_get_id(count: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if send_command(control, "stats")["stats"]["requests"].get("GET_ID", 0) >= count:
                return True
            time.sleep(0.1)
        return False

    def drive_host() -> None:
        """Each serial read by the guest is a cue: first record what it did and resize;
        then send two config changes that leave the capacity alone."""
        deadline = time.monotonic() + 150
        if not wait_get_id(1, deadline):
            return
        host["config"] = send_command(control, "get-config")["config"]
        host["resize"] = send_command(control, "resize", size="128M")
        if not wait_get_id(2, deadline):
            return
        host["cache"] = send_command(control, "set-cache-mode", mode="write back")
        host["read_only"] = send_command(control, "set-read-only", read_only=True)

    with ServeProcess(sock_dir / "blk.sock", args) as sp:
        thread = threading.Thread(target=drive_host, daemon=True)
        thread.start()
        result = run_guest(GUEST_SCRIPT, disks=[str(sp.socket_path)], kernel=guest_kernel,
                           timeout=180)
        thread.join(timeout=10)
        after = send_command(control, "stats")
        serve_log = sp.output
    values = _values(result.output)
    context = f"{result.output}\n--- serve ---\n{serve_log}\n--- host ---\n{host}"
    # Topology: what `serve` advertised, in bytes, as Linux's queue limits.
    assert values["TOPO"] == "512,4096,8192,65536,1024", context
    # Cache: the sysfs store reached our device's config (writeback 0) through QEMU.
    assert (values["CACHE_BEFORE"], values["CACHE_AFTER"]) == ("write back", "write through")
    assert values["WRITE_CACHE"] == "write through", context
    assert host["config"]["writeback"] == 0, context
    assert values["WRITE_BEFORE"] == "0", context
    # Resize: QEMU 7.2 forwards our CONFIG_CHANGE_MSG (capacity changes only) and Linux
    # prints its own "new size" line.
    assert host["resize"]["ok"] and host["resize"]["frontend_connected"], context
    assert (values["SIZE_BEFORE"], values["SIZE_AFTER"]) == ("131072", "262144"), context
    assert values["KLOG"] == "new size: 262144 512-byte logical blocks (134 MB/128 MiB)"
    # QEMU 7.2 forwards a config change to the guest only when the capacity changed
    # ("valid for resize only" in vhost_user_blk_handle_config_change): our cache-mode and
    # read-only messages raise no config interrupt, and the guest keeps its cache mode.
    assert host["cache"]["ok"] and host["cache"]["frontend_connected"], context
    assert "will not send flushes" in host["cache"]["warning"], context
    assert int(values["CONFIG_IRQS_RESIZED"]) >= 1, context
    assert values["CONFIG_IRQS_LATER"] == values["CONFIG_IRQS_RESIZED"], context
    assert values["CACHE_LATER"] == "write through", context
    # Read-only at run time: the RO bit stays 0 (fixed at negotiation); writes get EIO.
    assert values["RO"] == "0", context
    assert "Input/output error" in result.output, context
    assert values["READ_AFTER"] == "0", context
    assert after["stats"]["errors"]["IOERR"] >= 1


def test_connect_waits_while_a_busy_server_backlog_is_full(sock_dir: Path) -> None:
    """``virtblk serve`` listens with a backlog of one and serves one session at a time;
    a connect that finds the backlog full (EAGAIN on a Unix socket with a timeout) must
    wait for room, not fail.  The tests above connect right after ServeProcess's probe."""
    path = str(sock_dir / "busy.sock")
    dev = BlkDevice(MemoryBackend(4 * MiB))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    queued = []
    for _ in range(4):  # fill the backlog
        probe = socket.socket(socket.AF_UNIX)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            probe.close()
            break
        queued.append(probe)

    def serve_later() -> None:
        time.sleep(0.3)
        for _ in queued:
            listener.accept()[0].close()
        serve_connected(listener.accept()[0], dev)

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    with Disk.connect(path, timeout=10) as disk:
        assert disk.size == 4 * MiB
    thread.join(timeout=10)
    listener.close()
    for probe in queued:
        probe.close()


def test_a_second_control_server_on_a_live_path_is_refused(sock_dir: Path) -> None:
    """A live control socket is not stolen, and closing the refused one leaves it in place."""
    from virtblk.device.backends import MemoryBackend
    from virtblk.device.blk import BlkDevice
    from virtblk.device.control import ControlServer, send_command

    device = BlkDevice(MemoryBackend(1 << 20))
    path = sock_dir / "ctl.sock"
    with ControlServer(path, device):
        with pytest.raises(OSError, match="already listening"):
            ControlServer(path, device)
        assert send_command(path, "stats")["ok"]
    assert not path.exists()
