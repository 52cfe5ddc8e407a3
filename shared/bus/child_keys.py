"""Child SA keys sealed from an ike worker to the kernel service (`shared/bus/sealed.py`).

The four ESP keys of a child SA (encryption and integrity, each direction,
RFC 7296 2.17) cross the bus only inside `ChildInstall.sealed_keys`: sealed
with a fresh ephemeral X25519 key to the kernel service's transport key, which
the kernel service makes at start and keeps in memory only (published on
`subjects.KERNEL_TRANSPORT_KEY`). The associated data names the child's two
SPIs, so a sealed blob cannot be moved onto another child's install.

Plaintext layout: four (length: 2 octets, key) records in the order
encr_key_in, encr_key_out, integ_key_in, integ_key_out.

A worker's `ChildKeySealer` keeps one ephemeral key (and the channel derived from
it) for up to `EPHEMERAL_USES` installs or `EPHEMERAL_SECONDS`, and the kernel
service's `ChildKeyOpener` remembers the channels of the last `OPENER_CHANNELS`
ephemeral keys it saw: two X25519 operations and an HKDF per child SA on each side
were a tenth of a handshake's CPU. Each seal still has its own random nonce and
names its child's SPIs (AES-GCM with random 96-bit nonces stays far inside its
bound at a few thousand seals per key), and the ephemeral key only protects keys
the worker itself holds for as long as the child lives.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ikefarm.shared.bus.sealed import SealedChannel, SealError

INFO = b"ikefarm kernel channel v1"
LABEL = b"child-keys"
MAX_KEY_SIZE = 128  # the longest ESP KEYMAT part is 64 octets (HMAC-SHA-512)
_LENGTH = struct.Struct("!H")
# KernelAck.error of an install whose sealed keys do not open (a kernel service restarted
# with another transport key): the worker fetches the key again and seals once more
SEALED_KEYS_REFUSED = "sealed keys do not open"

EPHEMERAL_USES = 4096  # seals under one worker ephemeral key, at most
EPHEMERAL_SECONDS = 60.0  # and for at most this long
OPENER_CHANNELS = 64  # channels the kernel service remembers (a few per worker)

__all__ = [
    "SEALED_KEYS_REFUSED",
    "ChildKeyOpener",
    "ChildKeySealer",
    "ChildKeys",
    "open_child_keys",
    "seal_child_keys",
]


@dataclass(frozen=True)
class ChildKeys:
    """The four keys of a child SA; `repr` shows their lengths only."""

    encr_key_in: bytes = field(repr=False)
    encr_key_out: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)

    def __repr__(self) -> str:
        sizes = (self.encr_key_in, self.encr_key_out, self.integ_key_in, self.integ_key_out)
        return f"ChildKeys(lengths={tuple(len(key) for key in sizes)})"

    def _pack(self) -> bytes:
        keys = (self.encr_key_in, self.encr_key_out, self.integ_key_in, self.integ_key_out)
        return b"".join(_LENGTH.pack(len(key)) + key for key in keys)

    @classmethod
    def _unpack(cls, plain: bytes) -> ChildKeys:
        keys = []
        offset = 0
        for _ in range(4):
            if offset + _LENGTH.size > len(plain):
                raise SealError("sealed child keys are truncated")
            (size,) = _LENGTH.unpack_from(plain, offset)
            offset += _LENGTH.size
            if size > MAX_KEY_SIZE or offset + size > len(plain):
                raise SealError("sealed child keys have a bad length")
            keys.append(plain[offset : offset + size])
            offset += size
        if offset != len(plain):
            raise SealError("sealed child keys have trailing octets")
        return cls(*keys)


def _label(spi_in: bytes, spi_out: bytes) -> bytes:
    return LABEL + spi_in + spi_out


def seal_child_keys(
    kernel_public: bytes, spi_in: bytes, spi_out: bytes, keys: ChildKeys
) -> tuple[bytes, bytes]:
    """(ephemeral public key, sealed keys) for a ChildInstall to the kernel service."""
    channel, ephemeral = SealedChannel.open_to(kernel_public, INFO)
    return ephemeral, channel.seal(_label(spi_in, spi_out), keys._pack())


def open_child_keys(
    transport: X25519PrivateKey, ephemeral: bytes, sealed: bytes, spi_in: bytes, spi_out: bytes
) -> ChildKeys:
    """The kernel service's side; SealError when it does not open or is malformed."""
    channel = SealedChannel.accept(transport, ephemeral, INFO)
    return ChildKeys._unpack(channel.open(_label(spi_in, spi_out), sealed))


class ChildKeySealer:
    """The worker's side, reusing its ephemeral key within bounds (see the module text)."""

    def __init__(self, uses: int = EPHEMERAL_USES, seconds: float = EPHEMERAL_SECONDS) -> None:
        self._uses = uses
        self._seconds = seconds
        self._kernel_public = b""
        self._channel: SealedChannel | None = None
        self._ephemeral = b""
        self._left = 0
        self._until = 0.0

    def __repr__(self) -> str:
        return f"ChildKeySealer(uses_left={self._left})"

    def seal(
        self, kernel_public: bytes, spi_in: bytes, spi_out: bytes, keys: ChildKeys, now: float
    ) -> tuple[bytes, bytes]:
        """(ephemeral public key, sealed keys), as `seal_child_keys`."""
        if (
            self._channel is None
            or self._left <= 0
            or now >= self._until
            or kernel_public != self._kernel_public
        ):
            self._channel, self._ephemeral = SealedChannel.open_to(kernel_public, INFO)
            self._kernel_public = kernel_public
            self._left = self._uses
            self._until = now + self._seconds
        self._left -= 1
        return self._ephemeral, self._channel.seal(_label(spi_in, spi_out), keys._pack())

    def forget(self) -> None:
        """The kernel service refused a seal (it restarted with another key): start afresh."""
        self._channel = None


class ChildKeyOpener:
    """The kernel service's side: the channels of the last few ephemeral keys, remembered.

    A channel is remembered only once something sealed under it opened, so
    ephemeral keys that open nothing cannot push the workers' channels out."""

    def __init__(self, transport: X25519PrivateKey, size: int = OPENER_CHANNELS) -> None:
        self._transport = transport
        self._size = size
        self._channels: OrderedDict[bytes, SealedChannel] = OrderedDict()

    def __repr__(self) -> str:
        return f"ChildKeyOpener({len(self._channels)} channels)"

    def open(self, ephemeral: bytes, sealed: bytes, spi_in: bytes, spi_out: bytes) -> ChildKeys:
        """As `open_child_keys`; SealError when it does not open or is malformed."""
        channel = self._channels.get(ephemeral)
        known = channel is not None
        if channel is None:
            channel = SealedChannel.accept(self._transport, ephemeral, INFO)
        keys = ChildKeys._unpack(channel.open(_label(spi_in, spi_out), sealed))
        if known:
            self._channels.move_to_end(ephemeral)
        else:
            self._channels[ephemeral] = channel
            if len(self._channels) > self._size:
                self._channels.popitem(last=False)
        return keys
