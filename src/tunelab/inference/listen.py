"""Where `tunelab serve` and `tunelab ui` listen, checked before the model loads.

A port in use, a port out of range or an address this machine does not have is then one line naming the flag, not
a traceback (or a bare exit code) after minutes of loading.
"""

from __future__ import annotations

import errno
import socket

from tunelab.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (`host`, `port`), not yet listening, or a UserError naming --host or --port.

    Bound as uvicorn binds (IPv6 when the address has a colon; SO_REUSEADDR, so that a port a stopped server left in
    TIME_WAIT is free again), so serve can hand the socket to uvicorn; Gradio's own port check binds the same way.
    """
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: a TCP port is 1 to 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror):
            raise UserError(f"--host {host}: not an address or a name this machine resolves ({e.strerror}); "
                            "e.g. 127.0.0.1, or 0.0.0.0 for every interface") from None
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host}; stop what listens there or pick another "
                            "--port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: not an address of this machine; use 127.0.0.1, 0.0.0.0 (every "
                            "interface) or one of its own addresses") from None
        if e.errno == errno.EACCES:
            raise UserError(f"--port {port}: permission denied (ports below 1024 need privileges); pick a port "
                            "from 1024 up") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock
