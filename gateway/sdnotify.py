"""
systemd readiness notification (C{sd_notify(3)}) for C{Type=notify} units.

The protocol is one datagram of C{KEY=VALUE} lines to the C{AF_UNIX} socket
named by C{$NOTIFY_SOCKET} (a path, or an abstract name starting with
C{@}). It is written here rather than taken from a package: C{sdnotify} on
PyPI has had no release since 2017, and C{systemd-python} is a C extension
that needs libsystemd headers to build; the whole protocol is the few lines
below.

The gateway sends C{READY=1} once its listeners listen and its reactor
runs (so that a C{SIGTERM} right after it drains) and C{STOPPING=1}
when its shutdown starts. A reload does not interrupt service, so it sends
nothing (systemd 252 has no C{Type=notify-reload} anyway).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional

from twisted.logger import Logger

_log = Logger()


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """
    Send C{state} (e.g. C{"READY=1"}, C{"STOPPING=1"}, C{"STATUS=..."}) to
    systemd, if the process runs under a unit that listens.

    @param environ: the environment to read C{NOTIFY_SOCKET} from; the
        process's by default.
    @return: True if a datagram was sent; False when there is no
        C{NOTIFY_SOCKET} or the send failed (logged; never raised).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode("utf-8"))
    except OSError as e:
        _log.warn("sd_notify {state} failed: {error}", state=state, error=str(e))
        return False
    return True
