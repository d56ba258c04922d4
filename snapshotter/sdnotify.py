"""systemd's notify protocol (sd_notify(3)), without libsystemd: one datagram to $NOTIFY_SOCKET.

With ``Type=notify`` systemd starts containerd (ordered after us) only once we send READY=1, which
the daemon does when its socket serves and its lazy layers are mounted again. A no-op when the
daemon is not run by systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields; True if a notify socket took them."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd", extra={"socket": address.lstrip("\0"), "error": str(exc)})
        return False
    return True
