"""UDP ports for ingress instances started on the host's loopback by parallel tests.

Ingress binds with SO_REUSEPORT, so two tests that happened to draw the same free
port from the kernel would silently share it and steal each other's datagrams.
Every test process draws from one counter kept under a file lock instead, in a
range below the kernel's ephemeral ports, and skips ports something else holds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

FIRST, LAST = 20000, 29999
_COUNTER = Path(tempfile.gettempdir()) / f"ikefarm-test-udp-ports.{os.getuid()}"


def _free(port: int) -> bool:
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def udp_ports(count: int = 2) -> list[int]:
    """`count` distinct UDP ports no other test of this machine has been given lately."""
    ports: list[int] = []
    with _COUNTER.open("a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        counter.seek(0)
        text = counter.read().strip()
        port = int(text) if text.isdigit() else FIRST + os.getpid() % 1000
        while len(ports) < count:
            port = port + 1 if port < LAST else FIRST
            if _free(port):
                ports.append(port)
        counter.seek(0)
        counter.truncate()
        counter.write(str(port))
    return ports
