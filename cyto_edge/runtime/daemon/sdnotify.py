"""systemd's sd_notify protocol without a dependency: datagrams to the unix socket in $NOTIFY_SOCKET.

    notify("READY=1")                  # after the store is open and the web server listens
    notify("STATUS=live, 12 FOVs")     # shown by `systemctl status`
    notify("WATCHDOG=1")               # every watchdog_interval() s while the service is healthy
    notify("STOPPING=1")               # at the start of a graceful stop

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op returning False. Sends never block: a
notification that does not fit in the receiver's queue is dropped (False), so a stuck receiver cannot
stop the main loop from handling SIGTERM. An address starting with "@"
is in the abstract namespace (a leading NUL byte).
"""
from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one notification; False when not under systemd or when the socket refuses it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.send(message.encode(), socket.MSG_DONTWAIT)   # never block the main loop on a full queue
        return True
    except OSError:                                         # BlockingIOError included: this one is dropped
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), None when the watchdog is off or is meant
    for another process (WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        us = int(usec)
    except ValueError:
        return None
    return us / 2e6 if us > 0 else None
