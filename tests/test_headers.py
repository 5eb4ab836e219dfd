"""
Header filtering and path routing, checked as properties with Hypothesis.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hestia.headers import (
    HOP_BY_HOP,
    PathEscape,
    headers_for_backend,
    headers_for_client,
    request_id_from,
    split_service_path,
)

pytestmark = pytest.mark.unit

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12).map(str.encode)
header_value = st.binary(min_size=0, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)
hop_name = st.sampled_from(sorted(HOP_BY_HOP)).map(lambda n: n.title())
header_name = st.one_of(token, hop_name, st.sampled_from([b"Connection", b"X-Forwarded-For", b"Host"]))
headers = st.lists(st.tuples(header_name, st.lists(header_value, min_size=1, max_size=3)), max_size=12)


def forwarded(raw: list[tuple[bytes, list[bytes]]]) -> list[tuple[bytes, list[bytes]]]:
    return headers_for_backend(
        raw, client_ip="10.0.0.9", scheme=b"http", host=b"gw:8080", prefix=b"/services/x", request_id=b"rid"
    )


@given(headers)
def test_no_hop_by_hop_header_reaches_the_backend(raw: list[tuple[bytes, list[bytes]]]) -> None:
    named_in_connection = {
        token.strip().lower()
        for name, values in raw
        if name.lower() == b"connection"
        for value in values
        for token in value.split(b",")
    }
    for name, _ in forwarded(raw):
        assert name.lower() not in HOP_BY_HOP
        assert name.lower() not in named_in_connection - {b"x-forwarded-for", b"x-forwarded-proto",
                                                           b"x-forwarded-host", b"x-forwarded-prefix",
                                                           b"x-request-id"}
        assert name.lower() not in (b"host", b"content-length")


@given(headers)
def test_end_to_end_headers_keep_every_value_in_order(raw: list[tuple[bytes, list[bytes]]]) -> None:
    out = headers_for_client(raw)
    dropped = HOP_BY_HOP | {
        token.strip().lower()
        for name, values in raw
        if name.lower() == b"connection"
        for value in values
        for token in value.split(b",")
    }
    expected = [(n, v) for n, v in raw if n.lower() not in dropped]
    assert out == expected


@given(st.lists(st.sampled_from([b"1.1.1.1", b"2.2.2.2", b"3.3.3.3"]), max_size=3))
def test_forwarded_for_is_appended_to(chain: list[bytes]) -> None:
    raw = [(b"X-Forwarded-For", [b", ".join(chain)])] if chain else []
    out = dict(forwarded(raw))
    assert out[b"X-Forwarded-For"] == [b", ".join([*([b", ".join(chain)] if chain else []), b"10.0.0.9"])]
    assert out[b"X-Forwarded-Prefix"] == [b"/services/x"]
    assert out[b"X-Forwarded-Host"] == [b"gw:8080"]
    assert out[b"X-Request-ID"] == [b"rid"]


def test_client_cannot_spoof_forwarded_proto_or_request_id_twice() -> None:
    out = forwarded([(b"X-Forwarded-Proto", [b"https"]), (b"X-Request-Id", [b"other"])])
    assert dict(out)[b"X-Forwarded-Proto"] == [b"http"]
    assert [n for n, _ in out if n.lower() == b"x-request-id"] == [b"X-Request-ID"]


def test_request_ids() -> None:
    assert request_id_from([b"abc-123"]) == b"abc-123"
    generated = request_id_from([b"bad id\x00"])
    assert len(generated) == 32 and generated != request_id_from(None)


service_name = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,10}\Z")
path_segment = st.text(alphabet="abcxyz019-._~%/\\?=&", max_size=30).map(lambda s: s.encode())


@given(service_name, path_segment)
def test_routing_never_leaves_the_named_service(name: str, rest: bytes) -> None:
    uri = b"/services/" + name.encode() + b"/" + rest
    try:
        routed = split_service_path(uri)
    except PathEscape:
        return
    assert routed is not None
    routed_name, forwarded_rest = routed
    assert routed_name == name
    assert forwarded_rest.startswith(b"/")
    # What is forwarded is exactly what the client wrote below the service.
    assert uri.endswith(forwarded_rest)
    assert b".." not in forwarded_rest.split(b"?")[0].replace(b"\\", b"/").split(b"/")


@pytest.mark.parametrize(
    "uri",
    [
        b"/services/a/../../v1/services",
        b"/services/a/%2e%2e/v1",
        b"/services/a/%2E%2E%2Fv1",
        b"/services/a/%252e%252e/v1",
        b"/services/a/..%5c..%5cv1",
        b"/services/a/..\\v1",
        b"/services/a/x/../../b",
    ],
)
def test_dot_segments_in_any_spelling_are_refused(uri: bytes) -> None:
    with pytest.raises(PathEscape):
        split_service_path(uri)


@pytest.mark.parametrize(
    "uri, expected",
    [
        (b"/services/ollama/api/tags", ("ollama", b"/api/tags")),
        (b"/services/ollama", ("ollama", b"/")),
        (b"/services/ollama?x=1", ("ollama", b"/?x=1")),
        (b"/services/web/a%20b/c?q=%2F&x", ("web", b"/a%20b/c?q=%2F&x")),
        (b"/services/web/..foo/x", ("web", b"/..foo/x")),
    ],
)
def test_routing_examples(uri: bytes, expected: tuple[str, bytes]) -> None:
    assert split_service_path(uri) == expected


@pytest.mark.parametrize(
    "uri", [b"/services/", b"/services/Ollama/", b"/services/%6fllama/", b"/services/-x/", b"/v1/health",
            b"http://evil/services/x/", b"/services/a b/"]
)
def test_names_outside_the_pattern_route_nowhere(uri: bytes) -> None:
    assert split_service_path(uri) is None
