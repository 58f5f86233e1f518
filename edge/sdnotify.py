"""The systemd notification protocol (sd_notify(3)) for ``Type=notify`` units.

A datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
("@name" is an abstract socket). Outside systemd the variable is unset and every call
is a no-op, so the node calls these unconditionally. The watchdog ping is sent from
the event loop on purpose: a loop that stops turning stops the pings, and systemd
restarts the service (``WatchdogSec``).
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STOPPING=1"``, ...) as one message; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False  # the manager went away: nothing a service can do about it
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd 253+ asks for; ``READY=1`` ends it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when
    systemd expects none (unset, or ``$WATCHDOG_PID`` names another process)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
