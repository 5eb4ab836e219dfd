"""
C{twistd hestia}: options and the one L{MultiService} that is Hestia.

Start-up order: load and validate the configuration (a bad one ends the
process with one line naming file, service and key), build the gateway, listen.
Shut-down order (SIGTERM): stop accepting, let in-flight requests finish for
up to C{server.shutdown_timeout}, then stop every service Hestia started.
"""

from __future__ import annotations

import errno
import inspect
import signal
import sys
from typing import Any, NoReturn

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import IResource
from twisted.web.server import Site

from hestia.api import ManagementAPI
from hestia.auth import AdminGuard, Authenticator, parse_auth, secret_variables
from hestia.backends.docker.discovery import discovery_service
from hestia.backends.environment import hidden_variables, hide_from_children
from hestia.config import Config, ConfigError, ServerConfig
from hestia.coroutines import as_deferred
from hestia.gateway import Gateway
from hestia.guard import GuardedSite, Limits, raise_open_file_limit
from hestia.logs import ServiceOutput, access_log, install_log_observer
from hestia.metrics import HestiaMetrics
from hestia.planning import Planning
from hestia.preflight import load_checked
from hestia.proxy import GatewayRoot
from hestia.reconcile import reconcile, request_time_recorder
from hestia.reload import describe_summary
from hestia.state import StateStore, StateStoreError, check_state_file, state_recorder
from hestia.tls import CertificateError, CertificateStore, RedirectToHTTPS, https_port, is_tls_listen, parse_listen
from hestia.watch import ConfigWatcher

log = Logger(namespace="hestia.server")


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT] [--watch-config]"
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
    optFlags = [
        ["watch-config", None, "Apply changes to the configuration file as they are saved, like SIGHUP "
                               "(server.watch_config)."],
    ]

    def postOptions(self) -> None:
        try:
            # The same checks as `hestia check-config` (hestia.preflight).
            self["loaded"] = load_checked(self["config"], listen=self["listen"])
        except ConfigError as error:
            # One line and a non-zero exit: no traceback, no usage text.
            sys.stderr.write(f"hestia: config error: {error}\n")
            raise SystemExit(2) from None
        if self["log-format"] not in (None, "text", "json"):
            sys.stderr.write(f"hestia: --log-format must be text or json, not {self['log-format']!r}\n")
            raise SystemExit(2)


DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """
    C{tcp:8080} with a listen backlog of L{DEFAULT_BACKLOG} unless one is given.

    Twisted's default of 50 makes a burst of new connections (everyone opening
    the page at once, a batch job fanning out) overflow the kernel's accept
    queue and wait for SYN retransmits, seconds each.
    """
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return description + ":backlog=" + str(DEFAULT_BACKLOG)
    return description


# Recent Twisted releases let a Site skip form parsing (parsePOSTFormSubmission).
_SITE_CAN_SKIP_FORMS = "parsePOSTFormSubmission" in inspect.signature(Site.__init__).parameters


class HestiaSite(GuardedSite):
    """
    A Site without the stock access log: Hestia writes its own, structured.

    Its connections are guarded (L{hestia.guard}); the L{Authenticator} is
    given to the resources that ask it (L{GatewayRoot}, L{AdminGuard}).
    """

    displayTracebacks = False
    noisy = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A proxy forwards bodies, it does not read them: by default Twisted
        # parses every form POST into request.args, reading a multipart
        # upload whole into memory (several copies of it) and answering 400
        # itself to one it cannot parse, which the backend should judge.
        if _SITE_CAN_SKIP_FORMS:
            kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def log(self, request: Any) -> None:
        pass


def build_site(
    gateway: Gateway, api: IResource, authenticator: Authenticator, server: ServerConfig,
    reactor: IReactorTime | None = None,
) -> HestiaSite:
    """
    The site Hestia serves: the proxy and the guarded API behind guarded channels.

    One function for the daemon and the in-memory tests (hestia.testing.site),
    so that what the tests drive is what runs.
    """
    kwargs = {} if reactor is None else {"reactor": reactor}
    root = GatewayRoot(gateway, AdminGuard(api, authenticator), authenticator)
    site = HestiaSite(root, Limits.from_server(server), **kwargs)
    return site


class HestiaService(MultiService):
    """The whole gateway: its listening port plus the services it manages."""

    def __init__(
        self, config: Config, listen: str | None = None, reactor: IReactorTime | None = None,
        log_format: str | None = None, watch_config: bool = False,
    ) -> None:
        """
        @param log_format: C{text} or C{json}, overriding C{server.log_format}.
        @param watch_config: watch the file even if C{server.watch_config} is off.
        """
        super().__init__()
        self.log_format = log_format or config.server.log_format
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.gateway = Gateway(config, reactor)
        self.store = StateStore(config.server.state_path)
        self.gateway.add_state_observer(state_recorder(self.store, reactor.seconds))
        # Remote machines record their own facts and are taken up again on start.
        self.gateway.use_store(self.store)
        self.gateway.request_observers.append(request_time_recorder(self.gateway, self.store, reactor.seconds))
        self.metrics = HestiaMetrics(self.gateway)
        self.gateway.add_state_observer(self.metrics.state_changed)
        self.gateway.request_observers.append(self.metrics.request_finished)
        self.gateway.request_observers.append(access_log)
        self.output = ServiceOutput(self.gateway)
        self.gateway.add_state_observer(self.output.state_changed)
        self.output.attach_all()
        # Costs, schedules and predictive warm-up (issue 16).
        self.planning = Planning(self.gateway, self.store, self.metrics)
        self.api = ManagementAPI(
            self.gateway, reload=self.reload, store=self.store, metrics=self.metrics, output=self.output,
            costs=self.planning.ledger,
        )
        self.authenticator = Authenticator(parse_auth(config), reactor.seconds)
        hide_from_children(secret_variables(config))  # Before any service starts.
        self.site = build_site(self.gateway, self.api.resource(), self.authenticator, config.server)
        self.listen = listen or config.server.listen
        self.certificates: CertificateStore | None = None
        self.port_service: IService
        if is_tls_listen(self.listen):
            endpoint, self.certificates = parse_listen(reactor, self.listen)
            self.port_service = StreamServerEndpointService(endpoint, self.site)
        else:
            self.port_service = strports.service(with_backlog(self.listen), self.site, reactor=IReactorCore(reactor))
        self.port_service.setServiceParent(self)
        if config.server.redirect_listen:
            redirect = Site(RedirectToHTTPS(https_port(self.listen)))
            redirect.noisy = False
            redirecting = strports.service(config.server.redirect_listen, redirect, reactor=IReactorCore(reactor))
            redirecting.setServiceParent(self)
        # Container label discovery (docker: {discover: true}) runs as a child service.
        self.discovery = discovery_service(self.gateway, config, reactor)
        if self.discovery is not None:
            self.discovery.setServiceParent(self)
        self._previous_sighup: Any = None
        self.watcher = self._config_watcher(watch_config or config.server.watch_config)

    # ---- watching the configuration file (issue 20) ---------------------- begin ----
    def _config_watcher(self, wanted: bool) -> ConfigWatcher | None:
        """The file watcher, calling what SIGHUP calls; C{None} when off or there is no file."""
        if not wanted:
            return None
        if self.config.source.startswith("<"):
            log.warn("watch_config: no configuration file to watch ({source})", source=self.config.source)
            return None
        return ConfigWatcher(self.config.source, self.reactor, self._reload_logged)

    # ---- watching the configuration file --------------------------------- end ----

    def setServiceParent(self, parent: Any) -> Any:
        # twistd adds this service to its application, then starts logging
        # with the application's log observer: the moment to choose JSON.
        install_log_observer(self, parent, self.log_format)
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd binds the ports here; a busy or unusable address would end in
        # a traceback through twistd.  Say it in one line and exit instead.
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            where = f"{error.interface or '*'}:{error.port}"
            reason = getattr(error.socketError, "strerror", None) or error.socketError
            hint = ""
            if getattr(error.socketError, "errno", None) == errno.EADDRINUSE:
                hint = " (another process has it: choose another with --listen, $HESTIA_LISTEN or server.listen)"
            _refuse(f"hestia: cannot listen on {where}: {reason}{hint}")

    def startService(self) -> None:
        raise_open_file_limit()
        super().startService()
        self.store.open().addErrback(
            lambda failure: log.failure("cannot open the state database {path}", failure, path=self.store.path)
        )
        self.planning.start()  # first: a killed gateway's open spans are closed before new ones open
        reconcile(self.gateway, self.store).addErrback(
            lambda failure: log.failure("cannot take up the recorded services", failure)
        )
        log.info(
            "Hestia listening on {listen} with {count} services from {source}",
            listen=self.listen,
            count=len(self.config.services),
            source=self.config.source,
        )
        self.gateway.start_keep_warm()
        self.gateway.adopt_running()
        if self.watcher is not None:
            self.watcher.startService()
        if hasattr(signal, "SIGHUP"):
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda signum, frame: IReactorThreads(self.reactor).callFromThread(self._reload_logged)
            )

    def reload(self) -> dict[str, Any]:
        """
        Re-read the configuration file and apply it.

        @raise ConfigError: the file is bad; the running configuration stays.
        """
        source = None if self.config.source.startswith("<") else self.config.source
        config = load_checked(source)  # the same checks as at start-up
        if config.server.listen != self.config.server.listen:
            log.warn("server.listen changed: it takes effect on restart")
        auth = parse_auth(config)  # Before anything changes: a bad auth section keeps the old one.
        # Once a secret, always: a variable a reload stops naming still holds its token.
        hide_from_children(hidden_variables() | secret_variables(config))
        summary = self.gateway.apply(config)
        self.authenticator.update(auth)
        self.site.set_limits(Limits.from_server(config.server))
        if self.certificates is not None:
            try:
                summary["certificates"] = self.certificates.reload()
            except CertificateError as error:
                log.error("certificates not reloaded, keeping the loaded ones: {error}", error=str(error))
        self.config = config
        self.planning.apply()
        log.info("reloaded {source}: {changes}", source=config.source, changes=describe_summary(summary),
                 summary=summary)
        return summary

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except ConfigError as error:
            log.error("reload failed, keeping the running configuration: {error}", error=str(error))

    @as_deferred
    async def stopService(self) -> Any:
        if self.watcher is not None:  # No reload half-way through a shutdown.
            self.watcher.stopService()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        # Stop accepting first, so that draining can end.
        await self.port_service.stopService()
        self.planning.stop()
        timeout = self.config.server.shutdown_timeout
        if self.gateway.in_flight_requests:
            log.info("waiting up to {timeout}s for {count} requests", timeout=timeout,
                     count=self.gateway.in_flight_requests)
        began = self.reactor.seconds()
        await self.gateway.drain(timeout)
        await self.gateway.shutdown()
        # Whatever SQLite does (a lock held by another process), the state
        # writes get what is left of shutdown_timeout, at least a second.
        left = max(1.0, began + timeout - self.reactor.seconds())
        await self.store.flush(left, self.reactor)
        if self.store.pending:
            log.error("shutting down with {count} state writes unfinished ({path})",
                      count=self.store.pending, path=self.store.path)
        self.store.close()
        await super().stopService()


def _refuse(line: str) -> NoReturn:
    """
    End start-up with one line on the real stderr and exit status 2.

    Once twistd has started logging, C{sys.stderr} is redirected into the log
    (each line prefixed, as if it were an error of Twisted's), so the line
    goes to the stderr the process was given.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(line + "\n")
    stream.flush()
    raise SystemExit(2)


def makeService(options: Options) -> HestiaService:
    config: Config = options["loaded"]
    try:
        # Before anything runs: a state file Hestia cannot use would lose the
        # facts of what it starts (a cloud VM forgotten keeps costing money).
        check_state_file(config.server.state_path)
    except StateStoreError as error:
        _refuse(f"hestia: state file error: {error}")
    try:
        return HestiaService(
            config, listen=options["listen"], log_format=options["log-format"],
            watch_config=bool(options["watch-config"]),
        )
    except CertificateError as error:
        _refuse(f"hestia: TLS error: {error}")
