"""systemd's readiness protocol (sd_notify): READY=1 once the data path forwards, STOPPING=1
when the agent stops, sent to $NOTIFY_SOCKET when systemd supervises the agent (Type=notify)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("overlay.agent")


def sd_notify(message: str) -> None:
    """Send ``message`` (e.g. READY=1) to systemd if it supervises us; no-op otherwise."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), target)
        except OSError as e:
            log.warning("could not notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e.strerror)
