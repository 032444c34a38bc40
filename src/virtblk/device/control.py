"""The control socket of ``virtblk serve``: change a running device from the host.

A disk is resized, made read-only or switched between cache modes while a guest uses
it; those are host decisions, so they arrive on a separate Unix socket, never on the
vhost-user one (the frontend owns that).  The protocol is JSON lines, one request and
one answer per line, so ``socat`` or a three-line script can drive it::

    {"command": "resize", "size": "2G"}            -> {"ok": true, "size": ..., ...}
    {"command": "set-read-only", "read_only": true} -> {"ok": true, "read_only": true, ...}
    {"command": "set-cache-mode", "mode": "write through"}
    {"command": "stats"}                            -> {"ok": true, "stats": {...}, ...}
    {"command": "get-config"}                       -> {"ok": true, "config": {...}, ...}

Anything wrong (bad JSON, unknown command, a refused change) answers
``{"ok": false, "error": "..."}`` and keeps the connection open.

Each change that alters what the driver should see sends CONFIG_CHANGE_MSG to the
connected frontend (``BlkDevice`` calls its ``config_changed`` hook).  Read-only at
run time is special: VIRTIO_BLK_F_RO is fixed at feature negotiation, so the driver is
not told through a feature bit.  The device fails every write, discard, write-zeroes
and secure-erase with IOERR from then on and still sends a config change (the config
space itself is unchanged); drivers see their writes fail with EIO.

:func:`handle_request` is the whole protocol without sockets; :class:`ControlServer`
runs it on a socket in threads (one per client); :func:`send_command` is the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
from typing import Any

from virtblk.device.blk import CACHE_WRITE_BACK, CACHE_WRITE_THROUGH, BlkDevice
from virtblk.spec import BlkConfig, feature_names
from virtblk.unixsock import bind_private, remove_if_ours
from virtblk.util import parse_size

__all__ = [
    "COMMANDS",
    "ControlError",
    "ControlServer",
    "handle_line",
    "handle_request",
    "normalise_cache_mode",
    "send_command",
]

log = logging.getLogger("virtblk.control")

MAX_LINE = 64 * 1024
"""A request longer than this is refused: the protocol's requests are tiny."""

_CACHE_ALIASES = {
    CACHE_WRITE_BACK: CACHE_WRITE_BACK,
    "writeback": CACHE_WRITE_BACK,
    "write-back": CACHE_WRITE_BACK,
    CACHE_WRITE_THROUGH: CACHE_WRITE_THROUGH,
    "writethrough": CACHE_WRITE_THROUGH,
    "write-through": CACHE_WRITE_THROUGH,
}


class ControlError(Exception):
    """A request the device refuses; its message is the ``error`` of the answer."""


def normalise_cache_mode(mode: str) -> str:
    """``"write back"`` / ``"write through"`` (the seed's spelling) from common variants."""
    try:
        return _CACHE_ALIASES[mode.strip().lower()]
    except KeyError:
        raise ControlError(
            f"unknown cache mode {mode!r}: use {CACHE_WRITE_BACK!r} or {CACHE_WRITE_THROUGH!r}"
        ) from None


def _state(device: BlkDevice) -> dict[str, Any]:
    """What every successful answer carries: the device as the driver would now see it."""
    return {
        "size": device.backend.size,
        "capacity": device.capacity,
        "read_only": device.read_only,
        "cache_mode": device.cache_mode,
        "frontend_connected": device.config_changed is not None,
    }


def _resize(device: BlkDevice, request: dict[str, Any]) -> dict[str, Any]:
    if "size" not in request:
        raise ControlError("resize needs a size (bytes, or a string such as '2G')")
    raw = request["size"]
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ControlError(f"size must be an integer or a size string, not {raw!r}")
    try:
        size = parse_size(raw)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    if size < 0 or size % device.blk_size:
        raise ControlError(
            f"size {size} must be a non-negative multiple of the {device.blk_size}-byte "
            f"logical block size")
    old = device.backend.size
    device.resize(size)
    return {"old_size": old}


def _set_read_only(device: BlkDevice, request: dict[str, Any]) -> dict[str, Any]:
    value = request.get("read_only")
    if not isinstance(value, bool):
        raise ControlError("set-read-only needs \"read_only\": true or false")
    device.set_read_only(value)
    return {}


def _set_cache_mode(device: BlkDevice, request: dict[str, Any]) -> dict[str, Any]:
    mode = request.get("mode")
    if not isinstance(mode, str):
        raise ControlError("set-cache-mode needs \"mode\": \"write back\" or \"write through\"")
    wanted = normalise_cache_mode(mode)
    before = device.cache_mode
    device.set_cache_mode(wanted)
    if wanted == CACHE_WRITE_BACK != before and device.config_changed is not None:
        # QEMU 7.2 forwards config changes only when the capacity changed, and Linux 6.1
        # re-reads only the capacity: such a guest keeps writing as if write-through and
        # never flushes, so a crash of the host can lose its writes.
        return {"warning": "a driver that does not re-read the cache mode on a config "
                           "change (Linux behind QEMU 7.2) will not send flushes"}
    return {}


def _stats(device: BlkDevice, request: dict[str, Any]) -> dict[str, Any]:
    return {"stats": device.stats(), "running_queues": device.running_queues()}


def _get_config(device: BlkDevice, request: dict[str, Any]) -> dict[str, Any]:
    negotiated = device.negotiated_features
    return {
        "config": dataclasses.asdict(BlkConfig.unpack(device.config())),
        "features_offered": feature_names(device.features),
        "features_negotiated": None if negotiated is None else feature_names(negotiated),
        "ring": device.ring_kind,
    }


COMMANDS = {
    "resize": _resize,
    "set-read-only": _set_read_only,
    "set-cache-mode": _set_cache_mode,
    "stats": _stats,
    "get-config": _get_config,
}
"""Every command the control socket understands."""


def handle_request(device: BlkDevice, request: Any) -> dict[str, Any]:
    """Run one decoded request; the answer always has ``ok`` (and ``error`` when False)."""
    if not isinstance(request, dict):
        return {"ok": False, "error": "a request is a JSON object with a \"command\""}
    command = request.get("command")
    handler = COMMANDS.get(command) if isinstance(command, str) else None
    if handler is None:
        return {"ok": False,
                "error": f"unknown command {command!r}; known: {', '.join(COMMANDS)}"}
    try:
        extra = handler(device, request)
    except (ControlError, ValueError, OSError) as exc:
        log.warning("control: %s refused: %s", command, exc)
        return {"ok": False, "error": str(exc)}
    log.info("control: %s done", command)
    return {"ok": True, **extra, **_state(device)}


def handle_line(device: BlkDevice, line: bytes) -> bytes:
    """One request line in, one answer line (with its newline) out."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        answer: dict[str, Any] = {"ok": False, "error": f"not a JSON request: {exc}"}
    else:
        answer = handle_request(device, request)
    return json.dumps(answer).encode() + b"\n"


class ControlServer:
    """Listen on ``path`` and answer control requests for ``device`` in background threads.

    The socket file is created 0600: whoever can connect can resize the disk.  ``close``
    stops accepting, disconnects clients and removes the socket file.
    """

    def __init__(self, path: str | os.PathLike[str], device: BlkDevice) -> None:
        self.path = os.fspath(path)
        self.device = device
        self._listener, self._socket_id = bind_private(self.path, backlog=4)
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="virtblk-control",
                                        daemon=True)

    def start(self) -> ControlServer:
        """Start accepting in a background thread."""
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._clients.add(client)
            threading.Thread(target=self._serve_client, args=(client,),
                             name="virtblk-control-client", daemon=True).start()

    def _serve_client(self, client: socket.socket) -> None:
        pending = b""
        try:
            while True:
                data = client.recv(4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        client.sendall(handle_line(self.device, line))
                if len(pending) > MAX_LINE:
                    client.sendall(json.dumps(
                        {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                    ).encode() + b"\n")
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def close(self) -> None:
        """Stop accepting, drop clients, remove the socket file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        remove_if_ours(self.path, self._socket_id)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_command(
    path: str | os.PathLike[str], command: str, timeout: float = 10.0, **arguments: Any,
) -> dict[str, Any]:
    """Send one request to a control socket and return the decoded answer.

    Raises ``OSError`` when the socket cannot be reached or closes without answering.
    """
    request = {"command": command, **arguments}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError(f"control socket {os.fspath(path)} closed without an answer")
            answer += chunk
    decoded = json.loads(answer)
    if not isinstance(decoded, dict):
        raise OSError(f"control socket answered {decoded!r}, not a JSON object")
    return decoded


def notification_counters(path: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, int]:
    """Our device's notification counters summed over its queues, through its control
    socket: ``notifications`` (interrupts sent), ``kicks`` (kicks that woke a queue),
    ``batches``, ``polled`` (times polling found work).  What ``virtblk bench`` reports per
    I/O."""
    answer = send_command(path, "stats", timeout)
    if not answer.get("ok"):
        raise OSError(f"control socket {os.fspath(path)}: {answer.get('error')}")
    queues = answer["stats"]["queues"]
    return {key: sum(int(q.get(key, 0)) for q in queues)
            for key in ("notifications", "kicks", "batches", "polled")}
