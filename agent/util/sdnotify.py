"""systemd's notify protocol, without libsystemd: READY=1, WATCHDOG=1, STOPPING=1.

Under `Type=notify` systemd passes $NOTIFY_SOCKET, a datagram socket to send state lines to;
under `WatchdogSec=` (60 s in systemd/strobe.service) it expects WATCHDOG=1 within that
interval, and the window loop sends one every 2 s. Outside systemd (a shell, a container)
there is no socket and every call is a cheap no-op, so the daemon can notify
unconditionally. Nothing here raises.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

READY = "READY=1"
WATCHDOG = "WATCHDOG=1"
STOPPING = "STOPPING=1"


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value: a path, or "@name" (abstract)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # the abstract namespace: a leading NUL byte, no file
    if value.startswith("/"):
        return value
    return None  # empty, relative, or another family (vsock:...) that we do not speak


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", or several lines) to systemd.

    True when a datagram was sent; False when not running under a notify-aware manager
    or when sending failed (logged at debug level: the service keeps running).
    """
    env = os.environ if environ is None else environ
    address = socket_address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", state, env.get("NOTIFY_SOCKET"), exc)
        return False
    return True
