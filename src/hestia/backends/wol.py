"""
The C{wol} backend: a machine woken by Wake-on-LAN (a GPU box running Ollama).

Starting sends the standard magic packet -- six C{0xFF} bytes, then the
network card's MAC address sixteen times -- over UDP to C{address}:C{port}
(the broadcast address 255.255.255.255, port 9, unless configured), and again
C{packets - 1} more times C{packet_interval} apart while the machine boots, as
C{wakeonlan} and friends do: a single datagram is easily lost.  Readiness is
the service's health check, within the usual C{start_timeout}.  Idle, it runs
C{stop_command} (C{ssh box sudo systemctl suspend}); without one Hestia only
stops proxying and marks the service stopped.

What the machine's state is, and why it is kept in the state store, is in
L{hestia.backends.machine}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.web.iweb import IAgent
from zope.interface import provider

from hestia import health
from hestia.backends.commands import parse_command, parse_command_timeout
from hestia.backends.machine import MachineBackend
from hestia.config import Reader, ServiceConfig, describe, describe_command
from hestia.errors import StartFailed
from hestia.interfaces import IBackend, IBackendFactory

WOL_KEYS = {"mac", "address", "port", "packets", "packet_interval", "stop_command", "command_timeout",
            "adopt", "stop_on_shutdown"}
DEFAULT_ADDRESS = "255.255.255.255"
DEFAULT_PORT = 9  # "discard"; 7 (echo) is the other common choice
MAGIC_PREFIX = b"\xff" * 6
MAC_REPEATS = 16

_COLON_OR_DASH = re.compile(r"^[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}$", re.IGNORECASE)
_DOTTED = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$", re.IGNORECASE)  # Cisco style
_BARE = re.compile(r"^[0-9a-f]{12}$", re.IGNORECASE)


def magic_packet(mac: bytes) -> bytes:
    """The 102-byte Wake-on-LAN payload for the 6-byte MAC C{mac}."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return MAGIC_PREFIX + mac * MAC_REPEATS


def format_mac(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def _sexagesimal(value: int) -> str:
    """What YAML 1.1 read as a base-60 number (C{12:34:56}), written back as it was typed."""
    groups = []
    while value:
        value, group = divmod(value, 60)
        groups.append(f"{group:02d}")
    return ":".join(reversed(groups)) or "0"


def parse_mac(reader: Reader, value: Any, key: str) -> bytes:
    """C{52:54:00:ab:cd:ef}, C{52-54-00-AB-CD-EF}, C{5254.00ab.cdef} or C{525400abcdef}."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 52:54:00:12:34:56 as a base-60 integer.
        raise reader.fail(key, f'write the MAC address in quotes (mac: "{_sexagesimal(value)}"): '
                               "unquoted, YAML reads it as a number")
    if not isinstance(value, str):
        raise reader.fail(key, f"expected a MAC address such as 52:54:00:ab:cd:ef, got {describe(value)}")
    text = value.strip()
    if _COLON_OR_DASH.match(text):
        digits = text.replace(":", "").replace("-", "")
    elif _DOTTED.match(text):
        digits = text.replace(".", "")
    elif _BARE.match(text):
        digits = text
    else:
        raise reader.fail(key, f"expected a MAC address such as 52:54:00:ab:cd:ef, got {value!r}")
    mac = bytes.fromhex(digits)
    if mac == bytes(6):
        raise reader.fail(key, f"{value!r} is the all-zero address, not a network card's")
    if mac[0] & 1:
        raise reader.fail(key, f"{value!r} is a multicast (or broadcast) address, not a network card's")
    return mac


def parse_address(reader: Reader, value: Any, key: str) -> str:
    """An IPv4 or IPv6 literal: a broadcast address (C{192.168.1.255}) or the machine's own."""
    if not isinstance(value, str) or not value.strip():
        raise reader.fail(key, f"expected an IPv4 or IPv6 address such as 192.168.1.255, got {describe(value)}")
    text = value.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise reader.fail(
            key, f"expected an IPv4 or IPv6 address (a broadcast address such as 192.168.1.255), got {text!r}: "
                 "a sleeping machine cannot answer a DNS name's lookup for itself"
        ) from None
    if address.is_unspecified:
        raise reader.fail(key, f"{text!r} is the unspecified address: give a broadcast or the machine's address")
    return str(address)


@dataclass(frozen=True)
class WakeOnLanSettings:
    """A service's validated C{wol:} section."""

    mac: bytes
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    packets: int = 3
    packet_interval: float = 1.0
    stop_command: tuple[str, ...] | None = None
    command_timeout: float = 60.0
    adopt: bool = True
    stop_on_shutdown: bool = False


def parse_wol_section(reader: Reader, raw: Mapping[str, Any], key: str, service: str) -> WakeOnLanSettings:
    """Validate a service's C{wol:} mapping (called by L{hestia.config})."""
    reader.check_keys(raw, WOL_KEYS, key)
    if "mac" not in raw:
        raise reader.fail(f"{key}.mac", "missing: the MAC address of the network card to wake")
    values: dict[str, Any] = {"mac": parse_mac(reader, raw["mac"], f"{key}.mac")}
    if "address" in raw:
        values["address"] = parse_address(reader, raw["address"], f"{key}.address")
    if "port" in raw:
        port = reader.integer(raw["port"], f"{key}.port", minimum=1, maximum=65535)
        if port > 65535:
            raise reader.fail(f"{key}.port", f"must be at most 65535, got {port}")
        values["port"] = port
    if "packets" in raw:
        values["packets"] = reader.integer(raw["packets"], f"{key}.packets", minimum=1)
        if values["packets"] > 100:
            raise reader.fail(f"{key}.packets", "must be at most 100")
    if "packet_interval" in raw:
        interval = reader.duration(raw["packet_interval"], f"{key}.packet_interval")
        if not 0 < interval <= 3600:  # also refuses NaN
            raise reader.fail(f"{key}.packet_interval", "must be more than 0 and at most 1h")
        values["packet_interval"] = interval
    if raw.get("stop_command") is not None:
        values["stop_command"] = parse_command(reader, raw["stop_command"], f"{key}.stop_command")
    if "command_timeout" in raw:
        values["command_timeout"] = parse_command_timeout(reader, raw["command_timeout"], f"{key}.command_timeout")
    for flag in ("adopt", "stop_on_shutdown"):
        if flag in raw:
            values[flag] = reader.boolean(raw[flag], f"{key}.{flag}")
    return WakeOnLanSettings(**values)


def settings_of(service: ServiceConfig) -> WakeOnLanSettings:
    section = service.sections.get("wol")
    if isinstance(section, WakeOnLanSettings):
        return section
    # Built by hand (tests, plugins): validate it the same way.
    return parse_wol_section(Reader("<service>"), dict(section or {}), f"services.{service.name}.wol", service.name)


class _Sender(DatagramProtocol):
    noisy = False


def open_sender(reactor: IReactorUDP, address: str) -> Any:
    """
    An ephemeral UDP port to send magic packets to C{address} from (broadcast allowed).

    @raise OSError: no socket could be had.
    """
    ipv6 = ":" in address
    port = reactor.listenUDP(0, _Sender(), interface="::" if ipv6 else "", maxPacketSize=8192)
    if not ipv6:
        port.setBroadcastAllowed(True)  # type: ignore[attr-defined]
    return port


class WakeOnLanBackend(MachineBackend):
    """Wakes C{settings.mac} with magic packets; C{stop_command} puts it to sleep."""

    kind = "wol"

    def __init__(self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> None:
        self.settings = settings_of(service)
        super().__init__(
            service, reactor, agent, adopt=self.settings.adopt, stop_on_shutdown=self.settings.stop_on_shutdown
        )
        self.packet = magic_packet(self.settings.mac)
        self.packets_sent = 0
        self._repeat: IDelayedCall | None = None
        self._sender: Any = None  # the UDP port of the packets in progress
        self._left = 0

    def __repr__(self) -> str:
        return f"<WakeOnLanBackend {self.service.name} {format_mac(self.settings.mac)}>"

    def _wake(self) -> Deferred[None]:
        self._woken()
        self._left = self.settings.packets
        try:
            # One port for this start's packets, closed once they are sent or the machine answers.
            self._sender = open_sender(IReactorUDP(self._reactor), self.settings.address)
            self._send()
        except OSError as error:
            self._woken()
            raise StartFailed(
                f"cannot send the magic packet to {self.settings.address} port {self.settings.port}: {error}"
            ) from None
        return succeed(None)

    def _send(self) -> None:
        """Send one packet now, and schedule the next one, if any are left."""
        self._repeat = None
        if self._left <= 0 or self._sender is None:
            return
        self._left -= 1
        self._sender.write(self.packet, (self.settings.address, self.settings.port))
        self.packets_sent += 1
        self._log.info(
            "sent a magic packet for {mac} to {address} port {port} ({left} more to come)",
            mac=format_mac(self.settings.mac), address=self.settings.address, port=self.settings.port,
            left=self._left, service=self.service.name,
        )
        if self._left > 0:
            self._repeat = self._reactor.callLater(self.settings.packet_interval, self._send_logged)
        else:
            self._close_sender()

    def _send_logged(self) -> None:
        try:
            self._send()
        except OSError as error:
            self._woken()
            self._log.warn("cannot send a magic packet: {error}", error=str(error), service=self.service.name)

    def _woken(self) -> None:
        self._left = 0
        if self._repeat is not None and self._repeat.active():
            self._repeat.cancel()
        self._repeat = None
        self._close_sender()

    def _close_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.stopListening()

    def _sleep(self) -> Deferred[Any]:
        if self.settings.stop_command is None:
            return succeed(None)
        return self.commands.run(self.settings.stop_command, self.settings.command_timeout, "stop command")

    def _check_running(self) -> Deferred[bool]:
        return health.probe(self._agent, self._reactor, self.url, self.service.health)

    def _details(self) -> dict[str, Any]:
        return {
            "mac": format_mac(self.settings.mac),
            "address": self.settings.address,
            "port": self.settings.port,
            "packets_sent": self.packets_sent,
            "stop_command": describe_command(self.settings.stop_command),
        }


@provider(IBackendFactory)
class WakeOnLanBackendFactory:
    name = "wol"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> IBackend:
        return WakeOnLanBackend(service, reactor, agent)
