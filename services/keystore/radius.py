"""The RADIUS client of the keystore: EAP relayed to a RADIUS server, and accounting.

Why here (docs/radius.md): the RADIUS shared secret is a secret like a PSK, and the
MSK an EAP method derives becomes the key of the peer's AUTH (RFC 7296 2.16). Both stay
in the keystore, which already holds secrets and whose bus user may answer requests but
publish nothing else (proto/subjects.py). What leaves is the EAP message for the peer,
the RADIUS State, the address attributes of an Access-Accept, and the MSK sealed under a
key only this keystore holds.

Packets are pyrad's (encoding, Request/Response Authenticator, Message-Authenticator,
the salt decryption of RFC 2548 2.4.2/2.4.3); the UDP exchange, retransmission and
failover are ours, on asyncio:

- one UDP socket per request (its own source port, so Identifiers never collide);
- a request is sent, and sent again every `timeout` seconds `retries` times; then the
  next server is tried (RFC 2865 2.4 leaves failover to the client). A conversation that
  got a State from one server continues with that server only (RFC 5080 2.1.1: State is
  that server's).
- an answer is taken only if it is one of the three Access-* answers (or an
  Accounting-Response), its Identifier matches, its Response Authenticator verifies, and,
  for Access-*, it carries a valid Message-Authenticator (RFC 3579 3.2: mandatory with
  EAP-Message). Anything else is dropped and counted (`radius.dropped.<reason>`); the
  request goes on waiting for a good one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyrad.packet import (
    AccessAccept,
    AccessChallenge,
    AccessReject,
    AccessRequest,
    AccountingRequest,
    AccountingResponse,
    AcctPacket,
    AuthPacket,
    Packet,
    PacketError,
)

from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.config.loader import Config

# attribute types (RFC 2865 5, RFC 2866 5, RFC 2869 5, RFC 3162, RFC 6911)
USER_NAME = 1
NAS_IP_ADDRESS = 4
SERVICE_TYPE = 6
FRAMED_IP_ADDRESS = 8
FRAMED_IP_NETMASK = 9
STATE = 24
CLASS = 25
VENDOR_SPECIFIC = 26
CALLED_STATION_ID = 30
CALLING_STATION_ID = 31
NAS_IDENTIFIER = 32
ACCT_STATUS_TYPE = 40
ACCT_INPUT_OCTETS = 42
ACCT_OUTPUT_OCTETS = 43
ACCT_SESSION_ID = 44
ACCT_SESSION_TIME = 46
ACCT_INPUT_PACKETS = 47
ACCT_OUTPUT_PACKETS = 48
ACCT_TERMINATE_CAUSE = 49
ACCT_INPUT_GIGAWORDS = 52
ACCT_OUTPUT_GIGAWORDS = 53
NAS_PORT_TYPE = 61
EAP_MESSAGE = 79
MESSAGE_AUTHENTICATOR = 80
FRAMED_IPV6_PREFIX = 97
FRAMED_IPV6_ADDRESS = 168
DNS_SERVER_IPV6_ADDRESS = 169

SERVICE_TYPE_FRAMED = 2
NAS_PORT_TYPE_VIRTUAL = 5

VENDOR_MICROSOFT = 311  # RFC 2548
MS_MPPE_SEND_KEY = 16
MS_MPPE_RECV_KEY = 17
MS_PRIMARY_DNS_SERVER = 28
MS_SECONDARY_DNS_SERVER = 29
MS_PRIMARY_NBNS_SERVER = 30
MS_SECONDARY_NBNS_SERVER = 31

ACCT_STATUS = {"start": 1, "stop": 2, "interim": 3}  # RFC 2866 5.1
TERMINATE_CAUSES = {  # RFC 2866 5.10
    "user-request": 1,
    "lost-carrier": 2,
    "idle-timeout": 4,
    "session-timeout": 5,
    "admin-reset": 6,
    "nas-error": 9,
    "nas-request": 10,
}

ATTRIBUTE_MAX = 253  # octets of value in one attribute (RFC 2865 5)
PACKET_MAX = 4096  # RFC 2865 3
MSK_HALF = 32  # MS-MPPE-Recv-Key and -Send-Key each carry half of the 64-octet MSK


class RadiusUnavailable(Exception):
    """No configured server gave a valid answer in time."""


@dataclass(frozen=True)
class RadiusServer:
    """One `[[ike.radius-server]]`; its secret renders as `Secret(<n bytes>)`."""

    name: str
    address: str
    auth_port: int
    acct_port: int
    secret: Secret = field(repr=False)
    timeout: float
    retries: int
    nas_identifier: str


def servers_from_config(config: Config) -> list[RadiusServer]:
    servers = []
    for index, node in enumerate(config.ike.radius_server):
        if not isinstance(node.secret, Secret) or node.address is None:
            continue  # refused at load; a config without secrets has none
        servers.append(
            RadiusServer(
                name=node.name or f"radius-server[{index}]",
                address=node.address,
                auth_port=node.auth_port,
                acct_port=node.acct_port,
                secret=node.secret,
                timeout=float(node.timeout),
                retries=int(node.retries),
                nas_identifier=node.nas_identifier,
            )
        )
    return servers


def split_eap(eap: bytes) -> list[bytes]:
    """An EAP message in EAP-Message attributes of at most 253 octets (RFC 3579 3.1)."""
    return [eap[i : i + ATTRIBUTE_MAX] for i in range(0, len(eap), ATTRIBUTE_MAX)] or [b""]


def vendor_attributes(packet: Packet, vendor: int) -> dict[int, list[bytes]]:
    """The sub-attributes of one vendor's Vendor-Specific attributes (RFC 2865 5.26);
    malformed ones are skipped (a well-formed answer never has them)."""
    found: dict[int, list[bytes]] = {}
    for raw in packet.get(VENDOR_SPECIFIC, []):
        if len(raw) < 6 or struct.unpack("!L", raw[:4])[0] != vendor:
            continue
        loc = 4
        while loc + 2 <= len(raw):
            kind, length = raw[loc], raw[loc + 1]
            if length < 2 or loc + length > len(raw):
                break
            found.setdefault(kind, []).append(raw[loc + 2 : loc + length])
            loc += length
    return found


def _ipv4(value: bytes) -> str | None:
    return str(ipaddress.IPv4Address(value)) if len(value) == 4 else None


def _ipv6(value: bytes) -> str | None:
    return str(ipaddress.IPv6Address(value)) if len(value) == 16 else None


def _ipv6_prefix(value: bytes) -> tuple[str, int] | None:
    """Framed-IPv6-Prefix (RFC 3162 2.3): Reserved, Prefix-Length, Prefix (0-16 octets)."""
    if len(value) < 2 or value[1] > 128 or len(value) - 2 > 16:
        return None
    prefix = value[2:] + bytes(16 - (len(value) - 2))
    return str(ipaddress.IPv6Address(prefix)), value[1]


def framed_attributes(packet: Packet) -> dict[str, list[str]]:
    """The attributes of an Access-Accept a `vip-pool radius` turns into the SA's own pool,
    by pool keyword (docs/radius.md, seed 004): Framed-IP-Address, Framed-IPv6-Address (or
    the address of a /128 Framed-IPv6-Prefix), DNS (MS-Primary/Secondary-DNS-Server,
    DNS-Server-IPv6-Address), NBNS (MS-Primary/Secondary-NBNS-Server), Framed-IP-Netmask.
    Values of the wrong length are ignored."""
    found: dict[str, list[str]] = {}

    def add(key: str, value: str | None) -> None:
        if value is not None and value not in found.get(key, []):
            found.setdefault(key, []).append(value)

    for raw in packet.get(FRAMED_IP_ADDRESS, []):
        address = _ipv4(raw)
        # 255.255.255.254 / .255: "let the NAS choose" / "the user chooses" (RFC 2865 5.8)
        if address not in ("255.255.255.254", "255.255.255.255", "0.0.0.0"):  # noqa: S104
            add("address", address)
    for raw in packet.get(FRAMED_IPV6_ADDRESS, []):
        add("address", _ipv6(raw))
    for raw in packet.get(FRAMED_IPV6_PREFIX, []):
        prefix = _ipv6_prefix(raw)
        if prefix is not None and prefix[1] == 128:
            add("address", prefix[0])
    for raw in packet.get(FRAMED_IP_NETMASK, []):
        add("netmask", _ipv4(raw))
    microsoft = vendor_attributes(packet, VENDOR_MICROSOFT)
    for kind in (MS_PRIMARY_DNS_SERVER, MS_SECONDARY_DNS_SERVER):
        for raw in microsoft.get(kind, []):
            add("dns", _ipv4(raw))
    for raw in packet.get(DNS_SERVER_IPV6_ADDRESS, []):
        add("dns", _ipv6(raw))
    for kind in (MS_PRIMARY_NBNS_SERVER, MS_SECONDARY_NBNS_SERVER):
        for raw in microsoft.get(kind, []):
            add("nbns", _ipv4(raw))
    return found


def mppe_msk(reply: Packet, request: Packet) -> bytes | None:
    """MSK = MS-MPPE-Recv-Key | MS-MPPE-Send-Key (RFC 5216 2.3 / RFC 3748 7.10 as RADIUS
    carries it, RFC 2548 2.4.2-2.4.3: each salt-encrypted with the shared secret and the
    Request Authenticator). None when the answer has no usable pair."""
    microsoft = vendor_attributes(reply, VENDOR_MICROSOFT)
    recv = microsoft.get(MS_MPPE_RECV_KEY, [])
    send = microsoft.get(MS_MPPE_SEND_KEY, [])
    if len(recv) != 1 or len(send) != 1:
        return None
    decrypter = Packet(secret=request.secret, id=0)
    decrypter.request_authenticator = request.authenticator
    halves = []
    for value in (recv[0], send[0]):
        try:
            half = decrypter.SaltDecrypt(value)
        except PacketError:
            return None
        if len(half) != MSK_HALF:
            return None
        halves.append(half)
    return halves[0] + halves[1]


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)


@dataclass
class Answer:
    """A verified answer and the server (index) that gave it."""

    packet: Packet
    request: Packet
    server: int


class RadiusClient:
    """Access-Requests and Accounting-Requests to the configured servers, in order."""

    def __init__(
        self,
        servers: Sequence[RadiusServer],
        counters: Counter[str] | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.servers = tuple(servers)
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._random = random

    def __repr__(self) -> str:
        return f"RadiusClient({len(self.servers)} servers)"

    def wait_limit(self) -> float:
        """The longest an exchange can take: every server, every try."""
        return sum(s.timeout * (s.retries + 1) for s in self.servers) + 1.0

    def _packet(
        self, server: RadiusServer, code: int, attributes: Iterable[tuple[int, bytes]]
    ) -> Packet:
        packet: Packet
        ident = self._random(1)[0]
        if code == AccessRequest:
            packet = AuthPacket(code=code, id=ident, secret=server.secret.value)
            packet.authenticator = self._random(16)
            packet.add_message_authenticator()  # RFC 3579 3.2; first (BlastRADIUS)
        else:
            packet = AcctPacket(code=code, id=ident, secret=server.secret.value)
        packet[NAS_IDENTIFIER] = [server.nas_identifier.encode()[:ATTRIBUTE_MAX]]
        for kind, value in attributes:
            packet.setdefault(kind, []).append(value)
        return packet

    async def access(self, attributes: Sequence[tuple[int, bytes]], server: int = -1) -> Answer:
        """Send an Access-Request (to `server` only, when the conversation is that server's)
        and return its verified answer; RadiusUnavailable when none came."""
        order = [server] if 0 <= server < len(self.servers) else range(len(self.servers))
        return await self._send(order, AccessRequest, attributes, accounting=False)

    async def accounting(self, attributes: Sequence[tuple[int, bytes]]) -> Answer:
        return await self._send(
            range(len(self.servers)), AccountingRequest, attributes, accounting=True
        )

    async def _send(
        self,
        order: Iterable[int],
        code: int,
        attributes: Sequence[tuple[int, bytes]],
        *,
        accounting: bool,
    ) -> Answer:
        kind = "acct" if accounting else "auth"
        for position, index in enumerate(order):
            server = self.servers[index]
            if position:
                self.counters[f"radius.{kind}.failover"] += 1
            packet = self._packet(server, code, attributes)
            try:
                raw = packet.RequestPacket()
            except ValueError:
                self.counters[f"radius.{kind}.request_too_large"] += 1
                raise RadiusUnavailable("request too large") from None
            if len(raw) > PACKET_MAX:
                self.counters[f"radius.{kind}.request_too_large"] += 1
                raise RadiusUnavailable("request too large")
            port = server.acct_port if accounting else server.auth_port
            reply = await self._exchange(server, port, packet, raw, kind)
            if reply is not None:
                return Answer(reply, packet, index)
            self.counters[f"radius.{kind}.server_timeout"] += 1
        raise RadiusUnavailable("no RADIUS server answered")

    async def _exchange(
        self, server: RadiusServer, port: int, request: Packet, raw: bytes, kind: str
    ) -> Packet | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
        transport, receiver = await loop.create_datagram_endpoint(
            _Receiver, remote_addr=(server.address, port), family=family
        )
        try:
            for attempt in range(server.retries + 1):
                transport.sendto(raw)
                self.counters[f"radius.{kind}.{'retransmitted' if attempt else 'sent'}"] += 1
                deadline = loop.time() + server.timeout
                while (left := deadline - loop.time()) > 0:
                    try:
                        data = await asyncio.wait_for(receiver.queue.get(), left)
                    except TimeoutError:
                        break
                    reply = self._verified(request, data, kind)
                    if reply is not None:
                        return reply
            return None
        finally:
            transport.close()

    def _verified(self, request: Packet, data: bytes, kind: str) -> Packet | None:
        """The answer decoded and checked, or None (dropped and counted)."""
        reason = check_reply(request, data)
        if isinstance(reason, str):
            self.counters[f"radius.dropped.{reason}"] += 1
            return None
        self.counters[f"radius.{kind}.answered"] += 1
        return reason


def check_reply(request: Packet, data: bytes) -> Packet | str:
    """Decode and verify an answer to `request`: the decoded packet, or why it is dropped."""
    if len(data) < 20:
        return "truncated"
    try:
        reply = Packet(secret=request.secret, id=0, packet=data)
    except PacketError:
        return "malformed"
    except (ValueError, IndexError, struct.error):
        return "malformed"
    if request.code == AccessRequest:
        if reply.code not in (AccessAccept, AccessReject, AccessChallenge):
            return "unexpected_code"
    elif reply.code != AccountingResponse:
        return "unexpected_code"
    if reply.id != request.id:
        return "wrong_identifier"
    if request.code == AccessRequest and MESSAGE_AUTHENTICATOR not in reply:
        return "no_message_authenticator"
    if any(len(v) != 16 for v in reply.get(MESSAGE_AUTHENTICATOR, [])):
        return "bad_message_authenticator"
    try:
        good = request.VerifyReply(reply, data, enforce_ma=True)
    except Exception:  # pyrad raises bare Exception for an unusable authenticator
        return "bad_authenticator"
    if not good:
        return "bad_authenticator"
    return reply
