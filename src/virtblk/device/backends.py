"""Storage backends behind the virtio-blk device model.

A backend is a flat array of bytes with the operations a block request needs. Buffers are
``memoryview`` slices of guest memory: backends read and write them in place, so the data
of a request is never copied through Python objects on its way to or from storage.

All offsets and lengths are in bytes; the device model has already checked them against
``size``. Errors are raised as ``OSError`` and the device turns them into IOERR.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtblk.util import skip_bytes

if TYPE_CHECKING:
    from virtblk.device.queue_worker import Offloader

_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))
"""A shared read-only source of zeros: filling buffers from it is a memcpy, no allocation."""

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux ``fallocate(2)`` with its mode flags (``os.posix_fallocate`` has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, offset={offset}, length={length}): "
                      f"{os.strerror(err)}")


def zero_fill(buffer: memoryview) -> None:
    """Set every byte of ``buffer`` to zero without allocating."""
    length = len(buffer)
    pos = 0
    while pos < length:
        n = min(length - pos, _ZERO_CHUNK)
        buffer[pos : pos + n] = _ZEROS[:n]
        pos += n


def scatter(data: bytes | memoryview, buffers: Sequence[memoryview]) -> None:
    """Copy ``data`` across ``buffers`` in order; where it runs out, the rest is zeros (a
    short read, a payload smaller than the buffers)."""
    source = memoryview(data)  # slices of it copy nothing
    pos = 0
    for buf in buffers:
        n = len(buf)
        got = source[pos : pos + n]
        buf[: len(got)] = got
        if len(got) < n:
            zero_fill(buf[len(got) :])
        pos += n


class Backend(abc.ABC):
    """What the device needs from storage. Subclasses implement the I/O methods."""

    blocking = False
    """True when a read or write may sleep on a disk: the device then keeps many of them
    in flight from a pool of threads instead of doing one at a time."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError(f"backend size must be >= 0, got {size}")
        self._size = size
        self._read_only = read_only
        self._writeback = True

    @property
    def size(self) -> int:
        """Size in bytes; the device reports ``size // 512`` sectors."""
        return self._size

    @property
    def read_only(self) -> bool:
        """True when the storage itself cannot be written (e.g. a file opened read-only)."""
        return self._read_only

    @property
    def writeback(self) -> bool:
        """The cache mode last set with ``set_write_cache``."""
        return self._writeback

    def resize(self, new_size: int) -> None:
        """Change the size (the device then announces the new capacity)."""
        if new_size < 0:
            raise ValueError(f"backend size must be >= 0, got {new_size}")
        self._size = new_size

    def follow_resize(self, new_size: int) -> None:
        """Another process (the device's main one) resized the storage this backend shares
        with it: take the new size without resizing anything."""
        Backend.resize(self, new_size)

    def current_size(self) -> int | None:
        """The storage's size as it is now, for storage whose size can change by itself
        (another client resized the image): the device looks about once a second and
        follows a change.  None: only this backend's ``resize`` changes it."""
        return None

    def offloader(self, index: int, depth: int) -> Offloader | None:
        """The backend's own way to keep queue ``index``'s reads and writes in flight, at
        most ``depth`` at once (asynchronous calls of a storage library), or None for the
        device's (Linux AIO or a thread pool) when ``blocking``."""
        return None

    @abc.abstractmethod
    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill ``buffers`` from ``offset``; returns the bytes transferred (all of them)."""

    @abc.abstractmethod
    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        """Store ``buffers`` at ``offset``; with ``fua`` the data is durable on return."""

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill one buffer from ``offset``: what nearly every read is, so the device's fast
        path calls this rather than building a list for ``preadv``."""
        self.preadv((buf,), offset)

    def write_from(self, buf: memoryview, offset: int) -> None:
        """Store one buffer at ``offset`` (not FUA): the fast path's ``pwritev``."""
        self.pwritev((buf,), offset)

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if the storage can; its content is then unspecified."""

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make a range read as zeros; with ``unmap`` it may also be deallocated."""

    @abc.abstractmethod
    def secure_erase(self, offset: int, length: int) -> None:
        """Erase a range so its old content cannot be recovered (overwrite, not unmap)."""

    def set_write_cache(self, writeback: bool) -> None:
        """Write-through (False) makes each write durable before it completes."""
        self._writeback = writeback

    @abc.abstractmethod
    def close(self) -> None:
        """Release the storage; the backend is unusable afterwards."""


class MemoryBackend(Backend):
    """A volatile disk in RAM: a memfd, zero-filled, pages allocated on first write.

    Shared memory, so that queue workers in other processes serve the same disk (they map
    ``fd`` with :meth:`attach`).  Discard and write-zeroes punch holes in it: the pages go
    back to the kernel and read back as zeros.
    """

    def __init__(self, size: int, *, fd: int | None = None) -> None:
        """A new disk of ``size`` bytes, or (``fd``) the memfd another process made."""
        super().__init__(size)
        if fd is None:
            fd = os.memfd_create("virtblk-memory-disk", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self._file_size(size))
            except OSError:
                os.close(fd)
                raise
        self._fd = fd
        self._map = self._new_map(fd, size)
        self._view = memoryview(self._map)
        # Only resize replaces the mapping; the lock keeps I/O from using a stale one.
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, fd: int, size: int) -> MemoryBackend:
        """Serve the disk whose memfd is ``fd`` (taking ownership of the fd)."""
        return cls(size, fd=fd)

    @property
    def fd(self) -> int:
        """The memfd holding the disk, for another process to ``attach``."""
        return self._fd

    @staticmethod
    def _file_size(size: int) -> int:
        # mmap cannot map zero bytes; a one-page map for an empty disk is never read.
        return max(size, mmap.PAGESIZE)

    @classmethod
    def _new_map(cls, fd: int, size: int) -> mmap.mmap:
        return mmap.mmap(fd, cls._file_size(size), mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        pos = offset
        with self._lock:
            view = self._view
            for buf in buffers:
                n = len(buf)
                buf[:] = view[pos : pos + n]
                pos += n
        return pos - offset

    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        pos = offset
        with self._lock:
            view = self._view
            for buf in buffers:
                n = len(buf)
                view[pos : pos + n] = buf
                pos += n
        return pos - offset

    def read_into(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            buf[:] = self._view[offset : offset + len(buf)]

    def write_from(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            self._view[offset : offset + len(buf)] = buf

    def _zero(self, offset: int, length: int) -> None:
        """Zero a range, handing whole pages back to the kernel instead of writing them."""
        page = mmap.PAGESIZE
        first = -(-offset // page) * page
        last = (offset + length) // page * page
        with self._lock:
            if last > first:
                zero_fill(self._view[offset:first])
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, first,
                          last - first)
                zero_fill(self._view[last : offset + length])
            else:
                zero_fill(self._view[offset : offset + length])

    def flush(self) -> None:
        """Memory is volatile by nature: there is no more durable place to push it to."""

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        self._zero(offset, length)

    def secure_erase(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    def resize(self, new_size: int) -> None:
        """Truncate the memfd and map it again, in one hold of the lock, in the order that
        never leaves a mapping longer than the file (touching past its end is SIGBUS):
        growing truncates first, shrinking maps first."""
        if new_size < 0:
            raise ValueError(f"backend size must be >= 0, got {new_size}")
        with self._lock:
            if new_size >= self._size:
                os.ftruncate(self._fd, self._file_size(new_size))
                self._remap(new_size)
            else:
                self._remap(new_size)
                os.ftruncate(self._fd, self._file_size(new_size))
            Backend.resize(self, new_size)

    def follow_resize(self, new_size: int) -> None:
        """Map the disk at the size another process gave the memfd (it follows a shrink
        before truncating, and a growth after)."""
        with self._lock:
            self._remap(new_size)
            Backend.resize(self, new_size)

    def _remap(self, new_size: int) -> None:
        """Replace the mapping (the lock is held: no I/O uses the old one)."""
        new_map = self._new_map(self._fd, new_size)
        self._view.release()
        self._map.close()
        self._map = new_map
        self._view = memoryview(new_map)

    def close(self) -> None:
        with self._lock:
            self._view.release()
            self._map.close()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class NullBackend(Backend):
    """A disk that stores nothing: for measuring the device and transport alone."""

    def __init__(self, size: int, *, read_zeroes: bool = True) -> None:
        super().__init__(size)
        self.read_zeroes = read_zeroes

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        total = 0
        for buf in buffers:
            if self.read_zeroes:
                zero_fill(buf)
            total += len(buf)
        return total

    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        return sum(len(buf) for buf in buffers)

    def read_into(self, buf: memoryview, offset: int) -> None:
        if self.read_zeroes:
            n = len(buf)
            if n <= _ZERO_CHUNK:
                buf[:] = _ZEROS[:n]
            else:
                zero_fill(buf)

    def write_from(self, buf: memoryview, offset: int) -> None:
        """Nothing is stored."""

    def flush(self) -> None:
        """Nothing is stored, so nothing is pending."""

    def discard(self, offset: int, length: int) -> None:
        """Nothing is stored, so nothing to deallocate."""

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Reads give zeros (or nothing) anyway."""

    def secure_erase(self, offset: int, length: int) -> None:
        """Nothing is stored, so nothing to erase."""

    def close(self) -> None:
        """No resources to release."""


class FileBackend(Backend):
    """A regular file or a block device, accessed with preadv/pwritev on guest buffers.

    Durability: in write-through mode (and for FUA writes) data goes through a second
    descriptor opened with ``O_DSYNC``, so each write is stable when it returns; in
    write-back mode writes use the plain descriptor and ``flush`` calls ``fdatasync``.
    """

    blocking = True

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False,
        create_size: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        access = os.O_RDONLY if read_only else os.O_RDWR
        flags = access | os.O_CLOEXEC
        fd = -1
        if create_size is not None and not read_only:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    os.ftruncate(fd, create_size)
                except OSError:
                    os.close(fd)
                    raise
        if fd < 0:
            fd = os.open(self.path, flags)
        dsync_fd = direct_fd = -1
        try:
            if not read_only:
                dsync_fd = os.open(self.path, flags | os.O_DSYNC)
        except OSError:
            os.close(fd)
            raise
        try:
            # For many reads and writes in flight with Linux AIO; tmpfs and others refuse.
            direct_fd = os.open(self.path, flags | os.O_DIRECT)
        except OSError:
            direct_fd = -1
        self._adopt(fd, dsync_fd, direct_fd, read_only)

    @classmethod
    def attach(
        cls, path: str, fd: int, dsync_fd: int, direct_fd: int = -1, *, read_only: bool
    ) -> FileBackend:
        """Serve the file another process opened: its descriptors (the plain one, the
        ``O_DSYNC`` one, -1 when read-only, the ``O_DIRECT`` one, -1 if the filesystem
        refused it), whose ownership passes to us."""
        self = cls.__new__(cls)
        self.path = path
        self._adopt(fd, dsync_fd, direct_fd, read_only)
        return self

    def _adopt(self, fd: int, dsync_fd: int, direct_fd: int, read_only: bool) -> None:
        """Serve the file through these descriptors (ours now: closed if this fails)."""
        self._fd = fd
        self._dsync_fd = dsync_fd
        self._direct_fd = direct_fd
        try:
            self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            for owned in (fd, dsync_fd, direct_fd):
                if owned >= 0:
                    os.close(owned)
            raise
        super().__init__(size, read_only=read_only)
        # Remember what the filesystem refused so the hot path does not ask again.
        self._refused: set[int] = set()  # fallocate modes

    @property
    def fd(self) -> int:
        """The descriptor reads and write-back writes use."""
        return self._fd

    @property
    def dsync_fd(self) -> int:
        """The ``O_DSYNC`` descriptor write-through writes use (-1 when read-only)."""
        return self._dsync_fd

    @property
    def direct_fd(self) -> int:
        """An ``O_DIRECT`` descriptor for Linux AIO (-1 when the filesystem refuses)."""
        return self._direct_fd

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        total = sum(len(buf) for buf in buffers)
        pending: Sequence[memoryview] = buffers
        pos = offset
        while pending:
            batch = pending[:_IOV_MAX]
            n = os.preadv(self._fd, batch, pos)
            if n == 0:
                # End of file (a file shorter than the disk): the rest reads as zeros.
                for buf in pending:
                    zero_fill(buf)
                break
            pos += n
            pending = skip_bytes(pending, n)
        return total

    def read_into(self, buf: memoryview, offset: int) -> None:
        if os.preadv(self._fd, (buf,), offset) != len(buf):
            self.preadv((buf,), offset)  # short: the general loop finishes (or zero-fills)

    def pwritev(self, buffers: Sequence[memoryview], offset: int, *, fua: bool = False) -> int:
        self._check_writable()
        fd = self._dsync_fd if (fua or not self._writeback) else self._fd
        total = sum(len(buf) for buf in buffers)
        pending: Sequence[memoryview] = buffers
        pos = offset
        while pending:
            n = os.pwritev(fd, pending[:_IOV_MAX], pos)
            if n == 0:
                raise OSError(errno.EIO, f"pwritev wrote nothing at offset {pos} of {self.path}")
            pos += n
            pending = skip_bytes(pending, n)
        return total

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def _check_writable(self) -> None:
        if self._read_only:
            raise OSError(errno.EBADF, f"{self.path} is open read-only")

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        """The fallback when the filesystem cannot zero or punch: write the zeros."""
        fd = self._fd if self._writeback else self._dsync_fd
        pos, end = offset, offset + length
        while pos < end:
            n = os.pwrite(fd, _ZEROS[: min(end - pos, _ZERO_CHUNK)], pos)
            if n == 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing at offset {pos} of {self.path}")
            pos += n

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """``fallocate`` with ``mode`` (PUNCH_HOLE or ZERO_RANGE, keeping the size); False
        when the filesystem does not support it."""
        if mode in self._refused:
            return False
        try:
            fallocate(self._fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED_ERRNOS:
                self._refused.add(mode)
                return False
            raise
        return True

    def _sync_metadata(self) -> None:
        """fallocate changes are metadata: in write-through they must be durable too."""
        if not self._writeback:
            os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        # Discard is advisory: when holes are unsupported, doing nothing is correct.
        if self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length):
            self._sync_metadata()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        self._check_writable()
        done = (unmap and self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length)) or (
            self._try_fallocate(FALLOC_FL_ZERO_RANGE, offset, length)
        )
        if done:
            self._sync_metadata()
        else:
            self._write_zero_bytes(offset, length)

    def secure_erase(self, offset: int, length: int) -> None:
        # Overwrite rather than deallocate: a punched hole leaves old blocks on the medium.
        self._check_writable()
        self._write_zero_bytes(offset, length)
        os.fdatasync(self._fd)

    def resize(self, new_size: int) -> None:
        if not self._regular:
            raise ValueError(f"{self.path} is not a regular file; resize the device itself")
        self._check_writable()
        os.ftruncate(self._fd, new_size)
        super().resize(new_size)

    def close(self) -> None:
        for fd in (self._fd, self._dsync_fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dsync_fd = self._direct_fd = -1
