"""
The proxy's fast path for response headers keeps the rule of L{headers_for_client}.

L{hestia.proxy._client_headers} reuses the backend's L{Headers} object instead
of copying it header by header (it is on every response's path); these
properties check that it drops and keeps exactly what the pure, separately
tested L{headers_for_client} does.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from hestia.headers import HOP_BY_HOP, headers_for_client
from hestia.proxy._exchange import _client_headers

pytestmark = pytest.mark.unit

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12).map(str.encode)
value = st.binary(min_size=0, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)
hop_name = st.sampled_from(sorted(HOP_BY_HOP)).map(lambda n: n.title())
name = st.one_of(token, hop_name, st.sampled_from([b"Connection", b"Server", b"Date", b"X-Multi"]))
raw = st.lists(st.tuples(name, st.lists(value, min_size=1, max_size=3)), max_size=12)
connection_value = st.lists(st.one_of(token, hop_name), max_size=4).map(b", ".join)


def build(pairs: list[tuple[bytes, list[bytes]]]) -> Headers:
    headers = Headers()
    for header, values in pairs:
        for each in values:
            headers.addRawHeader(header, each)
    return headers


def as_dict(headers: Headers | list[tuple[bytes, list[bytes]]]) -> dict[bytes, list[bytes]]:
    pairs = headers.getAllRawHeaders() if isinstance(headers, Headers) else headers
    out: dict[bytes, list[bytes]] = {}
    for header, values in pairs:
        out.setdefault(header.lower(), []).extend(values)
    return out


@given(raw, st.one_of(st.none(), connection_value))
def test_fast_path_keeps_the_rule_of_headers_for_client(backend_raw: list[tuple[bytes, list[bytes]]],
                                                        listed: bytes | None) -> None:
    backend = build(backend_raw)
    connection = None if listed is None else Headers({b"connection": [listed]})
    expected = as_dict(headers_for_client(backend.getAllRawHeaders(),
                                          connection.getAllRawHeaders() if connection is not None else ()))
    got = _client_headers(Headers(), backend, connection)
    assert as_dict(got) == expected


@given(raw)
def test_gateway_headers_survive_unless_the_backend_sends_them_or_they_are_twisted_defaults(
    backend_raw: list[tuple[bytes, list[bytes]]],
) -> None:
    gateway_set = Headers({b"server": [b"TwistedWeb"], b"date": [b"today"], b"x-gateway": [b"kept"]})
    backend = build(backend_raw)
    backend_names = {header.lower() for header, _ in backend.getAllRawHeaders()}
    got = as_dict(_client_headers(gateway_set, backend, None))
    if b"x-gateway" not in backend_names:
        assert got[b"x-gateway"] == [b"kept"]
    assert got.get(b"server") != [b"TwistedWeb"] or b"server" in backend_names
    assert got.get(b"date") != [b"today"] or b"date" in backend_names
