"""
The baseline: stock C{twisted.web.proxy.ReverseProxyResource}, as shipped.

Run by C{bench/run.py} with the project's virtualenv Python::

    python bench/stock_proxy.py --port 8001 --backend 127.0.0.1:8000 [--sse 127.0.0.1:8002]

Everything goes to C{--backend}, except C{/sse...}, which goes to C{--sse} (the
test backend that stamps Server-Sent Events).  The only change from a textbook
use is that the access log is switched off, as it is in Hestia and in the
other proxies of the benchmark.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site


class QuietSite(Site):
    """No access log: the other proxies in the benchmark write none either."""

    def log(self, request: Any) -> None:
        pass


class Root(ReverseProxyResource):
    """C{ReverseProxyResource} for C{/}, with C{/sse} sent to another upstream."""

    def __init__(self, host: str, port: int, sse: tuple[str, int] | None) -> None:
        super().__init__(host, port, b"", reactor)
        self.sse = sse

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"sse" and self.sse is not None:
            return ReverseProxyResource(self.sse[0], self.sse[1], b"/sse", self.reactor)
        return super().getChild(path, request)  # type: ignore[no-any-return]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="host:port")
    parser.add_argument("--sse", help="host:port of the SSE backend")
    args = parser.parse_args()
    host, port = _address(args.backend)
    sse = _address(args.sse) if args.sse else None
    reactor.listenTCP(args.port, QuietSite(Root(host, port, sse)), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    print(f"stock ReverseProxyResource listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
