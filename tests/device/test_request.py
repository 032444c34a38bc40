"""Request framing: any layout is accepted, every malformation is named."""

from __future__ import annotations

import itertools

import pytest
from device_helpers import chain, header
from hypothesis import given
from hypothesis import strategies as st

from virtblk.device.request import MalformedRequest, parse_request, read_segments
from virtblk.spec import DiscardSegment, RequestType


def test_read_with_conventional_layout() -> None:
    c, ins = chain([header(RequestType.IN, sector=8)], [4096, 1], head=3)
    req = parse_request(c)
    assert (req.head, req.type, req.sector, req.data_len) == (3, RequestType.IN, 8, 4096)
    assert [len(v) for v in req.data] == [4096]
    req.status[0] = 7
    assert ins[1] == b"\x07"
    req.data[0][:2] = b"ok"
    assert ins[0][:2] == b"ok"  # data is a view of the chain's buffer, not a copy


def test_header_split_across_descriptors_and_data_sharing_one() -> None:
    hdr = header(RequestType.OUT, sector=77, ioprio=5)
    payload = bytes(range(256)) * 4  # 1024 bytes
    # 3 + 9 bytes of header, then the last 4 header bytes share a buffer with data.
    c, _ = chain([hdr[:3], hdr[3:12], hdr[12:] + payload[:100], payload[100:]], [1])
    req = parse_request(c)
    assert (req.type, req.ioprio, req.sector, req.data_len) == (RequestType.OUT, 5, 77, 1024)
    assert b"".join(bytes(v) for v in req.data) == payload


def test_status_shares_the_last_writable_buffer_with_data() -> None:
    c, ins = chain([header(RequestType.IN)], [100, 413])
    req = parse_request(c)
    assert req.data_len == 512
    assert [len(v) for v in req.data] == [100, 412]
    req.status[0] = 1
    assert ins[1][412] == 1


def test_empty_views_are_ignored_for_status() -> None:
    c, ins = chain([header(RequestType.FLUSH)], [1, 0])
    req = parse_request(c)
    req.status[0] = 9
    assert ins[0] == b"\x09"


def test_whole_request_in_one_readable_and_one_writable_buffer() -> None:
    c, _ = chain([header(RequestType.OUT) + bytes(512)], [1])
    assert parse_request(c).data_len == 512


@given(cuts=st.lists(st.integers(1, 16 + 1024 - 1), max_size=6, unique=True))
def test_any_split_of_the_readable_bytes_frames_the_same(cuts: list[int]) -> None:
    blob = header(RequestType.OUT, sector=9) + bytes(range(256)) * 4
    points = [0, *sorted(cuts), len(blob)]
    c, _ = chain([blob[a:b] for a, b in itertools.pairwise(points)], [1])
    req = parse_request(c)
    assert req.sector == 9 and req.data_len == 1024
    assert b"".join(bytes(v) for v in req.data) == blob[16:]


def malformed(readable: list[bytes], writable: list[int]) -> MalformedRequest:
    c, _ = chain(readable, writable, head=5)
    with pytest.raises(MalformedRequest) as info:
        parse_request(c)
    assert info.value.head == 5
    return info.value


def test_no_writable_byte_means_no_status() -> None:
    err = malformed([header(RequestType.OUT) + bytes(512)], [])
    assert err.status is None
    assert "no device-writable byte" in err.reason


def test_short_header() -> None:
    err = malformed([bytes(15)], [1])
    assert err.status is not None
    assert "15 device-readable bytes" in err.reason and "header" in err.reason


@pytest.mark.parametrize("rtype", [RequestType.IN, RequestType.OUT, RequestType.OUT_FUA])
def test_data_not_a_sector_multiple(rtype: RequestType) -> None:
    if rtype == RequestType.IN:
        err = malformed([header(rtype)], [500, 1])
    else:
        err = malformed([header(rtype) + bytes(500)], [1])
    assert "500 data bytes, not a multiple of 512" in err.reason


def test_read_with_readable_data() -> None:
    err = malformed([header(RequestType.IN) + bytes(512)], [513])
    assert "IN request" in err.reason and "512 device-readable bytes" in err.reason


def test_write_with_writable_data() -> None:
    err = malformed([header(RequestType.OUT) + bytes(512)], [512, 1])
    assert "OUT request" in err.reason and "512 device-writable bytes" in err.reason


def test_flush_with_data() -> None:
    err = malformed([header(RequestType.FLUSH) + bytes(16)], [1])
    assert "FLUSH request" in err.reason and "it takes none" in err.reason


def test_get_id_with_readable_data() -> None:
    err = malformed([header(RequestType.GET_ID) + bytes(4)], [21])
    assert "GET_ID" in err.reason


@pytest.mark.parametrize(
    "rtype", [RequestType.DISCARD, RequestType.WRITE_ZEROES, RequestType.SECURE_ERASE]
)
@pytest.mark.parametrize("payload", [0, 8, 24])
def test_segment_payload_must_be_whole_segments(rtype: RequestType, payload: int) -> None:
    err = malformed([header(rtype) + bytes(payload)], [1])
    assert f"{payload}-byte payload" in err.reason and rtype.name in err.reason


def test_segments_decode_across_buffers() -> None:
    segs = [DiscardSegment(8, 16, 0), DiscardSegment(100, 1, 1)]
    raw = b"".join(s.pack() for s in segs)
    c, _ = chain([header(RequestType.WRITE_ZEROES) + raw[:5], raw[5:]], [1])
    assert read_segments(parse_request(c)) == segs


@pytest.mark.parametrize("rtype", [2, 3, 5, 16, 27 + 100, 0x80000000, 0x80000001])
def test_unknown_types_parse_without_looking_at_data(rtype: int) -> None:
    c, _ = chain([header(rtype) + bytes(3)], [7, 1])
    req = parse_request(c)
    assert req.type == rtype and req.data == [] and req.data_len == 0
