"""
Hot reload: the config file is polled and re-read on C{SIGHUP}.

L{ConfigWatcher} checks the file every C{config_poll_interval} seconds: a
C{stat} (modification time, size, inode), and when that changed, a read and
a SHA-256 of the content; the file is parsed only when the content changed.
C{SIGHUP} re-reads and re-parses at once, even if the file is unchanged (the
certificate and CA files it names may have changed).

The new file is parsed and validated completely (L{gateway.config.load}),
and only then swapped in with L{gateway.state.Gateway.apply}: one frozen
snapshot replaces the old one; the runtime state of services, backends and
routes that still exist is kept (see L{gateway.state.Gateway.apply}). A file
that does not validate changes nothing: the error is logged with its file,
line and reason, C{gateway.reloads["error"]} counts it, and the old config
keeps serving.

Files are stat-ed, read and hashed in the reactor's thread pool; the parse
itself runs on the reactor thread (a config file is small, and feature
parsers may assume they run there).

What a reload cannot change (the listeners' addresses, TLS on or off, the
number of workers, the access-log file, its format and buffering) is
logged as needing a restart; the rest of the new file
applies.
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.config import Config, ConfigError, Extension, duration, parse_config, register
from gateway.heap import CollectorTuning

_log = Logger()

#: Seconds between two checks of the config file when the file sets none.
DEFAULT_POLL_INTERVAL = 5.0

register(
    "top",
    Extension(
        "config_poll_interval",
        lambda where, value, context: duration(where, value),
        DEFAULT_POLL_INTERVAL,
    ),
)


@attrs.frozen
class FileState:
    """
    What the watcher knows of the file: C{stat} fields and content hash.

    @ivar mtime_ns: modification time, nanoseconds.
    @ivar size: size in bytes.
    @ivar inode: inode number (an atomic rename changes it).
    @ivar digest: SHA-256 hex digest of the content, or None if unread.
    """

    mtime_ns: int
    size: int
    inode: int
    digest: Optional[str] = None

    def same_stat(self, other: "FileState") -> bool:
        return (self.mtime_ns, self.size, self.inode) == (other.mtime_ns, other.size, other.inode)


def _stat(path: str) -> FileState:
    st = os.stat(path)
    return FileState(st.st_mtime_ns, st.st_size, st.st_ino)


def read_file(path: str, known: Optional[FileState]) -> tuple[FileState, Optional[bytes]]:
    """
    Stat C{path}; read it if its C{stat} differs from C{known} (or C{known}
    is None). Blocking: run it in a thread.

    @return: C{(state, content)}; C{content} is None when unread.
    @raise OSError: the file cannot be stat-ed or read.
    """
    state = _stat(path)
    if known is not None and state.same_stat(known):
        return known, None
    with open(path, "rb") as f:
        content = f.read()
    return attrs.evolve(state, digest=hashlib.sha256(content).hexdigest()), content


def _in_thread(reactor) -> Callable[..., Deferred]:
    def run(f, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """
    The settings that differ between C{old} and C{new} but only take
    effect when the gateway restarts.
    """
    changed = []
    if old.listen != new.listen:
        changed.append("listen")
    if old.admin.listen != new.admin.listen:
        changed.append("admin.listen")
    for key in ("workers",):
        if old.options.get(key) != new.options.get(key):
            changed.append(key)
    if (old.options.get("tls") is None) != (new.options.get("tls") is None):
        changed.append("tls (on/off)")
    old_log = getattr(old.options.get("observability"), "access_log", None)
    new_log = getattr(new.options.get("observability"), "access_log", None)
    if getattr(old_log, "file", None) is not None or getattr(new_log, "file", None) is not None:
        # (A new format on a reload would mix two in one file.)
        for key in ("file", "format", "flush_interval", "batch", "max_buffer"):
            if getattr(old_log, key, None) != getattr(new_log, key, None):
                changed.append(f"observability.access_log.{key}")
    return changed


class ConfigWatcher(Service):
    """
    Reloads the gateway's config when its file changes, and on C{SIGHUP}.

    @param gateway: the L{gateway.state.Gateway}; its C{reloads} counters
        (C{{"ok": n, "error": n}}) are updated.
    @param path: the config file.
    @param interval: seconds between checks; 0 or less for none (C{SIGHUP}
        only).
    @param clock: C{IReactorTime} for the polling loop.
    @param run: C{run(f, *args)} -> Deferred; runs blocking file I/O (by
        default in the reactor's thread pool).
    @param install_signal: handle C{SIGHUP} while running.
    @param collector: a L{gateway.heap.CollectorTuning}, or None: told of
        each applied reload (L{CollectorTuning.reloaded}: the replaced
        config was frozen with the rest of start-up).
    """

    name = "config-watcher"

    def __init__(
        self,
        gateway,
        path: str,
        interval: float,
        clock,
        run: Optional[Callable[..., Deferred]] = None,
        install_signal: bool = True,
        collector: Optional[CollectorTuning] = None,
    ) -> None:
        self.gateway = gateway
        self.path = path
        self.interval = interval
        self._clock = clock
        self._run = run or _in_thread(gateway.reactor)
        self._install_signal = install_signal
        self._collector = collector
        self._loop: Optional[LoopingCall] = None
        self._known: Optional[FileState] = None
        self._busy: Optional[Deferred] = None
        self._again = False
        self._previous_handler: Any = None
        #: Called with no arguments on each C{SIGHUP}, after the reload
        #: is started (the worker supervisor forwards the signal).
        self.signal_observers: list[Callable[[], None]] = []
        #: The last refused file's error, or None after a good reload.
        self.last_error: Optional[ConfigError] = None
        # What the file is now, just after it was loaded at start-up: not
        # in startService, which runs after the listeners listen, when the
        # file may already have been changed again.
        try:
            self._known = read_file(path, None)[0]
        except OSError:
            self._known = None

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: _log.failure("config poll loop stopped", f)
            )
        if self._install_signal and hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._collector is not None:
            self._collector.cancel()
        if self._install_signal and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return self._busy if self._busy is not None else succeed(None)

    def _on_sighup(self, signum, frame) -> None:
        # Signal handlers run between two bytecodes of whatever the main
        # thread is doing: hand over to the reactor loop.
        self.gateway.reactor.callFromThread(self._sighup)

    def _sighup(self) -> None:
        _log.info("SIGHUP: reloading {path}", path=self.path)
        self.reload()
        for observer in self.signal_observers:
            try:
                observer()
            except Exception:
                _log.failure("SIGHUP observer failed")

    # -- checking ----------------------------------------------------------

    def check(self) -> Deferred:
        """
        Reload if the file's content changed since the last check.

        @return: a Deferred firing with None when done; it never fails
            (errors are logged and counted).
        """
        return self._start(force=False)

    def reload(self) -> Deferred:
        """
        Re-read and re-parse the file now, changed or not.

        @return: as L{check}.
        """
        return self._start(force=True)

    def _start(self, force: bool) -> Deferred:
        if self._busy is not None:
            # One reload at a time; a forced one asked for meanwhile runs
            # after it, so that it sees the latest file.
            self._again = self._again or force
            return self._busy
        d = self._busy = maybeDeferred(self._run, read_file, self.path, None if force else self._known)
        d.addCallback(self._read, force)
        d.addErrback(self._unreadable)
        d.addBoth(self._done)
        return d

    def _done(self, result) -> None:
        self._busy = None
        if self._again:
            self._again = False
            self._start(force=True)
        return None

    def _unreadable(self, failure: Failure) -> None:
        if failure.check(OSError):
            self._refused(ConfigError(self.path, 0, f"cannot read the file: {failure.value}"))
        else:
            self._count("error")
            _log.failure("config reload of {path} failed", failure, path=self.path)

    def _read(self, result: tuple[FileState, Optional[bytes]], force: bool) -> None:
        state, content = result
        known = self._known
        self._known = state
        if content is None:
            return
        if not force and known is not None and known.digest == state.digest:
            return  # touched or rewritten with the same bytes
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as e:
            self._refused(ConfigError(self.path, 0, f"cannot read the file: {e}"))
            return
        try:
            config = parse_config(text, self.path)
        except ConfigError as e:
            self._refused(e)
            return
        self._apply(config, state)

    def _apply(self, config: Config, state: FileState) -> None:
        old = self.gateway.snapshot.config
        pending = restart_only_changes(old, config)
        closing = self.gateway.apply(config)
        closing.addErrback(lambda f: _log.failure("closing replaced backend pools failed", f))
        if self._collector is not None:
            self._collector.reloaded(self._clock)
        self.last_error = None
        self._count("ok")
        _log.info(
            "config reloaded from {path}: {routes} routes, {services} services",
            path=self.path,
            routes=len(config.routes),
            services=len(config.services),
            digest=state.digest,
            event="config_reload",
            result="ok",
        )
        if pending:
            _log.warn(
                "config reload: {settings} changed; this takes effect on restart",
                settings=", ".join(pending),
                path=self.path,
            )

    def _refused(self, error: ConfigError) -> None:
        self.last_error = error
        self._count("error")
        _log.error(
            "config reload refused, still serving the previous config: {error}",
            error=str(error),
            file=error.path,
            line=error.line,
            reason=error.reason,
            event="config_reload",
            result="error",
        )

    def _count(self, result: str) -> None:
        reloads = self.gateway.reloads
        reloads[result] = reloads.get(result, 0) + 1
        metrics = getattr(self.gateway, "metrics", None)
        if metrics is not None:  # gateway_config_reloads_total{result}
            metrics.config_reloaded(result == "ok")
