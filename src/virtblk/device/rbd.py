"""A disk in a Ceph cluster: an RBD image served through Ceph's own Python bindings.

The bindings (``rados``, ``rbd``) are Cython modules that Ceph builds for the system's
Python; there is no wheel.  :func:`load_bindings` imports them as any module when they are
on the path, and otherwise loads Debian's files (``python3-rados``, ``python3-rbd``) from
the system's dist-packages, the two files only, when they were built for this very
interpreter (the extension suffix says so: ``.cpython-311-x86_64-linux-gnu.so``).

Reads and writes are asynchronous (``aio_read``/``aio_write``): :class:`RbdAio` is the
queue's offloader, so as many requests as the ring holds are in flight at librbd, and
librbd's threads hand the answers back through a deque and an eventfd, as the thread pool
does: a callback only records the completion (it takes the interpreter lock from the
queue's thread, so it does as little as it can), and the queue's thread reads the result
and copies the data.  One librados thread runs the callbacks (``librados_thread_count =
1``: two only fight over the lock).  Every process that serves a queue opens the image
with a cluster connection of its own; librbd's cache is off on each (``rbd_cache =
false``) so that a write one queue's process answered is on the OSDs, where another
queue's process reads it.

What fails when the image is opened raises :class:`RbdError`, whose text is one line for
the user; what fails afterwards is an ``OSError`` (IOERR to the driver).
"""

from __future__ import annotations

import collections
import errno
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from virtblk.device.backends import Backend, scatter
from virtblk.device.queue_worker import Offloader, StorageError, Token

log = logging.getLogger("virtblk.device")

DEBIAN_DIR = "/usr/lib/python3/dist-packages"
"""Where Debian's ``python3-rados`` and ``python3-rbd`` put their modules."""

DEBIAN_PACKAGES = ("python3-rados", "python3-rbd")

CLOSE_TIMEOUT = 10.0
"""How long ``close`` waits for librbd and librados to let go (they wait for a dead cluster
without end); after that the connection is abandoned to a daemon thread."""

_FOLLOW_TIMEOUT = 10.0
"""How long a process that follows a growth waits for its own librbd to see it."""

_ERASE_CHUNK = 1 << 20
"""Bytes of zeros a secure erase writes per call."""

_bindings: tuple[ModuleType, ModuleType] | None = None
_bindings_lock = threading.Lock()


class RbdError(Exception):
    """The image cannot be served: its one-line text says why, for the user."""


def _missing_bindings(detail: str) -> RbdError:
    here = f"this is {sys.implementation.name} {sys.version_info.major}.{sys.version_info.minor}"
    return RbdError(
        f"the Ceph Python bindings (rados, rbd) are not available ({detail}): install them "
        f"with `apt-get install --no-install-recommends {' '.join(DEBIAN_PACKAGES)}`; they "
        "are built for one Python (CPython 3.11 on Debian 12) and load only into that "
        f"version ({here}, modules {importlib.machinery.EXTENSION_SUFFIXES[0]})")


def _load_file(name: str) -> ModuleType:
    """Load one extension module from Debian's directory, for this interpreter's ABI."""
    path = os.path.join(DEBIAN_DIR, name + importlib.machinery.EXTENSION_SUFFIXES[0])
    if not os.path.exists(path):
        raise _missing_bindings(f"no {path}")
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # rbd cimports rados: it must find it among the loaded modules.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise _missing_bindings(f"{path}: {exc}") from exc
    return module


def load_bindings() -> tuple[ModuleType, ModuleType]:
    """The ``rados`` and ``rbd`` modules: an ordinary import first, then Debian's files for
    this interpreter; :class:`RbdError` naming the packages when neither works."""
    global _bindings
    with _bindings_lock:
        if _bindings is None:
            modules = []
            for name in ("rados", "rbd"):
                try:
                    module = importlib.import_module(name)
                except ImportError:
                    module = _load_file(name)
                modules.append(module)
            rados, rbd = modules
            if not hasattr(rados, "Rados") or not hasattr(rbd, "Image"):
                raise _missing_bindings(f"{rados.__name__} or {rbd.__name__} is another module "
                                        f"({rados.__file__}, {rbd.__file__})")
            _bindings = rados, rbd
        return _bindings


def parse_image_spec(text: str) -> tuple[str, str, str, str | None]:
    """``POOL/IMAGE``, ``POOL/NAMESPACE/IMAGE``, either with ``@SNAP``:
    ``(pool, namespace, image, snapshot)``, the namespace ``""`` (the pool's default) and
    the snapshot None when not given.  ValueError says what is wrong."""
    path, at, snapshot = text.partition("@")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts) or (at and not snapshot) or "@" in snapshot:
        raise ValueError(f"RBD image {text!r}: expected POOL/IMAGE or POOL/NAMESPACE/IMAGE, "
                         "optionally followed by @SNAPSHOT")
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else ""
    return pool, namespace, image, snapshot or None


def _os_error(exc: Exception, what: str) -> OSError:
    """A librbd/librados error as the ``OSError`` the device answers IOERR for."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    return OSError(code, f"{what}: {exc}")


class RbdBackend(Backend):
    """An RBD image (see the module docstring).

    ``spec`` is ``POOL[/NAMESPACE]/IMAGE[@SNAP]`` (a snapshot is served read-only);
    ``conf`` the ``ceph.conf`` (None: librados' search, ``$CEPH_CONF`` then
    ``/etc/ceph/ceph.conf``...); ``client_id`` the cephx user, ``client.`` optional (None:
    ``admin``). ``create_size`` creates the image when it does not exist (an existing one
    keeps its size). ``op_timeout`` (seconds) makes a request the cluster does not answer
    fail (IOERR) instead of waiting for it; None waits, as librbd does.  Reaching the
    monitors at open gives up after ``connect_timeout`` seconds.
    """

    blocking = True

    def __init__(
        self, spec: str, *, conf: str | None = None, client_id: str | None = None,
        read_only: bool = False, create_size: int | None = None,
        op_timeout: float | None = None, connect_timeout: float = 10.0,
    ) -> None:
        pool, namespace, image, snapshot = parse_image_spec(spec)
        if op_timeout is not None and op_timeout <= 0:
            raise ValueError(f"op_timeout must be > 0 seconds, got {op_timeout}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
        if create_size is not None and create_size < 0:
            raise ValueError(f"create_size must be >= 0, got {create_size}")
        self._spec = spec
        self._pool, self._namespace, self._image_name, self._snapshot = (
            pool, namespace, image, snapshot)
        self._conf = os.fspath(conf) if conf is not None else None
        # Ceph's tools take the user with or without its type ("client.admin", "admin").
        self._client_id = (client_id or "admin").removeprefix("client.")
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        read_only = read_only or snapshot is not None
        self._rados, self._rbd = load_bindings()
        self._cluster: Any = None
        self._ioctx: Any = None
        self._img: Any = None
        try:
            size: int = self._open(read_only, create_size)
            if size < 512:
                raise self._fail(f"the image has {size} bytes, not one 512-byte sector to "
                                 "serve (grow it with rbd resize)")
        except BaseException:
            self._release(CLOSE_TIMEOUT)
            raise
        if create_size is not None and size != create_size:
            log.warning("%s: the image exists with %d bytes; serving that size, not %d",
                        spec, size, create_size)
        if size % 512:
            log.warning("%s: the image's %d bytes are not whole 512-byte sectors; the last "
                        "%d bytes are not served", spec, size, size % 512)
        super().__init__(size, read_only=read_only)

    # ------------------------------------------------------------------ opening

    def _fail(self, what: str, exc: BaseException | None = None) -> RbdError:
        detail = f": {exc}" if exc is not None else ""
        return RbdError(f"RBD image {self._spec}: {what}{detail}")

    def _open(self, read_only: bool, create_size: int | None) -> int:
        """Connect, open the pool and the image (created if asked); the image's size."""
        rados, rbd = self._rados, self._rbd
        if self._conf is not None and not os.path.isfile(self._conf):
            raise self._fail(f"the Ceph configuration file {self._conf} does not exist")
        try:
            if self._conf is not None:
                cluster = rados.Rados(rados_id=self._client_id, conffile=self._conf)
            else:
                cluster = rados.Rados(rados_id=self._client_id)
        except rados.ObjectNotFound as exc:
            raise self._fail("no Ceph configuration file found (looked for $CEPH_CONF, "
                             "/etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf); "
                             "name one", exc) from None
        except rados.Error as exc:
            raise self._fail("the Ceph configuration cannot be read", exc) from None
        self._cluster = cluster
        # librados waits for the monitors without end by default.
        cluster.conf_set("client_mount_timeout", f"{self._connect_timeout:g}")
        if self._op_timeout is not None:
            cluster.conf_set("rados_osd_op_timeout", f"{self._op_timeout:g}")
            cluster.conf_set("rados_mon_op_timeout", f"{self._op_timeout:g}")
        # Every serving process is a client of its own: a write answered must be on the
        # OSDs for the others to read it, not in one client's cache.
        cluster.conf_set("rbd_cache", "false")
        # librbd runs our completion callbacks on librados's threads, each taking the
        # interpreter lock: two (the default) only fight over it and the queue's thread.
        # One: the device's CPU per read at depth 32 from 117 to 87 us (same run: qsd 87).
        cluster.conf_set("librados_thread_count", "1")
        where = f"the monitors of {self._conf}" if self._conf else "the monitors"
        try:
            cluster.connect()
        except rados.PermissionError as exc:
            raise self._fail(f"permission denied to client.{self._client_id} (its keyring "
                             "or caps)", exc) from None
        except rados.Error as exc:
            raise self._fail(f"cannot reach the Ceph cluster ({where}) within "
                             f"{self._connect_timeout:g} s", exc) from None
        try:
            self._ioctx = cluster.open_ioctx(self._pool)
        except rados.ObjectNotFound:
            raise self._fail(f"pool {self._pool!r} does not exist") from None
        except rados.PermissionError as exc:
            raise self._fail(f"permission denied to client.{self._client_id} on pool "
                             f"{self._pool!r}", exc) from None
        except rados.Error as exc:
            raise self._fail(f"cannot open pool {self._pool!r}", exc) from None
        if self._namespace:
            self._ioctx.set_namespace(self._namespace)
        try:
            self._img = img = self._open_image(read_only, create_size)
            size: int = img.size()
        except rbd.PermissionError as exc:
            raise self._fail(f"permission denied to client.{self._client_id}", exc) from None
        except rbd.Error as exc:
            raise self._fail("cannot open the image", exc) from None
        return size

    def _open_image(self, read_only: bool, create_size: int | None) -> Any:
        rbd = self._rbd
        where = f"pool {self._pool!r}" + (
            f", namespace {self._namespace!r}" if self._namespace else "")

        def open_image() -> Any:
            return rbd.Image(self._ioctx, self._image_name, snapshot=self._snapshot,
                             read_only=read_only)

        try:
            return open_image()
        except rbd.ImageNotFound:
            if self._snapshot is not None:
                raise self._fail(f"no image {self._image_name!r} with snapshot "
                                 f"{self._snapshot!r} in {where}") from None
            if create_size is None or read_only:
                hint = "" if read_only else " (give a size to create it)"
                raise self._fail(f"no image {self._image_name!r} in {where}{hint}") from None
        try:
            rbd.RBD().create(self._ioctx, self._image_name, create_size)
            log.info("%s: created the image, %d bytes", self._spec, create_size)
        except rbd.ImageExists:
            pass  # someone else created it meanwhile: serve theirs
        return open_image()

    # ------------------------------------------------------------------ what it serves

    @property
    def spec(self) -> str:
        """The image as given: ``POOL[/NAMESPACE]/IMAGE[@SNAP]``."""
        return self._spec

    @property
    def pool(self) -> str:
        """The pool's name."""
        return self._pool

    @property
    def namespace(self) -> str:
        """The namespace in the pool (``""``: the default one)."""
        return self._namespace

    @property
    def image(self) -> str:
        """The image's name (what the serial number is made from)."""
        return self._image_name

    @property
    def snapshot(self) -> str | None:
        """The snapshot served (read-only), or None for the image itself."""
        return self._snapshot

    @property
    def conf(self) -> str | None:
        """The ``ceph.conf`` given (None: librados' search path)."""
        return self._conf

    @property
    def client_id(self) -> str:
        """The Ceph user, without ``client.``."""
        return self._client_id

    @property
    def op_timeout(self) -> float | None:
        """Seconds after which a request the cluster does not answer fails; None: never."""
        return self._op_timeout

    @property
    def connect_timeout(self) -> float:
        """Seconds the monitors have to answer when the image is opened."""
        return self._connect_timeout

    # ------------------------------------------------------------------ I/O

    def offloader(self, index: int, depth: int) -> Offloader | None:
        """librbd's asynchronous calls, ``depth`` at a time at most (the ring's size)."""
        return RbdAio(self)

    def _must_write(self) -> None:
        if self._read_only:
            raise OSError(errno.EROFS, f"RBD image {self._spec} is open read-only")

    def _durable(self) -> None:
        """In write-through every change is durable when it is answered."""
        if not self._writeback:
            self.flush()

    def _call(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """A synchronous librbd call; its error as the ``OSError`` (IOERR) naming ``what``."""
        try:
            return call(*args)
        except self._rbd.Error as exc:
            raise _os_error(exc, what) from None

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        total = sum(len(buf) for buf in buffers)
        data = self._call(f"read of {total} bytes at {offset}", self._img.read, offset, total)
        scatter(data, buffers)
        return total

    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        self._must_write()
        data = b"".join(buffers)
        self._call(f"write of {len(data)} bytes at {offset}", self._img.write, data, offset)
        if fua:
            self.flush()
        else:
            self._durable()
        return len(data)

    def flush(self) -> None:
        self._call("flush", self._img.flush)

    def discard(self, offset: int, length: int) -> None:
        self._must_write()
        self._call(f"discard of {length} bytes at {offset}", self._img.discard, offset, length)
        self._durable()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """librbd's write_zeroes; without ``unmap`` thick-provisioned (the zeros are
        written, nothing deallocated), as QEMU's rbd driver asks for it."""
        self._must_write()
        flags = 0 if unmap else self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._call(f"write_zeroes of {length} bytes at {offset}", self._img.write_zeroes,
                   offset, length, flags)
        self._durable()

    def secure_erase(self, offset: int, length: int) -> None:
        """Overwrite with zeros (a discard would only drop the objects' extents), then
        flush."""
        self._must_write()
        pos, end = offset, offset + length
        zeros = bytes(min(length, _ERASE_CHUNK))
        while pos < end:
            n = min(end - pos, len(zeros))
            self._call(f"secure erase at {pos}", self._img.write,
                       zeros if n == len(zeros) else zeros[:n], pos)
            pos += n
        self.flush()

    # ------------------------------------------------------------------ size

    def resize(self, new_size: int) -> None:
        """Resize the image itself (every other client of it sees the new size)."""
        if new_size < 0:
            raise ValueError(f"backend size must be >= 0, got {new_size}")
        self._must_write()
        self._call(f"resize to {new_size} bytes", self._img.resize, new_size)
        super().resize(new_size)

    def follow_resize(self, new_size: int) -> None:
        """Take a size another process gave the image; a growth waits (boundedly) until
        this process's librbd has seen it, so that a request for the new tail it serves
        next is not refused as past the end."""
        deadline = time.monotonic() + _FOLLOW_TIMEOUT
        try:
            while self._img.size() < new_size and time.monotonic() < deadline:
                time.sleep(0.01)
        except self._rbd.Error as exc:
            log.warning("%s: reading the image's size: %s", self._spec, exc)
        Backend.resize(self, new_size)

    def current_size(self) -> int | None:
        """The image's size now: librbd keeps it current from the header's watch, so an
        ``rbd resize`` by anyone shows here."""
        img = self._img
        if img is None:
            raise OSError(errno.EBADF, f"RBD image {self._spec} is closed")
        size: int = self._call("size", img.size)
        return size

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the image, the pool and the connection, waiting at most ``CLOSE_TIMEOUT``
        (librbd waits for a cluster that does not answer)."""
        self._release(CLOSE_TIMEOUT)

    def _release(self, timeout: float) -> None:
        img, ioctx, cluster = self._img, self._ioctx, self._cluster
        self._img = self._ioctx = self._cluster = None
        if img is None and ioctx is None and cluster is None:
            return

        def release() -> None:
            for what, obj, call in (("image", img, "close"), ("pool", ioctx, "close"),
                                    ("connection", cluster, "shutdown")):
                if obj is not None:
                    try:
                        getattr(obj, call)()
                    except Exception as exc:
                        log.warning("%s: closing the %s: %s", self._spec, what, exc)

        closer = threading.Thread(target=release, name="virtblk-rbd-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("%s: the cluster did not let the image go within %g s; leaving it",
                        self._spec, timeout)


class RbdAio:
    """One queue's reads and writes as librbd asynchronous calls (an ``Offloader``).

    librbd calls back on its own threads, each call taking the interpreter lock from the
    queue's thread: so a callback only records what completed (``_land``: the
    completion and the data it read, appended to ``done``) and writes ``event_fd``, which
    wakes the queue's loop; ``take``, on the queue's thread, reads the return values and
    copies what was read into the guest's buffers.  In write-through a write's callback
    asks for a flush first and the answer waits for it.  A call librbd refuses or fails is
    answered as a ``StorageError`` (IOERR at once; a cluster that timed out is not asked
    again on the queue's thread)."""

    def __init__(self, backend: RbdBackend) -> None:
        self._backend = backend
        self._image = backend._img
        self._rbd_error = backend._rbd.Error
        # (token, buffers a read fills or None, offset, completion or an error, data read)
        self._done: collections.deque[tuple[Any, ...]] = collections.deque()
        self.event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.in_flight = 0
        # close() must not release the eventfd under a callback about to write it.
        self._lock = threading.Lock()

    def _land(self, entry: tuple[Any, ...]) -> None:
        # The eventfd is written for the first answer after a take only: the queue's loop
        # takes them all when it wakes.  (Each write drops and takes back the interpreter
        # lock, which the queue's thread and the other callbacks wait for.)
        with self._lock:
            done = self._done
            done.append(entry)
            if len(done) == 1 and self.event_fd >= 0:
                os.eventfd_write(self.event_fd, 1)

    def _storage_error(self, write: bool, offset: int, code: int) -> StorageError:
        """librbd's answer ``code`` (an errno) to a read or write, as the device answers it:
        IOERR, not run again."""
        what = f"{'write' if write else 'read'} at {offset}"
        return StorageError(code, f"{self._backend.spec}: {what}: {os.strerror(code)}")

    def submit(self, write: bool, buf: memoryview, offset: int, token: Token) -> None:
        """Hand the read or write to librbd; it is answered through ``take``."""
        self.in_flight += 1
        if write:
            self._issue(token, write, offset, self._image.aio_write, bytes(buf), offset,
                        self._written(token, offset))
        else:
            self._issue(token, write, offset, self._image.aio_read, offset, len(buf),
                        self._read(token, (buf,), offset))

    def submitv(self, write: bool, buffers: list[memoryview], offset: int,
                token: Token) -> None:
        """The same for data in several buffers: one librbd call (a write's buffers are
        joined, a read's data is spread over them)."""
        self.in_flight += 1
        if write:
            self._issue(token, write, offset, self._image.aio_write, b"".join(buffers),
                        offset, self._written(token, offset))
        else:
            self._issue(token, write, offset, self._image.aio_read, offset,
                        sum(len(buf) for buf in buffers), self._read(token, buffers, offset))

    def _issue(self, token: Token, write: bool, offset: int, call: Callable[..., Any],
               *args: Any) -> None:
        """Make the librbd call; one it refuses at once is answered like one that failed."""
        try:
            call(*args)
        except self._rbd_error as exc:
            code = abs(getattr(exc, "errno", None) or errno.EIO)
            self._land((token, None, offset, self._storage_error(write, offset, code), None))

    def _read(self, token: Token, into: Sequence[memoryview],
              offset: int) -> Callable[[Any, Any], None]:
        land = self._land

        def done(completion: Any, data: bytes | None) -> None:
            land((token, into, offset, completion, data))
        return done

    def _written(self, token: Token, offset: int) -> Callable[[Any], None]:
        land = self._land
        if self._backend.writeback:
            def done(completion: Any) -> None:
                land((token, None, offset, completion, None))
            return done

        def then_flush(completion: Any) -> None:
            # Write-through: the answer waits for a flush, asked for here (the flush is
            # librbd's; the interpreter lock is held anyway to run this).
            try:
                if completion.get_return_value() < 0:
                    land((token, None, offset, completion, None))
                else:
                    self._image.aio_flush(
                        lambda flushed: land((token, None, offset, flushed, None)))
            except BaseException as exc:  # the binding would swallow it: answer it
                land((token, None, offset, exc, None))
        return then_flush

    def _finish(self, entry: tuple[Any, ...]) -> tuple[Token, BaseException | None]:
        """On the queue's thread: what one recorded completion answers."""
        token, into, offset, outcome, data = entry
        if isinstance(outcome, BaseException):
            return token, outcome
        try:
            ret = outcome.get_return_value()
            if ret < 0 or (into is not None and data is None):
                code = -ret if ret < 0 else errno.EIO
                return token, self._storage_error(into is None, offset, code)
            if into is not None:
                scatter(data, into)
        except Exception as exc:
            return token, exc
        return token, None

    def flush(self) -> None:
        """Nothing to do: each call went to librbd as it was submitted."""

    @property
    def has_done(self) -> bool:
        """Whether answers are waiting to be taken."""
        return bool(self._done)

    seen_done = has_done

    def take(self) -> list[tuple[Token, BaseException | None]]:
        """The answers so far: ``(token, None)`` or ``(token, the error)``; reads' data is
        copied into their buffers here."""
        with self._lock:  # what lands from now on signals again
            done, self._done = self._done, collections.deque()
        finish = self._finish
        out = [finish(entry) for entry in done]
        self.in_flight -= len(out)
        return out

    def close(self) -> None:
        """Release the eventfd (the queue's loop took every answer before: nothing is in
        flight)."""
        with self._lock:
            fd, self.event_fd = self.event_fd, -1
        if fd >= 0:
            os.close(fd)
