"""Every random octet of a negotiation comes through the engine's injectable source.

SPIs, nonces, DH private keys, the IVs of SK payloads and the retransmission and
rekey jitter are drawn from `IkeEngine(random=..., uniform=...)`; with a seeded
source a full handshake (IKE_SA_INIT, IKE_AUTH with the first child, a
CREATE_CHILD_SA with PFS, an IKE SA rekey) replays byte for byte. That is what
lets a test pin a negotiation down, and what a snapshot restored elsewhere
(`shared/ikev2/snapshot.py`) relies on to continue one identically.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ikefarm.shared.ikev2.constants import DhId
from ikefarm.shared.ikev2.crypto.dh import DhExchange, key_exchange_length
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import (
    INITIATOR_TOML,
    PFS_TEMPLATE,
    RESPONDER_TOML,
    Seeded,
    Side,
    Wire,
    config,
)

# AES-GCM as well as AES-CBC with HMAC: both IV kinds come from the source; PFS with an ECP
# group and IKE with x25519, MODP and ECP, so every DH flavour is drawn from it
GCM_X25519 = 'aead-alg = "aes256-gcm-128"\nprf-alg = "hmac-sha256"\ndh-group = "x25519"'
CBC_MODP = 'enc-alg = "aes128-cbc"\nauth-alg = "hmac-sha256"\ndh-group = "modp2048"'
CBC_ECP = 'enc-alg = "aes256-cbc"\nauth-alg = "hmac-sha384"\ndh-group = "ecp384"'
TEMPLATES = """
[[ike.ike-policy-template]]
name = "t"
[[ike.ike-policy-template.ike-proposal]]
{ike}
""" + PFS_TEMPLATE.replace("{", "{{").replace("}", "}}")
VPN = 'ike-policy = { template = "t" }\nipsec-policy = { template = "p" }'


def seeded(seed: int) -> tuple[Callable[[int], bytes], Callable[[float, float], float]]:
    source = Seeded(seed)
    return source.octets, source.uniform


def seeded_wire(seed: int, ike: str = GCM_X25519) -> Wire:
    engines = []
    for template, shard, salt in ((RESPONDER_TOML, 1, 0), (INITIATOR_TOML, 2, 1)):
        octets, uniform = seeded(seed * 2 + salt)
        policy = engine_policy(config(template, TEMPLATES.format(ike=ike), VPN))
        engines.append(IkeEngine(policy, shard, random=octets, uniform=uniform))
    responder, initiator = engines
    return Wire(
        Side(initiator, b"shared-secret-0123456789", "192.0.2.2"),
        Side(responder, b"shared-secret-0123456789", "192.0.2.1"),
    )


def negotiate(wire: Wire) -> list[tuple[str, bytes]]:
    """Handshake with the first child, one more child (PFS), an IKE SA rekey."""
    initiator = wire.initiator.engine
    wire.run(initiator.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = initiator.sas.values()
    assert sa.state == IkeSaState.ESTABLISHED and len(sa.children) == 1
    wire.run(initiator.create_child(sa, "net", wire.now), wire.initiator)
    assert len(sa.children) == 2
    wire.run(initiator.rekey_ike(sa, wire.now), wire.initiator)
    (new,) = initiator.sas.values()
    assert new is not sa and new.state == IkeSaState.ESTABLISHED and len(new.children) == 2
    return list(wire.log)


@pytest.mark.parametrize("ike", [GCM_X25519, CBC_MODP, CBC_ECP])
def test_a_seeded_source_replays_the_negotiation_byte_for_byte(ike: str) -> None:
    first = negotiate(seeded_wire(7, ike))
    second = negotiate(seeded_wire(7, ike))
    assert len(first) >= 10
    assert first == second
    # and the source is what decides: another seed, other octets in every message
    other = negotiate(seeded_wire(8, ike))
    assert len(other) == len(first)
    assert all(a[1] != b[1] for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("group", [DhId.MODP_2048, DhId.ECP_256, DhId.ECP_384, DhId.ECP_521, 31])
def test_dh_keys_from_the_source_agree_and_depend_only_on_it(group: int) -> None:
    octets_a, _ = seeded(1)
    octets_b, _ = seeded(2)
    a = DhExchange.generate(group, octets_a)
    b = DhExchange.generate(group, octets_b)
    assert a.compute_shared(b.public_bytes()) == b.compute_shared(a.public_bytes())
    assert len(a.public_bytes()) == key_exchange_length(group)
    again, _ = seeded(1)
    assert DhExchange.generate(group, again).public_bytes() == a.public_bytes()
    # the system generator is still what a source-less call uses
    assert DhExchange.generate(group).public_bytes() != a.public_bytes()


@pytest.mark.parametrize("group", [DhId.ECP_256, DhId.ECP_384, DhId.ECP_521])
def test_the_curve_orders_used_to_reduce_scalars_are_right(group: int) -> None:
    """n - 1 times G is -G: same x, y = p - y(G); a wrong order would not give that."""
    from ikefarm.shared.ikev2.crypto import dh as dh_module

    order = dh_module._ECP_ORDER[group]
    size = dh_module._ECP[group][1]
    prime = dh_module._ECP[group][2]
    g = DhExchange.from_private_bytes(group, (1).to_bytes(size, "big")).public_bytes()
    minus_g = DhExchange.from_private_bytes(group, (order - 1).to_bytes(size, "big"))
    public = minus_g.public_bytes()
    assert public[:size] == g[:size]
    assert int.from_bytes(public[size:], "big") == prime - int.from_bytes(g[size:], "big")
