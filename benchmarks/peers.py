"""Our driver against qemu-storage-daemon and against our own device, in one run.

Both devices serve a null backend over vhost-user from their own process, and both return
zeros for reads (the daemon's ``read-zeroes=on``, as our NullBackend does), so they do the
same work; our driver runs the same 4 KiB random-read load against each, at each depth,
and we read every process's CPU time from /proc.  Figures are printed as ratios against
the daemon measured in the same run (machines are noisy), plus a JSON record
(``--json FILE``).

    python benchmarks/peers.py [--runtime 5] [--depths 1,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from daemons import qemu_storage_daemon, virtblk_serve  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds


def measure(sock: str, pid: int, depth: int, runtime: float) -> dict[str, object]:
    """One bench run of our driver against the device on ``sock``."""
    with Disk.connect(sock, num_queues=1) as disk:
        cfg = BenchConfig(rw="randread", bs=4096, iodepth=depth, runtime=runtime)
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid))
    return result.summary()


def _num(value: object) -> float:
    """A number from a bench summary (they are JSON-typed ``object``s)."""
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def main() -> int:
    """Run the comparison and print it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--depths", default="1,32")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for depth in depths:
            peers = (("qemu-storage-daemon", qemu_storage_daemon), ("virtblk", virtblk_serve))
            for name, peer in peers:
                with peer(tmp) as (sock, pid):
                    row = measure(sock, pid, depth, args.runtime)
                row["device"] = name
                rows.append(row)
    print(f"{'device':<20} {'depth':>5} {'IOPS':>10} {'driver us/IO':>13} {'device us/IO':>13}")
    for r in rows:
        print(
            f"{r['device']:<20} {r['iodepth']:>5} {r['iops']:>10,.0f} "
            f"{r['driver_cpu_us_per_io']:>13.2f} {r['device_cpu_us_per_io']:>13.2f}"
        )
    print("\nratios (same run):")
    ratios = []
    for depth in depths:
        q = next(r for r in rows if r["device"] == "qemu-storage-daemon" and r["iodepth"] == depth)
        v = next(r for r in rows if r["device"] == "virtblk" and r["iodepth"] == depth)
        qsd_cpu = _num(q["device_cpu_us_per_io"])
        ratio = {
            "iodepth": depth,
            "virtblk_iops_over_qsd": round(_num(v["iops"]) / _num(q["iops"]), 3),
            "virtblk_device_cpu_over_qsd": round(_num(v["device_cpu_us_per_io"]) / qsd_cpu, 3),
            "driver_cpu_over_qsd_device_cpu": round(
                _num(q["driver_cpu_us_per_io"]) / qsd_cpu, 3
            ),
            "driver_cpu_vs_our_device_over_qsd_device_cpu": round(
                _num(v["driver_cpu_us_per_io"]) / qsd_cpu, 3
            ),
        }
        ratios.append(ratio)
        print(
            f"  depth {depth}: our device vs the daemon: IOPS "
            f"{ratio['virtblk_iops_over_qsd']}x, CPU/IO {ratio['virtblk_device_cpu_over_qsd']}x; "
            f"our driver's CPU/IO vs the daemon's CPU/IO: "
            f"{ratio['driver_cpu_over_qsd_device_cpu']}x (driving the daemon), "
            f"{ratio['driver_cpu_vs_our_device_over_qsd_device_cpu']}x (driving our device)"
        )
    record = {
        "machine": os.uname().nodename,
        "cpus": os.cpu_count(),
        "runs": rows,
        "ratios": ratios,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
