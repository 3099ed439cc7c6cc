"""Telling systemd where doproxy is: the sd_notify protocol (deploy/doproxy.service, Type=notify).

systemd passes a unix datagram socket in $NOTIFY_SOCKET; each datagram is newline-separated
assignments: READY=1 once the listener accepts, RELOADING=1 (with MONOTONIC_USEC, the
CLOCK_MONOTONIC time the reload began) and READY=1 again when a reload has finished, STOPPING=1
when a shutdown starts, STATUS=... for `systemctl status`. See sd_notify(3).

Written by hand because it is one datagram on one socket: sdnotify would be a dependency for
fifteen lines, and systemd-python a C build against libsystemd. Only the unix socket kinds
are handled (a path, or '@' for Linux's abstract namespace); systemd >= 254 may name a vsock
address for a virtual machine's manager, which a proxy in a container or on a host never gets.
Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to $NOTIFY_SOCKET; True when sent.

    Never raises: a notification that cannot be sent must not stop the proxy (systemd then
    times the unit out, which says more than a crash would).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    # "@name" is a socket in the abstract namespace, whose address starts with a NUL byte.
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", address, e)
        return False
    return True


def reloading(status: str = "reloading") -> bool:
    """RELOADING=1 with the time it began, as Type=notify-reload (systemd >= 253) wants."""
    # systemd matches this message to the reload it asked for by the timestamp (it must not be
    # older than the reload's start); without one, systemd >= 253 may not connect the two and
    # let `systemctl reload` return before the reload has finished.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS={status}")


def settle_heap() -> None:
    """Once a process is set up (modules imported, the config and the pool built, listening):
    move every object it holds to the collector's permanent generation (gc.freeze).

    The cyclic collector's full collections walk every tracked object; a proxy's heap is mostly
    what it made at start (tens of thousands of module, class, pydantic and config objects),
    and walking them took milliseconds on the one event loop every request shares, now and
    then, which showed at the p99. Frozen objects are never walked again; everything made
    later (connections, exchanges, a reloaded config) is collected as before. Instagram's and
    Python's own documentation give the same advice for long-running servers.
    """
    import gc

    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()
