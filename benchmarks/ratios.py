"""The performance yardstick in one run: our driver and our device against
qemu-storage-daemon (qsd), 4 KiB random reads, as ratios measured side by side.

* driver: our driver (``virtblk.tools.bench``, ``ioengine=queue``) driving qsd's null export,
  its CPU per I/O over qsd's at depth 1 and 32;
* device: the same driver against qsd's null export and ``virtblk serve --null`` at
  depth 1, 32 and 128: IOPS, device CPU per I/O and (depth 1) the round trip, ours over
  qsd's;
* two queues: two jobs (a process and a hardware queue each), both devices with two
  queues, depth 32: IOPS, ours over qsd's;
* file: ``virtblk serve --file`` against qsd's file export (``cache.direct=on``,
  ``aio=native``) of the same image, its page cache dropped before every run, depth 32.

Every configuration runs ``--repeat`` times with the two devices alternating, each device
in its own process and its CPU read from /proc (worker processes included); the ratios
are computed per repetition and their median is reported, with the notifications per I/O
both ends counted.  Both devices are driven over the split ring (``packed=False``):
qemu-storage-daemon has no other, and a ratio compares devices, not ring layouts
(``benchmarks/packed_vs_split.py`` does that).  ``--json FILE`` writes the whole record.

    python benchmarks/ratios.py [--runtime 3] [--repeat 3] [--sections driver,device,...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from daemons import (  # benchmarks/daemons.py
    SIZE,
    cpu_model,
    qemu_storage_daemon,
    qsd_file,
    serving,
)

from virtblk import Disk
from virtblk.device.control import notification_counters
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import process_cpu_seconds

SECTIONS = ("driver", "device", "queues", "file")
FILE_SIZE = 512 << 20


@contextlib.contextmanager
def ours(tmp: Path, *args: str, num_queues: int = 1) -> Iterator[tuple[str, int]]:
    """``virtblk serve`` with ``args`` (a backend), a control socket for its counters."""
    sock = tmp / "virtblk.sock"
    control = tmp / "virtblk.ctl"
    with serving(
        [sys.executable, "-m", "virtblk", "serve", "--socket", str(sock), *args,
         "--num-queues", str(num_queues), "--control", str(control)],
        sock, "virtblk serve",
    ) as (path, pid):  # fmt: skip
        deadline = time.monotonic() + 20
        while not control.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"virtblk serve did not create {control}")
            time.sleep(0.05)
        yield path, pid


def measure(
    sock: str, pid: int, cfg: BenchConfig, control: Path | None = None
) -> dict[str, Any]:
    """One bench run of our driver against the device on ``sock`` (a fresh connection)."""
    counters: Callable[[], dict[str, int]] | None = None
    if control is not None:
        path = control
        counters = lambda: notification_counters(path)  # noqa: E731
    with Disk.connect(sock, num_queues=cfg.numjobs, packed=False) as disk:
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid),
                           device_counters=counters)  # fmt: skip
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors against {sock}")
    return row


def drop_cache(image: Path) -> None:
    """Evict the image from the page cache, so reads go to the disk."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def make_image(path: Path) -> None:
    """An image of real data (holes would read without touching the disk)."""
    with open(path, "wb") as f:
        for _ in range(FILE_SIZE >> 20):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


class Run:
    """The record: every measurement and the ratios."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[dict[str, Any]] = []
        self.ratios: dict[str, dict[str, float]] = {}

    def cfg(self, depth: int, numjobs: int = 1) -> BenchConfig:
        a = self.args
        return BenchConfig(rw="randread", bs=4096, iodepth=depth, runtime=a.runtime,
                           numjobs=numjobs, ioengine="queue",
                           batch_complete_min=a.batch_min,
                           poll_us=a.driver_poll_us)  # fmt: skip

    def pair(
        self, name: str, theirs: Callable[[], contextlib.AbstractContextManager[tuple[str, int]]],
        mine: Callable[[], contextlib.AbstractContextManager[tuple[str, int]]],
        cfg: BenchConfig, before: Callable[[], None] = lambda: None,
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``--repeat`` alternating runs of ``cfg`` on both devices."""
        out: list[tuple[dict[str, Any], dict[str, Any]]] = []
        with theirs() as (q_sock, q_pid), mine() as (v_sock, v_pid):
            control = Path(v_sock).with_name("virtblk.ctl")
            for rep in range(self.args.repeat):
                before()
                q = measure(q_sock, q_pid, cfg)
                before()
                v = measure(v_sock, v_pid, cfg, control)
                for device, row in (("qsd", q), ("virtblk", v)):
                    row.update(section=name, device=device, repeat=rep)
                    self.rows.append(row)
                out.append((q, v))
                print(f"  {name} depth {cfg.iodepth} x{cfg.numjobs} #{rep}: IOPS qsd "
                      f"{q['iops']:,.0f} ours {v['iops']:,.0f}; device CPU/IO qsd "
                      f"{q['device_cpu_us_per_io']} ours {v['device_cpu_us_per_io']} us; "
                      f"driver CPU/IO {q['driver_cpu_us_per_io']} / "
                      f"{v['driver_cpu_us_per_io']} us", flush=True)
        return out

    def ratio(self, key: str, values: list[float]) -> None:
        self.ratios.setdefault(key, {})["median"] = _median(values)
        self.ratios[key]["runs"] = [round(v, 3) for v in values]  # type: ignore[assignment]


def main() -> int:
    """Run the sections asked for; print and (``--json``) record the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--batch-min", type=int, default=1,
                    help="the driver's iodepth_batch_complete_min")
    ap.add_argument("--driver-poll-us", type=float, default=0,
                    help="the driver's adaptive polling time (bench --poll-us)")
    ap.add_argument("--serve-args", default="", help="extra virtblk serve options")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    sections = args.sections.split(",")
    run = Run(args)
    extra = args.serve_args.split()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "driver" in sections or "device" in sections:
            for depth in (1, 32, 128):
                pairs = run.pair("null", lambda: qemu_storage_daemon(tmp),
                                 lambda: ours(tmp, "--null", str(SIZE), *extra),
                                 run.cfg(depth))  # fmt: skip
                q_cpu = [q["device_cpu_us_per_io"] for q, _ in pairs]
                if depth in (1, 32):
                    run.ratio(f"driver_cpu_over_qsd_cpu_d{depth}",
                              [q["driver_cpu_us_per_io"] / c for (q, _), c in zip(pairs, q_cpu,
                                                                                  strict=True)])
                run.ratio(f"device_iops_over_qsd_d{depth}",
                          [v["iops"] / q["iops"] for q, v in pairs])
                run.ratio(f"device_cpu_over_qsd_d{depth}",
                          [v["device_cpu_us_per_io"] / q["device_cpu_us_per_io"]
                           for q, v in pairs])
                run.ratio(f"our_driver_cpu_on_our_device_over_qsd_cpu_d{depth}",
                          [v["driver_cpu_us_per_io"] / q["device_cpu_us_per_io"]
                           for q, v in pairs])
                if depth == 1:
                    run.ratio("device_round_trip_over_qsd_d1",
                              [v["lat_mean_ns"] / q["lat_mean_ns"] for q, v in pairs])
        if "queues" in sections:
            pairs = run.pair("two queues", lambda: qemu_storage_daemon(tmp, num_queues=2),
                             lambda: ours(tmp, "--null", str(SIZE), *extra, num_queues=2),
                             run.cfg(32, numjobs=2))  # fmt: skip
            run.ratio("two_queues_iops_over_qsd_d32", [v["iops"] / q["iops"] for q, v in pairs])
            run.ratio("two_queues_device_cpu_over_qsd_d32",
                      [v["device_cpu_us_per_io"] / q["device_cpu_us_per_io"]
                       for q, v in pairs])
        if "file" in sections:
            image = tmp / "image.raw"
            make_image(image)
            pairs = run.pair("file", lambda: qsd_file(image, tmp),
                             lambda: ours(tmp, "--file", str(image), *extra),
                             run.cfg(32), before=lambda: drop_cache(image))  # fmt: skip
            run.ratio("file_iops_over_qsd_d32", [v["iops"] / q["iops"] for q, v in pairs])
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "cpu": cpu_model(), "kernel": platform.release(),
                    "python": platform.python_version(), "qsd": _qsd_version()},
        "args": vars(args),
        "ratios": run.ratios,
        "runs": run.rows,
    }
    print(f"\nratios, median of {args.repeat} (ours / qemu-storage-daemon):")
    for key, value in run.ratios.items():
        print(f"  {key:<52} {value['median']:>7}   runs {value['runs']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0



def _qsd_version() -> str:
    out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True,
                         check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


if __name__ == "__main__":
    sys.exit(main())
