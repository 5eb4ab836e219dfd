"""
Header and path rules that mutation testing (issue 21) found unpinned.  Every expectation here
is written out by hand, independent of the module's constants, and headers are read as the
ordered list of (name, values) the backend gets: a dict would let the gateway's value hide a
client's one.
"""

from __future__ import annotations

import pytest

from hestia.headers import (
    PathEscape,
    connection_tokens,
    end_to_end,
    headers_for_backend,
    headers_for_client,
    join_url,
    request_id_from,
    split_service_path,
)

pytestmark = pytest.mark.unit

Raw = list[tuple[bytes, list[bytes]]]


def to_backend(raw: Raw, **overrides: object) -> Raw:
    arguments: dict[str, object] = {
        "client_ip": "10.0.0.9",
        "scheme": b"https",
        "host": b"gw.example:8443",
        "prefix": b"/services/app",
        "request_id": b"rid-1",
        **overrides,
    }
    return headers_for_backend(raw, **arguments)  # type: ignore[arg-type]


def test_ordinary_headers_reach_the_backend_unchanged_and_in_order() -> None:
    raw: Raw = [
        (b"Accept", [b"text/html"]),
        (b"Cookie", [b"a=1", b"b=2"]),
        (b"X-Custom", [b"one"]),
        (b"Authorization", [b"Bearer backend-token"]),
    ]
    assert to_backend(raw) == [
        (b"Accept", [b"text/html"]),
        (b"Cookie", [b"a=1", b"b=2"]),
        (b"X-Custom", [b"one"]),
        (b"Authorization", [b"Bearer backend-token"]),
        (b"X-Forwarded-For", [b"10.0.0.9"]),
        (b"X-Forwarded-Proto", [b"https"]),
        (b"X-Forwarded-Host", [b"gw.example:8443"]),
        (b"X-Forwarded-Prefix", [b"/services/app"]),
        (b"X-Request-ID", [b"rid-1"]),
    ]


def test_a_clients_own_forwarded_headers_are_replaced_not_kept() -> None:
    raw: Raw = [
        (b"x-forwarded-proto", [b"http"]),
        (b"X-FORWARDED-HOST", [b"evil.example"]),
        (b"X-Forwarded-Prefix", [b"/admin"]),
        (b"X-Request-Id", [b"client-chosen"]),
        (b"Host", [b"evil.example"]),
        (b"Content-Length", [b"5"]),
        (b"Expect", [b"100-continue"]),
        (b"X-Forwarded-For", [b"1.1.1.1", b"2.2.2.2"]),
    ]
    out = to_backend(raw)
    assert out == [
        (b"X-Forwarded-For", [b"1.1.1.1, 2.2.2.2, 10.0.0.9"]),
        (b"X-Forwarded-Proto", [b"https"]),
        (b"X-Forwarded-Host", [b"gw.example:8443"]),
        (b"X-Forwarded-Prefix", [b"/services/app"]),
        (b"X-Request-ID", [b"rid-1"]),
    ]
    names = [name.lower() for name, _ in out]
    assert len(names) == len(set(names))  # exactly one of each


def test_host_and_prefix_are_left_out_when_there_are_none() -> None:
    assert to_backend([], host=None, prefix=b"") == [
        (b"X-Forwarded-For", [b"10.0.0.9"]),
        (b"X-Forwarded-Proto", [b"https"]),
        (b"X-Request-ID", [b"rid-1"]),
    ]


def test_credentials_the_gateway_consumed_are_dropped() -> None:
    raw: Raw = [(b"X-Hestia-Token", [b"secret"]), (b"Accept", [b"*/*"])]
    out = to_backend(raw, drop=frozenset({b"x-hestia-token"}))
    assert out[0] == (b"Accept", [b"*/*"])
    assert all(name != b"X-Hestia-Token" for name, _ in out)


def test_every_hop_by_hop_header_is_dropped() -> None:
    raw: Raw = [
        (b"Connection", [b"keep-alive"]),
        (b"Keep-Alive", [b"timeout=5"]),
        (b"Proxy-Connection", [b"keep-alive"]),
        (b"TE", [b"trailers"]),
        (b"Trailer", [b"Expires"]),
        (b"Transfer-Encoding", [b"chunked"]),
        (b"Upgrade", [b"h2c"]),
        (b"Proxy-Authenticate", [b"Basic"]),
        (b"Proxy-Authorization", [b"Basic dXNlcjpwYXNz"]),
        (b"Accept", [b"*/*"]),
    ]
    assert end_to_end(raw) == [(b"Accept", [b"*/*"])]


def test_headers_named_in_connection_are_dropped_in_any_case_and_spacing() -> None:
    raw: Raw = [
        (b"connection", [b" X-Secret ,close", b"x-other"]),
        (b"Connection", [b",,  "]),
        (b"x-secret", [b"1"]),
        (b"X-OTHER", [b"2"]),
        (b"Close", [b"not a header, but named"]),
        (b"X-Kept", [b"3"]),
    ]
    assert connection_tokens(raw) == frozenset({b"x-secret", b"close", b"x-other"})
    assert end_to_end(raw) == [(b"X-Kept", [b"3"])]
    assert [name for name, _ in to_backend(raw)][0] == b"X-Kept"


def test_response_headers_drop_what_the_response_connection_names() -> None:
    backend: Raw = [(b"X-Session", [b"s"]), (b"Content-Type", [b"text/plain"]), (b"Keep-Alive", [b"5"])]
    connection: Raw = [(b"Connection", [b"X-Session"])]
    assert headers_for_client(backend, connection) == [(b"Content-Type", [b"text/plain"])]
    assert headers_for_client(backend) == [(b"X-Session", [b"s"]), (b"Content-Type", [b"text/plain"])]


def test_request_ids_keep_a_sane_client_id_and_make_new_unique_ones() -> None:
    assert request_id_from([b"a" * 128]) == b"a" * 128
    assert request_id_from([b"ok-1", b"second"]) == b"ok-1"
    for bad in ([b"a" * 129], [b""], [b"has space"], [b"caf\xc3\xa9"]):
        assert request_id_from(bad) != bad[0]
    made = {request_id_from(None) for _ in range(50)} | {request_id_from([]) for _ in range(50)}
    assert len(made) == 100
    assert all(len(one) == 32 and int(one, 16) >= 0 for one in made)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/services/app", ("app", b"/")),
        (b"/services/app/", ("app", b"/")),
        (b"/services/app?q=1", ("app", b"/?q=1")),
        (b"/services/app/a/b?x=/..", ("app", b"/a/b?x=/..")),
        (b"/services/my-app_2/x%20y", ("my-app_2", b"/x%20y")),
    ],
)
def test_service_paths(uri: bytes, expected: tuple[str, bytes]) -> None:
    assert split_service_path(uri) == expected


@pytest.mark.parametrize(
    "uri", [b"/service/app", b"/services/", b"/services//x", b"/services/App/", b"/services/\xff/"]
)
def test_not_a_service_path(uri: bytes) -> None:
    assert split_service_path(uri) is None


@pytest.mark.parametrize(
    "uri",
    [
        b"/services/app/..",
        b"/services/app/a/../../b",
        b"/services/app/%2e%2e/x",
        b"/services/app/%252e%252e/x",
        b"/services/app/%25252e%25252e/x",
        b"/services/app/a\\..\\b",
        b"/services/app/%2525252e",
    ],
)
def test_climbing_out_is_refused(uri: bytes) -> None:
    with pytest.raises(PathEscape, match="path escapes /services/app/"):
        split_service_path(uri)


def test_dots_that_do_not_climb_are_allowed() -> None:
    assert split_service_path(b"/services/app/a..b/.../x.") == ("app", b"/a..b/.../x.")
    assert split_service_path(b"/services/app/%25") == ("app", b"/%25")


def test_join_url_keeps_the_base_path() -> None:
    assert join_url("http://127.0.0.1:9/base/", b"/x?y=1") == b"http://127.0.0.1:9/base/x?y=1"
    assert join_url("http://127.0.0.1:9", b"/") == b"http://127.0.0.1:9/"


def test_new_request_ids_are_lowercase_hex() -> None:
    made = request_id_from(None)
    assert made == made.lower() and bytes.fromhex(made.decode()) and len(made) == 32


@pytest.mark.parametrize(
    "rest",
    [b"/%c0%ae%c0%ae/x", b"/%u002e%u002e/x", b"/%U002E%U002E/x", b"/%EF%BC%8E%EF%BC%8E/x", b"/..;x=1/y",
     b"/.. /x", b"/..%00/x", b"/%e0%80%ae%e0%80%ae/x", b"/%f0%80%80%ae%f0%80%80%ae/x", b"/a\\..\\b"],
)
def test_lax_spellings_of_dot_dot_are_refused(rest: bytes) -> None:
    with pytest.raises(PathEscape):
        split_service_path(b"/services/app" + rest)


@pytest.mark.parametrize(
    "rest", [b"/%c0%ae/x", b"/%c0x/y", b"/caf%c3%a9/..x", b"/%ff%fe", b"/x;..", b"/%u002e/", b"/\xc3\xa9t\xc3\xa9"]
)
def test_near_misses_are_not_climbing(rest: bytes) -> None:
    assert split_service_path(b"/services/app" + rest) == ("app", rest)


@pytest.mark.parametrize(
    "rest",
    [
        # 0x40 and 0xAE: an ASCII byte leads no sequence, so a continuation byte after it is not
        # folded into one character with it (read as a 2-byte form, "@\xae" would be ".")
        b"/@%AE@%AE/x",
        # 0xF8 starts no UTF-8 sequence (the 4-byte leads end at 0xF7): "\xf8\x80\x80\xae" is
        # four characters, not an overlong "."
        b"/%F8%80%80%AE%F8%80%80%AE/x",
    ],
)
def test_bytes_that_lead_no_utf8_sequence_stand_for_themselves(rest: bytes) -> None:
    assert split_service_path(b"/services/app" + rest) == ("app", rest)


def test_only_the_path_before_the_first_question_mark_is_checked_for_dot_dot() -> None:
    # a second "?" is part of the query: the "/../" before it is no path segment
    assert split_service_path(b"/services/app/a?next=/../b?c=1") == ("app", b"/a?next=/../b?c=1")


def test_join_url_strips_only_slashes_from_the_base() -> None:
    assert join_url("http://127.0.0.1:9/api-X/", b"/v1") == b"http://127.0.0.1:9/api-X/v1"
    assert join_url("http://127.0.0.1:9/XX//", b"/v1") == b"http://127.0.0.1:9/XX/v1"
