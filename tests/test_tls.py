"""
Issue 6, TLS: certificates by SNI name with a DEFAULT fallback, HTTP/2 by ALPN,
reload on SIGHUP, and the plain-HTTP redirect.

Certificates are made in the test with C{cryptography}: a throw-away CA signs
C{DEFAULT}, C{a.test} and C{b.test}, so that clients can verify properly.
"""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.hestiaproc import BackendSpec, HestiaProcess, free_port, raw_request, reap_leftovers, wait_for

from hestia.tls import https_port

pytestmark = pytest.mark.integration


class CA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hestia test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, common_name: str, dns: list[str]) -> bytes:
        """Key plus certificate plus the CA, in one PEM, as txsni reads it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in dns]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem + cert.public_bytes(serialization.Encoding.PEM) + self.pem


class TLSGateway:
    def __init__(self, hestia: HestiaProcess, ca: CA, certs: Path, redirect_port: int, echo: BackendSpec) -> None:
        self.hestia = hestia
        self.ca = ca
        self.certs = certs
        self.redirect_port = redirect_port
        self.echo = echo

    @property
    def port(self) -> int:
        return self.hestia.port

    def served_name(self, sni: str | None) -> str:
        """The common name of the certificate Hestia presents for C{sni}."""
        context = ssl.create_default_context(cadata=self.ca.pem.decode())
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        common_name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(common_name[0].value)

    def client(self, http2: bool = True, check_hostname: bool = True) -> httpx.Client:
        context = ssl.create_default_context(cadata=self.ca.pem.decode())
        context.check_hostname = check_hostname
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=context, http2=http2,
                            trust_env=False, timeout=10)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSGateway]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = CA()
    certs = tmp / "certs"
    certs.mkdir()
    (certs / "DEFAULT.pem").write_bytes(ca.leaf("default", ["default.test"]))
    (certs / "a.test.pem").write_bytes(ca.leaf("a.test", ["a.test"]))
    (certs / "b.test.pem").write_bytes(ca.leaf("b.test", ["b.test"]))
    port, redirect_port = free_port(), free_port()
    echo = BackendSpec("echo", tmp)
    config = {
        "server": {"listen": f"txsni:{certs}:tcp:{port}:interface=127.0.0.1",
                   "redirect_listen": f"tcp:{redirect_port}:interface=127.0.0.1"},
        "defaults": {"idle_timeout": 0},
        "services": {"echo": echo.service()},
    }
    hestia = HestiaProcess(config, tmp / "hestia", port=port).start(wait=False)
    gateway = TLSGateway(hestia, ca, certs, redirect_port, echo)

    def healthy() -> bool:
        try:
            with gateway.client(http2=False) as client:
                return client.get("/v1/health", extensions={"sni_hostname": "a.test"}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(lambda: not hestia.running or healthy(), 15), hestia.log_text()
        assert hestia.running, hestia.log_text()
        yield gateway
    finally:
        hestia.stop()
        wait_for(lambda: not echo.running(), 5.0)
        reap_leftovers(str(tmp))


def test_each_hostname_gets_its_certificate(gw: TLSGateway) -> None:
    assert gw.served_name("a.test") == "a.test"
    assert gw.served_name("b.test") == "b.test"


def test_unknown_or_missing_sni_gets_default(gw: TLSGateway) -> None:
    assert gw.served_name("unknown.example") == "default"
    assert gw.served_name(None) == "default"
    # And the connection is usable, not torn down by a failed servername callback.
    with gw.client(http2=False, check_hostname=False) as client:
        response = client.get("/v1/health", extensions={"sni_hostname": "unknown.example"})
    assert response.status_code == 200


def test_http2_by_alpn_through_the_proxy(gw: TLSGateway) -> None:
    with gw.client(http2=True) as client:
        health = client.get("/v1/health", extensions={"sni_hostname": "a.test"})
        assert health.http_version == "HTTP/2" and health.status_code == 200
        body = b"h2 body " * 1000
        echoed = client.post("/services/echo/echo?via=h2", content=body, extensions={"sni_hostname": "a.test"})
        assert echoed.http_version == "HTTP/2"
        assert echoed.status_code == 200, echoed.text
        assert echoed.json()["body_len"] == len(body)
        assert echoed.json()["path"] == "/echo?via=h2"
        forwarded = {name.lower(): value for name, value in echoed.json()["headers"]}
        assert forwarded["x-forwarded-proto"] == "https"
    with gw.client(http2=False) as client:
        assert client.get("/v1/health", extensions={"sni_hostname": "b.test"}).http_version == "HTTP/1.1"


def test_http2_requests_get_the_same_refusals(gw: TLSGateway) -> None:
    before = len(gw.echo.requests())
    with gw.client(http2=True) as client:
        escape = client.get("/services/echo/%2e%2e/%2e%2e/v1/services", extensions={"sni_hostname": "a.test"})
        assert escape.http_version == "HTTP/2" and escape.status_code == 400
    assert len(gw.echo.requests()) == before


def test_plain_http_redirects_to_https(gw: TLSGateway) -> None:
    response = raw_request(gw.redirect_port, b"POST /services/echo/x?y=1 HTTP/1.1\r\nHost: a.test:80")
    assert response.status == 308
    assert response.header_values("location") == [f"https://a.test:{gw.port}/services/echo/x?y=1"]
    assert https_port("txsni:/c:tcp:443") == 443 and https_port("txsni:/c\\:x:tcp:port=8443") == 8443


def test_certificates_are_parsed_once_and_reloaded_on_sighup(gw: TLSGateway) -> None:
    # Files gone: still served from what was parsed at start (not per handshake).
    (gw.certs / "b.test.pem").unlink()
    (gw.certs / "a.test.pem").write_bytes(gw.ca.leaf("a.test renewed", ["a.test"]))
    assert gw.served_name("b.test") == "b.test"
    assert gw.served_name("a.test") == "a.test"
    gw.hestia.signal(signal.SIGHUP)
    assert wait_for(lambda: gw.served_name("a.test") == "a.test renewed", 5)
    assert gw.served_name("b.test") == "default"
    # A broken directory on reload keeps the certificates in use.
    (gw.certs / "DEFAULT.pem").write_bytes(b"not a pem")
    gw.hestia.signal(signal.SIGHUP)
    assert wait_for(lambda: "certificates not reloaded" in gw.hestia.log_text(), 5)
    assert gw.served_name(None) == "default"
