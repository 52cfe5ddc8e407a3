"""Inner packets and SA pairs for the ESP codec tests (shared/esp/)."""

from __future__ import annotations

import os

from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from ikefarm.shared.esp import EspTransform, InboundSa, OutboundSa

# (aead-alg,) or (enc-alg, auth-alg) as the configuration names them
ALGORITHMS: list[tuple[str, str | None]] = [
    ("aes128-gcm-128", None),
    ("aes192-gcm-128", None),
    ("aes256-gcm-128", None),
    ("chacha20-poly1305", None),
    ("aes128-cbc", "hmac-sha256"),
    ("aes192-cbc", "hmac-sha384"),
    ("aes256-cbc", "hmac-sha512"),
    ("aes128-cbc", "hmac-sha1"),
]

SPI = 0xC0FFEE01


def ipv4_packet(payload: bytes = b"ikefarm", seq: int = 1) -> bytes:
    return raw(IP(src="198.51.100.1", dst="198.51.100.2") / ICMP(id=7, seq=seq) / payload)


def ipv6_packet(payload: bytes = b"ikefarm", seq: int = 1) -> bytes:
    return raw(
        IPv6(src="2001:db8:1::1", dst="2001:db8:2::1") / ICMPv6EchoRequest(seq=seq, data=payload)
    )


def udp_packet(size: int) -> bytes:
    return raw(IP(src="198.51.100.1", dst="198.51.100.2") / UDP(sport=1, dport=2) / bytes(size))


def keys(transform: EspTransform) -> tuple[bytes, bytes]:
    return os.urandom(transform.encr_key_size), os.urandom(transform.integ_key_size)


def direction(
    names: tuple[str, str | None] = ("aes256-gcm-128", None),
    *,
    esn: bool = False,
    replay_window: int = 32,
    seq: int = 0,
    highest_seq: int = 0,
) -> tuple[OutboundSa, InboundSa]:
    """Both halves of one direction, sharing keys: what we send, the peer receives."""
    transform = EspTransform.from_names(*names)
    encr, integ = keys(transform)
    outbound = OutboundSa(SPI, transform, encr, integ, esn=esn, seq=seq)
    inbound = InboundSa(
        SPI,
        transform,
        encr,
        integ,
        esn=esn,
        replay_window=replay_window,
        highest_seq=highest_seq,
    )
    return outbound, inbound
