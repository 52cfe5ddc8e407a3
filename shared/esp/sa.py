"""Outbound and inbound ESP SAs in tunnel mode (RFC 4303 2, 3.3, 3.4): the codec, sans I/O.

`OutboundSa.encapsulate(inner)` turns one inner IP packet into the ESP packet

    SPI | Sequence Number | IV | E(inner | Padding | Pad Length | Next Header) | ICV

and `InboundSa.decapsulate(esp)` turns it back, or returns a `Dropped` with a
`DropReason`. Neither reads a clock or a socket; the IV source is injected
(default `os.urandom`). The caller (the userspace dataplane) owns sockets, the
TUN device and SA lookup by SPI (`InboundSaTable`); nothing here costs more
with more SAs.

Byte counters count inner IP packet octets. Soft and hard lifetimes in bytes
and packets are reported once each as `LifetimeEvent`s, drained with
`take_events()`; what to do (rekey, delete) is the caller's decision.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from ikefarm.shared.esp.replay import ReplayWindow
from ikefarm.shared.esp.transforms import ESP_HEADER_SIZE, EspTransform, KeyedTransform

__all__ = [
    "DropReason",
    "Dropped",
    "EncapsulationRefused",
    "InboundSa",
    "InboundSaTable",
    "Lifetime",
    "LifetimeEvent",
    "OutboundSa",
    "SaCounters",
    "Unwrapped",
]

NEXT_HEADER_IPV4 = 4  # IP-in-IP, RFC 4303 2.6 (IANA protocol numbers)
NEXT_HEADER_IPV6 = 41
NEXT_HEADER_NONE = 59  # "no next header": a dummy packet (RFC 4303 2.6)
SEQ_MAX_32 = (1 << 32) - 1
SEQ_MAX_64 = (1 << 64) - 1
_HEADER = struct.Struct("!II")
_IPV4_MIN = 20
_IPV6_HEADER = 40


class DropReason(StrEnum):
    """Why an ESP packet was not delivered; the label of the drop counter."""

    TOO_SHORT = "too_short"  # shorter than header, IV, the smallest ciphertext and ICV
    UNKNOWN_SPI = "unknown_spi"  # no inbound SA with that SPI (table level)
    REPLAY = "replay"  # seen already, left of the window, or sequence number 0
    INTEGRITY = "integrity"  # ICV / AEAD tag does not verify
    BAD_PADDING = "bad_padding"  # Pad Length overruns, padding not 1, 2, 3 ..., CBC misaligned
    BAD_NEXT_HEADER = "bad_next_header"  # not 4 (IPv4) or 41 (IPv6) in tunnel mode
    DUMMY = "dummy"  # Next Header 59: a traffic-flow-confidentiality dummy, discarded (2.6)
    INNER_MALFORMED = "inner_malformed"  # the decrypted packet is not a whole IP packet


class EncapsulationRefused(ValueError):
    """encapsulate() cannot send this packet; `reason` is the counter label.

    `sequence_exhausted`: the counter reached 2^32 - 1 (2^64 - 1 with ESN); a
    sequence number is never reused (RFC 4303 3.3.3), the SA must be rekeyed.
    `inner_malformed`: the packet to protect is not a whole IPv4 or IPv6 packet.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Lifetime:
    """Soft and hard limits in inner octets and packets; None means no limit."""

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None


_Kind = Literal["soft", "hard"]
_Limit = Literal["bytes", "packets"]


@dataclass(frozen=True)
class LifetimeEvent:
    """A lifetime limit reached on one SA direction; the caller rekeys (soft) or deletes (hard)."""

    spi: int
    direction: Literal["in", "out"]
    kind: _Kind
    limit: _Limit


@dataclass
class SaCounters:
    packets: int = 0
    bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Unwrapped:
    """A delivered inner packet (trimmed to its IP length) and its full sequence number."""

    inner: bytes
    spi: int
    seq: int


@dataclass(frozen=True)
class Dropped:
    reason: DropReason
    spi: int | None = None
    seq: int | None = None


def inner_length(packet: bytes, next_header: int | None = None) -> int | None:
    """The length an IPv4/IPv6 packet declares, if it fits in `packet`; None if malformed.

    `next_header` (4 or 41), when given, must agree with the version field.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and next_header in (None, NEXT_HEADER_IPV4):
        if len(packet) < _IPV4_MIN:
            return None
        header = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        return total if _IPV4_MIN <= header <= total <= len(packet) else None
    if version == 6 and next_header in (None, NEXT_HEADER_IPV6):
        if len(packet) < _IPV6_HEADER:
            return None
        payload = (packet[4] << 8) | packet[5]  # 0 would be a jumbogram: not supported
        total = _IPV6_HEADER + payload
        return total if payload and total <= len(packet) else None
    return None


class _Sa:
    __slots__ = (
        "_events",
        "_keyed",
        "_pending",
        "counters",
        "esn",
        "lifetime",
        "spi",
        "transform",
    )

    direction: Literal["in", "out"]

    def __init__(
        self,
        spi: int,
        transform: EspTransform,
        encr_key: bytes,
        integ_key: bytes,
        *,
        esn: bool,
        lifetime: Lifetime,
    ) -> None:
        if not 0 < spi <= SEQ_MAX_32:
            raise ValueError(f"SPI must be a non-zero 32-bit number, got {spi}")
        self.spi = spi
        self.transform = transform
        self.esn = esn
        self.lifetime = lifetime
        self.counters = SaCounters()
        self._keyed: KeyedTransform = transform.keyed(encr_key, integ_key)
        self._events: list[LifetimeEvent] = []
        self._pending: list[tuple[_Kind, _Limit, int]] = [
            (kind, limit, value)
            for kind, limit, value in (
                ("soft", "bytes", lifetime.soft_bytes),
                ("hard", "bytes", lifetime.hard_bytes),
                ("soft", "packets", lifetime.soft_packets),
                ("hard", "packets", lifetime.hard_packets),
            )
            if value is not None
        ]

    def __repr__(self) -> str:  # never the keys
        esn = ", esn" if self.esn else ""
        return f"{type(self).__name__}(spi=0x{self.spi:08x}, {self.transform.name}{esn})"

    @property
    def has_events(self) -> bool:
        """Whether lifetime events wait in `take_events()`."""
        return bool(self._events)

    def take_events(self) -> list[LifetimeEvent]:
        events, self._events = self._events, []
        return events

    def _count(self, octets: int) -> None:
        counters = self.counters
        counters.packets += 1
        counters.bytes += octets
        if not self._pending:
            return
        reached = [
            entry
            for entry in self._pending
            if (counters.bytes if entry[1] == "bytes" else counters.packets) >= entry[2]
        ]
        for entry in reached:  # each limit is reported once
            self._pending.remove(entry)
            self._events.append(LifetimeEvent(self.spi, self.direction, entry[0], entry[1]))


class OutboundSa(_Sa):
    """The sending half of a child SA: assigns sequence numbers, pads, encrypts, signs."""

    __slots__ = ("_random", "seq")
    direction: Literal["in", "out"] = "out"

    def __init__(
        self,
        spi: int,
        transform: EspTransform,
        encr_key: bytes,
        integ_key: bytes = b"",
        *,
        esn: bool = False,
        lifetime: Lifetime | None = None,
        seq: int = 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """`seq` is the last sequence number used (0: none yet, the first packet gets 1)."""
        super().__init__(
            spi, transform, encr_key, integ_key, esn=esn, lifetime=lifetime or Lifetime()
        )
        if not 0 <= seq <= (SEQ_MAX_64 if esn else SEQ_MAX_32):
            raise ValueError(f"sequence number out of range: {seq}")
        self.seq = seq
        self._random = random

    def encapsulate(self, inner: bytes) -> bytes:
        """The ESP packet protecting `inner`, an IPv4 or IPv6 packet (tunnel mode).

        Raises `EncapsulationRefused` (counted in `counters.drops`) and changes
        nothing else when the packet is malformed or no sequence number is left.
        """
        length = inner_length(inner)
        if length is None or length != len(inner):
            self.counters.drops["inner_malformed"] += 1
            raise EncapsulationRefused(
                "inner_malformed", f"not a whole IPv4/IPv6 packet ({len(inner)} octets)"
            )
        if self.seq >= (SEQ_MAX_64 if self.esn else SEQ_MAX_32):
            self.counters.drops["sequence_exhausted"] += 1
            raise EncapsulationRefused(
                "sequence_exhausted",
                f"SPI 0x{self.spi:08x} used its last sequence number; rekey the SA"
                " (RFC 4303 3.3.3)",
            )
        seq = self.seq + 1
        transform = self.transform
        next_header = NEXT_HEADER_IPV4 if inner[0] >> 4 == 4 else NEXT_HEADER_IPV6
        pad = -(len(inner) + 2) % transform.alignment
        plaintext = inner + bytes(range(1, pad + 1)) + bytes((pad, next_header))  # RFC 4303 2.4
        header = _HEADER.pack(self.spi, seq & SEQ_MAX_32)
        body = self._keyed.seal(header, seq, self.esn, plaintext, self._random)
        self.seq = seq  # only once sealed: a failed seal uses no number
        self._count(len(inner))
        return header + body


class InboundSa(_Sa):
    """The receiving half: anti-replay, integrity, decryption, trailer and inner checks."""

    __slots__ = ("_min_length", "window")
    direction: Literal["in", "out"] = "in"

    def __init__(
        self,
        spi: int,
        transform: EspTransform,
        encr_key: bytes,
        integ_key: bytes = b"",
        *,
        esn: bool = False,
        replay_window: int = 32,
        lifetime: Lifetime | None = None,
        highest_seq: int = 0,
    ) -> None:
        """`highest_seq`: the window's starting top (0 for a new SA)."""
        super().__init__(
            spi, transform, encr_key, integ_key, esn=esn, lifetime=lifetime or Lifetime()
        )
        self.window = ReplayWindow(replay_window, esn=esn, top=highest_seq)
        self._min_length = (
            ESP_HEADER_SIZE + transform.iv_size + transform.min_ciphertext + transform.icv_size
        )

    def _drop(self, reason: DropReason, seq: int | None = None) -> Dropped:
        self.counters.drops[reason] += 1
        return Dropped(reason, self.spi, seq)

    def decapsulate(self, packet: bytes) -> Unwrapped | Dropped:
        """The inner packet, or a counted `Dropped`; never raises for any input bytes."""
        if len(packet) < self._min_length:
            return self._drop(DropReason.TOO_SHORT)
        spi, seq_lo = _HEADER.unpack_from(packet)
        if spi != self.spi:
            return self._drop(DropReason.UNKNOWN_SPI)
        seq = self.window.check(seq_lo)  # RFC 4303 3.4.3: before the ICV, no state change
        if seq is None:
            return self._drop(DropReason.REPLAY, seq_lo)
        plaintext = self._keyed.open(packet, seq, self.esn)
        if plaintext is None:
            return self._drop(DropReason.INTEGRITY, seq)
        if len(plaintext) < 2:
            return self._drop(DropReason.BAD_PADDING, seq)
        pad, next_header = plaintext[-2], plaintext[-1]
        end = len(plaintext) - 2 - pad
        if end < 0 or plaintext[end:-2] != bytes(range(1, pad + 1)):
            return self._drop(DropReason.BAD_PADDING, seq)
        if next_header == NEXT_HEADER_NONE:
            return self._drop(DropReason.DUMMY, seq)
        if next_header not in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6):
            return self._drop(DropReason.BAD_NEXT_HEADER, seq)
        length = inner_length(plaintext[:end], next_header)
        if length is None:
            return self._drop(DropReason.INNER_MALFORMED, seq)
        self.window.update(seq)  # only now: authentic and delivered
        self._count(length)
        return Unwrapped(plaintext[:length], self.spi, seq)  # bytes past `length`: TFC (2.7)


class InboundSaTable:
    """Inbound SAs by SPI: one dict lookup per packet, whatever the number of SAs."""

    __slots__ = ("_by_spi", "drops")

    def __init__(self) -> None:
        self._by_spi: dict[int, InboundSa] = {}
        self.drops: Counter[str] = Counter()  # drops before an SA is known

    def __len__(self) -> int:
        return len(self._by_spi)

    def __contains__(self, spi: int) -> bool:
        return spi in self._by_spi

    def add(self, sa: InboundSa) -> None:
        if sa.spi in self._by_spi:
            raise ValueError(f"an inbound SA with SPI 0x{sa.spi:08x} exists already")
        self._by_spi[sa.spi] = sa

    def remove(self, spi: int) -> InboundSa | None:
        return self._by_spi.pop(spi, None)

    def get(self, spi: int) -> InboundSa | None:
        return self._by_spi.get(spi)

    def decapsulate(self, packet: bytes) -> Unwrapped | Dropped:
        if len(packet) < ESP_HEADER_SIZE:
            self.drops[DropReason.TOO_SHORT] += 1
            return Dropped(DropReason.TOO_SHORT)
        spi = int.from_bytes(packet[:4], "big")
        sa = self._by_spi.get(spi)
        if sa is None:
            self.drops[DropReason.UNKNOWN_SPI] += 1
            return Dropped(DropReason.UNKNOWN_SPI, spi)
        return sa.decapsulate(packet)
