"""Free ports for servers a test starts itself (a Temporal dev server, a metrics endpoint)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port that is free, and so is port + 1000 (a dev server's UI), both below Linux's ephemeral range (32768 on):
    a port from that range, or its UI port, can be taken meanwhile as the local end of any outgoing connection (seen:
    "bind: address already in use" for the UI port), and a restarted server needs the same port again."""
    while True:
        port = random.randrange(20_000, 31_000)
        if all(_bindable(candidate) for candidate in (port, port + 1000)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
