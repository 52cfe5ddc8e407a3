"""SA snapshot secrets kept for the farm (docs/failover.md): sealed here, opened only for
the worker that adopts the SA.

`seal`: the worker sends each snapshot's secrets sealed to the keystore's
transport key (`shared/bus/sa_secrets.py`); the keystore opens them and seals
them again under its snapshot key (AES-256-GCM, a random key made on the first
start and kept in the encrypted store, so only this keystore's master key
reaches it), with the binding (the KV key) as associated data. The worker
stores that in JetStream.

`unseal`: the adopting worker sends the stored items with a fresh ephemeral
key; the keystore opens each with the snapshot key and seals it to that
worker's channel. An item that does not open (altered, or bound to another
key) is refused by itself, the others are answered.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ikefarm.proto.messages import SaSealReply, SaSealRequest, SaUnsealReply, SaUnsealRequest
from ikefarm.shared.bus.sa_secrets import CHANNEL_INFO, check_batch, reply_label, request_label
from ikefarm.shared.bus.sealed import NONCE_SIZE, SealedChannel, SealError

SNAPSHOT_KEY = ("snapshot-key", "sa")  # (kind, name) in the store
STORED_AD = b"ikefarm sa secrets v1|"
REFUSED_SEAL = "seal_broken"


class BadSaRequest(ValueError):
    """A seal/unseal request that cannot be served: the text names the field, never a value."""


def new_snapshot_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class SaSecretKeeper:
    def __init__(self, transport: X25519PrivateKey, snapshot_key: bytes) -> None:
        self._transport = transport
        self._aead = AESGCM(snapshot_key)

    def __repr__(self) -> str:
        return "SaSecretKeeper(<keys>)"

    def _channel(self, ephemeral: bytes) -> SealedChannel:
        try:
            return SealedChannel.accept(self._transport, ephemeral, info=CHANNEL_INFO)
        except SealError as exc:
            raise BadSaRequest(f"ephemeral: {exc}") from None

    def seal(self, request: SaSealRequest) -> SaSealReply:
        problem = check_batch(request.bindings, request.items)
        if problem:
            raise BadSaRequest(problem)
        channel = self._channel(request.ephemeral)
        stored = []
        for binding, item in zip(request.bindings, request.items, strict=True):
            try:
                plain = channel.open(request_label(binding), item)
            except SealError as exc:
                raise BadSaRequest(f"items: {exc}") from None
            nonce = os.urandom(NONCE_SIZE)
            stored.append(nonce + self._aead.encrypt(nonce, plain, STORED_AD + binding.encode()))
        return SaSealReply(items=stored)

    def unseal(self, request: SaUnsealRequest) -> SaUnsealReply:
        problem = check_batch(request.bindings, request.items)
        if problem:
            raise BadSaRequest(problem)
        channel = self._channel(request.ephemeral)
        items: list[bytes] = []
        refused: list[str] = []
        for binding, item in zip(request.bindings, request.items, strict=True):
            try:
                if len(item) < NONCE_SIZE + 16:
                    raise InvalidTag
                plain = self._aead.decrypt(
                    item[:NONCE_SIZE], item[NONCE_SIZE:], STORED_AD + binding.encode()
                )
            except InvalidTag:
                items.append(b"")
                refused.append(REFUSED_SEAL)
                continue
            items.append(channel.seal(reply_label(binding), plain))
            refused.append("")
        return SaUnsealReply(items=items, refused=refused)
