"""A device restart loses nothing, with the real peer: QEMU 7.2 reconnects to a killed
``virtblk serve`` and hands back the in-flight buffer; Linux never sees an I/O error.

A guest with two vCPUs and two queues runs four O_DIRECT writers (two per CPU), each
rewriting its own 1 MiB region pass after pass with one 1 MiB write (many requests in
flight at once), each pass from one of four orders of 16 random 64 KiB chunks.
The host kills ``virtblk serve`` (the whole process group, queue workers included) with
SIGKILL while the writers run, at a moment its in-flight buffer holds requests (it stops
the group, reads the buffer through /proc, and kills or lets it go on), starts a new one
on the same socket and image, and does that ``KILLS`` times; QEMU (``reconnect=1``)
reconnects each time and hands the buffer back, and the new device resubmits what the
dead one had in flight.  Then the host writes
a stop mark into the image, the writers finish their pass, and the guest checks that
each region holds exactly its last pass and prints its checksum, which the host compares
with the image.  No dd may fail and dmesg may hold no "I/O error".

Over split rings (``packed=off``) and packed rings (``packed=on``, the guest checked to
have negotiated VIRTIO_F_RING_PACKED, bit 34): QEMU 7.2 keeps no packed ring position
across a backend crash (it starts the ring at its initial base again), so there the
buffer's packed journal is all the new device has to find the ring where it was.  Packed
runs with both kinds of queue workers.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from interop.serve_process import ServeProcess
from peers.guest import GuestKernel, RunningGuest, start_guest
from virtblk.virtio.inflight_packed import inflight_region_size

pytestmark = pytest.mark.guest

MiB = 1 << 20
CHUNK = 64 * 1024
CHUNKS = 16  # per writer: 1 MiB each
WRITERS = 4
STOP_CHUNK = 96  # at 6 MiB: the host writes STOP there
KILLS = 5
QUEUE_SIZE = 128  # vhost-user-blk-pci's default queue-size
GUEST_TIMEOUT = 110
RING_PACKED_BIT = 34  # of the guest's features string, one character per bit

ROTATIONS = 4  # source files: the random chunks in four different orders

# A pass is one 1 MiB O_DIRECT write (Linux splits it into requests that are in flight
# together), from the rotation (id + pass) % ROTATIONS: no two writers, and no two
# consecutive passes of one, write the same bytes to the same place.
WRITER = f"""id=$1
p=0
while :; do
    if ! dd if=/tmp/src$(( (id + p) % {ROTATIONS} )) of=/dev/vda bs={CHUNKS * CHUNK} \\
            seek=$id count=1 oflag=direct 2>/tmp/err$id; then
        echo "ERR writer $id pass $p: $(cat /tmp/err$id)"
        exit 1
    fi
    p=$((p + 1))
    echo "PASS $id $p"
    mark=$(dd if=/dev/vda bs={CHUNK} skip={STOP_CHUNK} count=1 iflag=direct 2>/dev/null \\
           | head -c 4)
    if [ "$mark" = STOP ]; then
        echo $p > /tmp/passes$id
        exit 0
    fi
done
"""

SCRIPT = f"""
dd if=/dev/urandom of=/tmp/random bs={CHUNK} count={CHUNKS} 2>/dev/null
for r in $(seq 0 {ROTATIONS - 1}); do
    for k in $(seq 0 {CHUNKS - 1}); do
        dd if=/tmp/random bs={CHUNK} skip=$(( (k * 5 + r * 3) % {CHUNKS} )) count=1 \\
            >> /tmp/src$r 2>/dev/null
    done
done
cat > /tmp/w.sh <<'END'
{WRITER}
END
echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"
echo "FEATURES $(cat /sys/block/vda/device/features)"
pids=""
for id in $(seq 0 {WRITERS - 1}); do
    taskset $(( 1 << (id % 2) )) sh /tmp/w.sh $id &
    pids="$pids $!"
done
rc=0
for pid in $pids; do
    wait $pid || rc=1
done
for id in $(seq 0 {WRITERS - 1}); do
    p=$(cat /tmp/passes$id)
    exp=/tmp/src$(( (id + p - 1) % {ROTATIONS} ))
    dd if=/dev/vda of=/tmp/got bs={CHUNKS * CHUNK} skip=$id count=1 iflag=direct 2>/dev/null
    cmp $exp /tmp/got || rc=1
    echo "MD5 $id $(md5sum $exp | cut -d' ' -f1) $p"
done
echo "IOERRORS $(dmesg | grep -c 'I/O error')"
dmesg | grep -i 'error' | head -5
exit $rc
"""


def passes(console: str) -> int:
    return len(re.findall(r"^PASS \d+ \d+", console, re.MULTILINE))


def wait_for(what: str, ready: Callable[[], bool], guest: RunningGuest,
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if guest.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}:\n{guest.console()[-3000:]}")
        time.sleep(0.05)


def serve(path: Path, image: Path, workers: str) -> ServeProcess:
    server = ServeProcess(path, ["--file", str(image), "--num-queues", "2",
                                 "--workers", workers])
    server.argv[1:1] = ["--log-level", "info"]  # virtblk --log-level info serve ...
    return server.start()


def in_flight(pid: int, packed: bool) -> int:
    """Requests the in-flight buffer of process ``pid`` (a stopped ``virtblk serve``)
    records as in flight: its memfd read through /proc (a split region's flags are at
    16 + 16 * i, a packed one's at 32 + 32 * i)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:virtblk-inflight"):
            data = fd.read_bytes()
            region = inflight_region_size(QUEUE_SIZE, packed=packed)
            entry = 32 if packed else 16
            return sum(data[q * region + entry * (i + 1)] == 1
                       for q in range(len(data) // region) for i in range(QUEUE_SIZE))
    return 0


def kill_mid_request(server: ServeProcess, deadline: float, packed: bool) -> tuple[str, int]:
    """SIGKILL the server's whole group (queue workers too) at a moment it has requests
    in flight: stop the group, look at the buffer, kill or let it go on and look again.
    Its output, and how many requests the buffer held."""
    assert server.process is not None
    group = server.process.pid
    while True:
        os.killpg(group, signal.SIGSTOP)
        held = in_flight(group, packed)
        if held or time.monotonic() > deadline:
            break
        os.killpg(group, signal.SIGCONT)
        time.sleep(0.002)
    server.kill()  # the stopped group dies as it is
    return server.output, held


@pytest.mark.parametrize(("ring", "workers"), [
    ("split", "process"),
    ("packed", "process"),
    ("packed", "thread"),
])  # fmt: skip
def test_the_guest_survives_sigkilled_devices(
    guest_kernel: GuestKernel, sock_dir: Path, tmp_path: Path, ring: str, workers: str
) -> None:
    path = sock_dir / "vb.sock"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * MiB))
    packed = ring == "packed"
    outputs: list[str] = []
    held = 0
    server = serve(path, image, workers)
    rng = random.Random(11)
    try:
        with start_guest(SCRIPT, disks=[str(path)], num_queues=2, smp=2, reconnect=1,
                         kernel=guest_kernel,
                         device_options=[f"packed={'on' if packed else 'off'}"]) as guest:
            wait_for("every writer's first pass", lambda: passes(guest.console()) >= WRITERS,
                     guest)
            for _ in range(KILLS):
                seen = passes(guest.console())
                wait_for("progress since the restart",
                         lambda seen=seen: passes(guest.console()) >= seen + 2, guest)
                time.sleep(rng.uniform(0, 0.3))
                output, count = kill_mid_request(server, time.monotonic() + 10, packed)
                outputs.append(output)
                held += count
                server = serve(path, image, workers)
            seen = passes(guest.console())
            wait_for("progress after the last restart",
                     lambda: passes(guest.console()) >= seen + WRITERS, guest)
            with image.open("r+b") as f:
                f.seek(STOP_CHUNK * CHUNK)
                f.write(b"STOP")
            result = guest.wait(GUEST_TIMEOUT)
    finally:
        server.stop()
        outputs.append(server.output)
    log = "\n".join(outputs)
    assert result.rc == 0, f"{result.output}\n--- virtblk serve ---\n{log[-5000:]}"
    assert not re.search(r"^ERR ", result.output, re.MULTILINE), result.output
    assert re.search(r"^IOERRORS 0$", result.output, re.MULTILINE), result.output
    assert "QUEUES 2" in result.output
    features = re.search(r"^FEATURES ([01]+)$", result.output, re.MULTILINE)
    assert features is not None and features[1][RING_PACKED_BIT] == str(int(packed))
    assert "will not resume" not in log
    data = image.read_bytes()
    written = 0
    for writer, md5, count in re.findall(r"^MD5 (\d+) ([0-9a-f]{32}) (\d+)$", result.output,
                                         re.MULTILINE):
        start = int(writer) * CHUNKS * CHUNK
        assert hashlib.md5(data[start : start + CHUNKS * CHUNK]).hexdigest() == md5, writer
        written += int(count)
    resubmitted = sum(int(n) for n in re.findall(r"resubmitting (\d+) in-flight", log))
    print(f"\n{ring} rings, {workers} workers: kills survived: {KILLS}, "
          f"requests in flight at the kills: {held}, resubmitted: {resubmitted}, "
          f"1 MiB O_DIRECT writes completed: {written} (the last of each writer's, "
          f"{WRITERS} MiB, compared in the guest and in the image), "
          f"guest time {result.elapsed:.1f} s")
    assert written >= KILLS + WRITERS
    # Each kill caught requests in flight; the next device resubmitted them (all but any
    # whose answer was published just before the stop: those are settled instead).
    assert held >= KILLS and resubmitted >= 1
