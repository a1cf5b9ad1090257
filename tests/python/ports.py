"""Ports for the tests' own servers (Ray nodes, Serve's HTTP proxy).

A port found free by binding port 0 lies in the kernel's ephemeral range,
where every outgoing connection (Ray opens many) also takes its local port:
between the test finding it free and the server binding it, a connection
can take it, and the server fails to start (``ray start`` of a second node
failed so, once in a CI run). Ports here come from below that range, which
outgoing connections never use, and above Ray's worker ports (10002-19999);
each is checked free on every address and never handed out twice by this
process."""

from __future__ import annotations

import random
import socket
import threading

_given: set[int] = set()
_lock = threading.Lock()
_LOW = 20000  # above Ray's default worker ports


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port no server listens on, outside the ephemeral range."""
    high = _ephemeral_low() - 1
    if high < _LOW + 1000:  # an unusual range: any port, checked as below
        high = 65535
    with _lock:
        for _ in range(2000):
            port = random.randint(_LOW, high)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free port in [{_LOW}, {high}]")
