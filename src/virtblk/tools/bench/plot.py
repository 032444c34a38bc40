"""The picture of a run: latency distribution and IOPS over time (``--plot``)."""

from __future__ import annotations

import numpy as np

from virtblk.tools.bench.config import SAMPLE_NS
from virtblk.tools.bench.results import BenchResult


def plot(result: BenchResult, path: str, title: str = "") -> None:
    """Draw the latency distribution (CDF, log x) and IOPS over time into a PNG.
    Needs matplotlib (the ``plot`` extra); ImportError says so otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install 'virtblk[plot]'"
        ) from exc
    fig, (ax_lat, ax_iops) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, d, color in (("read", result.read, "tab:blue"), ("write", result.write,
                                                               "tab:orange")):
        if not d.ios:
            continue
        lat_us = np.sort(d.lat_ns) / 1000
        frac = np.arange(1, len(lat_us) + 1) / len(lat_us)
        ax_lat.plot(lat_us, frac * 100, color=color, label=f"{name} ({d.ios:,} I/Os)")
        p50, p99 = np.percentile(lat_us, [50, 99])
        for p, style in ((p50, ":"), (p99, "--")):
            ax_lat.axvline(p, color=color, linestyle=style, linewidth=0.8)
        t = (np.arange(len(d.samples)) + 1) * SAMPLE_NS / 1e9
        iops = np.asarray(d.samples, dtype=np.float64) * (1e9 / SAMPLE_NS)
        ax_iops.plot(t, iops, marker="o", markersize=3, color=color, label=name)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("completion latency (µs, log scale); dotted p50, dashed p99")
    ax_lat.set_ylabel("I/Os completed within (%)")
    ax_lat.set_ylim(0, 100)
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(loc="lower right")
    ax_lat.set_title("latency distribution (CDF)")
    ax_iops.set_xlabel("time (s)")
    ax_iops.set_ylabel(f"IOPS (averaged over {SAMPLE_NS // 1_000_000} ms)")
    ax_iops.set_ylim(bottom=0)
    ax_iops.grid(True, alpha=0.3)
    ax_iops.legend(loc="lower right")
    ax_iops.set_title("IOPS over time")
    c = result.config
    fig.suptitle(
        title
        or f"{c.rw} bs={c.bs} iodepth={c.iodepth} numjobs={c.numjobs} ioengine={c.ioengine}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
