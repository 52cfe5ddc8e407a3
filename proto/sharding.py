"""How an IKE SPI names the ike worker shard that owns the SA (docs/principles.md, principle 3).

The first two octets of every SPI an ike worker allocates are its shard number,
so ingress routes each later datagram by reading the SPI: no lookup, no state.
"""

from __future__ import annotations

SHARD_OCTETS = 2
MAX_SHARDS = 1 << (8 * SHARD_OCTETS)


def shard_of_spi(spi: bytes) -> int:
    return int.from_bytes(spi[:SHARD_OCTETS], "big")


def spi_for_shard(shard: int, random_octets: bytes) -> bytes:
    """An 8-octet IKE SPI: the shard, then 6 random octets."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard {shard} out of range 0-{MAX_SHARDS - 1}")
    if len(random_octets) != 8 - SHARD_OCTETS:
        raise ValueError("need 6 random octets")
    return shard.to_bytes(SHARD_OCTETS, "big") + random_octets
