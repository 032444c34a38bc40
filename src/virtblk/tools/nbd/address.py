"""Where ``virtblk nbd`` listens: ``unix:PATH`` or ``HOST:PORT``, loopback unless told.

NBD has no authentication and this server no TLS: whoever reaches the socket reads and
writes the whole device.  So a TCP listener binds a loopback address unless the user
says ``--allow-remote``, and a host name counts as loopback only when every address it
resolves to is one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket

DEFAULT_PORT = 10809
"""The IANA port for NBD."""


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """A Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def uri(self, export: str = "") -> str:
        """The NBD URI (as libnbd and QEMU spell it) that reaches ``export`` here."""
        if self.path is not None:
            return f"nbd+unix:///{export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


def parse_listen(text: str) -> ListenAddress:
    """``unix:PATH``, ``HOST:PORT``, ``[V6ADDR]:PORT`` or ``HOST`` (port 10809); ValueError
    says what is wrong."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("unix: needs a path (unix:/run/disk.sock)")
        return ListenAddress(path=path)
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDR]:PORT")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    if not host:
        raise ValueError(f"{text!r}: no host (127.0.0.1:{port} listens on loopback)")
    if not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
        raise ValueError(f"{text!r}: port {port!r} is not a number in 0..65535")
    return ListenAddress(host=host, port=int(port))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
