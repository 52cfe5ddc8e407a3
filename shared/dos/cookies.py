"""Stateless cookies (RFC 7296 2.6), the model being aioquic's retry tokens.

    Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | <secret>)

Hash is HMAC-SHA256 keyed with the secret (the standard library's one-shot
`hmac.digest`, OpenSSL underneath, never hand-rolled: a flood is answered one
HMAC per packet, and the one-shot costs a third of a streamed HMAC object); the
version is 4 octets, so a cookie is 36 octets (RFC 7296 3.10.1 allows 1-64).
Secrets rotate; a cookie made with the previous secret is still accepted, so a
peer that got its cookie just before a rotation is not refused. Verification is
constant time (`hmac.compare_digest`). A `CookieSecret` never prints its key: its
repr and every error name the version only, so it cannot leak into a log or a span.
"""

from __future__ import annotations

import hmac
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ikefarm.proto.messages import CookieSecrets
from ikefarm.shared.ikev2.constants import (
    IKE_HEADER_LENGTH,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from ikefarm.shared.ikev2.message import IKE_MAJOR_VERSION, IkeHeader
from ikefarm.shared.ikev2.payloads.nonce import NONCE_MAX, NONCE_MIN

VERSION_OCTETS = 4
DIGEST_OCTETS = 32
COOKIE_OCTETS = VERSION_OCTETS + DIGEST_OCTETS
SECRET_OCTETS = 32
MAX_COOKIE_OCTETS = 64  # RFC 7296 3.10.1: the COOKIE notification data is 1-64 octets
MAX_VERSION = (1 << (8 * VERSION_OCTETS)) - 1


@dataclass(frozen=True)
class CookieSecret:
    version: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.version <= MAX_VERSION:
            raise ValueError(f"cookie secret version {self.version} out of range")
        if len(self.key) != SECRET_OCTETS:
            raise ValueError(f"cookie secret must be {SECRET_OCTETS} octets")


def _packed(address: str) -> bytes:
    """IPi as octets (4 or 16); ValueError for what is not an IP address."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except OSError:
        raise ValueError(f"not an IP address: {address!r}") from None


def _mac(secret: CookieSecret, nonce_i: bytes, address: str, spi_i: bytes) -> bytes:
    """Hash(Ni | IPi | SPIi | <secret>) as HMAC-SHA256 keyed with the secret."""
    return hmac.digest(secret.key, nonce_i + _packed(address) + spi_i, "sha256")


class CookieJar:
    """The current secret and the previous one; makes and checks cookies."""

    def __init__(self, current: CookieSecret, previous: CookieSecret | None = None) -> None:
        self.current = current
        self.previous = previous

    def __repr__(self) -> str:
        previous = self.previous.version if self.previous else None
        return f"CookieJar(current={self.current.version}, previous={previous})"

    def rotate(self, current: CookieSecret, previous: CookieSecret | None) -> None:
        self.current, self.previous = current, previous

    def make(self, nonce_i: bytes, address: str, spi_i: bytes) -> bytes:
        digest = _mac(self.current, nonce_i, address, spi_i)
        return self.current.version.to_bytes(VERSION_OCTETS, "big") + digest

    def verify(self, cookie: bytes, nonce_i: bytes, address: str, spi_i: bytes) -> bool:
        """Whether `cookie` was made by this farm (current or previous secret) for this peer."""
        if len(cookie) != COOKIE_OCTETS:
            return False
        version = int.from_bytes(cookie[:VERSION_OCTETS], "big")
        for secret in (self.current, self.previous):
            if secret is None or secret.version != version:
                continue
            expected = _mac(secret, nonce_i, address, spi_i)
            return hmac.compare_digest(expected, cookie[VERSION_OCTETS:])
        return False


@dataclass(frozen=True)
class InitRequest:
    """What the gate needs from an IKE_SA_INIT request: SPIi, Ni and the COOKIE it carries."""

    spi_i: bytes
    message_id: int
    nonce_i: bytes
    cookie: bytes | None


GENERIC_HEADER_OCTETS = 4  # RFC 7296 3.2
NOTIFY_FIXED_OCTETS = 4  # RFC 7296 3.10: Protocol ID, SPI Size, Notify Message Type
MAX_CHAIN = 64  # payloads in one IKE_SA_INIT request; more is not a request we answer
# the payload numbers as plain ints: compared per payload of every flood packet
_NONE, _NONCE, _NOTIFY = int(PayloadType.NONE), int(PayloadType.NONCE), int(PayloadType.NOTIFY)
_ENCRYPTED = frozenset({int(PayloadType.SK), int(PayloadType.SKF)})
_COOKIE = int(NotifyType.COOKIE)
# RFC 7296 3.1: SPIi, SPIr, Next Payload, versions, Exchange Type, Flags, Message ID, Length
_HEADER = struct.Struct("!8s8sBBBBII")
_NOTIFY_HEADER = struct.Struct("!BBHBBH")  # 3.2 generic header, then 3.10's fixed part
_COOKIE_REPLY_FLAGS = int(HeaderFlag.RESPONSE)  # the original responder: no I flag (3.1)
_VERSION = IKE_MAJOR_VERSION << 4


def init_request(datagram: bytes, header: IkeHeader | None = None) -> InitRequest | None:
    """The gate's view of an IKE_SA_INIT request, read without decoding every payload.

    The gate answers floods, so it walks only the generic payload headers
    (RFC 7296 3.2), every length bounds-checked against the datagram: it needs
    Ni (3.9, 16-256 octets) and a COOKIE notification, which is one only in
    first position (2.6). None when the message is not such a request: too short,
    a length that does not add up, an Encrypted payload, no valid Ni. The worker
    still parses the whole message if the gate lets it through. The header's
    fields are read from the octets (`header`, when ingress has read it already,
    changes nothing: the octets are what is answered).
    """
    size = len(datagram)
    if size < IKE_HEADER_LENGTH:
        return None
    spi_i, _spi_r, next_type, _version, _exchange, _flags, message_id, length = _HEADER.unpack_from(
        datagram
    )
    if length != size:
        return None
    offset, index = IKE_HEADER_LENGTH, 0
    nonce: bytes | None = None
    cookie: bytes | None = None
    while next_type != _NONE:
        if index >= MAX_CHAIN or size - offset < GENERIC_HEADER_OCTETS:
            return None
        if next_type in _ENCRYPTED:
            return None  # IKE_SA_INIT is never encrypted (RFC 7296 1.2)
        following = datagram[offset]
        length = (datagram[offset + 2] << 8) | datagram[offset + 3]
        if length < GENERIC_HEADER_OCTETS or length > size - offset:
            return None
        if next_type == _NONCE:
            if not NONCE_MIN <= length - GENERIC_HEADER_OCTETS <= NONCE_MAX or nonce is not None:
                return None
            nonce = datagram[offset + GENERIC_HEADER_OCTETS : offset + length]
        elif next_type == _NOTIFY and index == 0:
            cookie = _cookie_of(datagram[offset + GENERIC_HEADER_OCTETS : offset + length])
        offset += length
        next_type = following
        index += 1
    if offset != size or nonce is None:
        return None
    return InitRequest(spi_i, message_id, nonce, cookie)


def _cookie_of(body: bytes) -> bytes | None:
    """The data of a COOKIE notification body (RFC 7296 3.10), or None."""
    if len(body) < NOTIFY_FIXED_OCTETS:
        return None
    spi_size = body[1]
    if int.from_bytes(body[2:4], "big") != _COOKIE:
        return None
    if len(body) < NOTIFY_FIXED_OCTETS + spi_size:
        return None
    data = body[NOTIFY_FIXED_OCTETS + spi_size :]
    return data if 1 <= len(data) <= MAX_COOKIE_OCTETS else None


def cookie_response(request: InitRequest, cookie: bytes) -> bytes:
    """The unprotected IKE_SA_INIT response asking for a retry: N(COOKIE) alone, SPIr = 0
    (RFC 7296 2.6), packed directly: it is sent once per flood packet."""
    if not 1 <= len(cookie) <= MAX_COOKIE_OCTETS:
        raise ValueError(f"a cookie is 1-{MAX_COOKIE_OCTETS} octets")
    notify_length = GENERIC_HEADER_OCTETS + NOTIFY_FIXED_OCTETS + len(cookie)
    return (
        _HEADER.pack(
            request.spi_i,
            bytes(8),
            _NOTIFY,
            _VERSION,
            int(ExchangeType.IKE_SA_INIT),
            _COOKIE_REPLY_FLAGS,
            request.message_id,
            IKE_HEADER_LENGTH + notify_length,
        )
        # Protocol ID and SPI Size 0: no SPI with a COOKIE (3.10)
        + _NOTIFY_HEADER.pack(_NONE, 0, notify_length, 0, 0, _COOKIE)
        + cookie
    )


def jar_from_record(record: CookieSecrets) -> CookieJar:
    """The jar of a stored record; ValueError when the record is unusable."""
    previous = None
    if record.previous_version >= 0:
        previous = CookieSecret(record.previous_version, record.previous_key)
    return CookieJar(CookieSecret(record.version, record.key), previous)


def first_record(now_wall: float, random: Callable[[int], bytes]) -> CookieSecrets:
    return CookieSecrets(version=1, key=random(SECRET_OCTETS), created=now_wall)


def rotated(
    record: CookieSecrets, now_wall: float, lifetime: float, random: Callable[[int], bytes]
) -> CookieSecrets | None:
    """The next record once the current secret is `lifetime` old (the current becomes the
    previous one, still accepted), else None. A clock that went back rotates too."""
    age = now_wall - record.created
    if 0 <= age < lifetime:
        return None
    return CookieSecrets(
        version=(record.version + 1) % (MAX_VERSION + 1),
        key=random(SECRET_OCTETS),
        created=now_wall,
        previous_version=record.version,
        previous_key=record.key,
    )
