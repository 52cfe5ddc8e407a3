"""Key material that must cross the bus between an ike worker and the keystore or kernel, sealed.

PPK mixing (RFC 8784 3) needs SK_d, SK_pi and SK_pr in the keystore (where the
PPK is) and brings SK_d', SK_pi', SK_pr' back to the worker. Neither may be
readable by whoever can subscribe to the bus (docs/principles.md, principle 4), so each such
request opens a `SealedChannel`:

- the keystore holds a long-term X25519 transport key (in its encrypted store)
  and publishes only the public half (`keystore.transport-key`);
- the worker makes an ephemeral X25519 key per request; both sides derive
  key = HKDF-SHA256(X25519(ephemeral, transport), salt = ephemeral_pub | transport_pub,
  info = "ikefarm keystore channel v1");
- each direction is AES-256-GCM with a random 96-bit nonce and its own label as
  associated data ("request", "reply"), so a sealed request cannot be replayed
  as a reply.

A worker and the keystore that never shared anything but a public key thus
exchange keys the bus only sees encrypted; the ephemeral key lives for one request
(a worker's child-key seals reuse theirs within bounds: `child_keys.py`).

Child SA keys (ESP KEYMAT, RFC 7296 2.17) reach the kernel service the same way
(`shared/bus/child_keys.py`): the kernel service's transport key lives in its
memory only, and the derivation uses its own `info` ("ikefarm kernel channel
v1"), so a channel to one service never opens for the other.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

INFO = b"ikefarm keystore channel v1"
NONCE_SIZE = 12
PUBLIC_KEY_SIZE = 32
REQUEST = b"request"
REPLY = b"reply"


class SealError(ValueError):
    """A sealed blob that does not open: wrong key, altered, or malformed."""


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class SealedChannel:
    """One request's AES-GCM key; `repr` shows nothing of it."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SealedChannel(<key>)"

    @staticmethod
    def _derive(
        private: X25519PrivateKey, peer_public: bytes, salt: bytes, info: bytes
    ) -> SealedChannel:
        if len(peer_public) != PUBLIC_KEY_SIZE:
            raise SealError(f"public key is {len(peer_public)} octets, not {PUBLIC_KEY_SIZE}")
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise SealError("public key is not a usable X25519 point") from None
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)
        return SealedChannel(key)

    @classmethod
    def open_to(cls, keystore_public: bytes, info: bytes = INFO) -> tuple[SealedChannel, bytes]:
        """The worker's side: a channel to the keystore and the ephemeral public key to send."""
        ephemeral = X25519PrivateKey.generate()
        mine = public_bytes(ephemeral)
        return cls._derive(ephemeral, keystore_public, mine + keystore_public, info), mine

    @classmethod
    def accept(
        cls, transport: X25519PrivateKey, ephemeral_public: bytes, info: bytes = INFO
    ) -> SealedChannel:
        """The keystore's side, from its transport key and the worker's ephemeral public key."""
        salt = ephemeral_public + public_bytes(transport)
        return cls._derive(transport, ephemeral_public, salt, info)

    def seal(self, label: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, label)

    def open(self, label: bytes, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + 16:
            raise SealError("sealed data is too short")
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], label)
        except InvalidTag:
            raise SealError("sealed data does not open with this channel") from None
