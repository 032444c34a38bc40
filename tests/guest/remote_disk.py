"""The workload of the guest tests whose disk lives elsewhere (``serve --rbd``, ``serve
--nbd``): one script, one set of writes and one check, so both backends are held to the same
proof.

The storage holds random bytes at ``SEED_OFFSET`` before the boot, so the guest's first
reads come from what the host put there.  The guest then writes known patterns with
O_DIRECT, two writers at once (one pinned to each CPU, so each uses its own queue), over
part of the seeded bytes, at byte 512 and in the disk's last MiB, the last one fsync'ed (a
FLUSH), and reads each back.  Once the guest has powered off, and while the device still
runs, the storage must hold exactly the seed with the patterns laid over it, and the device
must have received exactly the bytes dd wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import pytest

from peers.guest import GuestResult

MiB = 1 << 20
SEED_OFFSET = 32 * MiB
SEED_LENGTH = 8 * MiB
GUEST_TIMEOUT = 240


def pattern(text: str, length: int) -> bytes:
    """What ``yes TEXT | head -c LENGTH`` prints: the host's copy of a guest pattern.  Each
    line is a length that divides no sector, so a write in the wrong place shows."""
    line = f"{text}\n".encode()
    return (line * (length // len(line) + 1))[:length]


@dataclasses.dataclass(frozen=True)
class Write:
    """One dd of the guest: where, how much, its dd block size, the text of its pattern."""

    name: str
    offset: int
    length: int
    bs: int
    text: str

    def command(self, extra: str = "") -> str:
        return (
            f"dd if=/tmp/{self.name} of=/dev/vda bs={self.bs} seek={self.offset} "
            f"count={self.length // self.bs} oflag=direct,seek_bytes{extra} "
            f"2>/tmp/err-{self.name} || {{ cat /tmp/err-{self.name}; exit 1; }}"
        )

    def readback(self) -> str:
        return (
            f"dd if=/dev/vda of=/tmp/back-{self.name} bs={self.bs} skip={self.offset} "
            f"count={self.length // self.bs} iflag=direct,skip_bytes 2>/dev/null\n"
            f"cmp /tmp/{self.name} /tmp/back-{self.name}\n"
            f"echo READBACK_{self.name.upper()}=ok"
        )


@dataclasses.dataclass(frozen=True)
class RemoteDiskWorkload:
    """The workload for a disk of ``size`` bytes; ``label`` goes into the patterns' text
    and ``probe`` is one more ``echo KEY=...`` line of the backend's own (a serial, ro)."""

    label: str
    size: int
    probe: str

    @property
    def writes(self) -> list[Write]:
        """cpu0 crosses a 4 MiB boundary (an RBD object's) with 64 KiB requests; cpu1
        rewrites the last 512 KiB before the seed and its first 512 KiB with 4 KiB requests;
        "unaligned" is one 4 KiB write at byte 512 (sectors 1-8, across a page boundary);
        "tail" is the disk's last MiB in one write, fsync'ed.  No dd block is smaller than a
        page: busybox's dd takes a smaller buffer from malloc, unaligned, and when the
        O_DIRECT write fails (EINVAL) it quietly writes through the page cache."""
        tag = f"virtblk {self.label}"
        return [
            Write("cpu0", 2 * MiB, 4 * MiB, 64 * 1024, f"{tag} cpu0 ."),
            Write("cpu1", SEED_OFFSET - 512 * 1024, MiB, 4096, f"{tag} cpu1 .."),
            Write("unaligned", 512, 4096, 4096, f"{tag} unaligned ...."),
            Write("tail", self.size - MiB, MiB, MiB, f"{tag} tail ..."),
        ]

    def content(self) -> bytearray:
        """What the storage holds before the boot: zeros, random bytes at the seed."""
        content = bytearray(self.size)
        content[SEED_OFFSET : SEED_OFFSET + SEED_LENGTH] = os.urandom(SEED_LENGTH)
        return content

    def script(self) -> str:
        w = {write.name: write for write in self.writes}
        return "\n".join([
            "set -e",
            "echo SIZE=$(cat /sys/block/vda/size)",
            "echo MQ=$(ls /sys/block/vda/mq | wc -l)",
            self.probe,
            f"dd if=/dev/vda of=/tmp/seed bs=1M skip={SEED_OFFSET // MiB} "
            f"count={SEED_LENGTH // MiB} iflag=direct 2>/dev/null",
            "echo SEED_MD5=$(md5sum /tmp/seed | cut -d' ' -f1)",
            *(f"yes '{x.text}' | head -c {x.length} > /tmp/{x.name}" for x in self.writes),
            f"taskset 0x1 sh -c '{w['cpu0'].command()}' &",
            "A=$!",
            f"taskset 0x2 sh -c '{w['cpu1'].command()}' &",
            "B=$!",
            "wait $A",
            "wait $B",
            w["unaligned"].command(),
            w["tail"].command(" conv=fsync"),
            *(x.readback() for x in self.writes),
            "echo IOERRORS=$(dmesg | grep -c 'I/O error' || true)",
        ])  # fmt: skip

    def check(
        self, result: GuestResult, queues: list[dict[str, Any]], content: bytearray,
        stored: bytes, where: str,
    ) -> dict[str, str]:  # fmt: skip
        """Everything the workload proves; returns the guest's ``KEY=value`` lines for the
        backend's own checks.  ``stored`` is what the storage holds now, read by the
        backend's own tool; ``where`` names it in a failure."""
        # Each writer was pinned to a CPU, and each CPU has a queue of its own.
        assert [q["requests"].get("OUT", 0) > 0 for q in queues] == [True, True], queues
        # The device received exactly the bytes dd wrote: nothing went through the guest's
        # page cache (which writes whole pages, after reading them).
        written = sum(x.length for x in self.writes)
        assert sum(q["bytes_written"] for q in queues) == written, queues
        values = dict(re.findall(r"^([A-Z_0-9]+)=(.*)$", result.output, re.MULTILINE))
        assert values["SIZE"] == str(self.size // 512)
        assert values["MQ"] == "2"
        seed = content[SEED_OFFSET : SEED_OFFSET + SEED_LENGTH]
        assert values["SEED_MD5"] == hashlib.md5(seed).hexdigest()
        for x in self.writes:
            assert values[f"READBACK_{x.name.upper()}"] == "ok"
        assert values["IOERRORS"] == "0", result.console
        expected = bytearray(content)
        for x in self.writes:
            expected[x.offset : x.offset + x.length] = pattern(x.text, x.length)
        assert len(stored) == self.size
        if stored != expected:
            wrong = [i for i in range(0, self.size, 512)
                     if stored[i : i + 512] != expected[i : i + 512]]  # fmt: skip
            pytest.fail(f"{len(wrong)} sectors differ in {where}, the first at byte "
                        f"{wrong[0]}; guest output:\n{result.output}")
        return values


def failure_report(result: GuestResult, device_output: str) -> str:
    """What a failed guest script leaves to read: its output, the console's tail and the
    device's log."""
    return (
        f"guest script exited {result.rc}\n--- guest output ---\n{result.output}\n"
        f"--- console tail ---\n{chr(10).join(result.console.splitlines()[-30:])}\n"
        f"--- virtblk serve ---\n{device_output}"
    )
