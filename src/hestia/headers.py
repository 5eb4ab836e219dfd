"""
What the proxy forwards, as pure functions of the request.

Kept free of Twisted requests and I/O so that Hypothesis can check the rules
on thousands of generated inputs: which headers cross the gateway, and which
paths reach which service.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from urllib.parse import unquote_to_bytes

from hestia.config import SERVICE_NAME

SERVICES_PREFIX = b"/services/"

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        # RFC 9113 section 3.2.1 (h2c): connection-specific, and Hestia never
        # passes an h2c upgrade on.
        b"http2-settings",
    }
)

# Set by the HTTP client from the target URL and the body producer.  Expect is
# answered by the gateway itself (Twisted sends the 100 Continue) and the body
# is already here when the request is forwarded.
_RECOMPUTED = frozenset({b"host", b"content-length", b"expect"})
_FORWARDED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix", b"x-request-id"})

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
# A generator of Hestia's own, seeded from os.urandom once.
_random_bits = random.Random().getrandbits  # noqa: S311 -- unique, not secret

RawHeaders = Iterable[tuple[bytes, Sequence[bytes]]]


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """Header names listed in C{Connection}: hop-by-hop for this message."""
    tokens: set[bytes] = set()
    for name, values in headers:
        if name.lower() == b"connection":
            for value in values:
                tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(tokens)


def end_to_end(headers: RawHeaders, also_drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, list[bytes]]]:
    """
    The headers without hop-by-hop ones, every value of repeated ones kept.
    """
    materialised = [(name, list(values)) for name, values in headers]
    drop = HOP_BY_HOP | connection_tokens(materialised) | also_drop
    return [(name, values) for name, values in materialised if name.lower() not in drop]


def request_id_from(values: Sequence[bytes] | None) -> bytes:
    """
    The client's C{X-Request-ID} if it is sane, else a new one.

    A new one is 128 random bits as 32 hex digits (the shape of a uuid4's
    hex).  It has to be unique, not secret, so it comes from the C{random}
    module rather than from C{uuid4}'s C{os.urandom}: one system call fewer
    per request.
    """
    if values and _REQUEST_ID.match(values[0]):
        return values[0]
    return b"%032x" % _random_bits(128)


def headers_for_backend(
    headers: RawHeaders,
    *,
    client_ip: str,
    scheme: bytes,
    host: bytes | None,
    prefix: bytes,
    request_id: bytes,
    drop: frozenset[bytes] = frozenset(),
) -> list[tuple[bytes, list[bytes]]]:
    """
    The request headers as the backend should see them.

    C{X-Forwarded-For} is appended to (the client may be behind proxies of its
    own); C{X-Forwarded-Proto}, C{-Host} and C{-Prefix} describe this hop and
    replace whatever the client claimed.

    @param drop: more names to remove (credentials the gateway consumed).
    """
    forwarded_for: list[bytes] = []
    kept: list[tuple[bytes, list[bytes]]] = []
    for name, values in end_to_end(headers, also_drop=_RECOMPUTED | _FORWARDED | drop):
        if name.lower() == b"x-forwarded-for":
            forwarded_for.extend(values)
        else:
            kept.append((name, values))
    chain = b", ".join([*forwarded_for, client_ip.encode("ascii", "replace")])
    kept.append((b"X-Forwarded-For", [chain]))
    kept.append((b"X-Forwarded-Proto", [scheme]))
    if host:
        kept.append((b"X-Forwarded-Host", [host]))
    if prefix:  # Empty for host-routed requests (issue 7): the service is at /.
        kept.append((b"X-Forwarded-Prefix", [prefix]))
    kept.append((b"X-Request-ID", [request_id]))
    return kept


def headers_for_client(
    headers: RawHeaders, connection: RawHeaders = ()
) -> list[tuple[bytes, list[bytes]]]:
    """
    The backend's response headers as the client should see them.

    @param connection: the response's connection headers, when the HTTP client
        keeps them apart from C{headers} (Twisted's does): the names its
        C{Connection} lists are dropped too.
    """
    return end_to_end(headers, also_drop=connection_tokens(connection))


class PathEscape(ValueError):
    """The path tries to climb out of the service it names."""


_IIS_ESCAPE = re.compile(rb"%[uU]([0-9A-Fa-f]{4})")
_SEPARATORS = re.compile(r"[/\\]")


def _lenient_utf8(data: bytes) -> str:
    """
    C{data} as text the way a lax decoder reads it: overlong UTF-8 forms
    (C{C0 AE} for C{.}) give the character they encode, and a byte that starts
    no sequence stands for itself (as in Latin-1).
    """
    out: list[str] = []
    index, size = 0, len(data)
    while index < size:
        lead = data[index]
        width = 2 if 0xC0 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF7 else 1
        tail = data[index + 1:index + width]
        if width > 1 and len(tail) == width - 1 and all(0x80 <= byte <= 0xBF for byte in tail):
            code = lead & (0x7F >> width)
            for byte in tail:
                code = (code << 6) | (byte & 0x3F)
            out.append(chr(code) if code <= 0x10FFFF else "\ufffd")
            index += width
        else:
            out.append(chr(lead))
            index += 1
    return "".join(out)


def _segment_climbs(segment: str) -> bool:
    # ";..." is a path parameter to Tomcat and Jetty (C{..;x=1} is C{..}); some
    # servers stop at NUL or trim spaces.
    segment = segment.split(";", 1)[0].split("\x00", 1)[0].strip()
    return segment == ".."


def _spellings(path: bytes) -> Iterable[str]:
    """The texts a backend might take C{path} for: as sent, lax UTF-8, IIS C{%u}, Unicode-compatible (NFKC)."""
    yield path.decode("latin-1")
    text = _lenient_utf8(_IIS_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)).encode("utf-8"), path))
    yield text
    # Full-width dots and solidi, the one-dot leader...: NFKC makes them ASCII.
    yield unicodedata.normalize("NFKC", text)


def _climbs(path: bytes) -> bool:
    """
    Whether C{path} holds a C{..} segment in any spelling.

    Decoded up to three times (C{%252e%252e} is C{..} to a backend that decodes
    twice), with C{%2f} and backslashes taken as separators, as some servers do;
    in each round also read as overlong UTF-8 (C{%c0%ae}), IIS's C{%u002e}, and
    after Unicode compatibility folding (full-width dots, U+FF0E), with C{;params}
    ignored (C{..;/}).
    """
    for _ in range(4):
        for text in _spellings(path):
            if any(_segment_climbs(segment) for segment in _SEPARATORS.split(text)):
                return True
        decoded = unquote_to_bytes(path)
        if decoded == path:
            return False
        path = decoded
    return True  # Still encoded after three rounds: nobody sends that honestly.


def split_service_path(uri: bytes) -> tuple[str, bytes] | None:
    """
    C{/services/<name>/<rest>?<query>} -> C{(name, b"/<rest>?<query>")}.

    The rest is forwarded exactly as the client wrote it (no decoding), so the
    backend sees the same bytes it would see directly.  C{None} when C{uri} does
    not name a service in the canonical form; L{PathEscape} when the rest holds
    a C{..} segment (in any encoding, or with backslashes), which could make a
    normalising backend or cache see another path than the one routed.
    """
    if not uri.startswith(SERVICES_PREFIX):
        return None
    remainder = uri[len(SERVICES_PREFIX):]
    end = len(remainder)
    for separator in (b"/", b"?"):
        found = remainder.find(separator)
        if found != -1:
            end = min(end, found)
    name_bytes, rest = remainder[:end], remainder[end:]
    try:
        name = name_bytes.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not SERVICE_NAME.match(name):
        return None
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    if _climbs(rest.split(b"?", 1)[0]):
        raise PathEscape(f"path escapes /services/{name}/")
    return name, rest


def join_url(base: str, rest: bytes) -> bytes:
    """The backend URL for C{rest} under C{base} (which may carry a path)."""
    return base.rstrip("/").encode("ascii") + rest
