"""NBD URIs as doc/uri.md writes them, and what is refused with a reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtblk.nbd.uri import NbdUri, parse_uri


@pytest.mark.parametrize(("text", "expected"), [
    ("nbd://example.com/disk", NbdUri("disk", host="example.com")),
    ("nbd://example.com:10810/disk", NbdUri("disk", host="example.com", port=10810)),
    ("nbd+tcp://127.0.0.1/x", NbdUri("x", host="127.0.0.1")),
    ("nbd://example.com/", NbdUri("", host="example.com")),
    ("nbd://example.com", NbdUri("", host="example.com")),
    ("nbd://example.com//disk", NbdUri("/disk", host="example.com")),
    ("nbd://example.com/hello%20world", NbdUri("hello world", host="example.com")),
    ("nbd://[::1]:99/e", NbdUri("e", host="::1", port=99)),
    ("NBD://h/e", NbdUri("e", host="h")),
    ("nbd+unix:///disk?socket=/run/nbd.sock", NbdUri("disk", socket="/run/nbd.sock")),
    ("nbd+unix:///?socket=nbd.sock", NbdUri("", socket="nbd.sock")),
    ("nbd+unix:///?socket=%00/abstract", NbdUri("", socket="\0/abstract")),
])
def test_uri_forms(text: str, expected: NbdUri) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("nbds://example.com/disk", "TLS"),
    ("nbds+unix:///disk?socket=s", "TLS"),
    ("nbd://h/e?tls-type=anon", "TLS parameter"),
    ("http://example.com/disk", "scheme 'http'"),
    ("/tmp/disk.sock", "scheme '\\(none\\)'"),
    ("nbd+unix:///disk", "needs \\?socket=PATH"),
    ("nbd+unix:///disk?socket=", "needs \\?socket=PATH"),
    ("nbd+unix://host/disk?socket=s", "takes no host"),
    ("nbd+unix:///d?socket=a&socket=b", "more than once"),
    ("nbd://h/e?socket=s", "socket= goes with nbd\\+unix"),
    ("nbd://h/e?timeout=3", "unknown parameter 'timeout'"),
    ("nbd:///disk", "needs a host"),
    ("nbd://h:0/e", "port 0"),
    ("nbd://h:99999/e", "out of range"),
    ("nbd://h:port/e", "NBD URI"),
    ("nbd://user@h/e", "user info"),
    ("nbd://h/e#frag", "fragment"),
    ("nbd://h/a%00b", "NUL"),
    ("nbd://h/" + "x" * 4097, "longer than 4096"),
])
def test_bad_uris_say_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as raised:
        parse_uri(text)
    assert "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH" in str(
        raised.value)


@given(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40),
       st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\0"),
                                    min_size=1, max_size=40)))
def test_str_parses_back(export: str, socket: str | None) -> None:
    uri = (NbdUri(export, socket=socket) if socket is not None
           else NbdUri(export, host="127.0.0.1", port=12345))
    assert parse_uri(str(uri)) == uri


@given(st.text(max_size=80))
def test_any_text_parses_or_says_why(text: str) -> None:
    try:
        parse_uri(text)
    except ValueError as exc:
        assert str(exc).startswith("NBD URI ")
