"""Child SA keys sealed from an ike worker to the kernel service (`shared/bus/sealed.py`).

The four ESP keys of a child SA (encryption and integrity, each direction,
RFC 7296 2.17) cross the bus only inside `ChildInstall.sealed_keys`: sealed
with a fresh ephemeral X25519 key to the kernel service's transport key, which
the kernel service makes at start and keeps in memory only (published on
`subjects.KERNEL_TRANSPORT_KEY`). The associated data names the child's two
SPIs, so a sealed blob cannot be moved onto another child's install.

Plaintext layout: four (length: 2 octets, key) records in the order
encr_key_in, encr_key_out, integ_key_in, integ_key_out.
"""

from __future__ import annotations

import struct
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

__all__ = ["SEALED_KEYS_REFUSED", "ChildKeys", "open_child_keys", "seal_child_keys"]


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
