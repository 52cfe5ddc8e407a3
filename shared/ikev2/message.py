"""IKEv2 messages: header, payload chain, SK / SKF protection (codec only).

RFC 7296 3.1 (header), 3.2 (chain), 3.14 (Encrypted payload), RFC 7383 2.5
(Encrypted Fragment payload). Sans-I/O: bytes in, dataclasses out, and back.

Receiving is two steps so that ingress and workers pay only for what they need:

1. `parse_message(datagram)` checks the header and decodes the outer chain. An
   unprotected message (IKE_SA_INIT) is then fully decoded (`parsed.message`);
   a protected one keeps its SK/SKF body encrypted.
2. `decrypt_message(parsed, protection, sk_e, sk_a)` verifies and decrypts SK
   and decodes the inner chain. Fragments go through `decrypt_fragment` and
   `fragments.FragmentReassembler` instead.

The cipher is any object with the `SkProtectionLike` shape, in practice
`crypto.protection.SkProtection`: this module only builds the associated data, i.e. every
octet of the datagram before the SK/SKF body, with final lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ikefarm.shared.ikev2.constants import (
    GENERIC_PAYLOAD_HEADER_LENGTH,
    IKE_HEADER_LENGTH,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from ikefarm.shared.ikev2.errors import InvalidMajorVersion, MalformedMessage
from ikefarm.shared.ikev2.payloads import (
    NotifyPayload,
    Payload,
    SkfPayload,
    SkPayload,
    decode_chain,
    encode_chain,
)
from ikefarm.shared.ikev2.payloads.base import GENERIC_HEADER, MAX_PAYLOAD_LENGTH
from ikefarm.shared.ikev2.payloads.fields import FieldTable, as_enum

IKE_MAJOR_VERSION = 2
IKE_MINOR_VERSION = 0
SPI_LENGTH = 8
MAX_FRAGMENTS_ON_WIRE = 0xFFFF  # Total Fragments is a 2-octet field (RFC 7383 2.5)
_KNOWN_FLAGS = HeaderFlag.INITIATOR | HeaderFlag.VERSION | HeaderFlag.RESPONSE

_HEADER = FieldTable(
    "header",
    ("spi_i", "8s"),
    ("spi_r", "8s"),
    ("next_payload", "B"),
    ("version", "B"),
    ("exchange_type", "B"),
    ("flags", "B"),
    ("message_id", "I"),
    ("length", "I"),
)
_SKF_FIELDS = SkfPayload.FIELDS

P = TypeVar("P", bound=Payload)


RandomSource = Callable[[int], bytes]  # n -> n random octets


class SkProtectionLike(Protocol):
    """What the codec needs from the negotiated SK cipher (`crypto.protection.SkProtection`).

    `encrypted_length(n)`: the SK body length (IV + ciphertext with padding and
    Pad Length + ICV) for an n-octet plaintext. `seal` / `open` take the
    associated data: every octet of the message before the body (IKE header
    with the final Length, earlier payloads, the SK header; for SKF also
    Fragment Number and Total Fragments). `open` raises the crypto package's
    IntegrityCheckFailed / MalformedEncryptedPayload. `random` is where the IV comes from
    (the engine's injectable source; the system's when None).
    """

    def encrypted_length(self, plaintext_len: int) -> int: ...

    def seal(
        self,
        sk_e: bytes,
        sk_a: bytes,
        associated_data: bytes,
        plaintext: bytes,
        *,
        random: RandomSource | None = None,
    ) -> bytes: ...

    def open(self, sk_e: bytes, sk_a: bytes, associated_data: bytes, body: bytes) -> bytes: ...


# -- header ------------------------------------------------------------------


@dataclass(frozen=True)
class IkeHeader:
    """The fixed IKE header (RFC 7296 3.1)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: PayloadType | int
    major_version: int
    minor_version: int
    exchange_type: ExchangeType | int
    flags: HeaderFlag
    message_id: int
    length: int

    @classmethod
    def parse(cls, data: bytes) -> IkeHeader:
        """Decode the first 28 octets. Structural only: the version is not judged here,
        so a responder can still read the SPIs to answer INVALID_MAJOR_VERSION."""
        if len(data) < IKE_HEADER_LENGTH:
            raise MalformedMessage("truncated_header", f"{len(data)} octets")
        values = _HEADER.unpack(data)
        return cls(
            spi_i=values["spi_i"],
            spi_r=values["spi_r"],
            next_payload=as_enum(PayloadType, values["next_payload"]),
            major_version=values["version"] >> 4,
            minor_version=values["version"] & 0x0F,
            exchange_type=as_enum(ExchangeType, values["exchange_type"]),
            flags=HeaderFlag(values["flags"] & _KNOWN_FLAGS),  # reserved bits ignored (3.1)
            message_id=values["message_id"],
            length=values["length"],
        )

    def encode(self) -> bytes:
        if len(self.spi_i) != SPI_LENGTH or len(self.spi_r) != SPI_LENGTH:
            raise ValueError("IKE SPIs are 8 octets")
        return _HEADER.pack(
            {
                "spi_i": self.spi_i,
                "spi_r": self.spi_r,
                "next_payload": self.next_payload,
                "version": (self.major_version << 4) | self.minor_version,
                "exchange_type": self.exchange_type,
                "flags": int(self.flags & _KNOWN_FLAGS),
                "message_id": self.message_id,
                "length": self.length,
            }
        )

    @property
    def is_initiator(self) -> bool:
        """I flag: sent by the original initiator of the IKE SA."""
        return bool(self.flags & HeaderFlag.INITIATOR)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)


def peek_header(datagram: bytes) -> IkeHeader:
    """Cheap header check for ingress routing: 28 octets and major version 2.

    The datagram is the IKE message itself (non-ESP marker already stripped).
    """
    header = IkeHeader.parse(datagram)
    if header.major_version != IKE_MAJOR_VERSION:
        raise InvalidMajorVersion(header.major_version)
    return header


# -- messages ----------------------------------------------------------------


@dataclass
class Message:
    """A decoded (or to-be-encoded) IKE message.

    `payloads` are the cleartext payloads; when `protected`, those are the ones
    carried inside SK (or the reassembled SKF fragments).
    """

    exchange_type: ExchangeType | int
    spi_i: bytes
    spi_r: bytes
    message_id: int
    is_initiator: bool
    is_response: bool
    payloads: list[Payload] = field(default_factory=list)
    protected: bool = False

    @property
    def flags(self) -> HeaderFlag:
        flags = HeaderFlag.NONE
        if self.is_initiator:
            flags |= HeaderFlag.INITIATOR
        if self.is_response:
            flags |= HeaderFlag.RESPONSE
        return flags

    def get(self, payload_class: type[P]) -> P | None:
        """The first payload of that class (IdPayload/TsPayload: of either direction)."""
        for payload in self.payloads:
            if isinstance(payload, payload_class):
                return payload
        return None

    def get_all(self, payload_class: type[P]) -> list[P]:
        return [p for p in self.payloads if isinstance(p, payload_class)]

    def get_type(self, payload_type: PayloadType | int) -> Payload | None:
        """The first payload with that type code (tells IDi from IDr, TSi from TSr)."""
        for payload in self.payloads:
            if payload.payload_type == payload_type:
                return payload
        return None

    def notify(self, notify_type: NotifyType | int) -> NotifyPayload | None:
        for payload in self.payloads:
            if isinstance(payload, NotifyPayload) and payload.notify_type == notify_type:
                return payload
        return None

    def notifies(self) -> list[NotifyPayload]:
        return self.get_all(NotifyPayload)

    def summary(self) -> str:
        """One line like strongSwan's: ``IKE_AUTH request 1 [ IDi N(INITIAL_CONTACT) AUTH ]``."""
        exchange = getattr(self.exchange_type, "name", str(self.exchange_type))
        kind = "response" if self.is_response else "request"
        return f"{exchange} {kind} {self.message_id} {describe_payloads(self.payloads)}"


_SHORT_NAMES = {
    PayloadType.NONCE: "No",
    PayloadType.DELETE: "D",
    PayloadType.VENDOR_ID: "V",
    PayloadType.SK: "E",
    PayloadType.SKF: "EF",
}


def describe_payloads(payloads: list[Payload]) -> str:
    """Payload types in order, notifies with their type: ``[ SA KE No N(COOKIE) ]``.

    Lengths and type names only, never payload content: safe for logs.
    """
    names = []
    for payload in payloads:
        if isinstance(payload, NotifyPayload):
            kind = getattr(payload.notify_type, "name", str(payload.notify_type))
            names.append(f"N({kind})")
            continue
        code = payload.payload_type
        if isinstance(code, PayloadType):
            names.append(_SHORT_NAMES.get(code, code.name))
        else:
            names.append(f"UNKNOWN({code})")
    return "[ " + " ".join(names) + " ]" if names else "[ ]"


@dataclass
class ParsedMessage:
    """A datagram after step 1: header and outer chain checked, SK/SKF body still sealed.

    `payloads` is the outer chain; for a protected message it ends with the
    SkPayload/SkfPayload, whose Next Payload is `inner_first_payload`.
    Cleartext payloads before SK (legal but unused in practice) stay here and
    are not part of the decrypted `Message`.
    """

    header: IkeHeader
    payloads: list[Payload]
    raw: bytes
    encrypted_offset: int | None = None
    inner_first_payload: int = PayloadType.NONE

    @property
    def protected(self) -> bool:
        return self.encrypted_offset is not None

    @property
    def encrypted(self) -> SkPayload | SkfPayload | None:
        if self.encrypted_offset is None:
            return None
        last = self.payloads[-1]
        if not isinstance(last, SkPayload | SkfPayload):
            raise RuntimeError("encrypted_offset set without an SK/SKF payload")
        return last

    @property
    def is_fragment(self) -> bool:
        return isinstance(self.encrypted, SkfPayload)

    @property
    def associated_data(self) -> bytes:
        """Every octet before the SK/SKF body: what `SkProtectionLike` authenticates."""
        if self.encrypted_offset is None:
            raise ValueError("message is not protected")
        start = self.encrypted_offset + GENERIC_PAYLOAD_HEADER_LENGTH
        if self.is_fragment:
            start += _SKF_FIELDS.size
        return self.raw[:start]

    @property
    def message(self) -> Message | None:
        """The full message of an unprotected datagram; None while it is still sealed."""
        if self.protected:
            return None
        return _message(self.header, self.payloads, protected=False)


def _message(header: IkeHeader, payloads: list[Payload], *, protected: bool) -> Message:
    return Message(
        exchange_type=header.exchange_type,
        spi_i=header.spi_i,
        spi_r=header.spi_r,
        message_id=header.message_id,
        is_initiator=header.is_initiator,
        is_response=header.is_response,
        payloads=payloads,
        protected=protected,
    )


def parse_message(datagram: bytes, header: IkeHeader | None = None) -> ParsedMessage:
    """Step 1 of receiving: header, lengths and the outer payload chain.

    `header`: the fixed header as ingress already read it from these octets (the worker gets
    it with the datagram), so it is not read twice; the lengths are still checked here."""
    data = bytes(datagram)
    if header is None:
        header = peek_header(data)
    if header.length < IKE_HEADER_LENGTH or header.length > len(data):
        raise MalformedMessage("truncated_message", f"length {header.length}, have {len(data)}")
    if header.length < len(data):
        raise MalformedMessage("trailing_data", f"length {header.length}, have {len(data)}")
    chain = decode_chain(data, header.next_payload, IKE_HEADER_LENGTH, allow_encrypted=True)
    return ParsedMessage(
        header=header,
        payloads=chain.payloads,
        raw=data,
        encrypted_offset=chain.encrypted_offset,
        inner_first_payload=chain.inner_first_payload,
    )


def decode_inner(header: IkeHeader, first_payload: int, plaintext: bytes) -> Message:
    """The protected `Message` from decrypted (or reassembled) SK plaintext."""
    chain = decode_chain(plaintext, first_payload, allow_encrypted=False)
    return _message(header, chain.payloads, protected=True)


def decrypt_message(
    parsed: ParsedMessage, protection: SkProtectionLike, sk_e: bytes, sk_a: bytes
) -> Message:
    """Step 2: verify and decrypt the SK payload, decode the inner chain.

    An unprotected message is returned as decoded. A fragment raises
    `MalformedMessage("unexpected_fragment")`: fragments go to the reassembler.
    """
    encrypted = parsed.encrypted
    if encrypted is None:
        return _message(parsed.header, parsed.payloads, protected=False)
    if isinstance(encrypted, SkfPayload):
        raise MalformedMessage("unexpected_fragment")
    plaintext = protection.open(sk_e, sk_a, parsed.associated_data, encrypted.body)
    return decode_inner(parsed.header, parsed.inner_first_payload, plaintext)


def decrypt_fragment(
    parsed: ParsedMessage, protection: SkProtectionLike, sk_e: bytes, sk_a: bytes
) -> bytes:
    """Verify and decrypt one SKF fragment (RFC 7383 2.6: each on its own); its plaintext."""
    encrypted = parsed.encrypted
    if not isinstance(encrypted, SkfPayload):
        raise MalformedMessage("not_a_fragment")
    return protection.open(sk_e, sk_a, parsed.associated_data, encrypted.body)


# -- encoding ----------------------------------------------------------------


def _header(message: Message, next_payload: int, length: int) -> bytes:
    return IkeHeader(
        spi_i=message.spi_i,
        spi_r=message.spi_r,
        next_payload=next_payload,
        major_version=IKE_MAJOR_VERSION,
        minor_version=IKE_MINOR_VERSION,
        exchange_type=message.exchange_type,
        flags=message.flags,
        message_id=message.message_id,
        length=length,
    ).encode()


def _first_type(payloads: list[Payload]) -> int:
    return int(payloads[0].payload_type) if payloads else PayloadType.NONE


def _seal(
    message: Message,
    protection: SkProtectionLike,
    *,
    sk_e: bytes,
    sk_a: bytes,
    plaintext: bytes,
    next_payload: int,
    fragment: tuple[int, int] | None = None,
    random: RandomSource | None = None,
) -> bytes:
    """One SK (or, with `fragment` = (number, total), SKF) message around `plaintext`."""
    extra = b""
    payload_type = PayloadType.SK
    if fragment is not None:
        payload_type = PayloadType.SKF
        extra = _SKF_FIELDS.pack({"fragment_number": fragment[0], "total_fragments": fragment[1]})
    body_length = protection.encrypted_length(len(plaintext))
    payload_length = GENERIC_PAYLOAD_HEADER_LENGTH + len(extra) + body_length
    if payload_length > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"encrypted payload too long: {payload_length} octets")
    generic = GENERIC_HEADER.pack(
        {"next_payload": next_payload, "flags": 0, "length": payload_length}
    )
    associated_data = (
        _header(message, payload_type, IKE_HEADER_LENGTH + payload_length) + generic + extra
    )
    body = protection.seal(sk_e, sk_a, associated_data, plaintext, random=random)
    if len(body) != body_length:
        raise RuntimeError(f"seal produced {len(body)} octets, encrypted_length said {body_length}")
    return associated_data + body


def encode_message(
    message: Message,
    protection: SkProtectionLike | None = None,
    sk_e: bytes = b"",
    sk_a: bytes = b"",
    *,
    random: RandomSource | None = None,
) -> bytes:
    """The datagram for `message`; protected messages are sealed into one SK payload
    (its IV from `random`, the system's source when None)."""
    chain = encode_chain(message.payloads)
    if not message.protected:
        length = IKE_HEADER_LENGTH + len(chain)
        return _header(message, _first_type(message.payloads), length) + chain
    if protection is None:
        raise ValueError("a protected message needs its SK protection")
    first = _first_type(message.payloads)
    return _seal(
        message,
        protection,
        sk_e=sk_e,
        sk_a=sk_a,
        plaintext=chain,
        next_payload=first,
        random=random,
    )


def encode_message_fragments(
    message: Message,
    protection: SkProtectionLike,
    sk_e: bytes,
    sk_a: bytes,
    max_fragment_size: int,
    *,
    random: RandomSource | None = None,
) -> list[bytes]:
    """The datagrams of `message` split into SKF fragments (RFC 7383 2.5).

    `max_fragment_size` bounds each IKE message (header to last octet; the
    caller subtracts IP/UDP headers and the non-ESP marker, RFC 7383 2.5.1).
    Always fragments, even into one; whether to fragment is the caller's call.
    The inner chain is serialized once and cut into chunks; fragment 1's SKF
    Next Payload names the first inner payload, the others carry 0. All share
    the message's Message ID.
    """
    if not message.protected:
        raise ValueError("only protected messages are fragmented (RFC 7383 2.5)")
    plaintext = encode_chain(message.payloads)
    overhead = IKE_HEADER_LENGTH + GENERIC_PAYLOAD_HEADER_LENGTH + _SKF_FIELDS.size

    def fits(chunk: int) -> bool:
        return overhead + protection.encrypted_length(chunk) <= max_fragment_size

    if not fits(1):
        raise ValueError(f"max_fragment_size {max_fragment_size} leaves no room for data")
    # the largest chunk that fits (encrypted_length grows with the plaintext)
    low, high = 1, max(1, len(plaintext))
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    chunk = low
    total = max(1, math.ceil(len(plaintext) / chunk))
    if total > MAX_FRAGMENTS_ON_WIRE:
        raise ValueError(f"{total} fragments exceed the Total Fragments field")
    first = _first_type(message.payloads)
    datagrams = []
    for index in range(total):
        piece = plaintext[index * chunk : (index + 1) * chunk]
        next_payload = first if index == 0 else PayloadType.NONE
        datagrams.append(
            _seal(
                message,
                protection,
                sk_e=sk_e,
                sk_a=sk_a,
                plaintext=piece,
                next_payload=next_payload,
                fragment=(index + 1, total),
                random=random,
            )
        )
    return datagrams
