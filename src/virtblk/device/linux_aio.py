"""Linux native AIO (``io_submit``) for a file backend: many reads and writes on the disk
at once from one thread, with no thread per request.

What qemu-storage-daemon does with ``aio=native``: the file is opened a second time with
``O_DIRECT``; each read or write becomes an ``iocb``, a round's worth go to the kernel in
one ``io_submit``, and completions raise an eventfd (``IOCB_FLAG_RESFD``) that the queue's
loop polls beside its kick eventfd, then ``io_getevents`` collects them without blocking.
The system calls have no wrapper in the C library, so they go through ``syscall(2)`` with
ctypes (only where their numbers are known: x86-64 and arm64); anywhere else, and on a
filesystem that refuses ``O_DIRECT``, the device keeps its pool of threads instead.

``O_DIRECT`` needs the buffer address, the offset and the length aligned to the device's
block: a request that is not (rare: guests align their I/O) is done at once with the
ordinary descriptor.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["LinuxAio", "available"]

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_NR = _SYSCALLS.get(platform.machine())

_IOCB = struct.Struct("<QIIHhIQQqQII")  # 64 bytes: struct iocb
_EVENT = struct.Struct("<QQqq")  # 32 bytes: struct io_event
_CMD_PREAD, _CMD_PWRITE = 0, 1
_FLAG_RESFD = 1
RWF_DSYNC = 2
"""``aio_rw_flags``: this write is durable when it completes (write through)."""
DIRECT_ALIGN = 512
"""The alignment asked of O_DIRECT transfers (a logical block).  A disk with larger
blocks refuses misaligned ones with EINVAL, and those are answered by the general path
with the ordinary descriptor, so this is a guess about speed, never about correctness."""

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def available() -> bool:
    """Whether this machine's system call numbers are known here."""
    return _NR is not None


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def buffer_address(buf: memoryview) -> int:
    """The process address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class LinuxAio:
    """One queue's AIO context: ``submit`` queues, ``flush`` hands the queued to the kernel
    in one system call, ``take`` collects what completed.  ``event_fd`` becomes readable
    when something did.  Tokens are the caller's, returned with each result."""

    def __init__(self, depth: int, *, direct_fd: int, fallback: Callable[[bool, memoryview,
                 int], None], align: int, rw_flags: Callable[[], int]) -> None:
        """``depth`` requests at most in flight; ``fallback(write, buf, offset)`` does a
        request O_DIRECT cannot take; ``rw_flags()`` gives each write's flags now."""
        if _NR is None:
            raise OSError(errno.ENOSYS, f"Linux AIO system calls unknown on {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = _NR
        self.depth = depth
        self._fd = direct_fd
        self._fallback = fallback
        self._align = align
        self._rw_flags = rw_flags
        ctx = ctypes.c_ulong(0)
        _check(_syscall(self._setup, ctypes.c_uint(depth), ctypes.byref(ctx)), "io_setup")
        self._ctx = ctx.value
        self.event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._iocbs = (ctypes.c_char * (_IOCB.size * depth))()
        self._iocb_base = ctypes.addressof(self._iocbs)
        self._pointers = (ctypes.c_void_p * depth)()
        self._events = (ctypes.c_char * (_EVENT.size * depth))()
        self._timeout = (ctypes.c_long * 2)(0, 0)  # struct timespec {0, 0}: do not wait
        self._tokens: list[tuple[Any, int] | None] = [None] * depth  # (token, length)
        self._free = list(range(depth - 1, -1, -1))
        # slot, write, buffer, its address, offset
        self._queued: list[tuple[int, bool, memoryview, int, int]] = []
        self._done: collections.deque[tuple[Any, BaseException | None]] = collections.deque()
        self.in_flight = 0

    def submit(self, write: bool, buf: memoryview, offset: int, token: Any) -> None:
        """Queue a read into (or write from) ``buf`` at ``offset``; it reaches the kernel at
        the next ``flush``."""
        self.in_flight += 1
        length = len(buf)
        address = buffer_address(buf)
        align = self._align - 1
        if (address | offset | length) & align or not self._free:
            self._run_now(write, buf, offset, token)
            return
        slot = self._free.pop()
        self._tokens[slot] = (token, length)
        self._queued.append((slot, write, buf, address, offset))

    def _run_now(self, write: bool, buf: memoryview, offset: int, token: Any) -> None:
        """Do a request with the fallback, at once; its result is taken as any other."""
        error: BaseException | None = None
        try:
            self._fallback(write, buf, offset)
        except BaseException as exc:
            error = exc
        self._done.append((token, error))
        os.eventfd_write(self.event_fd, 1)

    def flush(self) -> None:
        """Hand what is queued to the kernel, in one ``io_submit``."""
        queued = self._queued
        if not queued:
            return
        base = self._iocb_base
        iocbs = self._iocbs
        pointers = self._pointers
        flags = self._rw_flags()
        for i, (slot, write, buf, address, offset) in enumerate(queued):
            _IOCB.pack_into(iocbs, i * _IOCB.size, slot, 0, flags if write else 0,
                            _CMD_PWRITE if write else _CMD_PREAD, 0, self._fd, address,
                            len(buf), offset, 0, _FLAG_RESFD, self.event_fd)
            pointers[i] = base + i * _IOCB.size
        done = 0
        while done < len(queued):
            result = _syscall(self._submit, ctypes.c_ulong(self._ctx),
                              ctypes.c_long(len(queued) - done),
                              ctypes.byref(pointers, done * ctypes.sizeof(ctypes.c_void_p)))
            if result > 0:
                done += result
                continue
            err = ctypes.get_errno() if result < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            # Refused (EAGAIN: the kernel's AIO limit): the rest is done at once instead.
            for slot, write, buf, _, offset in queued[done:]:
                entry = self._tokens[slot]
                assert entry is not None
                self._tokens[slot] = None
                self._free.append(slot)
                self._run_now(write, buf, offset, entry[0])
            break
        queued.clear()

    @property
    def has_done(self) -> bool:
        """Whether completions are waiting: asks the kernel (one ``io_getevents`` that does
        not wait) whenever requests are out there, whatever the eventfd says, since the
        queue's loop may have read the eventfd to sleep and wake on it."""
        if self._done:
            return True
        if self.in_flight > len(self._queued):
            try:
                os.eventfd_read(self.event_fd)
            except BlockingIOError:
                pass
            self._collect()
        return bool(self._done)

    @property
    def seen_done(self) -> bool:
        """Whether completions were already collected (no system call: for a loop that
        polls its ring and would otherwise ask the kernel at every turn)."""
        return bool(self._done)

    def take(self) -> list[tuple[Any, BaseException | None]]:
        """The results so far: ``(token, None)``, or ``(token, the error)`` for a failed
        or short transfer (the caller answers those through its general path).  Asks the
        kernel only when nothing was collected yet (``has_done`` usually just did)."""
        if not self._done:
            self._collect()
        done = self._done
        out = [done.popleft() for _ in range(len(done))]
        self.in_flight -= len(out)
        return out

    def _collect(self, wait: bool = False) -> None:
        while True:
            n = _syscall(self._getevents, ctypes.c_ulong(self._ctx), ctypes.c_long(1 if wait
                         else 0), ctypes.c_long(self.depth), ctypes.byref(self._events),
                         None if wait else ctypes.byref(self._timeout))  # fmt: skip
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                _check(n, "io_getevents")
            break
        events = self._events
        for i in range(n):
            slot, _, res, _ = _EVENT.unpack_from(events, i * _EVENT.size)
            entry = self._tokens[slot]
            assert entry is not None, f"io_getevents returned slot {slot} twice"
            self._tokens[slot] = None
            self._free.append(slot)
            token, length = entry
            if res == length:
                self._done.append((token, None))
            elif res < 0:
                self._done.append((token, OSError(-res, os.strerror(-res))))
            else:
                self._done.append((token, OSError(errno.EIO, f"short transfer: {res} of "
                                                             f"{length} bytes")))

    def close(self) -> None:
        """Wait for what the kernel still has, then release the context."""
        self.flush()
        while self.in_flight - len(self._done) > 0:
            self._collect(wait=True)
        _syscall(self._destroy, ctypes.c_ulong(self._ctx))
        os.close(self.event_fd)
