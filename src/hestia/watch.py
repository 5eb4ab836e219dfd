"""
Watching the configuration file (C{server.watch_config}, C{--watch-config}).

A change to the file is applied like a SIGHUP: the watcher calls the same
reload entry point, after a short debounce, so an editor's burst of writes
(truncate, write, write, close; or write a temporary file and rename it over
the original) becomes one reload of the finished file.

The directory is watched, not the file: an editor's write-and-rename replaces
the file's inode, and a watch on the old inode would go quiet after the first
save.  Events are matched on the file's name.

Two sources of change notices, one interface (L{IChangeSource}):
  - L{InotifySource}: inotify through L{twisted.internet.inotify} (Linux);
  - L{PollingSource}: C{stat} of the file, never more often than once a second.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.runtime import platform
from zope.interface import Interface, implementer

log = Logger(namespace="hestia.watch")

# Quiet time after the last notice before the reload: long enough for an
# editor's save (several events within milliseconds), short enough to feel
# immediate.
DEBOUNCE_DELAY = 0.3
# A file that keeps changing (a slow copy, a generator writing it) is still
# reloaded this long after the first notice; the next notices reload it again.
DEBOUNCE_MAX_WAIT = 2.0
# The rule: polling no faster than once a second.
MIN_POLL_INTERVAL = 1.0


class IChangeSource(Interface):
    """Something that says when a file may have changed."""

    def start(changed: Callable[[], None]) -> None:
        """Begin watching; call C{changed()} (with no arguments) on every notice."""

    def stop() -> None:
        """Stop watching; no call of C{changed} after this."""


class Debounce:
    """
    Turn a burst of notices into one call of C{action}.

    C{action} runs C{delay} seconds after the latest L{poke}, but no later than
    C{max_wait} after the first poke of a burst.  C{action} may return a
    L{Deferred}: while it runs, pokes are remembered and it runs once more
    after it finishes (never two at a time).
    """

    def __init__(
        self, reactor: IReactorTime, action: Callable[[], Any],
        delay: float = DEBOUNCE_DELAY, max_wait: float = DEBOUNCE_MAX_WAIT,
    ) -> None:
        self.reactor = reactor
        self.action = action
        self.delay = delay
        self.max_wait = max(max_wait, delay)
        self._timer: IDelayedCall | None = None
        self._burst_started: float | None = None
        self._running: Deferred[Any] | None = None
        self._again = False
        self.runs = 0  # how many times the action ran (for status and tests)

    @property
    def pending(self) -> bool:
        """A run is due (timer set, or asked for while one runs)."""
        return self._timer is not None or self._again

    def poke(self) -> None:
        if self._running is not None:
            self._again = True
            return
        now = self.reactor.seconds()
        if self._burst_started is None:
            self._burst_started = now
        wait = min(self.delay, self._burst_started + self.max_wait - now)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, wait), self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._burst_started = None
        self._again = False

    def _fire(self) -> None:
        self._timer = None
        self._burst_started = None
        self.runs += 1
        running: Deferred[Any] = maybeDeferred(self.action)
        running.addErrback(self._failed)
        if running.called:  # The usual case: a synchronous reload.
            self._finished()
            return
        self._running = running
        running.addBoth(self._finished)

    def _failed(self, failure: Failure) -> None:
        # Whatever went wrong, the watcher keeps watching.
        log.failure("reload after a change of the configuration file failed", failure)

    def _finished(self, result: Any = None) -> None:
        self._running = None
        if self._again:
            self._again = False
            self.poke()


@implementer(IChangeSource)
class InotifySource:
    """
    inotify on the file's directory, keeping the events that name the file.

    A configuration that is a symlink is followed too: the directory of the
    file it points to (now: the link may be replaced) is watched as well (a
    dotfiles checkout), and an event that names neither file counts when what
    the path leads to has changed (a Kubernetes ConfigMap swaps a C{..data}
    symlink beside the file).

    The mask leaves out C{IN_MODIFY}: it fires on every write, and the
    directory usually also holds the SQLite state database (C{state_path} is
    relative to the config file), written on every request.  A writer that is
    done closes the file (C{IN_CLOSE_WRITE}); an editor that renames gives
    C{IN_MOVED_TO}; C{IN_ATTRIB} catches C{touch} and a permission fix.
    """

    MASK_NAMES = ("IN_CLOSE_WRITE", "IN_MOVED_TO", "IN_MOVED_FROM", "IN_CREATE", "IN_DELETE", "IN_ATTRIB")

    def __init__(self, path: Path, reactor: IReactorTime | None = None) -> None:
        from twisted.internet import inotify

        self._inotify_module = inotify
        self.path = path
        self.names = {os.fsencode(path.name)}
        self._unwatchable: set[Path] = set()  # said once, not on every event
        self.reactor = reactor
        self.mask = 0
        for name in self.MASK_NAMES:
            self.mask |= getattr(inotify, name)
        self._notifier: Any = None
        self._changed: Callable[[], None] | None = None
        self._last = file_signature(path)

    def start(self, changed: Callable[[], None]) -> None:
        """
        @raise INotifyError: (or L{OSError}) inotify cannot be used here, e.g.
            the per-user limit of instances is reached.
        """
        notifier = self._inotify_module.INotify(reactor=self.reactor)
        try:
            self._watch(notifier, self.path.parent)
            self._follow(notifier)
        except BaseException:
            notifier.loseConnection()
            raise
        notifier.startReading()
        self._changed = changed
        self._notifier = notifier
        self._last = file_signature(self.path)

    def _watch(self, notifier: Any, directory: Path) -> None:
        notifier.watch(FilePath(str(directory)), mask=self.mask, callbacks=[self.notice])  # once per path

    def _follow(self, notifier: Any) -> None:
        """Watch where the path leads now, if that is another directory or name."""
        target = Path(os.path.realpath(self.path))
        self.names.add(os.fsencode(target.name))
        if target.parent != self.path.parent and target.parent not in self._unwatchable:
            try:
                self._watch(notifier, target.parent)
            except Exception as error:  # inotify.INotifyError: gone, or out of watches
                self._unwatchable.add(target.parent)
                log.warn("cannot watch {directory}: {error}", directory=str(target.parent), error=str(error))

    def notice(self, ignored: Any, filepath: FilePath[Any], mask: int) -> None:
        """The inotify callback: one event in the directory."""
        if mask & (self._inotify_module.IN_DELETE_SELF | self._inotify_module.IN_MOVE_SELF):
            # A followed link's old directory going away is routine (a ConfigMap update).
            if filepath.asBytesMode() == FilePath(str(self.path.parent)).asBytesMode():
                log.warn("the directory of {path} was removed or moved: no longer watching it",
                         path=str(self.path))
            return
        if self._changed is None:
            return
        if self._notifier is not None:
            self._follow(self._notifier)
        signature = file_signature(self.path)
        different, self._last = signature != self._last, signature
        if different or filepath.asBytesMode().basename() in self.names:
            self._changed()

    def stop(self) -> None:
        self._changed = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None


def file_signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is written or replaced; C{None} when it is not there."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@implementer(IChangeSource)
class PollingSource:
    """C{stat} the file every C{interval} seconds (at least L{MIN_POLL_INTERVAL})."""

    def __init__(self, path: Path, reactor: IReactorTime, interval: float = MIN_POLL_INTERVAL) -> None:
        self.path = path
        self.interval = max(interval, MIN_POLL_INTERVAL)
        self._loop = LoopingCall(self._look)
        self._loop.clock = reactor
        self._last: tuple[int, int, int, int] | None = None
        self._changed: Callable[[], None] | None = None

    def start(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._last = file_signature(self.path)
        self._loop.start(self.interval, now=False)

    def _look(self) -> None:
        signature = file_signature(self.path)
        if signature != self._last:
            self._last = signature
            if self._changed is not None:
                self._changed()

    def stop(self) -> None:
        self._changed = None
        if self._loop.running:
            self._loop.stop()


def change_source(path: Path, reactor: IReactorTime, use_inotify: bool | None = None) -> IChangeSource:
    """inotify where the platform has it (and C{use_inotify} is not False), else polling."""
    if use_inotify is None:
        use_inotify = platform.supportsINotify()
    if use_inotify:
        return InotifySource(path, reactor)
    return PollingSource(path, reactor)


class ConfigWatcher(Service):
    """
    Call C{reload} (the SIGHUP entry point) after the file at C{path} changed.

    @param reload: takes no arguments; it reads the file, applies it or keeps
        the running configuration and logs why.  It may return a L{Deferred}.
    @param source: how changes are noticed (default: L{change_source}).
    """

    def __init__(
        self, path: str | Path, reactor: IReactorTime, reload: Callable[[], Any], source: IChangeSource | None = None,
        delay: float = DEBOUNCE_DELAY,
    ) -> None:
        # Absolute, but symlinks kept: a rename over the link's name must match.
        self.path = Path(os.path.abspath(path))
        self.reactor = reactor
        self.source = source if source is not None else change_source(self.path, reactor)
        self.debounce = Debounce(reactor, self._reload, delay=delay)
        self._reload_config = reload
        self.method = "inotify" if isinstance(self.source, InotifySource) else "polling"

    def startService(self) -> None:
        super().startService()
        try:
            self.source.start(self.debounce.poke)
        except Exception as error:  # inotify.INotifyError or OSError: out of instances or watches
            if not isinstance(self.source, InotifySource):
                raise
            log.warn("inotify unavailable ({error}): polling {path} once a second", error=str(error),
                     path=str(self.path))
            self.source = PollingSource(self.path, self.reactor)
            self.method = "polling"
            self.source.start(self.debounce.poke)
        log.info("watching {path} for changes ({method})", path=str(self.path), method=self.method)

    def _reload(self) -> Any:
        log.info("{path} changed: reloading", path=str(self.path))
        return self._reload_config()

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()
        self.source.stop()
        self.debounce.cancel()
