"""Our device over an RBD image against qemu-storage-daemon's and fio's, one image, one run.

A fresh one-node Ceph cluster (tests/peers/ceph.py: one monitor, one memstore OSD) holds
one image, written all through first (``rbd bench``), so reads hit real objects.  On it:

* ``virtblk serve --rbd``: our driver (``virtblk bench``'s engine, ``ioengine=queue``)
  against our device;
* qemu-storage-daemon exporting the same image through its own ``rbd`` block driver, under
  the same driver;
* fio's ``rbd`` engine on the image: librbd driven from C with nothing in between, what a
  client of this cluster can do at best.

Every client runs with librbd's cache off (our device turns it off; qemu-storage-daemon
does for ``cache.direct=on``; fio reads a ``[client]`` section that says so), and both
devices are put in write-back mode by the driver (fio's ``rbd`` engine does not flush
either).  4 KiB random reads (and writes, ``--workloads``) at depth 1 and 32; each workload
runs ``--repeat`` times, the three clients one after the other each time, and the ratios
(ours over qsd) are computed per repetition and their median reported.  CPU per I/O: the
driver's (our bench process), the device's (its process and its workers, from /proc),
fio's (its whole process, librbd's threads included, less what its start-up costs alone)
and the OSD's (from /proc): on a small machine the cluster shares the CPUs with the client.

    python benchmarks/rbd_peers.py [--runtime 5] [--repeat 3] [--size 1G]
        [--workloads randread:1,randread:32,randwrite:1,randwrite:32]
        [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from daemons import cpu_model, serving  # benchmarks/daemons.py

from virtblk import Disk
from virtblk.tools.bench import BenchConfig, run_bench
from virtblk.util import parse_size, process_cpu_seconds

# The cluster and qemu-storage-daemon as the tests start them (tests/peers/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from peers.ceph import POOL, CephCluster
from peers.qsd import QemuStorageDaemon

PEERS = ("qsd", "virtblk", "fio")

#: The ratios, in the table's order; the first is the issue's goal (>= 0.9).
RATIOS = ("iops_over_qsd", "device_cpu_over_qsd", "lat_over_qsd", "iops_over_fio",
          "qsd_iops_over_fio")  # fmt: skip

#: One run of a workload (rw, iodepth, runtime in seconds) on one client: its figures.
Measure = Callable[[str, int, float], dict[str, Any]]
LABELS = {
    "virtblk": "`virtblk serve --rbd`",
    "qsd": "qemu-storage-daemon `driver=rbd`",
    "fio": "fio `ioengine=rbd`",
}


@contextlib.contextmanager
def ours(tmp: Path, spec: str, conf: Path) -> Iterator[tuple[str, int]]:
    """``virtblk serve --rbd`` on the image, one queue; yields (socket, pid)."""
    sock = tmp / "virtblk.sock"
    argv = [sys.executable, "-m", "virtblk", "serve", "--socket", str(sock), "--rbd", spec,
            "--ceph-conf", str(conf), "--num-queues", "1"]  # fmt: skip
    with serving(argv, sock, "virtblk serve") as running:
        yield running


@contextlib.contextmanager
def qsd(tmp: Path, spec: str, conf: Path) -> Iterator[tuple[str, int]]:
    """qemu-storage-daemon exporting the image through its rbd driver, librbd's cache off
    (``cache.direct=on``), one queue; yields (socket, pid)."""
    with QemuStorageDaemon(tmp / "qsd.sock", rbd=spec, ceph_conf=conf, cache_direct=True) as d:
        assert d.process is not None
        yield str(d.socket_path), d.process.pid


class Osd:
    """The OSD's CPU seconds, to charge the cluster's share of a run to its I/O."""

    def __init__(self, cluster: CephCluster) -> None:
        assert cluster.osd is not None
        self.pid = cluster.osd.pid

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid)


def bench(sock: str, pid: int, rw: str, depth: int, runtime: float) -> dict[str, Any]:
    """One ``virtblk bench`` run (a fresh connection, write-back) on the device at ``sock``."""
    cfg = BenchConfig(rw=rw, bs=4096, iodepth=depth, runtime=runtime,  # type: ignore[arg-type]
                      ioengine="queue")  # fmt: skip
    with Disk.connect(sock, num_queues=1, packed=False) as disk:
        disk.cache_mode = "write back"
        result = run_bench(disk, cfg, device_cpu=lambda: process_cpu_seconds(pid))
    row: dict[str, Any] = result.summary()
    if row["errors"]:
        raise RuntimeError(f"{row['errors']} I/O errors against {sock}")
    return {
        "iops": row["iops"],
        "ios": row["ios"],
        "lat_mean_us": row["lat_mean_ns"] / 1000,
        "driver_cpu_us_per_io": row["driver_cpu_us_per_io"],
        "device_cpu_us_per_io": row["device_cpu_us_per_io"],
    }


def _children_cpu() -> float:
    """CPU seconds of the children this process waited for (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fio(name: str, conf: Path, runtime: float, *options: str) -> tuple[dict[str, Any], float]:
    """Run fio with its ``rbd`` engine on the image: its job's JSON and the CPU seconds its
    whole process used (librados's and librbd's threads included: fio's own ``usr_cpu``
    and ``sys_cpu`` count only the job's thread, a fifth of it here)."""
    before = _children_cpu()
    out = subprocess.run(
        ["fio", "--name=rbd", "--ioengine=rbd", "--clientname=admin", f"--pool={POOL}",
         f"--rbdname={name}", "--bs=4k", "--randrepeat=0", "--norandommap",
         "--output-format=json", *options],
        capture_output=True, text=True, check=True, timeout=runtime + 120,
        env={**os.environ, "CEPH_CONF": str(conf)},
    ).stdout  # fmt: skip
    cpu = _children_cpu() - before
    job = json.loads(out[out.index("{") :])["jobs"][0]  # librados may print lines first
    if job["error"]:
        raise RuntimeError(f"fio failed: error {job['error']}")
    return job, cpu


def fio_startup_cpu(name: str, conf: Path) -> float:
    """The CPU seconds fio spends to connect, open the image and close it again (one read):
    taken off each run's CPU, so what is left is the runtime's (the median of three)."""
    return statistics.median(
        _fio(name, conf, 0, "--rw=randread", "--number_ios=1")[1] for _ in range(3)
    )


def fio(name: str, conf: Path, rw: str, depth: int, runtime: float,
        startup_cpu: float) -> dict[str, Any]:  # fmt: skip
    """One fio run with its ``rbd`` engine on the image; its figures."""
    job, cpu = _fio(name, conf, runtime, f"--rw={rw}", f"--iodepth={depth}",
                    f"--runtime={runtime}", "--time_based")  # fmt: skip
    side = job["write" if "write" in rw else "read"]
    ios = side["total_ios"]
    if not ios:
        raise RuntimeError(f"fio did no I/O: {side}")
    return {
        "iops": side["iops"],
        "ios": ios,
        "lat_mean_us": side["lat_ns"]["mean"] / 1000,
        "driver_cpu_us_per_io": (cpu - startup_cpu) / ios * 1e6,
        "device_cpu_us_per_io": None,
    }


def prefill(cluster: CephCluster, spec: str, size: int) -> None:
    """Write the whole image (4 MiB sequential writes), so every read finds an object."""
    cluster.rbd("bench", "--io-type", "write", "--io-size", "4M",
                "--io-threads", "4", "--io-pattern", "seq", "--io-total", str(size), spec,
                timeout=600)  # fmt: skip
    used = cluster.rbd("du", spec)
    print(f"prefilled {spec}:\n{used}", flush=True)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


class Run:
    """The record: every run, the medians and the ratios."""

    def __init__(self, args: argparse.Namespace, osd: Osd) -> None:
        self.args = args
        self.osd = osd
        self.rows: list[dict[str, Any]] = []

    def one(self, peer: str, rw: str, depth: int, rep: int, measure: Measure) -> None:
        """Run one workload on one client, with the OSD's CPU over it; record it."""
        before = self.osd.cpu()
        row = measure(rw, depth, self.args.runtime)
        row["osd_cpu_us_per_io"] = (self.osd.cpu() - before) / row["ios"] * 1e6
        row.update(peer=peer, rw=rw, iodepth=depth, repeat=rep)
        self.rows.append(row)
        device = row["device_cpu_us_per_io"]
        print(f"  {rw} depth {depth} #{rep} {peer:>7}: {row['iops']:>8,.0f} IOPS, "
              f"lat {row['lat_mean_us']:7.0f} us, CPU/IO driver {row['driver_cpu_us_per_io']:.1f}"
              f" device {'-' if device is None else f'{device:.1f}'} "
              f"OSD {row['osd_cpu_us_per_io']:.1f} us", flush=True)  # fmt: skip

    def runs(self, peer: str, rw: str, depth: int) -> list[dict[str, Any]]:
        return sorted((r for r in self.rows if (r["peer"], r["rw"], r["iodepth"]) ==
                       (peer, rw, depth)), key=lambda r: r["repeat"])  # fmt: skip


def summarize(run: Run, workloads: list[tuple[str, int]]) -> dict[str, Any]:
    """Medians per client and workload, and the per-repetition ratios ours/qsd."""
    out: dict[str, Any] = {}
    for rw, depth in workloads:
        key = f"{rw}_d{depth}"
        medians = {}
        for peer in PEERS:
            rows = run.runs(peer, rw, depth)
            medians[peer] = {
                field: (None if rows[0][field] is None
                        else _median([r[field] for r in rows]))
                for field in ("iops", "lat_mean_us", "driver_cpu_us_per_io",
                              "device_cpu_us_per_io", "osd_cpu_us_per_io")
            }  # fmt: skip
        pairs = list(zip(run.runs("qsd", rw, depth), run.runs("virtblk", rw, depth),
                         run.runs("fio", rw, depth), strict=True))  # fmt: skip
        ratios = {
            "iops_over_qsd": [v["iops"] / q["iops"] for q, v, _ in pairs],
            "device_cpu_over_qsd": [
                v["device_cpu_us_per_io"] / q["device_cpu_us_per_io"] for q, v, _ in pairs
            ],
            "lat_over_qsd": [v["lat_mean_us"] / q["lat_mean_us"] for q, v, _ in pairs],
            "iops_over_fio": [v["iops"] / f["iops"] for _, v, f in pairs],
            "qsd_iops_over_fio": [q["iops"] / f["iops"] for q, _, f in pairs],
        }
        out[key] = {
            "medians": medians,
            "ratios": {name: {"median": _median(values), "runs": [round(x, 3) for x in values]}
                       for name, values in ratios.items()},
        }  # fmt: skip
    return out


def _cell(ratio: dict[str, Any], bold: bool = False) -> str:
    """A ratio as the tables show it: the median, then the runs in brackets."""
    median = f"{ratio['median']:.2f}"
    runs = ", ".join(f"{x:.2f}" for x in ratio["runs"])
    return f"{f'**{median}**' if bold else median} [{runs}]"


def markdown(summary: dict[str, Any], repeat: int) -> str:
    """Two tables for the README: the medians per client, and the ratios ours/qsd."""
    lines = [
        "| workload | client | IOPS | mean latency (us) | client CPU/IO (us) "
        "| device CPU/IO (us) | OSD CPU/IO (us) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, entry in summary.items():
        rw, depth = key.rsplit("_d", 1)
        for peer in ("virtblk", "qsd", "fio"):
            m = entry["medians"][peer]
            device = m["device_cpu_us_per_io"]
            lines.append(
                f"| {rw}, depth {depth} | {LABELS[peer]} | {m['iops']:,.0f} "
                f"| {m['lat_mean_us']:,.0f} | {m['driver_cpu_us_per_io']:.1f} "
                f"| {'-' if device is None else f'{device:.1f}'} "
                f"| {m['osd_cpu_us_per_io']:.1f} |"
            )
    lines += [
        "",
        "| workload | IOPS, ours / qsd | device CPU/IO, ours / qsd | mean latency, ours / qsd "
        "| IOPS, ours / fio | IOPS, qsd / fio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, entry in summary.items():
        rw, depth = key.rsplit("_d", 1)
        r = entry["ratios"]
        cells = [_cell(r[name], bold=name == "iops_over_qsd") for name in RATIOS]
        lines.append(f"| {rw}, depth {depth} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Medians of {repeat} runs; ratios: the median of the per-run ratios [runs].")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Start the cluster, fill the image, run every workload on the three clients."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", default="1G", help="the image's size")
    ap.add_argument("--workloads", default="randread:1,randread:32,randwrite:1,randwrite:32")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--markdown", dest="markdown_path")
    args = ap.parse_args()
    size = parse_size(args.size)
    workloads = [(rw, int(depth)) for rw, depth in
                 (w.split(":") for w in args.workloads.split(","))]  # fmt: skip
    name = "bench"
    spec = f"{POOL}/{name}"
    started = time.monotonic()
    with CephCluster(memstore_bytes=size + (2 << 30)) as cluster, \
            tempfile.TemporaryDirectory(prefix="vb-rbd-", dir="/tmp") as tmpdir:  # fmt: skip
        tmp = Path(tmpdir)
        # Every librbd client of the cluster (fio's in particular) with its cache off, as
        # both devices open the image.
        with cluster.conf.open("a") as conf:
            conf.write("[client]\nrbd cache = false\n")
        cluster.rbd("create", "--size", f"{size}B", spec)
        prefill(cluster, spec, size)
        run = Run(args, Osd(cluster))
        startup = fio_startup_cpu(name, cluster.conf)
        print(f"fio's start-up and close: {startup * 1000:.0f} ms of CPU", flush=True)
        with qsd(tmp, spec, cluster.conf) as (q_sock, q_pid), \
                ours(tmp, spec, cluster.conf) as (v_sock, v_pid):  # fmt: skip
            clients: dict[str, Measure] = {
                "qsd": lambda rw, depth, runtime: bench(q_sock, q_pid, rw, depth, runtime),
                "virtblk": lambda rw, depth, runtime: bench(v_sock, v_pid, rw, depth, runtime),
                "fio": lambda rw, depth, runtime: fio(
                    name, cluster.conf, rw, depth, runtime, startup
                ),
            }
            for peer in PEERS:  # warm-up, not recorded: first connections, first reads
                clients[peer]("randread", 32, 1.0)
            for rw, depth in workloads:
                for rep in range(args.repeat):
                    # One after the other, the order rotated each time so that no client
                    # always runs first (or always right after another).
                    for peer in PEERS[rep % len(PEERS) :] + PEERS[: rep % len(PEERS)]:
                        run.one(peer, rw, depth, rep, clients[peer])
        ceph_version = cluster.ceph("version").strip()
    summary = summarize(run, workloads)
    table = markdown(summary, args.repeat)
    print("\n" + table)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "cpu": cpu_model(),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "qsd": _first_line("qemu-storage-daemon", "--version"),
                    "fio": _first_line("fio", "--version"), "ceph": ceph_version},
        "args": vars(args),
        "image_bytes": size,
        "fio_startup_cpu_s": round(startup, 3),
        "summary": summary,
        "runs": run.rows,
    }  # fmt: skip
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    if args.markdown_path:
        Path(args.markdown_path).write_text(table)
    return 0



def _first_line(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


if __name__ == "__main__":
    sys.exit(main())
