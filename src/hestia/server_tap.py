"""
C{twistd hestia}: options and the one L{MultiService} that is Hestia.

Start-up order: load and validate the configuration (a bad one ends the
process with one line naming file, service and key), build the gateway, listen.
Shut-down order (SIGTERM): stop accepting, let in-flight requests finish for
up to C{server.shutdown_timeout}, then stop every service Hestia started.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from hestia.api import ManagementAPI
from hestia.config import Config, ConfigError, load_config
from hestia.gateway import Gateway
from hestia.proxy import GatewayRoot
from hestia.state import StateStore, state_recorder

log = Logger(namespace="hestia.server")


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = (
        "Run the Hestia on-demand service gateway. Services are read from --config "
        "(default: $HESTIA_CONFIG, else ./hestia_config.yml, else a built-in config "
        "fronting a local Ollama)."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (hestia_config.yml)."],
        ["listen", "l", None, "Listening endpoint, overriding server.listen (e.g. tcp:8080)."],
        ["log-format", None, None, "text or json, overriding server.log_format."],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as error:
            # One line and a non-zero exit: no traceback, no usage text.
            sys.stderr.write(f"hestia: config error: {error}\n")
            raise SystemExit(2) from None
        if self["log-format"] not in (None, "text", "json"):
            sys.stderr.write(f"hestia: --log-format must be text or json, not {self['log-format']!r}\n")
            raise SystemExit(2)


class HestiaSite(Site):
    """A Site without the stock access log: Hestia writes its own, structured."""

    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        pass


class HestiaService(MultiService):
    """The whole gateway: its listening port plus the services it manages."""

    def __init__(self, config: Config, listen: str | None = None, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.gateway = Gateway(config, reactor)
        self.store = StateStore(config.server.state_path)
        self.gateway.add_state_observer(state_recorder(self.store, reactor.seconds))
        self.api = ManagementAPI(self.gateway, reload=self.reload, store=self.store)
        self.site = HestiaSite(GatewayRoot(self.gateway, self.api.resource()))
        self.listen = listen or config.server.listen
        self.port_service: IService = strports.service(self.listen, self.site, reactor=reactor)
        self.port_service.setServiceParent(self)
        self._previous_sighup: Any = None

    def startService(self) -> None:
        super().startService()
        self.store.open().addErrback(
            lambda failure: log.failure("cannot open the state database {path}", failure, path=self.store.path)
        )
        log.info(
            "Hestia listening on {listen} with {count} services from {source}",
            listen=self.listen,
            count=len(self.config.services),
            source=self.config.source,
        )
        self.gateway.start_keep_warm()
        if hasattr(signal, "SIGHUP"):
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self._reload_logged)
            )

    def reload(self) -> dict[str, Any]:
        """
        Re-read the configuration file and apply it.

        @raise ConfigError: the file is bad; the running configuration stays.
        """
        source = None if self.config.source.startswith("<") else self.config.source
        config = load_config(source)
        if config.server.listen != self.config.server.listen:
            log.warn("server.listen changed: it takes effect on restart")
        summary = self.gateway.apply(config)
        self.config = config
        log.info("reloaded {source}: {summary}", source=config.source, summary=summary)
        return summary

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except ConfigError as error:
            log.error("reload failed, keeping the running configuration: {error}", error=str(error))

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        # Stop accepting first, so that draining can end.
        yield self.port_service.stopService()
        timeout = self.config.server.shutdown_timeout
        if self.gateway.in_flight_requests:
            log.info("waiting up to {timeout}s for {count} requests", timeout=timeout,
                     count=self.gateway.in_flight_requests)
        yield self.gateway.drain(timeout)
        yield self.gateway.shutdown()
        yield self.store.flush()
        self.store.close()
        yield super().stopService()


def makeService(options: Options) -> HestiaService:
    config: Config = options["loaded"]
    return HestiaService(config, listen=options["listen"])
