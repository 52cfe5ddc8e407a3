"""SA snapshot secrets between an ike worker and the keystore (docs/failover.md).

The secrets of an IKE SA snapshot (SK_*, child KEYMAT, DH private values of
tasks in flight; `shared/ikev2/snapshot.py` `SaSecrets`) are stored in JetStream
only sealed under a key the keystore holds. Both ways they travel on a
`SealedChannel` (`sealed.py`) with its own HKDF `info`, so a channel of another
purpose (PPK mixing, child keys) never opens for this one; each item's label
carries the direction and its binding (the KV key of the snapshot), so a sealed
item of one SA is not accepted as another's.
"""

from __future__ import annotations

from ikefarm.shared.bus.sealed import REPLY, REQUEST

CHANNEL_INFO = b"ikefarm sa secrets channel v1"
MAX_BATCH = 256  # items per request: well below the bus's message limit
MAX_ITEM = 16384  # octets of one sealed item (a snapshot's keys are a few hundred)
MAX_BINDING = 64  # characters of a binding: `shard-<n>.<16 hex>`


def request_label(binding: str) -> bytes:
    return REQUEST + b"|" + binding.encode()


def reply_label(binding: str) -> bytes:
    return REPLY + b"|" + binding.encode()


def check_batch(bindings: list[str], items: list[bytes]) -> str | None:
    """Why a batch cannot be served (naming the field, never a value), or None."""
    if len(bindings) != len(items):
        return "bindings and items differ in length"
    if len(items) > MAX_BATCH:
        return f"items: more than {MAX_BATCH}"
    if any(len(b) > MAX_BINDING or not b for b in bindings):
        return f"bindings: empty or longer than {MAX_BINDING} characters"
    if any(len(i) > MAX_ITEM for i in items):
        return f"items: one is longer than {MAX_ITEM} octets"
    return None
