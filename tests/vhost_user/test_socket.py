"""Frontend and server over real Unix sockets, with the recording device behind the server."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_user_helpers import AVAIL_OFF, DESC_OFF, USED_OFF, RecordingDevice, guest_region

from virtblk.spec import BlkConfig, Feature
from virtblk.vhost_user.backend import DEFAULT_PROTOCOL_FEATURES
from virtblk.vhost_user.codec import HEADER, encode
from virtblk.vhost_user.errors import NackError, PeerGoneError, ProtocolError, ReplyTimeoutError
from virtblk.vhost_user.frontend import VhostUserFrontend
from virtblk.vhost_user.messages import GetFeaturesReply, ProtocolFeature
from virtblk.vhost_user.server import VhostUserServer


class Served:
    """A server thread serving one end of a socketpair; the test holds a frontend."""

    def __init__(
        self, device: RecordingDevice, timeout: float = 5.0, use_reply_ack: bool = True
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.device = device
        self.server = VhostUserServer(theirs, device)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.frontend = VhostUserFrontend(ours, timeout=timeout, use_reply_ack=use_reply_ack)

    def close(self) -> None:
        self.frontend.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served(RecordingDevice())
    yield s
    s.close()


def negotiate(frontend: VhostUserFrontend) -> None:
    assert frontend.get_features() & Feature.VHOST_USER_PROTOCOL_FEATURES.mask
    frontend.set_protocol_features(frontend.get_protocol_features())
    frontend.set_owner()


def test_features_config_and_queue_num(served: Served) -> None:
    frontend = served.frontend
    negotiate(frontend)
    assert frontend.reply_ack  # offered and enabled: every request is acknowledged
    assert frontend.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert frontend.get_queue_num() == 2
    assert frontend.get_max_mem_slots() == 32
    frontend.set_features(Feature.VERSION_1.mask | Feature.BLK_CONFIG_WCE.mask)
    assert served.device.acked == Feature.VERSION_1.mask | Feature.BLK_CONFIG_WCE.mask
    config = BlkConfig.unpack(frontend.get_config(BlkConfig.SIZE))
    assert config.capacity == 2048
    frontend.set_config(BlkConfig.OFFSET_WRITEBACK, b"\x01")
    assert BlkConfig.unpack(frontend.get_config(BlkConfig.SIZE)).writeback == 1
    with pytest.raises(NackError, match="SET_CONFIG failed"):
        frontend.set_config(0, b"\x05")  # the device refuses: NACK, connection stays up
    with pytest.raises(NackError, match="GET_CONFIG"):
        frontend.get_config(16, offset=90)
    assert frontend.get_queue_num() == 2


def test_memory_table_and_vring_setup(served: Served) -> None:
    frontend = served.frontend
    negotiate(frontend)
    frontend.set_features(
        Feature.VERSION_1.mask
        | Feature.RING_EVENT_IDX.mask
        | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
    )
    region = guest_region()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        frontend.set_mem_table([region])
        uva = region.user_addr
        frontend.set_vring_num(0, 128)
        frontend.set_vring_base(0, 3)
        frontend.set_vring_addr(0, uva + DESC_OFF, uva + USED_OFF, uva + AVAIL_OFF)
        frontend.set_vring_call(0, call)
        frontend.set_vring_kick(0, kick)
        assert served.device.log == []
        frontend.set_vring_enable(0, True)
        assert served.device.log == [("start", 0)]
        vq, kick_fd, call_fd = served.device.running[0]
        assert (vq.num, vq.last_avail_idx, vq.event_idx) == (128, 3, True)
        # the device got its own copies of the eventfds: writing ours wakes its kick fd
        os.eventfd_write(kick, 1)
        assert os.eventfd_read(kick_fd) == 1
        os.eventfd_write(call_fd, 1)
        assert os.eventfd_read(call) == 1
        # the device sees the driver's writes through its own mapping
        region.view[DESC_OFF : DESC_OFF + 4] = b"ring"
        assert bytes(vq._desc[:4]) == b"ring"
        assert frontend.get_vring_base(0) == 3
        assert served.device.log == [("start", 0), ("stop", 0)]
        with pytest.raises(NackError, match="SET_VRING_NUM"):
            frontend.set_vring_num(5, 128)  # out of range: NACK, then the server drops us
        with pytest.raises(PeerGoneError):
            frontend.get_queue_num()
        assert served.server.last_violation is not None
        assert "ring index 5" in str(served.server.last_violation)
    finally:
        region.close()
        os.close(kick)
        os.close(call)


def test_config_change_reaches_the_frontend_callback(served: Served) -> None:
    frontend = served.frontend
    negotiate(frontend)
    seen = threading.Event()
    configs: list[int] = []

    def on_change() -> None:
        configs.append(BlkConfig.unpack(frontend.get_config(BlkConfig.SIZE)).capacity)
        seen.set()

    channel = frontend.open_backend_channel(on_change)
    channel.start()
    try:
        frontend.get_queue_num()  # the server has installed the channel by now
        served.device.config_bytes[0:8] = (4096).to_bytes(8, "little")
        assert served.device.config_changed is not None
        served.device.config_changed()  # as a device thread would after a resize
        assert seen.wait(5)
        assert configs == [4096]
        deadline = time.monotonic() + 5
        while served.server.connection and served.server.connection.backend_acks_pending:
            assert time.monotonic() < deadline, "the ack never reached the server"
            time.sleep(0.01)
        assert channel.config_changes == 1 and channel.error is None
    finally:
        channel.close()


def test_peer_closing_mid_conversation_is_peer_gone_quickly() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, timeout=10.0)

    def half_answer() -> None:
        theirs.recv(64)
        theirs.sendall(encode(GetFeaturesReply(1))[0][:10])  # half a reply, then gone
        theirs.close()

    peer = threading.Thread(target=half_answer)
    peer.start()
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="middle of a message"):
        frontend.get_features()
    assert time.monotonic() - start < 2
    peer.join()
    with pytest.raises(ProtocolError):  # the connection stays failed
        frontend.get_features()
    frontend.close()


def test_peer_closing_before_replying_is_peer_gone() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, timeout=10.0)
    theirs.close()
    start = time.monotonic()
    with pytest.raises(PeerGoneError):
        frontend.get_features()
    assert time.monotonic() - start < 2
    frontend.close()


def test_silent_peer_times_out() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ReplyTimeoutError, match=r"no answer within 0\.3 s"):
        frontend.get_protocol_features()
    assert 0.25 < time.monotonic() - start < 2
    frontend.close()
    theirs.close()


def test_garbage_reply_is_a_protocol_error() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = VhostUserFrontend(ours, timeout=2.0)
    theirs.sendall(HEADER.pack(1, 0x5, 8) + bytes(8))  # a reply to GET_FEATURES ...
    with pytest.raises(ProtocolError, match="answered GET_FEATURES to GET_QUEUE_NUM"):
        frontend.get_queue_num()  # ... to the wrong request
    frontend.close()
    theirs.close()


# --------------------------------------------------------------------------- listening server


@pytest.fixture
def socket_path(sock_dir: Path) -> str:
    return str(sock_dir / "vu.sock")


def start_server(path: str, device: RecordingDevice) -> tuple[VhostUserServer, threading.Thread]:
    server = VhostUserServer(path, device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def test_listening_server_lifecycle(socket_path: str) -> None:
    device = RecordingDevice()
    server, thread = start_server(socket_path, device)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    # a second server on the same path must not steal it
    with pytest.raises(OSError, match="already listening"):
        VhostUserServer(socket_path, RecordingDevice())
    # one frontend, then another after the first goes away: the device is reset between
    with VhostUserFrontend.connect(socket_path, timeout=5) as first:
        negotiate(first)
        assert first.get_queue_num() == 2
    with VhostUserFrontend.connect(socket_path, timeout=5) as second:
        negotiate(second)
        assert second.get_queue_num() == 2
    # a frontend that sends garbage is dropped; the server keeps listening
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.connect(socket_path)
        bad.sendall(b"\xff" * 12)
        bad.settimeout(5)
        assert bad.recv(16) == b""  # dropped
    with VhostUserFrontend.connect(socket_path, timeout=5) as third:
        assert third.get_queue_num() == 2
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert not os.path.exists(socket_path)  # removed on exit
    assert device.resets >= 3
    assert server.sessions >= 4


def test_stop_ends_a_live_session(socket_path: str) -> None:
    device = RecordingDevice()
    server, thread = start_server(socket_path, device)
    frontend = VhostUserFrontend.connect(socket_path, timeout=5)
    negotiate(frontend)
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(PeerGoneError):
        frontend.get_queue_num()
    frontend.close()
    assert device.resets == 1


def test_stale_socket_file_is_replaced(socket_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)  # bound, never listening: a crashed server's leftover
    stale.close()
    server, thread = start_server(socket_path, RecordingDevice())
    with VhostUserFrontend.connect(socket_path, timeout=5) as frontend:
        assert frontend.get_queue_num() == 2
    server.stop()
    thread.join(timeout=5)


def test_refuses_to_replace_a_regular_file(socket_path: str) -> None:
    Path(socket_path).write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        VhostUserServer(socket_path, RecordingDevice())
    assert Path(socket_path).read_text() == "not a socket"


def test_connect_to_nothing_is_peer_gone(socket_path: str) -> None:
    with pytest.raises(PeerGoneError, match="cannot connect"):
        VhostUserFrontend.connect(socket_path, timeout=1)


def test_reply_ack_can_be_declined() -> None:
    served = Served(RecordingDevice(), use_reply_ack=False)
    try:
        served.frontend.set_protocol_features(ProtocolFeature.REPLY_ACK.mask)
        assert not served.frontend.reply_ack
        served.frontend.set_owner()  # no ack asked, none awaited
        assert served.frontend.get_queue_num() == 2
    finally:
        served.close()


def test_module_level_serve_connected_serves_one_session() -> None:
    from virtblk.vhost_user.server import serve_connected

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = RecordingDevice()
    thread = threading.Thread(target=serve_connected, args=(theirs, device), daemon=True)
    thread.start()
    with VhostUserFrontend(ours, timeout=5) as frontend:
        negotiate(frontend)
        assert frontend.get_queue_num() == 2
    thread.join(timeout=5)
    assert not thread.is_alive() and device.resets == 1


class _BuggyDevice(RecordingDevice):
    """A device whose GET_QUEUE_NUM path fails the first time with an unexpected error."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    @property
    def num_queues(self) -> int:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("a bug in the device model")
        return 2

    @num_queues.setter
    def num_queues(self, value: int) -> None:
        pass


def test_an_internal_error_drops_only_that_frontend(socket_path: str) -> None:
    server, thread = start_server(socket_path, _BuggyDevice())
    with VhostUserFrontend.connect(socket_path, timeout=5) as first:
        with pytest.raises(PeerGoneError) as info:
            first.get_queue_num()
        assert not isinstance(info.value, ReplyTimeoutError)  # dropped, not left hanging
    with VhostUserFrontend.connect(socket_path, timeout=5) as second:
        assert second.get_queue_num() == 2
    assert thread.is_alive()
    server.stop()
    thread.join(timeout=5)
