"""
What every backend promises, checked the way the gateway will use it: a conformance check a
third-party backend's own tests can run (C{verify_backend}), as Hestia's tests run it on every
built-in backend (tests/test_backend_conformance.py).

    from hestia.loader import parse_config
    from hestia.testing.conformance import verify_backend

    def test_my_backend_conforms():
        config = parse_config({"services": {"svc": {...}}}, "test.yml", environ={})
        verify_backend(MyBackendFactory, config.services["svc"])
"""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from hestia.config import ServiceConfig
from hestia.interfaces import (
    IAdoptableBackend,
    IBackend,
    IBackendFactory,
    IPersistentBackend,
    IReconfigurableBackend,
)

OPTIONAL_INTERFACES = (IReconfigurableBackend, IAdoptableBackend, IPersistentBackend)


class NotConforming(AssertionError):
    """A backend (or its factory) does not do what its interfaces promise; the message says what."""


def verify_backend(factory: IBackendFactory, service: ServiceConfig, reactor: IReactorTime | None = None,
                   agent: IAgent | None = None) -> IBackend:
    """
    Build C{service}'s backend with C{factory}, as the gateway does, and check it.

    Checked: the factory provides L{IBackendFactory}; the backend provides L{IBackend} with
    every method and attribute, and each optional interface it declares
    (L{IReconfigurableBackend}, L{IAdoptableBackend}, L{IPersistentBackend}) in full; its
    C{url} is the service's, C{has_lifecycle} is a bool, C{describe()} is JSON for the
    status API, C{recent_output()} is a list of strings, and it takes an exit handler.
    Nothing is started.

    @param reactor: the reactor given to the factory (a L{MemoryReactorClock} by default).
    @param agent: the client given to it (an in-memory one that reaches nothing by default).
    @return: the backend, for further checks of the caller's own.
    @raise NotConforming: naming what is missing or wrong.
    """
    try:
        verifyObject(IBackendFactory, factory)
        backend = factory.build(service, reactor or MemoryReactorClock(), agent or RequestTraversalAgent(Resource()))
        verifyObject(IBackend, backend)
        for optional in OPTIONAL_INTERFACES:
            if optional.providedBy(backend):
                verifyObject(optional, backend)
    except NotConforming:
        raise
    except Exception as error:  # zope's Invalid family, or a factory that raises
        raise NotConforming(f"{factory!r}: {error}") from error
    name = factory.name
    if backend.url != service.url:
        raise NotConforming(f"{name}: url is {backend.url!r}, the service's is {service.url!r}")
    if not isinstance(backend.has_lifecycle, bool):
        raise NotConforming(f"{name}: has_lifecycle is {backend.has_lifecycle!r}, not a bool")
    described = backend.describe()
    try:
        json.dumps(described)
    except (TypeError, ValueError) as error:
        raise NotConforming(f"{name}: describe() is not JSON for the status API: {error}") from error
    output = backend.recent_output()
    if not isinstance(output, list) or not all(isinstance(line, str) for line in output):
        raise NotConforming(f"{name}: recent_output() is {output!r}, not a list of strings")
    backend.set_exit_handler(lambda reason, lines: None)
    return backend
