"""Stateless cookies (RFC 7296 2.6), the model being aioquic's retry tokens.

    Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | <secret>)

Hash is HMAC-SHA256 keyed with the secret (`cryptography`, never hand-rolled);
the version is 4 octets, so a cookie is 36 octets (RFC 7296 3.10.1 allows 1-64).
Secrets rotate; a cookie made with the previous secret is still accepted, so a
peer that got its cookie just before a rotation is not refused. Verification is
constant time (`HMAC.verify`). A `CookieSecret` never prints its key: its repr
and every error name the version only, so it cannot leak into a log or a span.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from ikefarm.proto.messages import CookieSecrets
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, ParsedMessage, encode_message
from ikefarm.shared.ikev2.payloads import NoncePayload, NotifyPayload

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
            try:
                _mac(secret, nonce_i, address, spi_i).verify(cookie[VERSION_OCTETS:])
            except InvalidSignature:
                return False
            return True
        return False


@dataclass(frozen=True)
class InitRequest:
    """What the gate needs from an IKE_SA_INIT request: SPIi, Ni and the COOKIE it carries."""

    spi_i: bytes
    message_id: int
    nonce_i: bytes
    cookie: bytes | None


def init_request(parsed: ParsedMessage) -> InitRequest | None:
    """The gate's view of a parsed IKE_SA_INIT request; None when it has no Ni.

    RFC 7296 2.6: the COOKIE notification is the first payload of the retried
    request; one anywhere else is not a cookie we gave.
    """
    message = parsed.message
    if message is None or not message.payloads:
        return None
    nonce = message.get(NoncePayload)
    if nonce is None:
        return None
    first = message.payloads[0]
    cookie = None
    if (
        isinstance(first, NotifyPayload)
        and first.notify_type == NotifyType.COOKIE
        and 1 <= len(first.data) <= MAX_COOKIE_OCTETS
    ):
        cookie = first.data
    return InitRequest(message.spi_i, message.message_id, nonce.data, cookie)


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
