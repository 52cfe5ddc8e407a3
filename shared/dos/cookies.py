"""Stateless cookies (RFC 7296 2.6), the model being aioquic's retry tokens.

    Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | <secret>)

Hash is HMAC-SHA256 keyed with the secret (`cryptography`, never hand-rolled);
the version is 4 octets, so a cookie is 36 octets (RFC 7296 3.10.1 allows 1-64).
Secrets rotate; a cookie made with the previous secret is still accepted, so a
peer that got its cookie just before a rotation is not refused. Verification is
constant time (`hmac.compare_digest`). A `CookieSecret` never prints its key: its
repr and every error name the version only, so it cannot leak into a log or a span.
"""

from __future__ import annotations

import hmac as hmac_module
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, hmac

from ikefarm.proto.messages import CookieSecrets
from ikefarm.shared.ikev2.constants import IKE_HEADER_LENGTH, ExchangeType, NotifyType, PayloadType
from ikefarm.shared.ikev2.message import IkeHeader, Message, encode_message
from ikefarm.shared.ikev2.payloads import NotifyPayload
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


def _mac(secret: CookieSecret, nonce_i: bytes, address: str, spi_i: bytes) -> hmac.HMAC:
    mac = hmac.HMAC(secret.key, hashes.SHA256())
    mac.update(nonce_i)
    mac.update(ipaddress.ip_address(address).packed)
    mac.update(spi_i)
    return mac


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
        digest = _mac(self.current, nonce_i, address, spi_i).finalize()
        return self.current.version.to_bytes(VERSION_OCTETS, "big") + digest

    def verify(self, cookie: bytes, nonce_i: bytes, address: str, spi_i: bytes) -> bool:
        """Whether `cookie` was made by this farm (current or previous secret) for this peer."""
        if len(cookie) != COOKIE_OCTETS:
            return False
        version = int.from_bytes(cookie[:VERSION_OCTETS], "big")
        for secret in (self.current, self.previous):
            if secret is None or secret.version != version:
                continue
            expected = _mac(secret, nonce_i, address, spi_i).finalize()
            return hmac_module.compare_digest(expected, cookie[VERSION_OCTETS:])
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


def init_request(datagram: bytes, header: IkeHeader | None = None) -> InitRequest | None:
    """The gate's view of an IKE_SA_INIT request, read without decoding every payload.

    The gate answers floods, so it walks only the generic payload headers
    (RFC 7296 3.2), every length bounds-checked against the datagram: it needs
    Ni (3.9, 16-256 octets) and a COOKIE notification, which is one only in
    first position (2.6). None when the message is not such a request: too short,
    a length that does not add up, an Encrypted payload, no valid Ni. The worker
    still parses the whole message if the gate lets it through. `header`: the datagram's
    header when ingress has read it already.
    """
    if len(datagram) < IKE_HEADER_LENGTH:
        return None
    if header is None:
        header = IkeHeader.parse(datagram)
    if header.length != len(datagram):
        return None
    offset, next_type, index = IKE_HEADER_LENGTH, int(header.next_payload), 0
    nonce: bytes | None = None
    cookie: bytes | None = None
    while next_type != PayloadType.NONE:
        if index >= MAX_CHAIN or len(datagram) - offset < GENERIC_HEADER_OCTETS:
            return None
        if next_type in (PayloadType.SK, PayloadType.SKF):
            return None  # IKE_SA_INIT is never encrypted (RFC 7296 1.2)
        following = datagram[offset]
        length = int.from_bytes(datagram[offset + 2 : offset + 4], "big")
        if length < GENERIC_HEADER_OCTETS or length > len(datagram) - offset:
            return None
        body = datagram[offset + GENERIC_HEADER_OCTETS : offset + length]
        if next_type == PayloadType.NONCE:
            if not NONCE_MIN <= len(body) <= NONCE_MAX or nonce is not None:
                return None
            nonce = body
        elif next_type == PayloadType.NOTIFY and index == 0:
            cookie = _cookie_of(body)
        offset += length
        next_type = following
        index += 1
    if offset != len(datagram) or nonce is None:
        return None
    return InitRequest(header.spi_i, header.message_id, nonce, cookie)


def _cookie_of(body: bytes) -> bytes | None:
    """The data of a COOKIE notification body (RFC 7296 3.10), or None."""
    if len(body) < NOTIFY_FIXED_OCTETS:
        return None
    spi_size = body[1]
    if int.from_bytes(body[2:4], "big") != NotifyType.COOKIE:
        return None
    if len(body) < NOTIFY_FIXED_OCTETS + spi_size:
        return None
    data = body[NOTIFY_FIXED_OCTETS + spi_size :]
    return data if 1 <= len(data) <= MAX_COOKIE_OCTETS else None


def cookie_response(request: InitRequest, cookie: bytes) -> bytes:
    """The unprotected IKE_SA_INIT response asking for a retry: N(COOKIE) alone, SPIr = 0."""
    reply = Message(
        exchange_type=ExchangeType.IKE_SA_INIT,
        spi_i=request.spi_i,
        spi_r=bytes(8),
        message_id=request.message_id,
        is_initiator=False,
        is_response=True,
        payloads=[NotifyPayload(NotifyType.COOKIE, data=cookie)],
    )
    return encode_message(reply)


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
