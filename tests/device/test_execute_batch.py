"""``BlkDevice.execute_batch`` answers the usual read and write inline; everything it
answers must be exactly what the general path (``process``) answers, for good requests
and hostile ones alike: same used length, same status, same bytes in guest memory and
on the backend, same counters."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtblk.device.backends import MemoryBackend
from virtblk.device.blk import BlkDevice
from virtblk.device.request import BlkRequest
from virtblk.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, RequestType
from virtblk.virtio.split_device import DeviceVirtqueue, Triple
from virtblk.virtio.split_layout import VringAddrs
from virtio.virtq_helpers import REGION_GPA, Guest, RawRing

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
DISK = 64 << 10
HDR, DATA, STATUS, TABLE = (REGION_GPA + 0x1000, REGION_GPA + 0x2000, REGION_GPA + 0x8000,
                            REGION_GPA + 0x9000)
DESC = struct.Struct("<QIHH")


class GeneralOnly(BlkDevice):
    """The same device with its own ``execute``: nothing is answered inline."""

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        return super().execute(req)


def answer(
    device_cls: type[BlkDevice], read_only: bool, header: bytes, hdr_len: int,
    data_len: int, into: bool, status_len: int, offloaded: bool = False,
) -> tuple[list[int], bytes, bytes, bytes, dict[str, object], bool]:
    """Offer one request-shaped chain on a fresh ring; what the device made of it.

    With ``offloaded``, the reads and writes ``execute_batch`` hands off are run on the
    backend here and answered by ``complete_offloaded``, as a blocking backend's pool
    does."""
    backend = MemoryBackend(DISK)
    backend.write_from(memoryview(bytes(range(256)) * (DISK // 256)), 0)
    device = device_cls(backend, read_only=read_only)
    with Guest() as g:
        addrs = VringAddrs.allocate(g.allocator, 8)
        raw = RawRing(g, addrs)
        vq = DeviceVirtqueue(g.memory, addrs, event_idx=False)
        g.memory.view(HDR, 32)[:] = header.ljust(32, b"\xee")
        g.memory.view(DATA, 0x4000)[:] = b"\xdd" * 0x4000
        g.memory.view(STATUS, 4)[:] = b"\xcc" * 4
        table = g.memory.view(TABLE, 48)
        DESC.pack_into(table, 0, HDR, hdr_len, NEXT, 1)
        DESC.pack_into(table, 16, DATA, data_len, NEXT | (WRITE if into else 0), 2)
        DESC.pack_into(table, 32, STATUS, status_len, WRITE, 0)
        raw.write_desc(3, TABLE, 48, INDIRECT, 0)
        raw.offer(3)
        view, items = vq.pop_batch(8)
        fast_shape = isinstance(items[0], Triple)
        if offloaded:
            handed: list[tuple[bool, memoryview, int, tuple[Triple, memoryview]]] = []
            used = device.execute_batch(
                view, items, offload=lambda *args: handed.append(args))
            for write, buf, offset, _ in handed:
                (backend.write_from if write else backend.read_into)(buf, offset)
            used += device.complete_offloaded([(token, None) for *_, token in handed])
        else:
            used = device.execute_batch(view, items)
        result = (used, bytes(g.memory.view(DATA, 0x4000)), bytes(g.memory.view(STATUS, 4)),
                  bytes(backend._view[:DISK]), device.stats(), fast_shape)
    backend.close()
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rtype=st.sampled_from([RequestType.IN, RequestType.OUT, RequestType.FLUSH,
                           RequestType.GET_ID, RequestType.OUT_FUA, 0x77]),
    sector=st.sampled_from([0, 1, 8, DISK // 512 - 8, DISK // 512 - 1, DISK // 512,
                            1 << 54, (1 << 64) - 1]),
    hdr_len=st.sampled_from([16, 16, 16, 8, 24]),
    data_len=st.sampled_from([512, 4096, 4096, 100, 513, 0x4000]),
    into=st.booleans(),
    status_len=st.sampled_from([1, 1, 1, 2]),
    read_only=st.booleans(),
    offloaded=st.booleans(),
)
def test_the_inline_path_answers_as_the_general_path_does(
    rtype: int, sector: int, hdr_len: int, data_len: int, into: bool, status_len: int,
    read_only: bool, offloaded: bool,
) -> None:
    header = struct.pack("<IIQ", rtype, 0, sector)
    fast = answer(BlkDevice, read_only, header, hdr_len, data_len, into, status_len,
                  offloaded)
    general = answer(GeneralOnly, read_only, header, hdr_len, data_len, into, status_len)
    assert fast[5], "the chain reaches execute_batch as a Triple"
    assert fast[:5] == general[:5]


def test_the_usual_read_and_write_are_answered_inline() -> None:
    """The differential test above would pass if nothing were inline: check that the
    usual requests really skip the general path."""

    class Counting(BlkDevice):
        processed = 0

        def process(self, chain: object, queue: int = 0) -> int:  # type: ignore[override]
            Counting.processed += 1
            return super().process(chain, queue)  # type: ignore[arg-type]

    for rtype, into in ((RequestType.IN, True), (RequestType.OUT, False)):
        header = struct.pack("<IIQ", rtype, 0, 8)
        used, *_ = answer(Counting, False, header, 16, 4096, into, 1)
        assert used == [3, 4097 if into else 1]
    assert Counting.processed == 0
    header = struct.pack("<IIQ", RequestType.IN, 0, DISK // 512)  # past the end
    used, *_ = answer(Counting, False, header, 16, 4096, True, 1)
    assert used == [3, 1] and Counting.processed == 1
