"""The shell's pure parts: where ``virtblk nbd`` listens, and what an export of a disk
advertises (over our embedded device)."""

from __future__ import annotations

import pytest

from virtblk import Disk
from virtblk.nbd.wire import TransmissionFlag
from virtblk.tools.nbd import ListenAddress, export_for, is_loopback, parse_listen

F = TransmissionFlag


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/x.sock", ListenAddress(path="/run/x.sock")),
    ("127.0.0.1:10809", ListenAddress(host="127.0.0.1", port=10809)),
    ("localhost", ListenAddress(host="localhost", port=10809)),
    ("[::1]:0", ListenAddress(host="::1", port=0)),
    ("[::1]", ListenAddress(host="::1", port=10809)),
])  # fmt: skip
def test_parse_listen(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("unix:", "needs a path"),
    ("::1:80", r"\[ADDR\]:PORT"),
    ("[::1", r"\[ADDR\]:PORT"),
    ("[::1]x", "':PORT'"),
    (":80", "no host"),
    ("host:port", "not a number"),
    ("host:70000", "not a number"),
])  # fmt: skip
def test_parse_listen_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_uris() -> None:
    assert ListenAddress(path="/s").uri("e") == "nbd+unix:///e?socket=/s"
    assert ListenAddress(host="::1", port=5).uri() == "nbd://[::1]:5/"
    assert str(ListenAddress(host="::1", port=5)) == "[::1]:5"


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.9.9.9")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    assert not is_loopback("no-such-host.invalid")


def test_export_of_our_device_advertises_what_it_negotiated() -> None:
    with Disk.embedded(8 << 20, mode="thread", blk_size=4096) as disk:
        export = export_for(disk, name="d")
        assert export.flags == (F.CAN_MULTI_CONN | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM
                                | F.SEND_WRITE_ZEROES | F.SEND_FAST_ZERO)
        assert (export.size, export.min_block, export.preferred_block, export.max_block) == (
            8 << 20, 4096, 4096, 32 << 20)
        assert not export.fast_zero
        ro = export_for(disk, read_only=True)
        assert ro.flags == F.CAN_MULTI_CONN | F.READ_ONLY | F.SEND_FLUSH | F.SEND_FUA
        assert "read-only" in ro.description
