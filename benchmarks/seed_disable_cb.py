"""The seed's second commit, "virtio_blk: Disable callback in virtblk_done()", reproduced.

That commit (Asias He, 2012) turned the completion loop into
``do { virtqueue_disable_cb(); while (get_buf()) ...; } while (!virtqueue_enable_cb())`` and
reported 6-32% more IOPS: with callbacks disabled while the driver drains the used ring,
the device does not interrupt for completions the driver is about to find anyway.

Here our driver's queue engine (``QueueHandle``) runs the same 4 KiB random reads with
the loop as the commit made it (callbacks disabled while draining, the default) and as it
was before (``disable_cb_while_draining=False``, ``virtblk bench
--keep-cb-while-draining``), against qemu-storage-daemon's null export and ``virtblk serve
--null``, with and without VIRTIO_RING_F_EVENT_IDX (the driver declines it to run the
flags-based suppression of 2012's devices).  Each configuration runs ``--repeat`` times
alternating; the table shows median IOPS and interrupts per I/O, and the IOPS ratio
with/without the commit.

    python benchmarks/seed_disable_cb.py [--runtime 3] [--repeat 3] [--depth 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemons import SIZE, qemu_storage_daemon, serving  # benchmarks/daemons.py

from virtblk import Disk, unixsock
from virtblk.driver.virtio_blk import VirtioBlk
from virtblk.spec import Feature
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds


@contextlib.contextmanager
def ours(tmp: Path) -> Iterator[tuple[str, int]]:
    """``virtblk serve --null``, as it starts by default."""
    sock = tmp / "virtblk.sock"
    with serving([sys.executable, "-m", "virtblk", "serve", "--socket", str(sock), "--null",
                  str(SIZE)], sock, "virtblk serve") as found:  # fmt: skip
        yield found


def run(sock: str, pid: int, *, event_idx: bool, disable: bool, depth: int,
        runtime: float) -> dict[str, Any]:
    """One bench run on a fresh connection."""
    exclude = 0 if event_idx else Feature.RING_EVENT_IDX.mask
    dev = VirtioBlk(unixsock.connect(sock, 10.0), num_queues=1, exclude_features=exclude)
    with Disk(dev) as disk:
        cfg = BenchConfig(rw="randread", bs=4096, iodepth=depth, runtime=runtime,
                          disable_cb_while_draining=disable)  # fmt: skip
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid))
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors")
    return row


def main() -> int:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, start in (("qemu-storage-daemon", lambda: qemu_storage_daemon(tmp)),
                            ("virtblk serve", lambda: ours(tmp))):
            with start() as (sock, pid):
                for event_idx in (True, False):
                    seen: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
                    for rep in range(args.repeat):
                        for disable in (True, False):
                            row = run(sock, pid, event_idx=event_idx, disable=disable,
                                      depth=args.depth, runtime=args.runtime)
                            row.update(device=name, event_idx=event_idx, disable_cb=disable,
                                       repeat=rep)
                            rows.append(row)
                            seen[disable].append(row)
                    entry = {"device": name, "event_idx": event_idx}
                    for disable, label in ((True, "with"), (False, "without")):
                        entry[f"iops_{label}"] = statistics.median(
                            r["iops"] for r in seen[disable])
                        entry[f"interrupts_per_io_{label}"] = statistics.median(
                            r["notifications_per_io"]["driver_interrupts"]
                            for r in seen[disable])
                        entry[f"device_cpu_us_per_io_{label}"] = statistics.median(
                            r["device_cpu_us_per_io"] for r in seen[disable])
                    entry["iops_with_over_without"] = round(statistics.median(
                        a["iops"] / b["iops"] for a, b in zip(seen[True], seen[False],
                                                               strict=True)), 3)
                    table.append(entry)
                    print(json.dumps(entry), flush=True)
    print(f"\ndepth {args.depth}, median of {args.repeat}: the commit's loop (with) against "
          "the loop before it (without)")
    print(f"{'device':<22}{'EVENT_IDX':>10}{'IOPS with':>12}{'without':>10}{'ratio':>8}"
          f"{'intr/IO with':>14}{'without':>9}")
    for e in table:
        print(f"{e['device']:<22}{'on' if e['event_idx'] else 'off':>10}"
              f"{e['iops_with']:>12,.0f}{e['iops_without']:>10,.0f}"
              f"{e['iops_with_over_without']:>8}{e['interrupts_per_io_with']:>14.4f}"
              f"{e['interrupts_per_io_without']:>9.4f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"args": vars(args), "table": table,
                                                    "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
