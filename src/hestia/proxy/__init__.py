"""
The transparent proxy: C{/services/<name>/<rest>} to C{<service url>/<rest>}.

L{ServiceProxyResource} is a L{ReverseProxyResource} in the resource tree, but
forwards with L{twisted.web.client.Agent} over a persistent connection pool
instead of the stock one-connection-per-request HTTP/1.0 client.  Each request
becomes an L{Exchange}, which:

  1. asks the service's lifecycle for a L{Lease} (held in its queue while the
     service starts; the lease keeps the service from idle-stopping);
  2. forwards method, headers (every value of repeated ones) and body;
  3. streams the response back as it arrives, with the client registered as
     the producer's consumer, so a slow reader slows the backend rather than
     filling the gateway's memory;
  4. cancels whatever is pending (its queue place, the backend request, the
     backend stream) the moment the client goes away, quietly.

The package: L{hestia.proxy._resources} (the tree), L{hestia.proxy._exchange}
(one request's way through), L{hestia.proxy._errors} (the answers it gives
when it cannot forward).  Import from here.
"""

from hestia.proxy._errors import write_error
from hestia.proxy._exchange import Exchange, RequestBody
from hestia.proxy._resources import (
    ErrorResource,
    GatewayRoot,
    ServiceProxyResource,
    ServiceResources,
    ServicesResource,
)

__all__ = [
    "ErrorResource",
    "Exchange",
    "GatewayRoot",
    "RequestBody",
    "ServiceProxyResource",
    "ServiceResources",
    "ServicesResource",
    "write_error",
]
