"""What the reliability features cost, measured side by side with qemu-storage-daemon.

* device: ``virtblk serve --null`` keeping the in-flight buffer (the default) against
  ``--no-inflight``, both under a driver connected with ``reconnect_timeout`` (which is
  when our driver asks for the buffer and hands it over), qemu-storage-daemon's null export
  under the same driver as the yardstick: device CPU per I/O and IOPS;
* driver: our driver with ``reconnect_timeout`` and ``request_timeout`` against without,
  both on qemu-storage-daemon's null export: driver CPU per I/O and IOPS.

4 KiB random reads, ``ioengine=queue``, depth 1 and 32; every configuration runs
``--repeat`` times with the variants alternating, and the median of the per-repetition
ratios is reported.

    python benchmarks/reliability_cost.py [--runtime 3] [--repeat 3] [--json FILE]
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

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds


@contextlib.contextmanager
def ours(tmp: Path, name: str, *args: str) -> Iterator[tuple[str, int]]:
    """``virtblk serve --null`` with ``args``."""
    sock = tmp / f"{name}.sock"
    with serving([sys.executable, "-m", "virtblk", "serve", "--socket", str(sock),
                  "--null", str(SIZE), *args], sock, "virtblk serve") as served:
        yield served


def measure(sock: str, pid: int, cfg: BenchConfig, **options: Any) -> dict[str, Any]:
    """One bench run of our driver (connected with ``options``) against ``sock``."""
    with Disk.connect(sock, num_queues=1, **options, packed=False) as disk:
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid))
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors against {sock}")
    return row


def median(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 3),
            "runs": [round(v, 3) for v in values]}


def main() -> int:
    """Run both sections; print and (``--json``) record the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    reconnect = {"reconnect_timeout": 10.0}
    both = {"reconnect_timeout": 10.0, "request_timeout": 30.0}
    ratios: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with qemu_storage_daemon(tmp) as (q_sock, q_pid), \
                ours(tmp, "inflight") as (i_sock, i_pid), \
                ours(tmp, "plain", "--no-inflight") as (p_sock, p_pid):
            for depth in (1, 32):
                cfg = BenchConfig(rw="randread", bs=4096, iodepth=depth,
                                  runtime=args.runtime, ioengine="queue")
                dev_cpu, dev_iops, over_qsd, drv_cpu, drv_iops = [], [], [], [], []
                for rep in range(args.repeat):
                    q = measure(q_sock, q_pid, cfg, **reconnect)
                    i = measure(i_sock, i_pid, cfg, **reconnect)
                    p = measure(p_sock, p_pid, cfg, **reconnect)
                    off = measure(q_sock, q_pid, cfg)
                    on = measure(q_sock, q_pid, cfg, **both)
                    for name, row in (("qsd", q), ("inflight", i), ("no-inflight", p),
                                      ("driver-plain", off), ("driver-options", on)):
                        rows.append({**row, "variant": name, "depth": depth, "repeat": rep})
                    dev_cpu.append(i["device_cpu_us_per_io"] / p["device_cpu_us_per_io"])
                    dev_iops.append(i["iops"] / p["iops"])
                    over_qsd.append(i["device_cpu_us_per_io"] / q["device_cpu_us_per_io"])
                    drv_cpu.append(on["driver_cpu_us_per_io"] / off["driver_cpu_us_per_io"])
                    drv_iops.append(on["iops"] / off["iops"])
                    print(f"depth {depth} #{rep}: device CPU/IO inflight "
                          f"{i['device_cpu_us_per_io']} no-inflight "
                          f"{p['device_cpu_us_per_io']} qsd {q['device_cpu_us_per_io']} us; "
                          f"driver CPU/IO options {on['driver_cpu_us_per_io']} plain "
                          f"{off['driver_cpu_us_per_io']} us", flush=True)
                ratios[f"device_cpu_inflight_over_none_d{depth}"] = median(dev_cpu)
                ratios[f"device_iops_inflight_over_none_d{depth}"] = median(dev_iops)
                ratios[f"device_cpu_inflight_over_qsd_d{depth}"] = median(over_qsd)
                ratios[f"driver_cpu_options_over_none_d{depth}"] = median(drv_cpu)
                ratios[f"driver_iops_options_over_none_d{depth}"] = median(drv_iops)
    for key, value in ratios.items():
        print(f"{key}: {value['median']} {value['runs']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"ratios": ratios, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
