"""
Makes C{twistd hestia} (and C{twist hestia}) run the Hestia gateway.

This directory has no C{__init__.py} on purpose: C{twisted.plugins} is a
namespace that Twisted extends with every C{twisted/plugins} directory on
C{sys.path}.
"""

from twisted.application.service import ServiceMaker

hestia = ServiceMaker(
    "Hestia",
    "hestia.server_tap",
    "Personal on-demand service gateway: start services on the first request, stop them when idle.",
    "hestia",
)
