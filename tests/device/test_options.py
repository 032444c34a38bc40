"""DeviceOptions: a device described before it exists, checked where it is described and
handed to a child process as JSON without losing anything."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import re
from typing import Any

import pytest

from virtblk.device.backends import NullBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.options import DEFAULT_POLL_US, BlkSettings, DeviceOptions
from virtblk.spec import Lifetime

MiB = 1 << 20

NOT_SETTINGS = {"self", "backend", "num_queues", "queue_size", "read_only", "workers"}
"""BlkDevice arguments that DeviceOptions holds itself (or, the backend, builds)."""


def test_every_blk_device_setting_is_a_field_with_its_default() -> None:
    params = {name: p.default for name, p in inspect.signature(BlkDevice.__init__).parameters
              .items() if name not in NOT_SETTINGS}
    fields = {f.name: f.default for f in dataclasses.fields(BlkSettings)}
    assert fields.keys() == params.keys()
    # Two differ on purpose: poll_us None lets DeviceOptions pick by where queues are
    # served, and the serial is text (JSON has no bytes).
    assert fields["poll_us"] is None and fields["serial"] == ""
    assert {**fields, "poll_us": params["poll_us"], "serial": b""} == params


def _not_defaults() -> DeviceOptions:
    """Every field set, none to its default, so a field the hand-off dropped shows."""
    settings = BlkSettings(
        serial="round-trip", blk_size=4096, seg_max=17, size_max=65536,
        physical_block_exp=3, alignment_offset=1, min_io_size=2, opt_io_size=64,
        geometry=(1024, 16, 63), max_discard_sectors=2048, max_discard_seg=4,
        discard_sector_alignment=16, max_write_zeroes_sectors=4096, max_write_zeroes_seg=2,
        max_secure_erase_sectors=1024, max_secure_erase_seg=3,
        secure_erase_sector_alignment=32, writeback=False, lifetime=Lifetime(1, 2, 3),
        fua=True, poll_us=12.5, io_threads=7, aio="threads", packed=False,
    )
    defaults = BlkSettings()
    for field in dataclasses.fields(BlkSettings):
        assert getattr(settings, field.name) != getattr(defaults, field.name), field.name
    return DeviceOptions(
        backend="file", size=8 * MiB, path="/tmp/image", read_only=True, num_queues=3,
        queue_size=64, device=settings, workers="thread",
    )


@pytest.mark.parametrize("options", [
    _not_defaults(),
    # zoned needs the memory backend, so it is set where the file backend is not
    dataclasses.replace(_not_defaults(), backend="memory", path=None,
                        zoned={"zone_size": MiB}),
    dataclasses.replace(_not_defaults(), backend="rbd", path="pool/ns/vm@snap",
                        ceph_conf="/c/ceph.conf", ceph_id="virt", rbd_op_timeout=2.5),
])
def test_the_json_hand_off_keeps_every_field(options: DeviceOptions) -> None:
    back = DeviceOptions.from_dict(json.loads(json.dumps(options.to_dict())))
    assert back == options
    assert isinstance(back.device.lifetime, Lifetime)
    assert back.device.geometry == (1024, 16, 63)


@pytest.mark.parametrize("build", [
    lambda: DeviceOptions(backend="null", size=MiB, serail="x"),
    lambda: BlkSettings(serail="x"),
    lambda: BlkSettings.from_dict({"serail": "x"}),
    lambda: DeviceOptions.from_dict({"backend": "null", "size": MiB,
                                     "device": {"serail": "x"}}),
])
def test_a_misspelled_option_names_itself(build: Any) -> None:
    with pytest.raises(TypeError, match="serail"):
        build()


def test_the_closest_name_is_suggested() -> None:
    with pytest.raises(TypeError, match=r"unknown device option 'max_discard_segs' \(did you "
                                        r"mean 'max_discard_seg'\?\)"):
        BlkSettings.from_dict({"max_discard_segs": 2})


@pytest.mark.parametrize(("field", "value"), [
    ("blk_size", "4096"), ("blk_size", True), ("writeback", 1), ("serial", 42),
    ("geometry", (1, 2)), ("geometry", [1, 2, 3]), ("lifetime", (1, 2, 3)),
    ("aio", "fibers"), ("poll_us", "10"), ("seg_max", 1.5),
])
def test_a_value_of_the_wrong_type_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"{field} must be"):
        BlkSettings(**{field: value})


@pytest.mark.parametrize(("values", "message"), [
    ({"blk_size": 1000}, "blk_size must be a power of two >= 512, got 1000"),
    ({"blk_size": 256}, "blk_size must be a power of two >= 512, got 256"),
    ({"serial": "x" * 21}, "serial is 21 bytes; GET_ID answers at most 20"),
    ({"serial": "d\u00e9j\u00e0"}, "serial must be ASCII"),
    ({"max_discard_seg": 0}, "max_discard_seg must be >= 1, got 0"),
    ({"max_write_zeroes_seg": 0}, "max_write_zeroes_seg must be >= 1, got 0"),
    ({"max_secure_erase_seg": -1}, "max_secure_erase_seg must be >= 1, got -1"),
    ({"poll_us": -1.0}, "poll_us must be >= 0, got -1.0"),
    ({"io_threads": -1}, "io_threads must be >= 0, got -1"),
])
def test_a_value_the_device_refuses_is_refused_where_it_is_given(
        values: dict[str, Any], message: str) -> None:
    """The device's rules for its settings are the settings' own: they hold when the
    settings are made (in the caller's process), and BlkDevice, made from its keywords,
    says the same."""
    with pytest.raises(ValueError, match=re.escape(message)):
        BlkSettings(**values)
    with pytest.raises(ValueError, match=re.escape(message)):
        BlkDevice(NullBackend(MiB), **values)


@pytest.mark.parametrize(("values", "message"), [
    ({"num_queues": 0}, "num_queues must be in 1..65535, got 0"),
    ({"num_queues": 65536}, "num_queues must be in 1..65535, got 65536"),
    ({"queue_size": 100}, "queue_size must be a power of two in 2..32768, got 100"),
    ({"queue_size": 65536}, "queue_size must be a power of two in 2..32768, got 65536"),
    ({"backend": "null", "size": None}, "the null backend needs a size > 0"),
    ({"backend": "memory", "size": 0}, "the memory backend needs a size > 0"),
    ({"backend": "file", "path": None}, "the file backend needs a path"),
    ({"backend": "file", "path": "/tmp/z.img", "zoned": {"zone_size": MiB}},
     "zoned devices use the memory backend, not file"),
    ({"zoned": {"zone_size": MiB}, "workers": "process"},
     "zoned devices and devices with their own execute() serve their queues from threads"),
    ({"zoned": {"zone_sise": MiB}}, "zone_sise"),
    ({"backend": "rbd", "path": None}, "the rbd backend needs an image (POOL/IMAGE)"),
    ({"backend": "rbd", "path": "no-pool"}, "no-pool"),
    ({"backend": "rbd", "path": "rbd/vm", "size": 0}, "the rbd backend's size must be > 0"),
    ({"backend": "rbd", "path": "rbd/vm", "rbd_op_timeout": 0.0}, "rbd_op_timeout must be > 0"),
    ({"ceph_conf": "/etc/ceph/ceph.conf"}, "ceph_conf is an option of the rbd backend, not"),
    ({"rbd_op_timeout": 5.0}, "rbd_op_timeout is an option of the rbd backend"),
])
def test_device_options_refuse_what_needs_no_storage_to_judge(
        values: dict[str, Any], message: str) -> None:
    """Judged when the description is made: nothing is opened, created or allocated."""
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        DeviceOptions(**{"backend": "memory", "size": MiB, **values})


def test_blk_device_keeps_its_settings_as_given() -> None:
    """BlkDevice makes its keywords a BlkSettings: every one reaches it (a keyword the
    device forgot to pass on would leave a default here)."""
    settings = _not_defaults().device
    dev = BlkDevice(NullBackend(MiB), **settings.as_kwargs())
    assert dev.settings == settings


def test_what_blkdevice_takes_is_taken_as_text() -> None:
    """A bytes serial (BlkDevice takes one) and a path-like are what they say, as text (the
    hand-off to a child process is JSON); a serial that is not ASCII is refused."""
    assert BlkSettings(serial=b"disk-7").serial == "disk-7"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ASCII"):
        BlkSettings(serial=b"\xff")  # type: ignore[arg-type]
    options = DeviceOptions(backend="file", path=pathlib.Path("/tmp/x.img"))
    assert options.path == "/tmp/x.img"
    assert DeviceOptions.from_dict(options.to_dict()) == options


def test_device_options_check_their_own_fields() -> None:
    with pytest.raises(TypeError, match="backend must be"):
        DeviceOptions(backend="tape", size=MiB)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device must be"):
        DeviceOptions(backend="null", size=MiB, device={"serial": "x"})  # type: ignore[arg-type]


def test_an_integer_poll_time_is_a_float_and_unset_is_chosen_by_the_workers() -> None:
    assert BlkSettings(poll_us=10).poll_us == 10
    dev = DeviceOptions(backend="null", size=MiB, workers="thread").build()
    try:
        assert dev.poll_ns == 0
    finally:
        dev.close()
        dev.backend.close()
    dev = DeviceOptions(backend="null", size=MiB, device=BlkSettings(serial="s")).build()
    try:
        assert dev.poll_ns == int(DEFAULT_POLL_US * 1000) and dev.serial == b"s"
    finally:
        dev.close()
        dev.backend.close()


@pytest.mark.parametrize(("spec", "serial"), [
    ("rbd/vm-disk-1", "vm-disk-1"),
    ("pool/ns/vm@snap", "vm"),
    ("rbd/a-very-long-image-name-of-a-cloud-volume", "me-of-a-cloud-volume"),
])
def test_an_rbd_disk_without_a_serial_answers_get_id_with_its_image_name(
        spec: str, serial: str) -> None:
    from virtblk.device.options import rbd_serial

    assert rbd_serial(spec) == serial
    assert len(rbd_serial(spec).encode()) <= 20
