"""
TLS with one certificate per hostname (SNI), HTTP/2 by ALPN, and an HTTP redirect.

C{server.listen: "txsni:/etc/hestia/certs:tcp:8443"} serves C{<host>.pem}
(key plus certificate chain, as txsni reads them) to clients asking for
C{<host>}, and C{DEFAULT.pem} to every other client, including those that send
no SNI name at all.

Why not txsni's own endpoint: txsni 0.2.0's C{SNIMap} raises C{KeyError} in the
servername callback for an unknown name (the handshake dies instead of falling
back to C{DEFAULT.pem}) and re-reads and re-parses the PEM file on every
handshake.  L{CertificateStore} keeps txsni's PEM parsing and endpoint, but
parses every file once, at start and on SIGHUP (L{CertificateStore.reload}),
and falls back to C{DEFAULT}.  Each context offers C{h2} and C{http/1.1} by
ALPN, so Twisted serves HTTP/2 to clients that ask (with the C{h2} package
installed) and HTTP/1.1 to the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from OpenSSL.SSL import Connection, Context
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime, IStreamServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from txsni.only_noticed_pypi_pem_after_i_wrote_this import objectsFromPEM
from txsni.tlsendpoint import TLSEndpoint
from zope.interface import implementer

log = Logger(namespace="hestia.tls")

PREFIX = "txsni:"
DEFAULT = "DEFAULT"
ALPN = [b"h2", b"http/1.1"]


class CertificateError(ValueError):
    """A certificate directory Hestia cannot serve from."""


def context_from_pem(pem: bytes, protocols: list[bytes] | None = None) -> Context:
    """
    An OpenSSL context for one C{.pem} file: one private key, its certificate,
    and any chain certificates after it (in any order, as txsni accepts).
    """
    objects = objectsFromPEM(pem)
    if len(objects.keys) != 1:
        raise CertificateError(f"expected 1 private key, found {len(objects.keys)}")
    key = objects.keys[0]
    by_key = {certificate.getPublicKey().keyHash(): certificate for certificate in objects.certificates}
    if key.keyHash() not in by_key:
        raise CertificateError("no certificate matches the private key")
    certificate = by_key.pop(key.keyHash())
    options = CertificateOptions(
        privateKey=key.original,
        certificate=certificate.original,
        extraCertChain=[chain.original for chain in by_key.values()],
        acceptableProtocols=ALPN if protocols is None else protocols,
    )
    return options.getContext()


def load_directory(directory: Path) -> dict[str, Context]:
    """Every C{<host>.pem} in C{directory}, parsed; C{DEFAULT.pem} is required."""
    contexts: dict[str, Context] = {}
    for path in sorted(directory.glob("*.pem")):
        host = path.stem if path.stem == DEFAULT else path.stem.lower()
        try:
            contexts[host] = context_from_pem(path.read_bytes())
        except (OSError, ValueError, Exception) as error:  # pyOpenSSL raises its own Error types
            raise CertificateError(f"{path}: {error}") from None
    if DEFAULT not in contexts:
        raise CertificateError(f"{directory}: no {DEFAULT}.pem (served to unknown and missing SNI names)")
    return contexts


@implementer(IOpenSSLServerConnectionCreator)
class CertificateStore:
    """
    Picks a context by SNI name, from certificates parsed once per (re)load.

    New connections start on C{DEFAULT}'s context; the servername callback
    switches to the named host's, or leaves C{DEFAULT} when there is none.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory).expanduser()
        self.contexts: Mapping[str, Context] = {}
        self.reload()

    def reload(self) -> list[str]:
        """
        Re-read the directory.  On any error the loaded certificates stay.

        @raise CertificateError: the new set is unusable.
        @return: the hostnames now served.
        """
        contexts = load_directory(self.directory)
        for context in contexts.values():
            context.set_tlsext_servername_callback(self._select)
        self.contexts = contexts
        return sorted(contexts)

    def _select(self, connection: Connection) -> None:
        name = connection.get_servername()
        if name is None:
            return
        context = self.contexts.get(name.decode("ascii", "replace").lower().rstrip("."))
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, protocol: Any) -> Connection:
        return Connection(self.contexts[DEFAULT], None)


def is_tls_listen(description: str) -> bool:
    return description.startswith(PREFIX)


def parse_listen(reactor: IReactorTime, description: str) -> tuple[IStreamServerEndpoint, CertificateStore]:
    """
    C{txsni:<certdir>:<endpoint>} -> (endpoint, its certificate store).

    The inner endpoint is any Twisted server endpoint (C{tcp:8443},
    C{tcp:8443:interface=127.0.0.1}); a colon in the directory is written C{\\:}.
    """
    rest = description[len(PREFIX):]
    directory, separator, inner = _split_unescaped(rest)
    if not separator or not inner:
        raise CertificateError(f"expected txsni:<certificate directory>:<endpoint>, got {description!r}")
    store = CertificateStore(directory.replace("\\:", ":"))
    return TLSEndpoint(endpoint=serverFromString(reactor, inner), contextFactory=store), store


def _split_unescaped(text: str) -> tuple[str, str, str]:
    index = 0
    while (index := text.find(":", index)) != -1:
        if index == 0 or text[index - 1] != "\\":
            return text[:index], ":", text[index + 1:]
        index += 1
    return text, "", ""


def https_port(description: str) -> int | None:
    """The TCP port of a C{txsni:} listen string, for redirects (C{None}: unknown)."""
    _, _, inner = _split_unescaped(description[len(PREFIX):])
    parts = inner.split(":")
    if len(parts) >= 2 and parts[0] in ("tcp", "tcp6", "ssl") and parts[1].isdigit():
        return int(parts[1])
    for part in parts:
        if part.startswith("port=") and part[5:].isdigit():
            return int(part[5:])
    return None


class RedirectToHTTPS(Resource):
    """
    Every request on the plain-HTTP listener: 308 to the same path over HTTPS.

    308 rather than 301, so that a POST stays a POST.  Only the host name of
    the C{Host} header is kept (never its port), and nothing is proxied here.
    """

    isLeaf = True

    def __init__(self, port: int | None) -> None:
        super().__init__()
        self.port = port

    def render(self, request: Request) -> bytes:
        host = (request.getRequestHostname() or b"localhost").decode("ascii", "replace")
        host = quote(host, safe=".-[]:")
        authority = host if self.port in (None, 443) else f"{host}:{self.port}"
        path = request.uri if request.uri.startswith(b"/") else b"/"
        location = f"https://{authority}".encode("ascii") + path
        request.setResponseCode(308)
        request.setHeader(b"location", location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Use HTTPS: " + location + b"\n"
