"""Binding a port the way the server will, to refuse a taken one in one line before gRPC tries.

Read by the server (one process) and by the supervisor of ``--workers`` (workers.py), so that neither
imports the other.
"""

from __future__ import annotations

import socket


def _addresses(host: str, port: int):
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host!r}: {e.strerror}") from None
    return [(family, addr) for family, _, _, _, addr in infos]


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A socket bound to host:port (not listening). Without reuse_port this fails if anything is there."""
    family, addr = _addresses(host, port)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_port:  # without SO_REUSEADDR: a plain bind (check_port_free) by another server is refused
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:  # as gRPC binds: connections of an earlier server still in TIME_WAIT do not block the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48) and reuse_port and not _listening(host, port):
            # Only connections of a server that stopped hold the port (TIME_WAIT, or FIN_WAIT with a client that
            # has not closed yet): they refuse a port-sharing socket without SO_REUSEADDR on some kernels. Nothing
            # listens, so bind as gRPC does, with both.
            return _bind_reusing(family, addr)
        if e.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise OSError(f"port {port} on {host} is already in use (another process listens there); "
                          "stop it or choose another --port") from None
        raise OSError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port now (any address: the loopback one)."""
    probe_host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host.strip("[]")
    try:
        with socket.create_connection((probe_host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _bind_reusing(family, addr) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind {addr[0]}:{addr[1]}: {e.strerror}") from None
    return sock


def check_port_free(host: str, port: int) -> int:
    """Refuse a port that anything is bound to; returns the port (a free one if ``port`` is 0)."""
    with bind_socket(host, port, reuse_port=False) as s:
        return s.getsockname()[1]
