"""``virtblk serve``: a vhost-user-blk device that QEMU, qemu-style frontends and our own
driver use as their disk."""

from __future__ import annotations

import logging
import re
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from virtblk.cli.params import SIZE
from virtblk.util import human_size

if TYPE_CHECKING:  # imported where it is used, as the device modules are (not for --help)
    from virtblk.device.options import BackendKind
    from virtblk.spec import Lifetime

log = logging.getLogger("virtblk.serve")


@click.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(), help="Unix socket.")
@click.option("--file", "file_path", type=click.Path(), help="Serve this raw image (or device).")
@click.option("--memory", "memory_size", type=SIZE, help="Serve a RAM disk of this size.")
@click.option("--null", "null_size", type=SIZE, help="Serve a null device of this size.")
@click.option("--rbd", "rbd_image", metavar="POOL/IMAGE",
              help="Serve a Ceph RBD image (POOL/[NAMESPACE/]IMAGE[@SNAP]; a snapshot is "
                   "served read-only). Needs Debian's python3-rados and python3-rbd.")
@click.option("--nbd", "nbd_uri", metavar="URI",
              help="Serve an NBD export: nbd://HOST[:PORT]/EXPORT or "
                   "nbd+unix:///EXPORT?socket=PATH (no TLS). One connection, all queues "
                   "on threads; a lost server answers IOERR and is dialled again.")
@click.option("--ceph-conf", type=click.Path(dir_okay=False),
              help="With --rbd: the cluster's ceph.conf (default: /etc/ceph/ceph.conf).")
@click.option("--ceph-id", metavar="NAME",
              help="With --rbd: the client name, without 'client.' (default: admin).")
@click.option("--rbd-op-timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="With --rbd: fail a request (IOERR) the cluster has not answered in S "
                   "seconds (default: wait, as librbd does).")
@click.option("--size", type=SIZE,
              help="With --file or --rbd: create the image with this size if it is missing.")
@click.option("--read-only", is_flag=True, help="Offer VIRTIO_BLK_F_RO; writes fail.")
@click.option("--num-queues", type=int, default=1, show_default=True, help="Request queues.")
@click.option(
    "--queue-size", type=int, default=256, show_default=True, help="Largest ring accepted."
)
@click.option("--serial", default="",
              help="GET_ID answer (at most 20 bytes; with --rbd, the image's name by default).")
@click.option("--blk-size", type=int, default=512, show_default=True, help="Logical block size.")
@click.option("--zoned", is_flag=True, help="With --memory: a host-managed zoned disk.")
@click.option("--zone-size", type=SIZE, default="4M", show_default=True, help="With --zoned.")
@click.option("--zone-capacity", type=SIZE, help="With --zoned: writable bytes per zone.")
@click.option("--max-open-zones", type=int, default=0, show_default=True, help="0: no limit.")
@click.option("--max-active-zones", type=int, default=0, show_default=True, help="0: no limit.")
@click.option("--conventional-zones", type=int, default=0, show_default=True,
              help="With --zoned: this many randomly writable zones first.")
@click.option("--control", "control_path", type=click.Path(),
              help="Also listen here for JSON-lines control requests (resize, set-read-only, "
                   "set-cache-mode, stats, get-config); see `virtblk control`.")
@click.option("--writeback/--writethrough", default=True, show_default=True,
              help="Initial cache mode (the driver may switch it with CONFIG_WCE).")
@click.option("--physical-block-size", type=SIZE,
              help="Topology: a power-of-two multiple of --blk-size.")
@click.option("--alignment-offset", type=SIZE, default=0, show_default=True,
              help="Topology: bytes, a multiple of --blk-size.")
@click.option("--min-io-size", type=SIZE, default=0, show_default=True,
              help="Topology: bytes, a multiple of --blk-size.")
@click.option("--opt-io-size", type=SIZE, default=0, show_default=True,
              help="Topology: bytes, a multiple of --blk-size.")
@click.option("--geometry", metavar="C/H/S", help="Offer VIRTIO_BLK_F_GEOMETRY with this CHS.")
@click.option("--max-discard-sectors", type=int, help="Discard limit per segment (sectors).")
@click.option("--max-discard-seg", type=int, help="Discard segments per request.")
@click.option("--discard-alignment", type=int, help="Discard alignment (sectors).")
@click.option("--max-write-zeroes-sectors", type=int, help="Write-zeroes limit (sectors).")
@click.option("--max-write-zeroes-seg", type=int, help="Write-zeroes segments per request.")
@click.option("--lifetime", metavar="PRE_EOL,A,B",
              help="Offer VIRTIO_BLK_F_LIFETIME: pre-EOL info and the two wear estimates.")
@click.option("--experimental-fua", is_flag=True,
              help="Offer the proposed VIRTIO_BLK_F_OUT_FUA (request type 27).")
@click.option("--poll-us", type=click.FloatRange(min=0), default=None,
              help="Poll an empty ring up to this many microseconds before sleeping "
              "(adaptive, as QEMU's poll-max-ns); 0 never polls.  [default: 128 with "
              "worker processes, 0 with threads]")
@click.option("--io-threads", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --file: reads and writes each queue keeps in flight on the disk "
              "(a thread each).")
@click.option("--aio", type=click.Choice(["native", "threads"]), default="native",
              show_default=True,
              help="With --file: Linux AIO on an O_DIRECT descriptor (qemu's aio=native; "
              "threads where the filesystem refuses O_DIRECT) or --io-threads threads.")
@click.option("--workers", type=click.Choice(["process", "thread"]), default=None,
              help="Serve each queue from a process of its own (default; not with --zoned) "
              "or from a thread of this process.")
@click.option("--accept-unsealed-memory", is_flag=True,
              help="Map guest memory whose file is not sealed against shrinking (e.g. "
              "memory-backend-file): a frontend that truncated it would kill this device "
              "with SIGBUS. By default such memory is refused.")
@click.option("--inflight/--no-inflight", default=True, show_default=True,
              help="Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: requests in flight are "
              "recorded in a buffer the frontend keeps, and a device restarted on the same "
              "socket resubmits them. --no-inflight hides it (as qemu-storage-daemon 7.2).")
@click.option("--packed/--no-packed", default=True, show_default=True,
              help="Offer VIRTIO_F_RING_PACKED (the driver chooses packed or split rings). "
              "--no-packed hides it: every driver uses split rings.")
def serve(
    socket_path: str,
    file_path: str | None,
    memory_size: int | None,
    null_size: int | None,
    rbd_image: str | None,
    nbd_uri: str | None,
    ceph_conf: str | None,
    ceph_id: str | None,
    rbd_op_timeout: float | None,
    size: int | None,
    read_only: bool,
    num_queues: int,
    queue_size: int,
    serial: str,
    blk_size: int,
    zoned: bool,
    zone_size: int,
    zone_capacity: int | None,
    max_open_zones: int,
    max_active_zones: int,
    conventional_zones: int,
    control_path: str | None,
    writeback: bool,
    physical_block_size: int | None,
    alignment_offset: int,
    min_io_size: int,
    opt_io_size: int,
    geometry: str | None,
    max_discard_sectors: int | None,
    max_discard_seg: int | None,
    discard_alignment: int | None,
    max_write_zeroes_sectors: int | None,
    max_write_zeroes_seg: int | None,
    lifetime: str | None,
    experimental_fua: bool,
    poll_us: float | None,
    io_threads: int,
    aio: str,
    workers: str | None,
    accept_unsealed_memory: bool,
    inflight: bool,
    packed: bool,
) -> None:
    """Serve one backend over vhost-user until SIGTERM or SIGINT.

    Exactly one of --file, --memory, --null, --rbd, --nbd.  One worker per queue; a frontend
    that disconnects leaves the server ready for the next.
    """
    from virtblk.device.control import ControlServer
    from virtblk.device.options import BlkSettings, DeviceOptions
    from virtblk.device.rbd import RbdError  # plain Python: the bindings load on use
    from virtblk.nbd.client import NbdError
    from virtblk.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES, WITHOUT_INFLIGHT
    from virtblk.vhost_user.server import VhostUserServer

    chosen = [x for x in (file_path, memory_size, null_size, rbd_image, nbd_uri)
              if x is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --file, --memory, --null, --rbd, --nbd")
    if rbd_image is None:
        for option, value in (("--ceph-conf", ceph_conf), ("--ceph-id", ceph_id),
                              ("--rbd-op-timeout", rbd_op_timeout)):
            if value is not None:
                raise click.UsageError(f"{option} goes with --rbd")
    if size is not None and file_path is None and rbd_image is None:
        raise click.UsageError("--size goes with --file or --rbd (--memory and --null "
                               "take their size, --nbd the server's)")
    if zoned and workers == "process":
        raise click.UsageError("--zoned serves its queues from threads (--workers thread)")
    if zoned and memory_size is None:
        raise click.UsageError("--zoned needs --memory")
    limits = {
        name: _in_range(f"--{name.replace('_', '-')}", value, 0xFFFFFFFF)
        for name, value in (
            ("max_discard_sectors", max_discard_sectors),
            ("max_discard_seg", max_discard_seg),
            ("discard_sector_alignment", discard_alignment),
            ("max_write_zeroes_sectors", max_write_zeroes_sectors),
            ("max_write_zeroes_seg", max_write_zeroes_seg),
        )
        if value is not None
    }
    try:  # the options judge their own values (BlkSettings, DeviceOptions)
        settings = BlkSettings(
            serial=serial,
            blk_size=blk_size,
            writeback=writeback,
            **_topology(blk_size, physical_block_size, alignment_offset, min_io_size, opt_io_size),
            geometry=None if geometry is None else _geometry(geometry),
            lifetime=None if lifetime is None else _lifetime(lifetime),
            fua=experimental_fua,
            poll_us=poll_us,
            io_threads=io_threads,
            aio=aio,  # type: ignore[arg-type]
            packed=packed,
            **limits,
        )
        backend: BackendKind = ("file" if file_path is not None
                                else "rbd" if rbd_image is not None
                                else "nbd" if nbd_uri is not None
                                else "memory" if memory_size is not None else "null")
        opts = DeviceOptions(
            backend=backend,
            size={"file": size, "rbd": size, "nbd": size, "memory": memory_size,
                  "null": null_size}[backend],
            path={"rbd": rbd_image, "nbd": nbd_uri}.get(backend, file_path),
            ceph_conf=ceph_conf,
            ceph_id=ceph_id,
            rbd_op_timeout=rbd_op_timeout,
            read_only=read_only,
            num_queues=num_queues,
            queue_size=queue_size,
            device=settings,
            zoned={"zone_size": zone_size, "zone_capacity": zone_capacity,
                   "max_open_zones": max_open_zones, "max_active_zones": max_active_zones,
                   "conventional_zones": conventional_zones} if zoned else None,
            workers=workers,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        device = opts.build()
    except (OSError, ValueError, RbdError, NbdError) as exc:
        # RbdError: the cluster, pool, image or permission, or the bindings are missing;
        # NbdError: the NBD server cannot be reached, has no such export, wants TLS...
        raise click.ClickException(str(exc)) from exc
    try:
        server = VhostUserServer(
            socket_path, device, accept_unsealed_memory=accept_unsealed_memory,
            protocol_features=DEFAULT_PROTOCOL_FEATURES if inflight else WITHOUT_INFLIGHT)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    control: ControlServer | None = None
    if control_path is not None:
        try:
            control = ControlServer(control_path, device).start()
        except OSError as exc:
            server.close()
            raise click.ClickException(f"control socket {control_path}: {exc}") from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(
        f"virtblk: serving {opts.describe()} {human_size(device.backend.size)} on {socket_path} "
        f"({num_queues} queue{'s' if num_queues > 1 else ''}"
        f"{', read-only' if read_only else ''}{', zoned' if zoned else ''}"
        f", {device.cache_mode}"
        f"{f', control {control_path}' if control_path else ''})",
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        if control is not None:
            control.close()
        device.close()
        device.backend.close()
    sys.exit(0)


def _in_range(option: str, value: int, top: int, bottom: int = 0) -> int:
    if not bottom <= value <= top:
        raise click.UsageError(f"{option} must be in {bottom}..{top}, got {value}")
    return value


def _blocks(option: str, value: int, blk_size: int, top: int) -> int:
    """Bytes on the command line, logical blocks in the config space."""
    if value % blk_size:
        raise click.UsageError(f"{option} {value} is not a multiple of --blk-size {blk_size}")
    return _in_range(f"{option} (in {blk_size}-byte blocks)", value // blk_size, top)


def _topology(
    blk_size: int, physical: int | None, alignment: int, min_io: int, opt_io: int,
) -> dict[str, Any]:
    """The config's topology fields (``physical_block_exp``, the rest in logical blocks)."""
    exp = 0
    if physical is not None:
        ratio, rest = divmod(physical, blk_size)
        if rest or ratio < 1 or ratio & (ratio - 1):
            raise click.UsageError(
                f"--physical-block-size {physical} must be a power-of-two multiple of "
                f"--blk-size {blk_size}")
        exp = _in_range("--physical-block-size (as a power of two)", ratio.bit_length() - 1,
                        0xFF)
    return {
        "physical_block_exp": exp,
        "alignment_offset": _blocks("--alignment-offset", alignment, blk_size, 0xFF),
        "min_io_size": _blocks("--min-io-size", min_io, blk_size, 0xFFFF),
        "opt_io_size": _blocks("--opt-io-size", opt_io, blk_size, 0xFFFFFFFF),
    }


def _geometry(text: str) -> tuple[int, int, int]:
    """``C/H/S`` with the config's widths: 16-bit cylinders, 8-bit heads and sectors."""
    match = re.fullmatch(r"(\d+)/(\d+)/(\d+)", text.strip())
    if match is None:
        raise click.UsageError(f"--geometry {text!r} is not C/H/S (e.g. 1024/16/63)")
    c, h, s = (int(g) for g in match.groups())
    return (_in_range("--geometry cylinders", c, 0xFFFF),
            _in_range("--geometry heads", h, 0xFF, 1),
            _in_range("--geometry sectors", s, 0xFF, 1))


def _lifetime(text: str) -> Lifetime:
    from virtblk.spec import Lifetime

    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise click.UsageError(f"--lifetime {text!r} is not PRE_EOL,A,B (e.g. 1,2,3)")
    pre_eol, a, b = (_in_range("--lifetime values", int(p), 0xFFFF) for p in parts)
    return Lifetime(pre_eol, a, b)
