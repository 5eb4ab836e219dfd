"""
Issue 20, "Watching the config": C{server.watch_config} / C{--watch-config}.

Unit tests drive the debounce and the polling source with a L{Clock}; the live
tests run a real ``twistd -n hestia`` and edit its file the ways people and
editors do (in place, broken, write-and-rename), without sending a signal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import StartHestia
from support.backendproc import wait_for
from support.hestiaproc import BackendSpec, HestiaProcess
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hestia.config import ConfigError
from hestia.loader import load_config, parse_config
from hestia.watch import (
    DEBOUNCE_DELAY,
    ConfigWatcher,
    Debounce,
    IChangeSource,
    InotifySource,
    PollingSource,
    change_source,
)

# ---- unit: the debounce --------------------------------------------------------


class Counter:
    def __init__(self, result: Any = None) -> None:
        self.calls = 0
        self.result = result

    def __call__(self) -> Any:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.unit
def test_a_burst_of_notices_is_one_reload_after_the_quiet_time() -> None:
    clock, action = Clock(), Counter()
    debounce = Debounce(clock, action, delay=0.3, max_wait=2.0)
    for _ in range(5):  # An editor's save: several events within milliseconds.
        debounce.poke()
        clock.advance(0.05)
    assert action.calls == 0
    clock.advance(0.29)  # 0.3 s after the last notice, not the first.
    assert action.calls == 1
    clock.advance(10)
    assert action.calls == 1 and not debounce.pending


@pytest.mark.unit
def test_nothing_runs_before_the_quiet_time() -> None:
    clock, action = Clock(), Counter()
    debounce = Debounce(clock, action, delay=0.3)
    debounce.poke()
    clock.advance(0.29)
    assert action.calls == 0 and debounce.pending
    clock.advance(0.01)
    assert action.calls == 1


@pytest.mark.unit
def test_a_file_that_keeps_changing_is_still_reloaded_after_max_wait() -> None:
    clock, action = Clock(), Counter()
    debounce = Debounce(clock, action, delay=0.3, max_wait=2.0)
    fired_at = []
    for _ in range(12):  # a notice every 0.25 s, for 3 s: never 0.3 s of quiet
        debounce.poke()
        clock.advance(0.25)
        if action.calls > len(fired_at):
            fired_at.append(clock.seconds())
    assert fired_at == [2.0], "reloaded at the cap although the notices went on"
    clock.advance(0.05)  # the second burst (2.0 s to 2.75 s) settles 0.3 s after its last notice
    assert action.calls == 2


@pytest.mark.unit
def test_notices_during_a_slow_reload_run_it_once_more_afterwards() -> None:
    clock = Clock()
    running: list[Deferred[None]] = []

    def slow_reload() -> Deferred[None]:
        running.append(Deferred())
        return running[-1]

    debounce = Debounce(clock, slow_reload, delay=0.3)
    debounce.poke()
    clock.advance(0.3)
    assert len(running) == 1
    debounce.poke()
    debounce.poke()
    clock.advance(5)
    assert len(running) == 1, "never two reloads at a time"
    running[0].callback(None)
    clock.advance(0.3)
    assert len(running) == 2, "the change seen during the reload is applied after it"
    running[1].callback(None)
    clock.advance(5)
    assert len(running) == 2


@pytest.mark.unit
def test_a_reload_that_raises_does_not_stop_the_watching() -> None:
    clock, action = Clock(), Counter(RuntimeError("boom"))
    debounce = Debounce(clock, action, delay=0.3)
    debounce.poke()
    clock.advance(0.3)
    debounce.poke()
    clock.advance(0.3)
    assert action.calls == 2


@pytest.mark.unit
def test_cancel_drops_a_pending_reload() -> None:
    clock, action = Clock(), Counter()
    debounce = Debounce(clock, action, delay=0.3)
    debounce.poke()
    debounce.cancel()
    clock.advance(5)
    assert action.calls == 0 and not debounce.pending


# ---- unit: the sources -----------------------------------------------------------


@pytest.mark.unit
def test_polling_is_never_faster_than_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text("a: 1\n")
    clock, seen = Clock(), Counter()
    source = PollingSource(path, clock, interval=0.1)
    assert source.interval == 1.0
    source.start(seen)
    path.write_text("a: 22\n")
    clock.advance(0.99)
    assert seen.calls == 0
    clock.advance(0.01)
    assert seen.calls == 1
    clock.advance(5)  # unchanged since: no more notices
    assert seen.calls == 1
    source.stop()
    assert not clock.getDelayedCalls()


@pytest.mark.unit
def test_polling_sees_a_rename_over_the_file_and_its_removal(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text("a: 1\n")
    clock, seen = Clock(), Counter()
    source = PollingSource(path, clock)
    source.start(seen)
    replacement = tmp_path / ".hestia_config.yml.swp"
    replacement.write_text("a: 1\n")  # same content and size: only the inode differs
    os.replace(replacement, path)
    clock.advance(1)
    assert seen.calls == 1
    path.unlink()
    clock.advance(1)
    assert seen.calls == 2
    path.write_text("a: 1\n")
    clock.advance(1)
    assert seen.calls == 3
    source.stop()


@pytest.mark.unit
def test_inotify_events_count_only_for_the_file_name(tmp_path: Path) -> None:
    from twisted.internet import inotify

    path = tmp_path / "hestia_config.yml"
    source = InotifySource(path)
    verifyObject(IChangeSource, source)
    seen = Counter()
    source._changed = seen  # what start() sets, without a reactor
    directory = FilePath(str(tmp_path)).asBytesMode()
    source.notice(None, directory.child(b"hestia.db-wal"), inotify.IN_CLOSE_WRITE)
    source.notice(None, directory.child(b"hestia_config.yml.tmp"), inotify.IN_CLOSE_WRITE)
    assert seen.calls == 0
    source.notice(None, directory.child(b"hestia_config.yml"), inotify.IN_MOVED_TO)
    assert seen.calls == 1
    # Every write to the state database beside it would wake us: IN_MODIFY is left out.
    assert not source.mask & inotify.IN_MODIFY
    assert source.mask & inotify.IN_MOVED_TO and source.mask & inotify.IN_CLOSE_WRITE


@pytest.mark.unit
def test_inotify_follows_a_configmap_style_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes: hestia_config.yml -> ..data/hestia_config.yml, and ..data is swapped by a rename."""
    from twisted.internet import inotify

    for version, timeout in (("v1", 5), ("v2", 7)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "hestia_config.yml").write_text(f"defaults: {{idle_timeout: {timeout}}}\n")
    (tmp_path / "..data").symlink_to("v1")
    path = tmp_path / "hestia_config.yml"
    path.symlink_to(Path("..data") / "hestia_config.yml")
    source = InotifySource(path)
    seen = Counter()
    source._changed = seen
    directory = FilePath(str(tmp_path)).asBytesMode()
    source.notice(None, directory.child(b"hestia.db-journal"), inotify.IN_CREATE)
    assert seen.calls == 0, "an unrelated file beside it"
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    source.notice(None, directory.child(b"..data"), inotify.IN_MOVED_TO)
    assert seen.calls == 1, "the name is not the file's, but what the path leads to changed"
    source.notice(None, directory.child(b"v1"), inotify.IN_DELETE)
    assert seen.calls == 1


@pytest.mark.unit
def test_polling_where_inotify_is_not_available(tmp_path: Path) -> None:
    assert isinstance(change_source(tmp_path / "c.yml", Clock(), use_inotify=False), PollingSource)


@implementer(IChangeSource)
class ManualSource:
    def __init__(self) -> None:
        self.changed: Any = None

    def start(self, changed: Any) -> None:
        self.changed = changed

    def stop(self) -> None:
        self.changed = None


@pytest.mark.unit
def test_the_watcher_reloads_after_the_debounce_and_not_after_stopping(tmp_path: Path) -> None:
    clock, reload, source = Clock(), Counter(), ManualSource()
    watcher = ConfigWatcher(tmp_path / "c.yml", clock, reload, source=source)
    watcher.startService()
    source.changed()
    clock.advance(DEBOUNCE_DELAY)
    assert reload.calls == 1
    source.changed()
    watcher.stopService()
    watcher.stopService()  # idempotent: the gateway stops it before its children
    clock.advance(5)
    assert reload.calls == 1 and source.changed is None


@pytest.mark.unit
def test_the_watcher_falls_back_to_polling_when_inotify_fails(tmp_path: Path) -> None:
    class Exhausted(InotifySource):
        def start(self, changed: Any) -> None:
            raise OSError(24, "Too many open files")

    path = tmp_path / "c.yml"
    path.write_text("a: 1\n")
    clock, reload = Clock(), Counter()
    watcher = ConfigWatcher(path, clock, reload, source=Exhausted(path))
    watcher.startService()
    assert watcher.method == "polling"
    path.write_text("a: 333\n")
    clock.advance(1)  # the look that sees it
    assert reload.calls == 0
    clock.advance(DEBOUNCE_DELAY)
    assert reload.calls == 1
    watcher.stopService()


# ---- unit: the setting -----------------------------------------------------------


@pytest.mark.unit
def test_watch_config_is_a_boolean_server_key() -> None:
    assert parse_config({"server": {"watch_config": "yes"}}, "c.yml", {}).server.watch_config is True
    assert parse_config({}, "c.yml", {}).server.watch_config is False
    with pytest.raises(ConfigError, match=r"c\.yml: server\.watch_config: expected true or false"):
        parse_config({"server": {"watch_config": "sometimes"}}, "c.yml", {})


@pytest.mark.unit
def test_the_gateway_watches_only_when_asked_and_only_a_file(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from hestia.server_tap import HestiaService, Options

    path = tmp_path / "hestia_config.yml"
    path.write_text(yaml.safe_dump({"server": {"state_path": ":memory:"}, "services": {}}))
    config = load_config(str(path), environ={})
    assert HestiaService(config, reactor=MemoryReactorClock()).watcher is None
    watched = HestiaService(config, reactor=MemoryReactorClock(), watch_config=True).watcher
    assert watched is not None and watched.path == path
    builtin = parse_config({"server": {"state_path": ":memory:"}}, "<built-in defaults>", {})
    assert HestiaService(builtin, reactor=MemoryReactorClock(), watch_config=True).watcher is None
    options = Options()
    options.parseOptions(["--config", str(path), "--watch-config"])
    assert options["watch-config"]


# ---- integration: a real gateway -------------------------------------------------


def edit_in_place(path: Path, config: dict[str, Any]) -> None:
    """What most editors and `>` do: truncate the same file and write it."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(yaml.safe_dump(config, sort_keys=False))


def reload_failures(gw: HestiaProcess) -> list[str]:
    return [line for line in gw.log_text().splitlines() if "reload failed" in line]


# The promise: an edit is in effect within 2 s, with no signal sent.
APPLIED_WITHIN = 2.0


@pytest.mark.integration
def test_edits_are_applied_without_a_signal_and_a_broken_one_is_refused(
    hestia: StartHestia, tmp_path: Path
) -> None:
    echo = BackendSpec("echo", tmp_path)
    services: dict[str, Any] = {"echo": echo.service(idle_timeout=5)}
    gw = hestia({"server": {"watch_config": True}, "services": services})
    assert gw.http.get("/services/echo/health").status_code == 200
    assert gw.config_path is not None
    config = {"server": {"listen": gw.listen, "watch_config": True}, "services": services}

    # An edit in place.
    services["echo"] = echo.service(idle_timeout=7)
    edit_in_place(gw.config_path, config)
    gw.wait_status("echo", "idle_timeout", 7, timeout=APPLIED_WITHIN)
    assert gw.http.get("/services/echo/health").status_code == 200
    pid = gw.status("echo")["details"]["pid"]

    # A broken edit: one line saying why, and the running configuration stays.
    broken = gw.config_path.read_text().replace("idle_timeout: 7", "idle_timeout: soon")
    gw.config_path.write_text(broken)
    assert wait_for(lambda: reload_failures(gw), 10), gw.log_text()
    [line] = reload_failures(gw)
    assert str(gw.config_path) in line and "services.echo.idle_timeout" in line
    assert "Traceback" not in gw.log_text()
    assert gw.status("echo")["idle_timeout"] == 7
    assert gw.http.get("/services/echo/health").status_code == 200
    assert gw.status("echo")["details"]["pid"] == pid  # the same process: nothing was touched

    # Invalid YAML half-way through a save is refused the same way.
    gw.config_path.write_text("services: [unclosed\n")
    assert wait_for(lambda: len(reload_failures(gw)) == 2, 10), gw.log_text()
    assert "invalid YAML" in reload_failures(gw)[1]

    # An editor's write-and-rename (a new inode under the same name).
    services["echo"] = echo.service(idle_timeout=9)
    gw.write_config(config)
    gw.wait_status("echo", "idle_timeout", 9, timeout=APPLIED_WITHIN)
    assert len(reload_failures(gw)) == 2


@pytest.mark.integration
def test_a_symlinked_config_is_watched_where_the_file_is(hestia: StartHestia, tmp_path: Path) -> None:
    """A config kept elsewhere (a dotfiles checkout) and linked into place: editing the real file counts."""
    gw = hestia({"server": {"watch_config": True}, "services": {"web": {"url": "http://127.0.0.1:9"}}})
    assert gw.config_path is not None
    elsewhere = tmp_path / "dotfiles"
    elsewhere.mkdir()
    real = elsewhere / "hestia.yml"
    real.write_text(gw.config_path.read_text())
    # Linking it into place is itself a change (a rename over the name): it is applied, unchanged.
    link = gw.config_path.with_name(".link")
    link.symlink_to(real)
    os.replace(link, gw.config_path)
    assert wait_for(lambda: "reloaded" in gw.log_text(), 10), gw.log_text()
    edit_in_place(real, {
        "server": {"listen": gw.listen, "watch_config": True},
        "services": {"web": {"url": "http://127.0.0.1:9", "idle_timeout": 13}},
    })
    gw.wait_status("web", "idle_timeout", 13, timeout=APPLIED_WITHIN)


@pytest.mark.integration
def test_watch_config_flag_sees_an_atomic_rename(hestia: StartHestia, tmp_path: Path) -> None:
    """C{--watch-config} (what C{dev.sh run} passes) with a file that does not ask for watching."""
    gw = hestia({"services": {"web": {"url": "http://127.0.0.1:9", "idle_timeout": 5}}}, args=["--watch-config"])
    assert gw.status("web")["idle_timeout"] == 5
    assert gw.config_path is not None
    replacement = gw.config_path.with_name(".hestia_config.yml.swp")  # as vim and many editors name it
    replacement.write_text(yaml.safe_dump({
        "server": {"listen": gw.listen},
        "services": {"web": {"url": "http://127.0.0.1:9", "idle_timeout": 11}},
    }))
    os.rename(replacement, gw.config_path)
    gw.wait_status("web", "idle_timeout", 11, timeout=APPLIED_WITHIN)
    assert "watching" in gw.log_text() and "(inotify)" in gw.log_text()
