"""
The resource tree: C{/services/<name>/...} to each service's L{ServiceProxyResource}
(a L{ReverseProxyResource}), C{/v1} to the management API, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from hestia.auth import AuthConfig, Authenticator, Denied, write_denied
from hestia.errors import (
    BadRequest,
    GatewayError,
    UnknownService,
)
from hestia.headers import (
    PathEscape,
    request_id_from,
    split_service_path,
)
from hestia.interfaces import IHeadCheck, IInterceptingRoute
from hestia.passive import write_passive_answer
from hestia.proxy._errors import write_error
from hestia.proxy._exchange import Exchange
from hestia.ui import serve_waiting_page, wants_waiting_page

if TYPE_CHECKING:
    from hestia.gateway import Gateway



@implementer(IHeadCheck)
class ServiceProxyResource(ReverseProxyResource):
    """
    The resource for one service: everything below C{/services/<name>/}.

    A leaf: the rest of the path is taken raw from the request URI by
    L{split_service_path}, so that the backend receives the bytes the client
    sent, not a decoded and re-encoded version of them.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, name: str, authenticator: Authenticator, host_routed: bool = False) -> None:
        """
        @param authenticator: decides whether a request may reach this service
            (L{Authenticator.check_service}), before its body is read.
        @param host_routed: the request's C{Host} is one of the service's
            C{hosts:} (issue 7): the whole path goes to the service, unprefixed.
        """
        self.authenticator = authenticator
        lifecycle = gateway.route(name)
        target = urlsplit(lifecycle.backend.url)
        super().__init__(
            target.hostname or "localhost",
            target.port or 80,
            target.path.encode("ascii"),
            gateway.reactor,
        )
        self.gateway = gateway
        self.name = name
        self.host_routed = host_routed

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self

    def _route(self, request: Request) -> tuple[str, bytes] | GatewayError:
        """The service and the rest of the path C{request} goes to, or why it goes nowhere."""
        try:
            if self.host_routed:
                if not request.uri.startswith(b"/"):  # absolute-form: never an open proxy
                    return BadRequest("expected an origin-form request target")
                routed = split_service_path(b"/services/" + self.name.encode("ascii") + request.uri)
            else:
                routed = split_service_path(request.uri)
        except PathEscape as escape:
            return BadRequest(str(escape))
        if routed is None or routed[0] != self.name:
            return UnknownService("no such service", service=self.name)
        return routed

    def check_head(self, request: Request) -> Denied | None:
        """The head's verdict (L{IHeadCheck}): what C{render} would refuse before the body is read."""
        routed = self._route(request)
        if isinstance(routed, GatewayError):
            return Denied(routed.status, routed.reason, service=routed.service)
        denied = self.authenticator.check_service(request, self.name)
        return None if denied is None else Denied(denied.status, denied.reason, denied.retry_after, self.name)

    def render(self, request: Request) -> int:
        request_id = request_id_from(request.requestHeaders.getRawHeaders(b"x-request-id"))
        routed = self._route(request)
        if isinstance(routed, GatewayError):
            write_error(request, routed, request_id)
            return NOT_DONE_YET
        denied = self.authenticator.check_service(request, self.name)  # Before anything can start.
        if denied is not None:
            write_denied(request, denied, self.name)
            return NOT_DONE_YET
        try:
            lifecycle = self.gateway.route(self.name)
        except UnknownService as unknown:
            write_error(request, unknown, request_id)
            return NOT_DONE_YET
        intercepting = IInterceptingRoute(lifecycle, None)  # a route_by: model route
        if intercepting is not None and intercepting.intercept(request, routed[1]):
            return NOT_DONE_YET  # answered by the route itself (a model list, an unknown model)
        passive = lifecycle.config.passive  # issue 17: monitors look without waking
        if passive is not None and passive.matches(request, routed[1]):
            exchange = Exchange(self.gateway, lifecycle, request, routed[1], request_id,
                                b"" if self.host_routed else None)
            if not exchange.begin_passive():
                write_passive_answer(request, lifecycle.name, lifecycle.state.value)
            return NOT_DONE_YET
        if wants_waiting_page(lifecycle, request):
            # A person's browser: a page that says what is happening beats a
            # blank tab spinning for the whole cold start (hestia.ui).
            serve_waiting_page(self.gateway, lifecycle, request)
            return NOT_DONE_YET
        prefix = b"" if self.host_routed else None
        loading_events = intercepting is not None and intercepting.wants_loading_events(request, routed[1])
        Exchange(self.gateway, lifecycle, request, routed[1], request_id, prefix, loading_events).begin()
        return NOT_DONE_YET


class ServiceResources:
    """
    The proxy resource of each service, built once per route and per routing
    mode (below C{/services/<name>/}, or by C{Host} at C{/}).

    A reload that replaces a service's route replaces its resource too: the
    cache is keyed by the route object, so nothing has to be told to forget.
    """

    def __init__(self, gateway: Gateway, authenticator: Authenticator) -> None:
        self.gateway = gateway
        self.authenticator = authenticator
        self._built: dict[tuple[str, bool], tuple[object, ServiceProxyResource]] = {}

    def get(self, name: str, host_routed: bool = False) -> ServiceProxyResource:
        """The resource of service C{name}; L{UnknownService} if there is none."""
        route = self.gateway.route(name)
        built = self._built.get((name, host_routed))
        if built is None or built[0] is not route:
            resource = ServiceProxyResource(self.gateway, name, self.authenticator, host_routed)
            built = self._built[(name, host_routed)] = (route, resource)
        return built[1]


@implementer(IHeadCheck)
class ServicesResource(Resource):
    """C{/services/}: finds the proxy resource for the named service."""

    _unnamed = UnknownService("no service named in the path: use /services/<name>/")

    def __init__(self, gateway: Gateway, resources: ServiceResources) -> None:
        super().__init__()
        self.gateway = gateway
        self.resources = resources

    def check_head(self, request: Request) -> Denied | None:
        """C{/services} itself answers only an error: refused before a body is read."""
        return _refusing(self._unnamed)

    def getChild(self, path: bytes, request: Request) -> Resource:
        try:
            name = path.decode("ascii")
            return self.resources.get(name)
        except (UnicodeDecodeError, UnknownService):
            return ErrorResource(UnknownService("no such service", service=path.decode("ascii", "replace")))

    def render(self, request: Request) -> int:
        write_error(request, self._unnamed)
        return NOT_DONE_YET


def _refusing(error: GatewayError) -> Denied:
    return Denied(error.status, error.reason, error.retry_after, error.service)


@implementer(IHeadCheck)
class ErrorResource(Resource):
    """
    Answers every request below it with one JSON error.

    The answer does not depend on the body, so the head check gives it at
    once: a client with no token cannot make Hestia read (and spool to disk)
    a body sent to an unknown path, up to C{max_body_size}, for a 404.
    """

    isLeaf = True

    def __init__(self, error: GatewayError) -> None:
        super().__init__()
        self.error = error

    def check_head(self, request: Request) -> Denied | None:
        return _refusing(self.error)

    def render(self, request: Request) -> int:
        write_error(request, self.error, request_id_from(request.requestHeaders.getRawHeaders(b"x-request-id")))
        return NOT_DONE_YET


class GatewayRoot(Resource):
    """
    The root: C{/services/...} is proxied, C{/v1/...} is the management API.

    Nothing else is served, and nothing below C{/services/} can reach C{/v1}:
    the proxy is a leaf that never hands the rest of the path back to the tree.
    """

    def __init__(self, gateway: Gateway, api: IResource, authenticator: Authenticator | None = None) -> None:
        """
        @param authenticator: who may reach which service; by default one with
            no tokens (authentication off: every request passes, and only
            Hestia's own credential headers are removed).
        """
        super().__init__()
        self.gateway = gateway
        self.authenticator = authenticator or Authenticator(AuthConfig(), gateway.reactor.seconds)
        self.resources = ServiceResources(gateway, self.authenticator)
        self.putChild(b"services", ServicesResource(gateway, self.resources))
        self.putChild(b"v1", api)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        # A Host listed in a service's hosts: goes to that service at / (issue 7).
        name = self.gateway.host_route(request.getHeader(b"host"))
        if name is not None:
            return self.resources.get(name, host_routed=True)
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return ErrorResource(UnknownService("not found: Hestia serves /services/<name>/ and /v1/"))

    def render(self, request: Request) -> int:
        return self.getChild(b"", request).render(request)
