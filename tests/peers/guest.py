"""A Linux guest under QEMU whose disks are vhost-user-blk devices.

The guest is the real virtio-blk driver (Linux 6.1's virtio_blk) that our device
must serve, and a second client for qemu-storage-daemon. It boots Debian 12's
own kernel with a busybox initramfs whose /init loads the virtio modules, runs a
per-test shell script and powers off, printing the script's exit status on the
serial console. Nothing is built from source; the kernel package is downloaded
once with apt and cached.

Usage: `run_guest("cat /sys/block/vda/size", disks=[socket_path])`; or, to act on the host
while the guest runs (kill its device, say), `with start_guest(...) as guest:`, read
`guest.console()` as it grows, and `guest.wait()` for the result.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Modules the guest loads, in load order; their dependencies are added in front.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)

BEGIN_MARKER = "VIRTBLK-GUEST-BEGIN"
EXIT_MARKER = "VIRTBLK-GUEST-EXIT="
_EXIT_RE = re.compile(r"VIRTBLK-GUEST-EXIT=(\d+)")

BUSYBOX = Path("/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"

# /init of the initramfs. Modules are loaded one by one so that a failure names
# the module; the exit marker is printed whatever the test script does.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || echo "VIRTBLK-GUEST: insmod $m failed"
done
cd /tmp
echo {BEGIN_MARKER}
sh /test.sh
rc=$?
echo {EXIT_MARKER}$rc
sync
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest could not be prepared, did not boot, or ended without an exit marker."""


class GuestTimeout(GuestError):
    """The guest ran longer than the timeout and was killed."""


@dataclass(frozen=True)
class GuestKernel:
    """A prepared kernel: its version, vmlinuz and the base initramfs (uncompressed newc)."""

    version: str
    vmlinuz: Path
    initramfs: Path


@dataclass(frozen=True)
class GuestResult:
    """How a guest run ended.

    `rc` is /test.sh's exit status; `output` is what the script printed (stdout
    and stderr, between the begin and exit markers, "\\r\\n" turned into "\\n");
    `console` is the whole serial log including kernel messages; `elapsed` is
    the wall time of the QEMU process in seconds.
    """

    rc: int
    output: str
    console: str
    elapsed: float


def cache_dir() -> Path:
    """Where the kernel package and the prepared files live ($VIRTBLK_GUEST_CACHE)."""
    configured = os.environ.get("VIRTBLK_GUEST_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "virtblk" / "guest"


# ---------------------------------------------------------------------------
# newc cpio archives (what the kernel unpacks into its initramfs)


class CpioWriter:
    """Writes a newc ("070701") archive in memory.

    Written here rather than with cpio(1) so that device nodes (/dev/console)
    can be added without root and the output is byte-for-byte reproducible.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._ino += 1
        self._parts += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive, with its trailer, padded to 512 bytes so archives concatenate."""
        self._entry("TRAILER!!!", 0)
        archive = b"".join(self._parts)
        return archive + b"\0" * (-len(archive) % 512)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def script_archive(script: str) -> bytes:
    """A newc archive holding only /test.sh, appended to the base initramfs per run."""
    writer = CpioWriter()
    writer.file("test.sh", script.encode(), mode=0o755)
    return writer.finish()


# ---------------------------------------------------------------------------
# Kernel preparation


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise preparation across processes: several engineers run tests at once."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestError(
            f"{' '.join(argv)} failed with status {result.returncode}:\n{result.stderr.strip()}"
        )
    return result.stdout


def _kernel_package() -> str:
    """The linux-image-6.1.0-N-amd64 package that linux-image-amd64 currently depends on."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        except GuestError:
            out = ""
        found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
        if found:
            return str(found[0])
        if attempt == 0:
            _run(["apt-get", "update", "-qq"])
    raise GuestError(
        f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel, even after apt-get update"
    )


def _download(package: str, directory: Path) -> Path:
    """The package's .deb in `directory`, downloaded only when not already there."""
    existing = sorted(directory.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    _run(["apt-get", "download", package], cwd=directory)
    existing = sorted(directory.glob(f"{package}_*.deb"))
    if not existing:
        raise GuestError(f"apt-get download {package} produced no .deb in {directory}")
    return existing[-1]


def modinfo_depends(module: bytes) -> list[str]:
    """The `depends=` list from a module's .modinfo ELF section.

    Debian's package ships no modules.dep (depmod runs at install time), so the
    dependencies are read from the modules themselves.
    """
    if module[:4] != b"\x7fELF" or module[4] != 2:
        raise GuestError("not a 64-bit ELF kernel module")
    shoff = int.from_bytes(module[0x28:0x30], "little")
    shentsize = int.from_bytes(module[0x3A:0x3C], "little")
    shnum = int.from_bytes(module[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(module[0x3E:0x40], "little")

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = int.from_bytes(module[base : base + 4], "little")
        offset = int.from_bytes(module[base + 0x18 : base + 0x20], "little")
        size = int.from_bytes(module[base + 0x20 : base + 0x28], "little")
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if module[strtab + name : module.index(b"\0", strtab + name)] == b".modinfo":
            for entry in module[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends=") :].decode()
                    return [dep for dep in value.split(",") if dep]
            return []
    raise GuestError("kernel module has no .modinfo section")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes; busybox insmod cannot load compressed modules, so unpack here."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestError(f"cannot decompress {path} (no zstd in the standard library)")


def resolve_modules(moddir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """`wanted` plus their dependencies, dependencies first, builtin modules left out."""
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        files[path.name.split(".ko")[0].replace("-", "_")] = path
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        for line in builtin_file.read_text().split():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))

    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise GuestError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            if name in builtin:
                seen.add(name)
                return
            raise GuestError(f"module {name} is neither in {moddir} nor builtin")
        data = _read_module(files[name])
        for dep in modinfo_depends(data):
            visit(dep, (*chain, name))
        seen.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


def _base_initramfs(modules: Sequence[tuple[str, bytes]]) -> bytes:
    if not BUSYBOX.exists():
        raise GuestError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    busybox = BUSYBOX.read_bytes()
    if b"ld-linux" in busybox[:4096] or b"/lib64/ld" in busybox[:4096]:
        raise GuestError(f"{BUSYBOX} is dynamically linked; install busybox-static")
    writer = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        writer.directory(directory)
    writer.char_device("dev/console", 5, 1)
    writer.char_device("dev/null", 1, 3, mode=0o666)
    writer.file("bin/busybox", busybox, mode=0o755)
    writer.file("init", INIT_SCRIPT.encode(), mode=0o755)
    writer.file("lib/modules/load-order", "".join(f"{name}\n" for name, _ in modules).encode())
    for name, data in modules:
        writer.file(f"lib/modules/{name}.ko", data)
    return writer.finish()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def prepare_guest_kernel(directory: Path | None = None) -> GuestKernel:
    """Download (once) Debian's kernel and build the base initramfs (cached).

    A kernel already prepared in the cache is reused without asking apt, so the
    tests run offline once the cache is filled; delete the cache to take a newer
    kernel. The base initramfs is rebuilt when /init or busybox change.
    """
    root = directory or cache_dir()
    with _locked(root):
        current = root / "current"
        if current.exists():
            kernel_dir = root / current.read_text().strip()
        else:
            package = _kernel_package()
            version = package.removeprefix("linux-image-")
            kernel_dir = root / version
            _extract_kernel(_download(package, root), kernel_dir, version)
            _atomic_write(current, version.encode())
        version = kernel_dir.name
        vmlinuz = kernel_dir / "vmlinuz"
        modules_dir = kernel_dir / "modules"
        if not vmlinuz.exists() or not modules_dir.is_dir():
            raise GuestError(f"{kernel_dir} is incomplete; delete {root} to prepare it again")
        order = (modules_dir / "load-order").read_text().split()
        modules = [(name, (modules_dir / f"{name}.ko").read_bytes()) for name in order]
        digest = hashlib.sha256(INIT_SCRIPT.encode() + BUSYBOX.read_bytes()).hexdigest()[:16]
        initramfs = kernel_dir / f"initramfs-base-{digest}.cpio"
        if not initramfs.exists():
            _atomic_write(initramfs, _base_initramfs(modules))
        return GuestKernel(version=version, vmlinuz=vmlinuz, initramfs=initramfs)


def _extract_kernel(deb: Path, kernel_dir: Path, version: str) -> None:
    """Keep vmlinuz and the guest's modules from the .deb; drop the rest (400 MB)."""
    scratch = Path(tempfile.mkdtemp(prefix="extract-", dir=deb.parent))
    try:
        _run(["dpkg", "-x", str(deb), str(scratch)])
        moddir = scratch / "lib" / "modules" / version
        modules = resolve_modules(moddir, GUEST_MODULES)
        staging = kernel_dir.with_name(kernel_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copyfile(scratch / "boot" / f"vmlinuz-{version}", staging / "vmlinuz")
        for name, data in modules:
            (staging / "modules" / f"{name}.ko").write_bytes(data)
        (staging / "modules" / "load-order").write_text("".join(f"{n}\n" for n, _ in modules))
        shutil.rmtree(kernel_dir, ignore_errors=True)
        staging.rename(kernel_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------
# Running a guest


def qemu_command(
    kernel: GuestKernel,
    initramfs: Path,
    *,
    disks: Sequence[str],
    num_queues: int,
    smp: int,
    memory_mb: int,
    device_options: Sequence[str] = (),
    kernel_cmdline: str = "",
    qemu_args: Sequence[str] = (),
    reconnect: int = 0,
) -> list[str]:
    """The qemu-system-x86_64 command line for one guest run.

    Guest RAM is a shared memfd: a vhost-user device maps it, so it must be
    shareable. Each disk is a vhost-user-blk-pci device on its own chardev; with
    `reconnect` (seconds), QEMU reconnects to a device that went away, and the
    guest waits for it.
    """
    append = "console=ttyS0 quiet panic=-1"
    if kernel_cmdline:
        append += " " + kernel_cmdline
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-no-reboot",
        "-m", str(memory_mb), "-smp", str(smp),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-machine", "q35,memory-backend=mem",
        "-net", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
        "-append", append,
    ]  # fmt: skip
    for index, socket_path in enumerate(disks):
        device = f"vhost-user-blk-pci,chardev=c{index},num-queues={num_queues}"
        device += "".join(f",{option}" for option in device_options)
        chardev = f"socket,id=c{index},path={socket_path}"
        if reconnect:
            chardev += f",reconnect={reconnect}"
        argv += ["-chardev", chardev, "-device", device]
    argv += list(qemu_args)
    return argv


def run_guest(
    script: str,
    *,
    disks: Sequence[str] = (),
    num_queues: int = 1,
    smp: int = 1,
    memory_mb: int = 256,
    timeout: float = 120,
    kernel: GuestKernel | None = None,
    device_options: Sequence[str] = (),
    kernel_cmdline: str = "",
    qemu_args: Sequence[str] = (),
) -> GuestResult:
    """Boot a guest that runs `script` (busybox sh, as /test.sh) and return how it ended.

    `disks` are vhost-user socket paths (already listening); they appear in the
    guest as /dev/vda, /dev/vdb, ... in that order, each with `num_queues`
    queues and the extra `device_options` ("key=value") of vhost-user-blk-pci.
    A non-zero `rc` is returned, not raised; `GuestTimeout` is raised when the
    guest outlives `timeout`, `GuestError` when it ends without the exit marker
    (QEMU failed, the kernel panicked, ...). Both messages carry the console tail.
    """
    with start_guest(
        script, disks=disks, num_queues=num_queues, smp=smp, memory_mb=memory_mb,
        kernel=kernel, device_options=device_options, kernel_cmdline=kernel_cmdline,
        qemu_args=qemu_args,
    ) as guest:  # fmt: skip
        return guest.wait(timeout)


class RunningGuest:
    """A guest booted by `start_guest`, running while the test acts on the host.

    Its serial console goes to a file, so `console()` can be read at any time.
    """

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.argv = argv
        self._workdir = workdir
        self._console = (workdir / "console").open("w+b")
        self._stderr = (workdir / "stderr").open("w+b")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._console, stderr=self._stderr
        )

    def console(self) -> str:
        """The serial console so far (kernel messages and the script's output)."""
        return _text((self._workdir / "console").read_bytes())

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off and return how it ended (see `run_guest`)."""
        left = max(0.0, self.started + timeout - time.monotonic())
        try:
            self.process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise GuestTimeout(
                f"guest still running after {timeout:.0f} s; killed\n"
                f"{_describe(self.argv, self.console(), self._stderr_text())}"
            ) from None
        elapsed = time.monotonic() - self.started
        console = self.console()
        found = _EXIT_RE.findall(console)
        if not found:
            raise GuestError(
                f"guest ended (QEMU status {self.process.returncode}) without "
                f"{EXIT_MARKER}<rc>\n{_describe(self.argv, console, self._stderr_text())}"
            )
        begin = console.find(BEGIN_MARKER + "\n")
        end = console.rfind(EXIT_MARKER)
        output = console[begin + len(BEGIN_MARKER) + 1 : end] if begin >= 0 else ""
        return GuestResult(rc=int(found[-1]), output=output, console=console, elapsed=elapsed)

    def _stderr_text(self) -> str:
        return _text((self._workdir / "stderr").read_bytes())

    def close(self) -> None:
        """Kill QEMU if it still runs; remove the work files."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._console.close()
        self._stderr.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


@contextmanager
def start_guest(
    script: str,
    *,
    disks: Sequence[str] = (),
    num_queues: int = 1,
    smp: int = 1,
    memory_mb: int = 256,
    kernel: GuestKernel | None = None,
    device_options: Sequence[str] = (),
    kernel_cmdline: str = "",
    qemu_args: Sequence[str] = (),
    reconnect: int = 0,
) -> Iterator[RunningGuest]:
    """Boot a guest as `run_guest` does, but in the background: the block runs while it
    does (QEMU is killed at its end if still running).  `reconnect`: see `qemu_command`."""
    kernel = kernel or prepare_guest_kernel()
    workdir = Path(tempfile.mkdtemp(prefix="vb-guest-"))
    try:
        initramfs = workdir / "initramfs.cpio"
        initramfs.write_bytes(kernel.initramfs.read_bytes() + script_archive(script))
        argv = qemu_command(
            kernel, initramfs, disks=disks, num_queues=num_queues, smp=smp,
            memory_mb=memory_mb, device_options=device_options,
            kernel_cmdline=kernel_cmdline, qemu_args=qemu_args, reconnect=reconnect,
        )  # fmt: skip
        guest = RunningGuest(argv, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        yield guest
    finally:
        guest.close()


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace").replace("\r\n", "\n")


def _describe(argv: Sequence[str], console: str, stderr: str, lines: int = 40) -> str:
    tail = "\n".join(console.splitlines()[-lines:])
    return (
        f"command: {' '.join(argv)}\n"
        f"--- QEMU stderr ---\n{stderr.strip()}\n"
        f"--- last {lines} console lines ---\n{tail}"
    )


def main() -> int:
    """`python -m peers.guest`: prepare the cache and say where it is (used by scripts/test)."""
    try:
        kernel = prepare_guest_kernel()
    except GuestError as error:
        print(f"cannot prepare the guest kernel: {error}", file=sys.stderr)
        return 1
    print(f"guest kernel {kernel.version}: {kernel.vmlinuz}, initramfs {kernel.initramfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
