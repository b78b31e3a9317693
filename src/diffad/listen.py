"""Where a diffad server listens (``diffad app``, ``diffad serve``): one check of ``--host`` and ``--port`` before a
model loads or a URL is printed."""

from __future__ import annotations

import socket

__all__ = ["LOCAL_HOSTS", "check_listen_address", "check_port_free"]

#: hosts that only this machine reaches; any other gets a warning (the servers have no login)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_port_free(host: str, port: int) -> None:
    """``ValueError`` (one line naming ``--port``) when ``host:port`` cannot be bound: another program listens there.
    The probe binds as the servers do (``SO_REUSEADDR``), so a port left in TIME_WAIT by a stopped server is free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"--port {port}: {host}:{port} is in use ({exc.strerror}); stop what uses it, or pass "
                             "another --port") from None


def check_listen_address(host: str, port: int, what: str) -> None:
    """``--port`` in 1..65535 and free on ``host`` (else a one-line ``ValueError``); a printed warning when ``host``
    is reachable from other machines (``what``: "the app", "the API")."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if host not in LOCAL_HOSTS:
        print(f"WARNING: --host {host}: {what} is reachable from other machines; it has no login")
    check_port_free(host, port)
