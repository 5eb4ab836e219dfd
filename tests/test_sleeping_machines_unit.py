"""
Issue 18, the pieces of the C{wol} and C{exec} backends that need no process:
the magic packet, MAC/address/command validation (one-line config errors), and
command timeouts, starts and stops driven by a L{Clock} with a fake process
reactor.  The live tests are in C{test_sleeping_machines.py}.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorUDP
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from hestia.backends import find_backend
from hestia.backends.commands import KILL_GRACE, OUTPUT_GRACE, CommandResult, CommandRunner
from hestia.backends.exec import ExecBackend
from hestia.backends.machine import StopFailed
from hestia.backends.wol import WakeOnLanBackend, magic_packet
from hestia.config import ConfigError
from hestia.errors import StartFailed
from hestia.interfaces import IAdoptableBackend, IBackendFactory, IPersistentBackend
from hestia.loader import load_config, parse_config

pytestmark = pytest.mark.unit

MAC = bytes.fromhex("5254 00ab cdef")


def _config(section: dict[str, Any], kind: str = "wol", **service: Any) -> Any:
    raw = {"services": {"box": {"url": "http://127.0.0.1:9", kind: section, **service}}}
    return parse_config(raw, "t.yml", {})


def _error(section: dict[str, Any], kind: str = "wol") -> str:
    with pytest.raises(ConfigError) as caught:
        _config(section, kind)
    text = str(caught.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ the packet


def test_magic_packet_byte_for_byte() -> None:
    packet = magic_packet(MAC)
    assert len(packet) == 102
    assert packet[:6] == b"\xff\xff\xff\xff\xff\xff"
    assert packet[6:] == bytes.fromhex("525400abcdef") * 16
    for index in range(16):
        assert packet[6 + 6 * index: 12 + 6 * index] == b"\x52\x54\x00\xab\xcd\xef"
    with pytest.raises(ValueError):
        magic_packet(b"\x01\x02\x03")


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("written", ["52:54:00:ab:cd:ef", "52-54-00-AB-CD-EF", "5254.00ab.cdef", "525400ABCDEF",
                                     " 52:54:00:ab:cd:ef "])
def test_mac_forms(written: str) -> None:
    settings = _config({"mac": written}).services["box"].sections["wol"]
    assert settings.mac == MAC


@pytest.mark.parametrize(("mac", "says"), [
    ("52:54:00:ab:cd", "expected a MAC address"),
    ("52:54:00:ab:cd:eg", "expected a MAC address"),
    ("52:54-00:ab:cd:ef", "expected a MAC address"),  # mixed separators
    ("52:54:00:ab:cd:ef:01", "expected a MAC address"),
    ("00:00:00:00:00:00", "all-zero"),
    ("ff:ff:ff:ff:ff:ff", "multicast"),
    ("01:00:5e:00:00:01", "multicast"),
    ("", "expected a MAC address"),
    (None, "expected a MAC address"),
    (True, "expected a MAC address"),
])
def test_bad_mac_is_one_line_naming_file_service_key(mac: Any, says: str) -> None:
    text = _error({"mac": mac})
    assert text.startswith("t.yml: services.box.wol.mac: ")
    assert says in text


def test_unquoted_mac_that_yaml_reads_as_a_number() -> None:
    raw = yaml.safe_load("services:\n  box:\n    url: http://127.0.0.1:9\n    wol: {mac: 52:54:00:12:34:56}\n")
    assert isinstance(raw["services"]["box"]["wol"]["mac"], int)  # YAML 1.1 base 60
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "t.yml", {})
    assert str(caught.value) == (
        't.yml: services.box.wol.mac: write the MAC address in quotes (mac: "52:54:00:12:34:56"): '
        "unquoted, YAML reads it as a number"
    )


def test_missing_mac() -> None:
    assert _error({"address": "127.0.0.1"}).startswith("t.yml: services.box.wol.mac: missing")


def test_address_defaults_to_broadcast_port_9() -> None:
    settings = _config({"mac": "52:54:00:ab:cd:ef"}).services["box"].sections["wol"]
    assert (settings.address, settings.port, settings.stop_command) == ("255.255.255.255", 9, None)


@pytest.mark.parametrize("address", ["192.168.1.255", "10.0.0.7", "127.0.0.1", "::1", "ff02::1", "fe80::1%eth0"])
def test_address_literals(address: str) -> None:
    settings = _config({"mac": "52:54:00:ab:cd:ef", "address": address}).services["box"].sections["wol"]
    assert settings.address == address


@pytest.mark.parametrize("address", ["box.lan", "localhost", "192.168.1", "300.1.1.1", "0.0.0.0", "::", "", 42])
def test_bad_address(address: Any) -> None:
    text = _error({"mac": "52:54:00:ab:cd:ef", "address": address})
    assert text.startswith("t.yml: services.box.wol.address: ")


@pytest.mark.parametrize(("key", "value"), [("port", 0), ("port", 65536), ("port", "nine"), ("packets", 0),
                                            ("packet_interval", 0), ("packet_interval", float("nan")),
                                            ("command_timeout", "soon"), ("command_timeout", float("inf")),
                                            ("command_timeout", float("nan")), ("command_timeout", 0),
                                            ("adopt", "maybe"), ("macc", "x")])
def test_other_wol_keys(key: str, value: Any) -> None:
    text = _error({"mac": "52:54:00:ab:cd:ef", key: value})
    assert text.startswith(f"t.yml: services.box.wol.{key}: ")


@pytest.mark.parametrize("command", ["", "   ", []])
def test_empty_stop_command(command: Any) -> None:
    text = _error({"mac": "52:54:00:ab:cd:ef", "stop_command": command})
    assert text == "t.yml: services.box.wol.stop_command: must not be empty"


@pytest.mark.parametrize(("section", "key", "says"), [
    ({"start": "", "stop": "true"}, "start", "must not be empty"),
    ({"start": [], "stop": "true"}, "start", "must not be empty"),
    ({"start": ["", "x"], "stop": "true"}, "start", "must not be empty"),
    ({"start": "true", "stop": "  "}, "stop", "must not be empty"),
    ({"start": "true", "stop": "true", "status": ""}, "status", "must not be empty"),
    ({"stop": "true"}, "start", "missing"),
    ({"start": "true"}, "stop", "missing"),
    ({"start": [["nested"]], "stop": "true"}, "start", "expected a list of arguments"),
    ({"start": 7, "stop": "true"}, "start", "expected a list of arguments"),
    ({"start": "true", "stop": "true", "command_timeout": -1}, "command_timeout", "negative"),
    ({"start": "true", "stop": "true", "command_timeout": "2d"}, "command_timeout", "expected a number"),
    ({"start": "true", "stop": "true", "command_timeout": 1e300}, "command_timeout", "at most 24h"),
    ({"start": "true", "stop": "true", "statuss": "true"}, "statuss", "did you mean status"),
])
def test_bad_exec_section(section: dict[str, Any], key: str, says: str) -> None:
    text = _error(section, "exec")
    assert text.startswith(f"t.yml: services.box.exec.{key}: ")
    assert says in text


def test_exec_commands_as_list_or_shell_line() -> None:
    settings = _config({"start": ["virsh", "start", "gpu"], "stop": "virsh shutdown gpu", "status": "true"},
                       "exec").services["box"].sections["exec"]
    assert settings.start == ("virsh", "start", "gpu")
    assert settings.stop == ("/bin/sh", "-c", "virsh shutdown gpu")
    assert settings.status == ("/bin/sh", "-c", "true")


def test_one_backend_per_service() -> None:
    with pytest.raises(ConfigError) as caught:
        _config({"mac": "52:54:00:ab:cd:ef"}, command=["true"])
    assert "give only one of" in str(caught.value) and "wol" in str(caught.value)


def test_backends_are_registered_plugins() -> None:
    for name in ("wol", "exec"):
        factory = find_backend(name)
        assert IBackendFactory.providedBy(factory) and factory.name == name
    config = _config({"mac": "52:54:00:ab:cd:ef"})
    backend = find_backend("wol").build(config.services["box"], Clock(), None)
    assert IPersistentBackend.providedBy(backend) and IAdoptableBackend.providedBy(backend)


# ------------------------------------------------------------------ fakes for the reactor


@implementer(IProcessTransport)
class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.stdin_closed = False
        self.closed_fds: list[int] = []

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeChildFD(self, fd: int) -> None:
        self.closed_fds.append(fd)


class Spawned:
    def __init__(self, protocol: Any, args: list[str], transport: FakeProcess) -> None:
        self.protocol = protocol
        self.args = args
        self.transport = transport

    def write(self, data: bytes, fd: int = 1) -> None:
        self.protocol.childDataReceived(fd, data)

    def end(self, code: int | None = 0, signum: int | None = None) -> None:
        self.protocol.processExited(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(code, signum)))
        self.transport.pid = None
        self.protocol.processEnded(Failure(ProcessDone(0) if code == 0 else ProcessTerminated(code, signum)))


class FakeUDPPort:
    def __init__(self, sent: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.sent = sent
        self.broadcast = False
        self.listening = True

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        assert self.listening and self.broadcast
        self.sent.append((data, address))

    def stopListening(self) -> None:
        self.listening = False


@implementer(IReactorProcess, IReactorUDP)
class ProcessClock(Clock):
    """A Clock that also spawns fake processes and sends UDP into a list."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.signals: list[tuple[int, int]] = []
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self.udp_ports: list[FakeUDPPort] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: Any = 0, childFDs: Any = None) -> FakeProcess:
        transport = FakeProcess(4000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append(Spawned(protocol, args, transport))
        return transport

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUDPPort:
        self.udp_ports.append(FakeUDPPort(self.datagrams))
        return self.udp_ports[-1]

    def signal_group(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))


def _runner(clock: ProcessClock) -> CommandRunner:
    return CommandRunner(clock, "box", signal_group=clock.signal_group)


def _result(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "not fired yet"
    return results[0]


# ------------------------------------------------------------------ commands


def test_command_runs_to_its_end_with_its_output() -> None:
    clock = ProcessClock()
    runner = _runner(clock)
    heard: list[tuple[str, str]] = []
    runner.add_line_listener(lambda stream, line: heard.append((stream, line)))
    running = runner.run(("aws", "ec2", "start-instances"), timeout=30)
    [spawned] = clock.spawned
    assert spawned.args[-3:] == ["aws", "ec2", "start-instances"] and spawned.transport.stdin_closed
    spawned.write(b"starting i-0abc\npart")
    spawned.write(b"warning: slow\r\n", fd=2)
    spawned.write(b"ial\nno newline")
    assert not running.called
    spawned.end(0)
    result: CommandResult = _result(running)
    assert result.succeeded and result.lines == ("starting i-0abc", "warning: slow", "partial", "no newline")
    assert heard == [("stdout", "starting i-0abc"), ("stderr", "warning: slow"), ("stdout", "partial"),
                     ("stdout", "no newline")]
    assert list(runner.output) == ["starting i-0abc", "warning: slow", "partial", "no newline"]
    clock.advance(KILL_GRACE + 60)
    assert clock.signals == []  # nothing is killed after a normal end


def test_command_timeout_terms_then_kills_its_session() -> None:
    clock = ProcessClock()
    running = _runner(clock).run(("ssh", "box", "suspend"), timeout=10)
    [spawned] = clock.spawned
    clock.advance(9.9)
    assert clock.signals == [] and not running.called
    clock.advance(0.1)
    assert clock.signals == [(4000, signal.SIGTERM)]
    clock.advance(KILL_GRACE - 0.1)
    assert clock.signals == [(4000, signal.SIGTERM)]
    clock.advance(0.1)
    assert clock.signals == [(4000, signal.SIGTERM), (4000, signal.SIGKILL)]
    spawned.write(b"ssh: connect to host box port 22: No route to host\n", fd=2)
    spawned.end(None, signal.SIGKILL)
    result: CommandResult = _result(running)
    assert result.timed_out and not result.succeeded
    assert result.summary("stop command") == (
        "stop command ssh box suspend: timed out after 10s (killed): "
        "ssh: connect to host box port 22: No route to host"
    )


def test_command_that_ends_before_its_kill_is_not_signalled_again() -> None:
    clock = ProcessClock()
    running = _runner(clock).run(("sleep", "100"), timeout=1)
    clock.advance(1)
    clock.spawned[0].end(None, signal.SIGTERM)
    clock.advance(KILL_GRACE * 2)
    assert clock.signals == [(4000, signal.SIGTERM)]
    assert _result(running).timed_out


def test_background_child_holding_the_output_does_not_hold_the_result() -> None:
    clock = ProcessClock()
    running = _runner(clock).run(("/bin/sh", "-c", "srv & echo started"), timeout=60)
    [spawned] = clock.spawned
    spawned.protocol.processExited(Failure(ProcessDone(0)))
    assert spawned.transport.closed_fds == []
    clock.advance(OUTPUT_GRACE)
    assert spawned.transport.closed_fds == [1, 2]  # which ends the process for Twisted
    spawned.protocol.processEnded(Failure(ProcessDone(0)))
    assert _result(running).succeeded


def test_cancelling_a_command_stops_it() -> None:
    clock = ProcessClock()
    running = _runner(clock).run(("gcloud", "compute", "instances", "start", "gpu"), timeout=60)
    running.cancel()
    assert clock.signals == [(4000, signal.SIGTERM)]
    clock.advance(KILL_GRACE)
    assert clock.signals[-1] == (4000, signal.SIGKILL)
    assert isinstance(_result(running), Failure)


# ------------------------------------------------------------------ the backends, step by step


def _exec_backend(clock: ProcessClock, **section: Any) -> ExecBackend:
    settings = {"start": ["start-vm"], "stop": ["stop-vm"], "command_timeout": 30, **section}
    service = _config(settings, "exec").services["box"]
    backend = ExecBackend(service, clock, agent=None)  # type: ignore[arg-type]
    backend.commands = _runner(clock)
    return backend


def test_exec_start_failure_shows_the_last_line_as_its_detail() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock)
    starting = backend.start()
    clock.spawned[0].write(b"An error occurred (InvalidInstanceID.NotFound)\n", fd=2)
    clock.spawned[0].end(254)
    failure = _result(starting)
    assert isinstance(failure, Failure) and failure.check(StartFailed)
    # The output is the detail (admin tokens only), never the reason anyone granted the service reads.
    assert failure.value.reason == "start command start-vm: exit status 254"
    assert failure.value.detail == ["An error occurred (InvalidInstanceID.NotFound)"]
    assert backend.describe()["machine"] == "awake"  # it may have started: the clean-up stop runs


def test_exec_start_command_timeout_fails_the_start() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock, command_timeout=5)
    starting = backend.start()
    clock.advance(5)
    clock.spawned[0].end(None, signal.SIGTERM)
    failure = _result(starting)
    assert failure.check(StartFailed) and "timed out after 5s" in failure.value.reason


def test_exec_failed_stop_says_it_may_still_be_awake() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock)
    backend.start()
    clock.spawned[0].end(0)
    stopping = backend.stop(10)
    assert clock.spawned[1].args[-1] == "stop-vm"
    clock.spawned[1].write(b"permission denied\n", fd=2)
    clock.spawned[1].end(3)
    failure = _result(stopping)
    assert failure.check(StopFailed)
    assert str(failure.value) == "stop command stop-vm: exit status 3 (the machine may still be awake)"
    assert failure.value.detail == ["permission denied"]
    assert backend.describe()["machine"] == "may be awake (stop failed)"
    assert backend.describe()["last_stop_error"] == str(failure.value)
    # The next stop tries again, and a success forgets the machine.
    again = backend.stop(10)
    clock.spawned[2].end(0)
    assert _result(again) is None and backend.describe()["machine"] == "asleep"


def test_exec_stop_of_a_machine_never_started_runs_nothing() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock)
    assert _result(backend.stop(10)) is None
    assert clock.spawned == []


def test_exec_status_adopts_without_running_start() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock, status=["vm-status"])
    asking = backend.running_already()
    clock.spawned[0].end(0)
    assert _result(asking) is True
    assert _result(backend.start()) is None
    assert len(clock.spawned) == 1  # no start command
    assert backend.describe()["adopted"] is True and backend.describe()["machine"] == "awake"
    backend.stop(10)
    assert clock.spawned[1].args[-1] == "stop-vm"


def test_exec_status_not_running_and_no_status() -> None:
    clock = ProcessClock()
    backend = _exec_backend(clock, status=["vm-status"])
    asking = backend.running_already()
    clock.spawned[0].end(3)
    assert _result(asking) is False
    assert _result(_exec_backend(ProcessClock()).running_already()) is False


def _wol_backend(clock: ProcessClock, **section: Any) -> WakeOnLanBackend:
    settings = {"mac": "52:54:00:ab:cd:ef", "address": "127.0.0.1", "port": 40009, **section}
    service = _config(settings).services["box"]
    backend = WakeOnLanBackend(service, clock, agent=None)  # type: ignore[arg-type]
    backend.commands = _runner(clock)
    return backend


def test_wol_start_sends_packets_until_woken() -> None:
    clock = ProcessClock()
    backend = _wol_backend(clock, packets=4, packet_interval=0.5)
    assert _result(backend.start()) is None
    expected = (b"\xff" * 6 + MAC * 16, ("127.0.0.1", 40009))
    assert clock.datagrams == [expected]
    clock.advance(0.5)
    assert clock.datagrams == [expected] * 2
    [port] = clock.udp_ports
    assert port.listening
    backend._woken()  # what a probe answering True does
    assert not port.listening
    clock.advance(10)
    assert clock.datagrams == [expected] * 2
    assert backend.describe()["packets_sent"] == 2


def test_wol_sends_at_most_packets() -> None:
    clock = ProcessClock()
    backend = _wol_backend(clock, packets=3, packet_interval=1)
    backend.start()
    clock.pump([1] * 10)
    assert len(clock.datagrams) == 3
    assert [port.listening for port in clock.udp_ports] == [False]  # one port per start, closed after the last


def test_wol_without_stop_command_only_marks_it_stopped() -> None:
    clock = ProcessClock()
    backend = _wol_backend(clock)
    backend.start()
    assert _result(backend.stop(10)) is None
    assert clock.spawned == [] and backend.describe()["machine"] == "asleep"


def test_wol_stop_runs_the_stop_command_and_stops_the_packets() -> None:
    clock = ProcessClock()
    backend = _wol_backend(clock, stop_command=["ssh", "box", "sudo", "systemctl", "suspend"], packets=5)
    backend.start()
    stopping = backend.stop(10)
    [spawned] = clock.spawned
    assert spawned.args[-5:] == ["ssh", "box", "sudo", "systemctl", "suspend"]
    clock.advance(30)
    assert len(clock.datagrams) == 1
    spawned.end(0)
    assert _result(stopping) is None


def test_exec_start_abandoned_stops_its_command() -> None:
    """The lifecycle cancels a start that ran past start_timeout: the command must not go on."""
    clock = ProcessClock()
    backend = _exec_backend(clock)
    starting = backend.start()
    starting.cancel()
    assert clock.signals == [(4000, signal.SIGTERM)]
    assert _result(starting).check(Exception)


def test_examples_in_the_sleeping_machines_page_are_valid(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "sleeping-machines.md"
    blocks = re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    backends = set()
    for block in blocks:
        path = tmp_path / "c.yml"
        path.write_text(block)
        backends |= {service.backend for service in load_config(str(path), environ={}).services.values()}
    assert backends == {"wol", "exec"}


def test_a_status_answer_that_a_stop_overtook_adopts_nothing() -> None:
    """A stop (a resumed one) began while status was asked: the next start must really start."""
    clock = ProcessClock()
    backend = _exec_backend(clock, status=["vm-status"])
    asking = backend.running_already()
    backend.stop(10)  # nothing recorded: runs nothing
    clock.spawned[0].end(0)  # status: running (it was, before the stop)
    assert _result(asking) is True
    backend.start()
    assert clock.spawned[-1].args[-1] == "start-vm"


def test_stop_on_shutdown_decides_whether_it_survives_the_gateway() -> None:
    assert _exec_backend(ProcessClock()).survives_gateway is True
    assert _exec_backend(ProcessClock(), stop_on_shutdown=True).survives_gateway is False
    assert _wol_backend(ProcessClock(), stop_on_shutdown=True).survives_gateway is False
