"""NBD URIs (NetworkBlockDevice/nbd ``doc/uri.md``): where an export is and what it is called.

``nbd://HOST[:PORT]/EXPORT`` (also ``nbd+tcp://``) is TCP, port 10809 by default;
``nbd+unix:///EXPORT?socket=PATH`` a Unix socket (a leading ``%00`` names one in the
abstract namespace).  The export name is the path without its first ``/``, percent-decoded.
We do not speak TLS, so ``nbds``/``nbds+unix`` and the ``tls-*`` parameters are refused
(uri.md: a client without TLS SHOULD give an error for them), as is any other parameter
(uri.md: unknown parameters SHOULD be diagnosed): a typo must not connect somewhere else.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from virtblk.nbd.wire import MAX_STRING

DEFAULT_PORT = 10809
"""The port IANA assigned to NBD."""

_FORMS = "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"


@dataclasses.dataclass(frozen=True)
class NbdUri:
    """Where an export is: a TCP ``host`` and ``port``, or a Unix ``socket`` path."""

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __str__(self) -> str:
        name = urllib.parse.quote(self.export, safe="")
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    @property
    def where(self) -> str:
        """The server's address, for a message: ``unix socket PATH`` or ``HOST:PORT``."""
        if self.socket is not None:
            return f"unix socket {self.socket}"
        return f"{self.host}:{self.port}"


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"NBD URI {text!r}: {why} (expected {_FORMS})")


def parse_uri(text: str) -> NbdUri:
    """The export ``text`` names; ValueError saying what is wrong with it."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _bad(text, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+tcp"):
        raise _bad(text, f"{scheme} asks for TLS, which virtblk does not speak")
    if scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        raise _bad(text, f"the scheme {parts.scheme or '(none)'!r} is not NBD's")
    if parts.fragment:
        raise _bad(text, "a fragment (#...) means nothing to NBD")
    if parts.username is not None or parts.password is not None:
        raise _bad(text, "user info is for TLS authentication, which virtblk does not do")
    path = parts.path
    if path and not path.startswith("/"):
        raise _bad(text, "the export name must follow a '/'")
    export = urllib.parse.unquote(path[1:], errors="strict") if path else ""
    if "\0" in export:
        raise _bad(text, "an export name cannot hold a NUL character")
    if len(export.encode()) > MAX_STRING:
        raise _bad(text, f"the export name is longer than {MAX_STRING} bytes")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                      strict_parsing=bool(parts.query), errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(text, f"a malformed query: {exc}") from None
    for key in query:
        if key.startswith("tls"):
            raise _bad(text, f"{key} is a TLS parameter; virtblk does not speak TLS")
        if key != "socket":
            raise _bad(text, f"unknown parameter {key!r}")
    sockets = query.get("socket", [])
    if len(sockets) > 1:
        raise _bad(text, "socket= is given more than once")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise _bad(text, f"nbd+unix takes no host ({parts.netloc!r}); write "
                       "nbd+unix:///EXPORT?socket=PATH")
        if not sockets or not sockets[0]:
            raise _bad(text, "nbd+unix needs ?socket=PATH")
        return NbdUri(export=export, socket=sockets[0])
    if sockets:
        raise _bad(text, f"socket= goes with nbd+unix, not {scheme}")
    if not parts.hostname:
        raise _bad(text, f"{scheme} needs a host")
    if port == 0:
        raise _bad(text, "port 0 is no port to connect to")
    return NbdUri(export=export, host=parts.hostname,
                  port=DEFAULT_PORT if port is None else port)
