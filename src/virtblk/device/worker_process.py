"""Queue workers in processes of their own: a device not bound by one interpreter lock.

``BlkDevice(workers="process")`` spawns one :class:`WorkerProcess` per queue when it is
created.  Each runs ``python -m virtblk.device.worker_process``: a thread-mode
``BlkDevice`` over the same storage (a file's descriptors, the memory disk's memfd, or a
null disk), whose one queue it serves.  The vhost-user connection stays in the main
process; what a worker needs to serve a ring crosses a private socketpair with the file
descriptors attached (``SCM_RIGHTS``): the guest memory regions' memfds, the ring
addresses and indices, the kick and call eventfds.  Guest memory is shared, so the worker
reads and writes it exactly as a thread would.

The messages (parent to worker, each answered):

* ``init``: the device's settings and its storage (with fds; an RBD image's worker
  connects to the cluster itself), once;
* ``start``: a ring to serve (memory regions, addresses, eventfds, features and the
  device state; for a split ring its indices, for a packed ring its 32-bit
  ``vring_base``; with vhost-user INFLIGHT_SHMFD, the in-flight buffer's memfd, where the
  queue's journal lies in it, its counter and what is still to resubmit: a split ring's
  heads, a packed ring's chains whole, as the main process recovered them);
* ``stop``: stop serving; answers the ring's ``vring_base`` (a split ring's next avail
  index, a packed ring's positions and wrap counters) and the queue's counters;
* ``stats``: the queue's counters;
* ``state``: the size, read-only flag or cache mode changed (a shrink is followed here
  before the main process truncates the memory disk);
* ``exit`` (or the socket closing, when the main process dies): leave.

Both ends are this package, so messages are pickled: the channel is a socketpair between
a process and the child it spawned, never anything a peer can reach.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from virtblk.device.backends import Backend, FileBackend, MemoryBackend, NullBackend
from virtblk.device.queue_worker import Ring
from virtblk.device.rbd import RbdBackend
from virtblk.virtio.inflight import InflightJournal
from virtblk.virtio.inflight_packed import PackedInflightJournal
from virtblk.virtio.memory import GuestMemory, MemoryRegion
from virtblk.virtio.packed_device import PackedDeviceVirtqueue
from virtblk.virtio.packed_layout import decode_vring_base
from virtblk.virtio.split_device import DeviceVirtqueue
from virtblk.virtio.split_layout import VringAddrs

log = logging.getLogger("virtblk.device")

_MAX_MESSAGE = 1 << 20
_MAX_FDS = 253  # SCM_MAX_FD
_REPLY_TIMEOUT = 30.0


class WorkerError(RuntimeError):
    """A worker process failed or went away."""


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = pickle.dumps(message)
    if len(data) > _MAX_MESSAGE:
        raise WorkerError(f"message {message.get('op')!r} of {len(data)} bytes is too large")
    socket.send_fds(sock, [data], list(fds))


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message: dict[str, Any] = pickle.loads(data)
    return message, fds


def storage_of(backend: Backend) -> tuple[dict[str, Any], list[int]]:
    """How a worker opens ``backend``'s storage: a description and the fds to pass."""
    if isinstance(backend, FileBackend):
        fds = [backend.fd, backend.dsync_fd, backend.direct_fd]
        return ({"kind": "file", "path": backend.path, "read_only": backend.read_only,
                 "present": [fd >= 0 for fd in fds]}, [fd for fd in fds if fd >= 0])
    if type(backend) is MemoryBackend:
        return {"kind": "memory", "size": backend.size}, [backend.fd]
    if isinstance(backend, NullBackend):
        return {"kind": "null", "size": backend.size, "read_zeroes": backend.read_zeroes}, []
    if isinstance(backend, RbdBackend):
        # No descriptor to pass: the worker connects to the cluster itself (a librados
        # connection is threads and sockets of one process).
        return {"kind": "rbd", "spec": backend.spec, "conf": backend.conf,
                "client_id": backend.client_id, "read_only": backend.read_only,
                "op_timeout": backend.op_timeout,
                "connect_timeout": backend.connect_timeout}, []
    raise ValueError(f"{type(backend).__name__} cannot be served from worker processes")


def _open_storage(desc: dict[str, Any], fds: list[int]) -> Backend:
    kind = desc["kind"]
    if kind == "file":
        received = iter(fds)
        plain, dsync, direct = (next(received) if present else -1
                                for present in desc["present"])
        return FileBackend.attach(desc["path"], plain, dsync, direct,
                                  read_only=desc["read_only"])
    if kind == "memory":
        return MemoryBackend.attach(fds[0], desc["size"])
    if kind == "rbd":
        return RbdBackend(desc["spec"], conf=desc["conf"], client_id=desc["client_id"],
                          read_only=desc["read_only"], op_timeout=desc["op_timeout"],
                          connect_timeout=desc["connect_timeout"])
    return NullBackend(desc["size"], read_zeroes=desc["read_zeroes"])


class WorkerProcess:
    """The main process's handle on one queue's worker process."""

    def __init__(self, index: int, settings: dict[str, Any], backend: Backend) -> None:
        """Spawn the worker for queue ``index`` of a device made with ``settings`` (the
        ``BlkDevice`` keyword arguments) over ``backend``'s storage.

        The worker dies with the thread that spawned it (``PR_SET_PDEATHSIG`` follows the
        thread, not the process): spawn from a thread that lives as long as the device,
        as ``virtblk serve`` and the embedded device do (the main thread, and the
        session thread that replaces a dead worker)."""
        self.index = index
        self.settings = settings
        self.last_stats: dict[str, Any] = {}
        self.dead = False
        """True once the worker stopped answering (it exited, or a reply timed out)."""
        # One request at a time, answered in order: the vhost-user thread (start, stop)
        # and control threads (stats, state) share the socket.
        self._lock = threading.Lock()
        self._seq = 0
        desc, fds = storage_of(backend)  # refuses storage a worker cannot open, first
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        level = logging.getLogger("virtblk").getEffectiveLevel()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "virtblk.device.worker_process", str(theirs.fileno()),
                 str(level)],
                pass_fds=[theirs.fileno()],
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Sent now, read when the child has imported: the two overlap.
        try:
            _send(ours, {"op": "init", "index": index, "settings": settings, "storage": desc},
                  fds)
        except BaseException:
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._proc.pid

    @property
    def socket_fd(self) -> int:
        """The main process's end of the worker's socket (it hangs up when the worker
        dies)."""
        return self._sock.fileno()

    def _call(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """Send one request and wait for its answer.  A worker that does not answer in
        time is killed: its state is unknown, and a late answer must not be taken for the
        next request's."""
        with self._lock:
            if self.dead:
                raise WorkerError(f"queue {self.index} worker (pid {self.pid}) is gone")
            self._seq += 1
            try:
                _send(self._sock, {**message, "seq": self._seq}, fds)
                self._sock.settimeout(_REPLY_TIMEOUT)
                reply, extra = _recv(self._sock)
            except TimeoutError as exc:
                self._proc.kill()
                raise WorkerError(self._gone(f"no answer to {message['op']} in "
                                             f"{_REPLY_TIMEOUT:.0f} s")) from exc
            except OSError as exc:
                raise WorkerError(self._gone(str(exc))) from exc
            for fd in extra:
                os.close(fd)
            if reply is None:
                raise WorkerError(self._gone("it closed its socket"))
            if reply.get("seq") != self._seq:
                self._proc.kill()
                raise WorkerError(self._gone(f"answered request {reply.get('seq')} to "
                                             f"{self._seq}"))
        if "error" in reply:
            raise WorkerError(f"queue {self.index} worker: {reply['error']}")
        return reply

    def _gone(self, what: str) -> str:
        """Why the worker stopped answering, for the error (it is dead from now on)."""
        self.dead = True
        try:
            status = self._proc.wait(1)
        except subprocess.TimeoutExpired:
            return f"queue {self.index} worker (pid {self.pid}) stopped answering: {what}"
        how = f"killed by signal {-status}" if status < 0 else f"with status {status}"
        return f"queue {self.index} worker (pid {self.pid}) exited {how}"

    def start(
        self, vq: Ring, kick_fd: int, call_fd: int, state: dict[str, Any],
        poll_ns: int,
    ) -> None:
        """Serve ``vq``, a split or packed ring (its memory and ring as the main process
        mapped them)."""
        regions = vq.memory.regions
        a = vq.addrs
        fds = [r.fd for r in regions] + [kick_fd] + ([call_fd] if call_fd >= 0 else [])
        journal = vq.inflight
        inflight: dict[str, Any] | None = None
        if journal is not None:
            if journal.region is None:
                raise WorkerError(f"queue {self.index}: its in-flight journal is not in a "
                                  "buffer another process can map")
            buf = journal.region
            resubmit: list[Any] = (vq.resubmit_chains if isinstance(vq, PackedDeviceVirtqueue)
                                   else vq.resubmit_pending)
            inflight = {"size": buf.size, "mmap_offset": buf.mmap_offset,
                        "offset": journal.offset, "counter": journal.counter,
                        "resubmit": resubmit}
            fds.append(buf.fd)
        self._call({
            "op": "start",
            "regions": [(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset)
                        for r in regions],
            "ring": (a.num, a.desc, a.avail, a.used),
            "event_idx": vq.event_idx,
            "packed": isinstance(vq, PackedDeviceVirtqueue),
            "vring_base": vq.vring_base,
            "used_idx": vq.used_idx,
            "max_indirect": vq.max_indirect,
            "call": call_fd >= 0,
            "state": state,
            "poll_ns": poll_ns,
            "inflight": inflight,
        }, fds)

    def stop(self) -> int:
        """Stop serving; the ring's ``vring_base``, where to resume from."""
        reply = self._call({"op": "stop"})
        self.last_stats = reply["stats"]
        return int(reply["vring_base"])

    def stats(self) -> dict[str, Any]:
        """The queue's counters now."""
        self.last_stats = self._call({"op": "stats"})["stats"]
        return self.last_stats

    def set_state(self, state: dict[str, Any]) -> None:
        """Tell the worker the size, read-only flag or cache mode changed."""
        self._call({"op": "state", "state": state})

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to leave, then make sure it did."""
        try:
            _send(self._sock, {"op": "exit"})
        except OSError:
            pass
        self._sock.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("queue %d worker (pid %d) did not exit; killing it", self.index,
                        self.pid)
            self._proc.kill()
            self._proc.wait()


def _serve(sock: socket.socket) -> None:
    """The worker's main loop: answer the main process until it says exit or goes away."""
    from virtblk.device.blk import BlkDevice

    init, fds = _recv(sock)
    if init is None or init.get("op") != "init":
        return
    index: int = init["index"]
    device = BlkDevice(_open_storage(init["storage"], fds), **init["settings"])
    device.size_watch_interval = None  # the main process watches and tells us
    memory: GuestMemory | None = None
    ring_fds: list[int] = []
    inflight: MemoryRegion | None = None
    running = False
    try:
        while True:
            message, fds = _recv(sock)
            if message is None or message["op"] == "exit":
                return
            op = message["op"]
            try:
                if op == "start":
                    if running:
                        raise ValueError("the queue is already running")
                    # _start owns the fds from here, whatever happens.
                    received, fds = fds, []
                    memory, ring_fds, inflight = _start(device, index, message, received)
                    running = True
                    reply: dict[str, Any] = {"ok": True}
                elif op == "stop":
                    vring_base = device.stop_queue(index) if running else 0
                    running = False
                    memory, ring_fds, inflight = _release(memory, ring_fds, inflight)
                    reply = {"vring_base": vring_base, "stats": device.queue_stats(index)}
                elif op == "stats":
                    reply = {"stats": device.queue_stats(index)}
                elif op == "state":
                    device.apply_state(message["state"])
                    reply = {"ok": True}
                else:
                    reply = {"error": f"unknown message {op!r}"}
            except Exception as exc:
                log.exception("queue %d worker: %s failed", index, op)
                for fd in fds:  # fds no handler took (none expected but start's)
                    os.close(fd)
                reply = {"error": f"{op}: {exc}"}
            _send(sock, {**reply, "seq": message.get("seq")})
    finally:
        if running:
            device.stop_queue(index)
        _release(memory, ring_fds, inflight)
        device.backend.close()


def _release(
    memory: GuestMemory | None, ring_fds: list[int], inflight: MemoryRegion | None
) -> tuple[None, list[int], None]:
    """Unmap a stopped ring's memory and in-flight buffer, close its eventfds (our
    copies)."""
    if memory is not None:
        memory.close()
    if inflight is not None:
        inflight.close()
    for fd in ring_fds:
        os.close(fd)
    return None, [], None


def _start(
    device: Any, index: int, message: dict[str, Any], fds: list[int]
) -> tuple[GuestMemory, list[int], MemoryRegion | None]:
    """Map the ring's memory (and its in-flight buffer) and serve it on a thread of this
    process; the memory, the eventfds (ours to close after the ring stops) and the
    buffer's mapping."""
    regions = message["regions"]
    region_fds, rest = fds[: len(regions)], fds[len(regions):]
    spec = message.get("inflight")
    buffer_fd = rest.pop() if spec is not None else -1
    kick = rest[0]
    call = rest[1] if message["call"] else -1
    memory = GuestMemory()
    buffer: MemoryRegion | None = None
    try:
        for gpa, size, uva, offset in regions:
            fd = region_fds.pop(0)  # map_fd owns it now (and closes it if it fails)
            region = MemoryRegion.map_fd(fd, size=size, mmap_offset=offset,
                                         guest_phys_addr=gpa, user_addr=uva)
            try:
                memory.add(region)
            except BaseException:
                region.close()
                raise
        addrs = VringAddrs(*message["ring"])
        journal_at, counter, resubmit = ((spec["offset"], spec["counter"], spec["resubmit"])
                                         if spec is not None else (0, 0, []))
        if spec is not None:
            # The main process checked the buffer (size, seals) and recovered from it; we
            # take over its journal where it left it.
            fd, buffer_fd = buffer_fd, -1
            buffer = MemoryRegion.map_fd(fd, size=spec["size"], mmap_offset=spec["mmap_offset"],
                                         guest_phys_addr=0, user_addr=0)
        vq: Ring
        if message["packed"]:
            # The main process checked the base when it built the ring.
            packed_journal = None if buffer is None else PackedInflightJournal.in_region(
                buffer, journal_at, addrs.num, counter=counter, in_flight=resubmit)
            vq = PackedDeviceVirtqueue(memory, addrs, event_idx=message["event_idx"],
                                       max_indirect=message["max_indirect"],
                                       inflight=packed_journal, resubmit=resubmit,
                                       **decode_vring_base(message["vring_base"])._asdict())
        else:
            journal = None if buffer is None else InflightJournal.in_region(
                buffer, journal_at, addrs.num, counter=counter)
            vq = DeviceVirtqueue(memory, addrs,
                                 event_idx=message["event_idx"],
                                 last_avail_idx=message["vring_base"],
                                 used_idx=message["used_idx"],
                                 max_indirect=message["max_indirect"],
                                 inflight=journal,
                                 resubmit=resubmit)
        device.apply_state(message["state"])
        device.poll_ns = message["poll_ns"]
        device.start_queue(index, vq, kick, call)
    except BaseException:
        memory.close()
        if buffer is not None:
            buffer.close()
        for fd in region_fds + rest + ([buffer_fd] if buffer_fd >= 0 else []):
            os.close(fd)
        raise
    return memory, rest, buffer


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL), then check the parent did not die before it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    if os.getppid() == 1:
        os._exit(0)


def main(argv: list[str]) -> int:
    """``python -m virtblk.device.worker_process FD LOG_LEVEL``."""
    fd, level = int(argv[0]), int(argv[1])
    # The main process decides when a worker stops (it says so, or its end of the socket
    # closes when it dies); a Ctrl-C or SIGTERM sent to the whole process group is its.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # And should the main process die while this one is stuck (a disk that never answers),
    # the kernel ends this one too: a worker never outlives its device.
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING,
                        format=f"virtblk-queue-worker[{os.getpid()}]: %(message)s")
    logging.getLogger("virtblk").setLevel(level)
    sock = socket.socket(fileno=fd)
    try:
        _serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
