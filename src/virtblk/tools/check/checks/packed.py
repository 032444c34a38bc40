"""Hostile packed rings (VIRTIO 1.2 2.8): descriptors no driver should write, played by
hand (``RawPackedRing``), and what the device must do with them.

What every one of them requires: the device does not crash or hang, and keeps serving
valid requests afterwards (on the same ring when it answered or skipped the bad
descriptors; on a new connection when it stopped the ring, which the spec allows a
device that met a driver error: it may set DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import time

from virtblk.errors import DeviceGoneError
from virtblk.spec import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VRING_DESC_F_NEXT, Feature, Status
from virtblk.tools.check.framework import Finding, Skip, Unexpected, check, failed, passed
from virtblk.tools.check.packed_ring import DATA_SIZE, QUEUE_SIZE, RawPackedRing
from virtblk.tools.check.session import Context
from virtblk.vhost_user.errors import VhostUserError

PACKED_WRAP = "2.8 Packed Virtqueues: wrap counters, available and used descriptors"
PACKED_ID = "2.8 Packed Virtqueues: buffer id"
PACKED_CHAIN = "2.8 Packed Virtqueues: descriptor chaining (next flag)"

_QUIET = 0.3
"""Seconds a descriptor the device must not take is watched for being taken."""


def _ring(ctx: Context) -> RawPackedRing:
    """A raw packed ring on a connection of its own (the context's session is closed:
    a device serves one frontend at a time); Skip when RING_PACKED is not offered."""
    if not ctx.offered(Feature.RING_PACKED):
        raise Skip("RING_PACKED not offered")
    ctx.drop_session()
    try:
        return RawPackedRing(ctx.path, ctx.timeout)
    except (DeviceGoneError, VhostUserError, OSError) as exc:
        raise Unexpected(f"setting up a packed ring failed: {exc}") from exc


def _served_after(ctx: Context) -> str:
    """A new connection still reads: the device survived.  Returns a note for the
    finding; Unexpected when it does not serve."""
    ctx.drop_session()
    ctx.read(0, DATA_SIZE)
    return "a new connection was served"


def _valid_read(ring: RawPackedRing, bid: int, timeout: float) -> str | None:
    """A valid read as ``bid`` on ``ring``: None when the device answered it OK, else
    what happened instead."""
    ring.read_request(bid)
    ring.kick()
    used = ring.wait_used(timeout)
    if used is None:
        return "a valid read after it was not answered (the ring stopped)"
    got, length = used
    if got != bid:
        return f"the next used descriptor has buffer id {got}, not the valid read's {bid}"
    if ring.status_byte != Status.OK:
        return f"the valid read after it answered status {ring.status_byte} (length {length})"
    return None


@check("packed.wrap-bits", "Descriptors whose AVAIL/USED bits contradict the wrap counter "
       "are not consumed", PACKED_WRAP, disruptive=True)  # fmt: skip
def wrap_bits(ctx: Context) -> Finding:
    with _ring(ctx) as ring:
        # A fresh ring's wrap counter is 1: available is AVAIL=1 USED=0.  USED alone is
        # the previous lap's "available"; both bits say "used".
        for bits, what in ((VIRTQ_DESC_F_USED, "AVAIL=0 USED=1"),
                           (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, "AVAIL=1 USED=1")):
            ring.avail_pos, ring.avail_wrap = 0, True
            head = ring.read_request(0, head_bits=bits)
            written = bytes(ring.desc[head * 16 : head * 16 + 16])
            ring.kick()
            time.sleep(_QUIET)
            # Not ``wait_used``: AVAIL=1 USED=1 is what a used descriptor looks like.  A
            # device that took the head would have written its status or the descriptor.
            if ring.status_byte != 0xFF:
                return failed(f"the device executed a head with {what} on wrap counter 1",
                              "it is not available: left alone")
            if bytes(ring.desc[head * 16 : head * 16 + 16]) != written:
                return failed(f"the device wrote over a head with {what} on wrap counter 1",
                              "it is not available: left alone")
        ring.avail_pos, ring.avail_wrap = 0, True
        problem = _valid_read(ring, 0, ctx.timeout)
    if problem is not None:
        return failed(problem, "the same descriptors, made available properly, served")
    return passed("heads with AVAIL=0 USED=1 and AVAIL=1 USED=1 left alone; the same chain "
                  "made available then served")


@check("packed.id-range", "A buffer id outside the queue breaks neither the ring's later "
       "requests nor the device", PACKED_ID, disruptive=True)  # fmt: skip
def id_range(ctx: Context) -> Finding:
    with _ring(ctx) as ring:
        ring.read_request(QUEUE_SIZE)  # ids are 0..QUEUE_SIZE-1
        ring.kick()
        bad = ring.wait_used(_QUIET)
        seen = ("left unanswered" if bad is None
                else f"answered as buffer id {bad[0]}, length {bad[1]}")
        problem = _valid_read(ring, 1, ctx.timeout)
    if problem is None:
        return passed(f"buffer id {QUEUE_SIZE} on a ring of {QUEUE_SIZE}: {seen}; a valid "
                      "read after it on the same ring served")
    return passed(f"buffer id {QUEUE_SIZE}: {seen}; {problem}; {_served_after(ctx)}")


@check("packed.endless-chain", "A chain whose every descriptor has NEXT is answered or "
       "stops the ring, never hangs the device", PACKED_CHAIN, disruptive=True)  # fmt: skip
def endless_chain(ctx: Context) -> Finding:
    with _ring(ctx) as ring:
        ring.memory.view(ring.data, DATA_SIZE)[:] = bytes(DATA_SIZE)
        placed = [ring.place(ring.data, DATA_SIZE, 0, VRING_DESC_F_NEXT)
                  for _ in range(QUEUE_SIZE)]
        for pos, flags in reversed(placed):  # the head last
            ring.publish(pos, flags)
        ring.ndescs[0] = QUEUE_SIZE
        ring.kick()
        used = ring.wait_used(ctx.timeout)
        if used is not None and used[1] != 0:
            return failed(f"the endless chain was answered with length {used[1]}",
                          "length 0 (the chain is malformed) or no answer")
        seen = "answered with length 0" if used is not None else "left unanswered"
        problem = _valid_read(ring, 1, ctx.timeout) if used is not None else "ring stopped"
    if problem is None:
        return passed(f"a chain of all {QUEUE_SIZE} descriptors with NEXT {seen}; a valid "
                      "read after it on the same ring served")
    return passed(f"the endless chain {seen}; {problem}; {_served_after(ctx)}")
