"""The UDP sockets ingress owns: which local endpoints, and how each is opened."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ikefarm.services.ingress.routing import canonical_address
from ikefarm.shared.config.loader import Config
from ikefarm.shared.esp.steering import attach_filter, not_esp_in_udp


@dataclass(frozen=True)
class LocalEndpoint:
    address: str  # canonical spelling
    port: int
    natt: bool  # the NAT-T port: IKE after a non-ESP marker (RFC 3948 2.2)

    def __str__(self) -> str:
        return f"{self.address}[{self.port}]"


def listen_addresses(config: Config) -> list[str]:
    """`[ingress] listen` when set, else the distinct local-address of the enabled VPNs."""
    configured = config.ingress.listen
    if configured is not None:
        candidates = list(configured)
    else:
        candidates = [
            vpn.local_address
            for vpn in config.ike.vpn
            if vpn.enabled and vpn.local_address is not None
        ]
    seen: dict[str, None] = {}
    for address in candidates:
        seen.setdefault(canonical_address(address), None)
    return list(seen)


def local_endpoints(config: Config) -> list[LocalEndpoint]:
    """Every (address, port) to bind: ike-port and natt-port on each listen address."""
    ike_port = config.ingress.ike_port
    natt_port = config.ingress.natt_port
    ports = [ike_port] if ike_port == natt_port else [ike_port, natt_port]
    return [
        LocalEndpoint(address, port, natt=port == natt_port)
        for address in listen_addresses(config)
        for port in ports
    ]


def open_udp_socket(address: str, port: int, *, drop_esp: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to (address, port), SO_REUSEPORT set so several
    ingress instances can share the endpoint (the kernel spreads datagrams by flow).

    `drop_esp` (the NAT-T port when the kernel service runs the userspace dataplane,
    which reads ESP-in-UDP itself): a socket filter drops ESP-in-UDP in the kernel
    (`shared/esp/steering.py`), so ingress never wakes up for a data packet."""
    version = ipaddress.ip_address(address).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if drop_esp:
            attach_filter(sock, not_esp_in_udp())
        if family == socket.AF_INET6:
            # "::" must not also take the IPv4 wildcard: IPv4 has sockets of its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock
