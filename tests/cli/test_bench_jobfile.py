"""fio job files for ``virtblk bench``: read as fio reads them (fio itself is the oracle for
the units), every option either honoured or named in the refusal, and a file's sections
run against our device and qemu-storage-daemon, one fio job entry per section.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interop.serve_process import run_virtblk
from virtblk.tools.bench import BenchConfig
from virtblk.tools.bench.jobfile import (
    JobFileError,
    job_runs,
    parse_job_file,
    parse_size,
    parse_time,
)

TWO_SECTIONS = """\
; what a storage engineer keeps
[global]
ioengine=libaio
direct=1
time_based
runtime=400ms     ; short: a test
filename=/dev/nvme0n1

[seq-read]
rw=read
bs=64k
iodepth=4

[rand-write]
rw=randwrite
blocksize=8k      # fio's other name for bs
iodepth=16
"""


def runs_of(text: str, env: dict[str, str] | None = None) -> list[Any]:
    return job_runs(parse_job_file(text, env or {}))


# -- the dialect -------------------------------------------------------------------------------
def test_jobs_inherit_the_globals_above_them_and_override_them() -> None:
    text = """
[global]
bs=8k
rw=randread
time_based
runtime=1
[a]
iodepth=4
[global]
bs=16k
[b]
rw=write
bs=32k
[c]
"""
    a, b, c = runs_of(text)
    assert (a.name, a.config.bs, a.config.rw, a.config.iodepth) == ("a", 8192, "randread", 4)
    # A later [global] reaches only the jobs after it; a job's own option wins.
    assert (b.config.bs, b.config.rw) == (32768, "write")
    assert (c.config.bs, c.config.rw) == (16384, "randread")


def test_comments_flags_spaces_and_the_name_option() -> None:
    text = """
# a comment line
  ; another, indented
[global]
time_based            ; a bare flag is 1
runtime = 2m          # spaces around '=' and a trailing comment
group_reporting
[one]
name=renamed
rw = randrw
rwmixwrite=30
numjobs=2
"""
    (run,) = runs_of(text)
    assert run.name == "renamed"
    assert run.group_reporting is True
    c = run.config
    assert (c.runtime, c.rw, c.rwmixread, c.numjobs) == (120.0, "randrw", 70, 2)


def test_environment_variables_expand() -> None:
    (run,) = runs_of("[j]\ntime_based\nruntime=1\nbs=${BS}\n", {"BS": "16k"})
    assert run.config.bs == 16384
    with pytest.raises(JobFileError, match="line 4: environment variable NOPE is not set"):
        runs_of("[j]\ntime_based\nruntime=1\nbs=${NOPE}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bs=4k\n[j]\n", "line 1: option 'bs=4k' outside of a [section]"),
        ("[j\nbs=4k\n", "line 1: '[j' is not a section header"),
        ("[]\n", "line 1: a section needs a name"),
        ("[j]\nbs 4k = x\n", "line 2: 'bs 4k = x' is not key=value or a flag"),
        ("[global]\nbs=4k\n", "no job section"),
        ("", "no job section"),
        ("[j]\ninclude other.fio\n", "line 2: include is not supported"),
    ],
)  # fmt: skip
def test_bad_syntax_names_the_line(text: str, message: str) -> None:
    with pytest.raises(JobFileError, match=message.replace("[", r"\[")):
        parse_job_file(text, {})


def test_every_unsupported_option_is_named_with_its_section() -> None:
    text = """
[global]
time_based
runtime=1
cpus_allowed=0-1
[seq]
zonemode=zbd
thinktime=10
rw=read
[other]
rw=trim
ramp_time=5
direct=0
ioengine=null
[fine]
bs=4k
"""
    with pytest.raises(JobFileError) as info:
        runs_of(text)
    lines = str(info.value).splitlines()
    assert "[global]: unsupported fio options: cpus_allowed" in lines
    assert "job 'seq': unsupported fio options: zonemode, thinktime" in lines
    message = str(info.value)
    for wrong in ("line 11, job 'other': rw=trim", "line 12, job 'other': ramp_time=5",
                  "line 13, job 'other': direct=0", "line 14, job 'other': ioengine=null"):
        assert wrong in message, message
    assert "'fine'" not in message  # a job with nothing wrong is not mentioned


def test_a_run_lasts_a_time_or_an_amount() -> None:
    """fio's two kinds of job: time based (runtime is required), or done after io_size
    bytes (by default its range once), cut short by runtime if one is given."""
    with pytest.raises(JobFileError, match=r"job 'j' .*time_based needs runtime"):
        runs_of("[j]\ntime_based\n")
    with pytest.raises(JobFileError, match=r"job 'j': io_size goes without time_based"):
        runs_of("[j]\ntime_based\nruntime=1\nio_size=1m\n")
    (run,) = runs_of("[j]\nrw=read\n")
    assert (run.config.time_based, run.config.runtime, run.config.io_size) == (False, None, None)
    (run,) = runs_of("[j]\nruntime=2\nio_limit=3m\n")
    assert (run.config.time_based, run.config.runtime, run.config.io_size) == (False, 2.0,
                                                                               3 << 20)


AMOUNTS = """\
[global]
stonewall
ioengine=psync
size=1m
[seq]
rw=read
bs=64k
[rand]
rw=randwrite
bs=4k
io_size=256k
iodepth=8
ioengine=libaio
[two]
rw=randread
bs=8k
numjobs=2
ioengine=libaio
iodepth=4
[verified]
rw=write
bs=4k
io_size=128k
verify=crc32c
iodepth=4
ioengine=libaio
"""


def test_a_job_without_time_based_does_what_fio_does(tmp_path: Path) -> None:
    """fio itself is the oracle: the same file (plus a filename) run by fio against a file
    of the device's size does the same number of I/Os in every job as ours does.  The file
    says stonewall, as ours run anyway: fio's concurrent randwrite would spoil the verify."""
    target = tmp_path / "disk.img"
    target.write_bytes(b"\0" * (1 << 20))
    fio = subprocess.run(["fio", "--output-format=json", f"--filename={target}",
                          _job_file(tmp_path, AMOUNTS)],
                         capture_output=True, text=True, timeout=120, check=True,
                         cwd=tmp_path)  # fio leaves its verify state file in its cwd
    theirs = [(j["jobname"], j["read"]["total_ios"], j["write"]["total_ios"])
              for j in json.loads(fio.stdout)["jobs"]]
    result = run_virtblk("bench", _job_file(tmp_path, AMOUNTS), "--backend", "memory",
                         "--device-size", "1M", "--output-format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)["jobs"]
    ours = [(j["jobname"], j["read"]["total_ios"], j["write"]["total_ios"]) for j in jobs]
    # fio's numjobs=2 gives each job its own 1 MiB; ours split the range between them.
    assert theirs[:2] == ours[:2] == [("seq", 16, 0), ("rand", 0, 64)]
    assert [t[1] for t in theirs[2:4]] == [128, 128]
    assert [o[1] for o in ours[2:4]] == [64, 64]
    # fio counts its verify pass among the reads; ours reports it as blocks verified.
    assert theirs[4] == ("verified", 32, 32)
    assert ours[4][2] == 32
    verify = json.loads(result.stdout)["virtblk"]["runs"][3]["verify"]
    assert (verify["verified"], verify["mismatches"]) == (32, 0)
    assert "time_based" not in jobs[0]["job options"]


@pytest.mark.parametrize(
    ("engine", "ours"),
    [("psync", "sync"), ("sync", "sync"), ("pvsync2", "sync"), ("libaio", "queue"),
     ("io_uring", "queue"), ("poll", "poll"), ("aio", "aio")],
)  # fmt: skip
def test_fio_engines_map_onto_ours(engine: str, ours: str) -> None:
    (run,) = runs_of(f"[j]\ntime_based\nruntime=1\nioengine={engine}\n")
    assert run.config.ioengine == ours


def test_io_uring_hipri_polls() -> None:
    (run,) = runs_of("[j]\ntime_based\nruntime=1\nioengine=io_uring\nhipri\n")
    assert run.config.ioengine == "poll"


def test_everything_a_job_sets_reaches_the_config() -> None:
    text = """
[j]
time_based
runtime=1500ms
rw=randrw
rwmixread=70
bs=4k,4k
iodepth=8
iodepth_batch_complete_min=4
ioengine=libaio
numjobs=2
size=8m
offset=1m
verify=crc32c-intel
randseed=42
write_lat_log=lat
write_iops_log
log_avg_msec=100
per_job_logs=0
"""
    (run,) = runs_of(text)
    assert run.config == BenchConfig(
        rw="randrw", rwmixread=70, bs=4096, iodepth=8, batch_complete_min=4,
        ioengine="queue", numjobs=2, runtime=1.5, size=8 << 20, offset=1 << 20,
        verify="crc32c", seed=42, write_lat_log="lat", write_iops_log="j",
        log_avg_msec=100, per_job_logs=False,
    )  # fmt: skip


def test_different_read_and_write_block_sizes_are_refused() -> None:
    with pytest.raises(JobFileError, match="bs=4k,8k: one block size"):
        runs_of("[j]\ntime_based\nruntime=1\nbs=4k,8k\n")


def test_an_option_that_needs_a_value() -> None:
    with pytest.raises(JobFileError, match="line 4, job 'j': bs: needs a value"):
        runs_of("[j]\ntime_based\nruntime=1\nbs\n")
    with pytest.raises(JobFileError, match="line 4, job 'j': rw=: needs a value"):
        runs_of("[j]\ntime_based\nruntime=1\nrw=\n")


def test_verify_needs_writes() -> None:
    with pytest.raises(JobFileError, match="verify needs a workload that writes"):
        runs_of("[j]\ntime_based\nruntime=1\nrw=read\nverify=md5\n")


# -- units, with fio as the oracle -------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kb_base", "bs"),
    [("4k", 1024, 512), ("4kb", 1024, 512), ("4KiB", 1024, 8), ("1mi", 1024, 8),
     ("1000ki", 1024, 8), ("1m", 1024, 512), ("0x1000", 1024, 512), ("2M", 1024, 512),
     ("4k", 1000, 8), ("4KiB", 1000, 512), ("1m", 1000, 8), ("4ki", 1000, 8),
     ("3MiB", 1024, 8), ("1kb", 1000, 8)],
)  # fmt: skip
def test_sizes_as_fio_reads_them(value: str, kb_base: int, bs: int, tmp_path: Path) -> None:
    """fio's null engine reads ``size`` bytes once: its io_bytes is the size it parsed.  A
    job file, as ours are: there fio applies kb_base before the sizes, wherever it stands
    (on fio's command line only the options after it)."""
    job = tmp_path / "size.fio"
    job.write_text(f"[x]\nsize={value}\nkb_base={kb_base}\nioengine=null\nrw=read\nbs={bs}\n")
    out = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    fio_bytes = json.loads(out)["jobs"][0]["read"]["io_bytes"]
    (run,) = runs_of(f"[x]\nsize={value}\nkb_base={kb_base}\ntime_based\nruntime=1\n")
    assert run.config.size == parse_size(value, kb_base)
    assert parse_size(value, kb_base) // bs * bs == fio_bytes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10", 10.0), ("2m", 120.0), ("1h", 3600.0), ("500ms", 0.5), ("250msec", 0.25),
     ("100us", 1e-4), ("1.5", 1.5), ("3s", 3.0)],
)  # fmt: skip
def test_times(value: str, seconds: float) -> None:
    assert parse_time(value) == pytest.approx(seconds)


def test_a_size_that_is_not_one() -> None:
    for bad in ("4q", "k", "1.5k", "50%", "-4k"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


# -- the parser, generated ---------------------------------------------------------------------
_keys = st.sampled_from(["bs", "iodepth", "rw", "size", "numjobs", "runtime", "offset"])
_values = st.text(st.sampled_from("abc0123456789kmKM_-"), min_size=1, max_size=8)
_options = st.lists(st.tuples(_keys, _values), max_size=5)
_sections = st.lists(
    st.tuples(st.booleans(), st.text(st.sampled_from("abcxyz01-"), min_size=1, max_size=6),
              _options), min_size=1, max_size=6)  # fmt: skip


@given(_sections)
def test_inheritance_matches_a_model(
    sections: list[tuple[bool, str, list[tuple[str, str]]]],
) -> None:
    """Any file of [global] and job sections: each job sees the globals written above it,
    then its own options, the last word winning."""
    text = ""
    for is_global, name, options in sections:
        text += f"[{'global' if is_global else name}]\n"
        text += "".join(f"{k}={v}\n" for k, v in options)
    expected = []
    seen: dict[str, str] = {}
    for is_global, name, options in sections:
        if is_global:
            seen.update(options)
        else:
            own = dict(seen)
            own.update(options)
            expected.append((name, own))
    if not expected:
        with pytest.raises(JobFileError):
            parse_job_file(text, {})
        return
    jobs = parse_job_file(text, {}).jobs
    got = [(j.name, {k: o.value for k, o in j.effective().items()}) for j in jobs]
    assert got == expected


@given(st.text(max_size=200))
def test_any_text_parses_or_gets_a_job_file_error(text: str) -> None:
    try:
        parse_job_file(text, {})
    except JobFileError:
        pass


# -- the command -------------------------------------------------------------------------------
def _job_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "jobs.fio"
    path.write_text(text)
    return str(path)


def _check_two_sections(data: dict[str, Any]) -> None:
    jobs = data["jobs"]
    assert [j["jobname"] for j in jobs] == ["seq-read", "rand-write"]
    assert [j["groupid"] for j in jobs] == [0, 1]
    seq, rand = jobs
    assert (seq["job options"]["rw"], seq["job options"]["bs"]) == ("read", "65536")
    assert (rand["job options"]["rw"], rand["job options"]["bs"]) == ("randwrite", "8192")
    assert seq["read"]["total_ios"] > 0 and seq["write"]["total_ios"] == 0
    assert rand["write"]["total_ios"] > 0 and rand["read"]["total_ios"] == 0
    assert seq["job options"]["iodepth"] == "4" and rand["job options"]["iodepth"] == "16"
    assert [r["ioengine"] for r in data["virtblk"]["runs"]] == ["queue", "queue"]


def test_a_job_file_on_the_embedded_device(tmp_path: Path) -> None:
    result = run_virtblk("bench", _job_file(tmp_path, TWO_SECTIONS), "--backend", "memory",
                         "--device-size", "16M", "--output-format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    _check_two_sections(json.loads(result.stdout))
    # filename names a device the job does not use: said, not silently dropped.
    assert "note: job 'seq-read': filename=/dev/nvme0n1 ignored" in result.stderr


@pytest.mark.interop
def test_a_job_file_on_qemu_storage_daemon(qsd_factory: Any, tmp_path: Path) -> None:
    daemon = qsd_factory(null_size=64 << 20)
    result = run_virtblk("bench", str(daemon.socket_path), _job_file(tmp_path, TWO_SECTIONS),
                         "--output-format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    _check_two_sections(data)
    assert str(daemon.socket_path) in data["virtblk"]["target"]


def test_numjobs_and_group_reporting_per_section(tmp_path: Path) -> None:
    text = """
[global]
time_based
runtime=300ms
ioengine=libaio
rw=randread
[two]
numjobs=2
[grouped]
numjobs=2
group_reporting
"""
    result = run_virtblk("bench", _job_file(tmp_path, text), "--backend", "null",
                         "--device-size", "16M", "--output-format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)["jobs"]
    assert [(j["jobname"], j["groupid"]) for j in jobs] == [("two", 0), ("two", 0),
                                                            ("grouped", 1)]  # fmt: skip
    assert jobs[2]["read"]["total_ios"] > jobs[0]["read"]["total_ios"]


def test_text_output_heads_each_section(tmp_path: Path) -> None:
    result = run_virtblk("bench", _job_file(tmp_path, TWO_SECTIONS), "--backend", "null",
                         "--device-size", "16M")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[seq-read] read: bs=65536 iodepth=4" in result.stdout
    assert "[rand-write] randwrite: bs=8192 iodepth=16" in result.stdout


def test_fio_defaults_apply_to_what_a_file_leaves_out(tmp_path: Path) -> None:
    """fio's own defaults: rw=read, bs=4k, iodepth=1, ioengine=psync."""
    result = run_virtblk("bench", _job_file(tmp_path, "[j]\ntime_based\nruntime=200ms\n"),
                         "--backend", "null", "--device-size", "8M", "--output-format", "json")
    assert result.returncode == 0, result.stderr
    options = json.loads(result.stdout)["jobs"][0]["job options"]
    assert (options["rw"], options["bs"], options["iodepth"], options["ioengine"]) == (
        "read", "4096", "1", "sync")


def test_a_refused_job_file_runs_nothing(tmp_path: Path) -> None:
    text = "[global]\ntime_based\nruntime=1\n[a]\nzonemode=zbd\n[b]\nthinktime=5\n"
    result = run_virtblk("bench", _job_file(tmp_path, text), "--backend", "null")
    assert result.returncode == 1
    assert "job 'a': unsupported fio options: zonemode" in result.stderr
    assert "job 'b': unsupported fio options: thinktime" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_workload_options_on_the_command_line_are_refused_with_a_job_file(
    tmp_path: Path,
) -> None:
    path = _job_file(tmp_path, "[j]\ntime_based\nruntime=1\n")
    result = run_virtblk("bench", path, "--rw", "write", "--bs", "8k", "--backend", "null")
    assert result.returncode == 2
    assert "--rw, --bs: with a job file the workload is the file's" in result.stderr


def test_a_missing_job_file(tmp_path: Path) -> None:
    result = run_virtblk("bench", "/nonexistent.sock", str(tmp_path / "nope.fio"))
    assert result.returncode == 1
    assert "nope.fio" in result.stderr and "Traceback" not in result.stderr


def test_a_section_the_device_cannot_run_is_named(tmp_path: Path) -> None:
    text = "[global]\ntime_based\nruntime=200ms\n[big]\nbs=3000\n"
    result = run_virtblk("bench", _job_file(tmp_path, text), "--backend", "null")
    assert result.returncode == 2
    assert "job 'big': bs 3000 must be a multiple of 512" in result.stderr
