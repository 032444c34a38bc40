"""fio job files: read them as fio does, and turn each job section into a bench run.

Two steps, both without I/O (text in, values out):

* :func:`parse_job_file`: fio's INI dialect (``init.c``'s ``parse_jobs_ini``): ``[global]``
  and job sections, ``key=value`` and bare flags, ``;`` and ``#`` comments (whole lines and
  the rest of a line), ``${VAR}`` from the environment.  A job inherits the options of the
  ``[global]`` sections *above* it (a later ``[global]`` changes only the jobs after it),
  then its own override them, the last occurrence winning.
* :func:`job_runs`: each job's options onto a :class:`BenchConfig`.  Every option is either
  understood (its value judged) or named in the one error that refuses the file:
  an option that changes the workload is never dropped without a word.

Values follow fio's parameter types: sizes with fio's suffixes and its ``kb_base`` (1024 by
default, where ``k`` is 1024 and, for old scripts' sake, ``KiB`` is 1000), times in seconds
unless a unit says otherwise, booleans as ``0``/``1`` or a bare name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from virtblk.tools.bench.config import BenchConfig


class JobFileError(ValueError):
    """A job file that cannot run: its syntax, or the options it uses (each one named)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``key[=value]`` line: a bare flag has value None."""

    key: str
    value: str | None
    line: int
    section: str  # the section it was written in ("global" for inherited ones)


@dataclasses.dataclass(frozen=True)
class JobSection:
    """One job section with what it inherited from the ``[global]`` sections above it."""

    name: str
    line: int
    options: tuple[Option, ...]  # global ones first, in file order

    def effective(self) -> dict[str, Option]:
        """Each option's last word."""
        return {o.key: o for o in self.options}


@dataclasses.dataclass(frozen=True)
class JobFile:
    """A parsed job file: its jobs in file order."""

    jobs: tuple[JobSection, ...]


_SECTION = re.compile(r"\[([^\]]*)\]$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_job_file(text: str, env: Mapping[str, str] | None = None) -> JobFile:
    """Parse fio's INI dialect; a line fio would refuse raises :class:`JobFileError` with
    its number.  ``env`` (default ``os.environ``) expands ``${VAR}`` in values."""
    env = os.environ if env is None else env
    globals_: list[Option] = []
    jobs: list[JobSection] = []
    current: tuple[str, int, list[Option]] | None = None  # (name, line, own options)

    def close() -> None:
        if current is not None and current[0] != "global":
            name, line, own = current
            jobs.append(JobSection(name, line, tuple(globals_ + own)))

    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.split(r"[;#]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            match = _SECTION.match(line)
            if match is None:
                raise JobFileError(f"line {number}: {line!r} is not a section header "
                                   "([name], on a line of its own)")
            name = match.group(1).strip()
            if not name:
                raise JobFileError(f"line {number}: a section needs a name")
            close()
            current = (name, number, [])
            continue
        if line.split()[0] == "include":
            raise JobFileError(f"line {number}: include is not supported: put the included "
                               "file's sections in this one")
        if current is None:
            raise JobFileError(f"line {number}: option {line!r} outside of a [section]")
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise JobFileError(f"line {number}: {line!r} is not key=value or a flag")
        option = Option(key, _expand(value.strip(), env, number) if sep else None, number,
                        current[0])
        (globals_ if current[0] == "global" else current[2]).append(option)
    close()
    if not jobs:
        raise JobFileError("the job file has no job section (only [global], or nothing)")
    return JobFile(tuple(jobs))


def _expand(value: str, env: Mapping[str, str], number: int) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise JobFileError(f"line {number}: environment variable {name} is not set")
        return env[name]

    return _ENV.sub(sub, value)


# -- values, in fio's parameter types ----------------------------------------------------------
_POWERS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE = re.compile(r"(0x[0-9a-f]+|\d+)\s*([kmgtp]?)(i?)(b?)", re.IGNORECASE)


def parse_size(value: str, kb_base: int = 1024) -> int:
    """fio's ``int`` for quantities of data, as its ``__get_mult_bytes`` reads it (which the
    tests check against fio itself): ``4k`` = 4096 with the default kb_base 1024; a suffix
    spelt with ``ib`` takes the other base (``4KiB`` = 4000 then, fio's "opposite units" for
    old scripts; ``1mi``, without the b, stays 1048576); kb_base 1000 is the SI way round.
    ``b`` is bytes, case does not matter, ``0x`` is hexadecimal."""
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size (a number with k, m, g, t, p, KiB...)")
    digits, prefix, i, b = match.groups()
    number = int(digits, 16) if digits.lower().startswith("0x") else int(digits)
    if i and not prefix:
        raise ValueError(f"{value!r} is not a size")
    base = kb_base
    if i and b:
        base = 1000 if kb_base == 1024 else 1024
    return int(number * base ** _POWERS[prefix.lower()])


_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s|sec|ms|msec|us|usec)?", re.IGNORECASE)
_SECONDS = {None: 1.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "sec": 1.0,
            "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}  # fmt: skip


def parse_time(value: str) -> float:
    """fio's ``time``, in seconds: a number (seconds) or one with d, h, m, s, ms, us."""
    match = _TIME.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a time (seconds, or with d, h, m, s, ms, us)")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _SECONDS[unit]


def _int(value: str, low: int, high: int | None = None) -> int:
    try:
        number = parse_size(value)  # fio's int: suffixes allowed
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < low or (high is not None and number > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{value} is out of range ({bound})")
    return number


def _bool(value: str | None) -> bool:
    if value is None:
        return True
    if value.strip() in ("0", "1"):
        return value.strip() == "1"
    raise ValueError(f"{value!r} is not a boolean (0 or 1)")


# -- the options a job may use -----------------------------------------------------------------
@dataclasses.dataclass
class JobRun:
    """What one job section asks for: the run, and how to report it."""

    name: str
    config: BenchConfig
    group_reporting: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


_RW = {"read": "read", "write": "write", "randread": "randread", "randwrite": "randwrite",
       "randrw": "randrw", "readwrite": "readwrite", "rw": "readwrite"}  # fmt: skip

_ENGINES = {
    # fio's synchronous engines: one I/O at a time through a blocking call.
    "sync": "sync", "psync": "sync", "vsync": "sync", "pvsync": "sync", "pvsync2": "sync",
    # fio's asynchronous engines: iodepth in flight on the device's queue, reaped in batches.
    "libaio": "queue", "io_uring": "queue",
    # virtblk's own.
    "queue": "queue", "poll": "poll", "aio": "aio",
}  # fmt: skip

_VERIFY = {"md5": "md5", "crc32c": "crc32c", "crc32c-intel": "crc32c", "none": None, "0": None}


class _Builder:
    """One job's options becoming BenchConfig fields (and what the report needs); a handler
    raises ValueError for a value it cannot honour, which :func:`job_runs` collects."""

    def __init__(self, name: str) -> None:
        self.fields: dict[str, Any] = {}
        self.name = name
        self.group_reporting = False
        self.notes: list[str] = []
        self.time_based = False
        self.hipri = False
        self.kb_base = 1024

    def size(self, value: str) -> int:
        if value.strip().endswith("%"):
            raise ValueError("a percentage of the device is not supported: give bytes")
        return parse_size(value, self.kb_base)


def _need(value: str | None) -> str:
    if value is None or not value.strip():
        raise ValueError("needs a value")
    return value


def _rw(b: _Builder, v: str | None) -> None:
    mode = _need(v).strip()
    if ":" in mode:
        raise ValueError(f"{mode}: the ':N' offset modifier is not supported")
    if mode not in _RW:
        raise ValueError(f"{mode} is not supported (read, write, randread, randwrite, "
                         "randrw, readwrite/rw; no trim)")
    b.fields["rw"] = _RW[mode]


def _bs(b: _Builder, v: str | None) -> None:
    parts = [p for p in _need(v).split(",") if p.strip()]
    sizes = {b.size(p) for p in parts}
    if len(sizes) != 1:
        raise ValueError("one block size for reads and writes is supported")
    b.fields["bs"] = sizes.pop()


def _ioengine(b: _Builder, v: str | None) -> None:
    engine = _need(v).strip()
    if engine not in _ENGINES:
        raise ValueError(f"{engine} cannot reach a vhost-user-blk device; use psync/sync "
                         "(-> sync), libaio/io_uring (-> queue), or virtblk's queue, poll, aio")
    b.fields["ioengine"] = _ENGINES[engine]


def _verify(b: _Builder, v: str | None) -> None:
    kind = _need(v).strip()
    if kind not in _VERIFY:
        raise ValueError(f"{kind} is not supported (md5, crc32c)")
    b.fields["verify"] = _VERIFY[kind]


def _must(expected: bool, why: str) -> Callable[[_Builder, str | None], None]:
    """A boolean that only one way round describes what the bench does."""

    def check(b: _Builder, v: str | None) -> None:
        if _bool(v) != expected:
            raise ValueError(why)

    return check


def _ignored(b: _Builder, v: str | None) -> None:
    """Options that change nothing here (fio's process model, grouping of the report)."""


def _filename(b: _Builder, v: str | None) -> None:
    b.notes.append(f"job '{b.name}': filename={v} ignored: the device is the SOCKET")


def _set(field: str, convert: Callable[[_Builder, str], object]) -> Callable[
        [_Builder, str | None], None]:  # fmt: skip
    def apply(b: _Builder, v: str | None) -> None:
        b.fields[field] = convert(b, _need(v))

    return apply


def _randrepeat(b: _Builder, v: str | None) -> None:
    if not _bool(v):  # fio: a fresh seed each run
        b.fields.setdefault("seed", int.from_bytes(os.urandom(4), "little"))


def _rwmixwrite(b: _Builder, v: str | None) -> None:
    b.fields["rwmixread"] = 100 - _int(_need(v), 0, 100)


def _log(field: str) -> Callable[[_Builder, str | None], None]:
    def apply(b: _Builder, v: str | None) -> None:
        b.fields[field] = v.strip() if v is not None and v.strip() else b.name

    return apply


def _runtime(b: _Builder, v: str) -> float:
    seconds = parse_time(v)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def _ramp_time(b: _Builder, v: str | None) -> None:
    if parse_time(_need(v)) != 0:
        raise ValueError("is not supported (the whole runtime is measured)")


def _kb_base(b: _Builder, v: str | None) -> None:
    base = _int(_need(v), 1000, 1024)
    if base not in (1000, 1024):
        raise ValueError("must be 1000 or 1024")
    b.kb_base = base


def _flag(attribute: str) -> Callable[[_Builder, str | None], None]:
    def apply(b: _Builder, v: str | None) -> None:
        setattr(b, attribute, _bool(v))

    return apply


def _name(b: _Builder, v: str | None) -> None:
    b.name = _need(v).strip()


_OPTIONS: dict[str, Callable[[_Builder, str | None], None]] = {
    "name": _name,
    "description": _ignored,
    "rw": _rw,
    "readwrite": _rw,
    "bs": _bs,
    "blocksize": _bs,
    "iodepth": _set("iodepth", lambda b, v: _int(v, 1)),
    "iodepth_batch_complete_min": _set("batch_complete_min", lambda b, v: _int(v, 1)),
    "iodepth_batch_complete": _set("batch_complete_min", lambda b, v: _int(v, 1)),
    "ioengine": _ioengine,
    "hipri": _flag("hipri"),
    "numjobs": _set("numjobs", lambda b, v: _int(v, 1)),
    "runtime": _set("runtime", _runtime),
    "timeout": _set("runtime", _runtime),
    "time_based": _flag("time_based"),
    "size": _set("size", lambda b, v: b.size(v)),
    "io_size": _set("io_size", lambda b, v: b.size(v)),
    "io_limit": _set("io_size", lambda b, v: b.size(v)),
    "offset": _set("offset", lambda b, v: b.size(v)),
    "rwmixread": _set("rwmixread", lambda b, v: _int(v, 0, 100)),
    "rwmixwrite": _rwmixwrite,
    "verify": _verify,
    "direct": _must(True, "only 1: there is no page cache, every I/O goes to the device"),
    "buffered": _must(False, "only 0: there is no page cache, every I/O goes to the device"),
    "norandommap": _must(True, "only 1: random offsets are drawn with repeats (no map)"),
    "filename": _filename,
    "group_reporting": _flag("group_reporting"),
    "randseed": _set("seed", lambda b, v: _int(v, 0)),
    "randrepeat": _randrepeat,
    "ramp_time": _ramp_time,
    "kb_base": _kb_base,
    # Jobs run one after another anyway; fio's process model changes nothing here.
    "stonewall": _ignored,
    "wait_for_previous": _ignored,
    "new_group": _ignored,
    "thread": _ignored,
    "write_lat_log": _log("write_lat_log"),
    "write_bw_log": _log("write_bw_log"),
    "write_iops_log": _log("write_iops_log"),
    "log_avg_msec": _set("log_avg_msec", lambda b, v: _int(v, 0)),
    "per_job_logs": _set("per_job_logs", lambda b, v: _bool(v)),
    "log_offset": _must(False, "only 0: offsets are not logged"),
    "log_max_value": _must(False, "only 0: windows log their average"),
}
"""Every option a job file may use; anything else is refused by name."""

_FIRST = ("kb_base", "name")
"""Read before the rest: sizes depend on kb_base, default log names on the job's name."""


def job_runs(jobfile: JobFile, defaults: BenchConfig | None = None) -> list[JobRun]:
    """Each job section as a :class:`JobRun` over ``defaults`` (fields a job does not set);
    raises one :class:`JobFileError` naming every unsupported option (and every bad value)
    of every section."""
    runs: list[JobRun] = []
    unsupported: dict[str, list[str]] = {}  # "job 'x'" / "[global]" -> option names
    bad: list[str] = []
    for section in jobfile.jobs:
        b = _Builder(section.name)
        effective = section.effective()
        ordered = sorted(effective.values(), key=lambda o: (o.key not in _FIRST, o.line))
        for option in ordered:
            handler = _OPTIONS.get(option.key)
            where = "[global]" if option.section == "global" else f"job '{section.name}'"
            if handler is None:
                names = unsupported.setdefault(where, [])
                if option.key not in names:
                    names.append(option.key)
                continue
            try:
                handler(b, option.value)
            except ValueError as exc:
                text = option.key + ("" if option.value is None else f"={option.value}")
                message = f"line {option.line}, {where}: {text}: {exc}"
                if message not in bad:
                    bad.append(message)
        if not b.time_based:
            # fio's default: the job ends after io_size bytes (one pass over its range), or
            # at runtime if one is given and comes first.
            b.fields["time_based"] = False
            b.fields.setdefault("runtime", None)
        elif "runtime" not in b.fields:
            bad.append(f"job '{section.name}' (line {section.line}): time_based needs runtime")
        elif "io_size" in b.fields:
            bad.append(f"job '{section.name}': io_size goes without time_based (a time based "
                       "job runs for runtime whatever it has transferred)")
        if b.hipri:
            if b.fields.get("ioengine") != "queue":
                bad.append(f"job '{section.name}': hipri goes with ioengine=io_uring")
            b.fields["ioengine"] = "poll"  # io_uring's polled completions: our poll engine
        config = dataclasses.replace(defaults or BenchConfig(), **b.fields)
        if config.verify is not None and not config.writes:
            bad.append(f"job '{section.name}': verify needs a workload that writes (write, "
                       f"randwrite, randrw, readwrite), not rw={config.rw}")
        runs.append(JobRun(b.name, config, b.group_reporting, b.notes))
    problems = [f"{where}: unsupported fio options: {', '.join(names)}"
                for where, names in unsupported.items()] + bad  # fmt: skip
    if problems:
        raise JobFileError("\n".join(problems))
    return runs
