"""Drive two IkeEngines against each other in memory: the unit tier of protocol tests.

`keystore_stand_in` computes PSK AUTH the way the keystore service does; it is a
stand-in for that service in unit tests only (the service tests and interop
tests use the real keystore over NATS).
"""

from __future__ import annotations

import hmac
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ikefarm.proto.messages import CertAuthReply, CertAuthRequest, PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.certs import CertStore, cert_auth
from ikefarm.shared.config.loader import Config, parse_config
from ikefarm.shared.ikev2.crypto.keys import mix_ppk
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.effects import (
    VIP_LEASE,
    Effect,
    Endpoint,
    KeystoreAnswer,
    KeystoreCall,
    KeystoreRequest,
    PpkMix,
    PpkMixed,
    SendDatagram,
)
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges.auth_methods import CERT_AUTH
from ikefarm.shared.ikev2.policy import engine_policy

KEY_PAD = b"Key Pad for IKEv2"


def keystore_stand_in(
    psk: bytes,
    request: KeystoreCall,
    operation: str = "psk-auth",
    ppks: dict[bytes, bytes] | None = None,
) -> KeystoreAnswer:
    """The keystore's answer to a PSK AUTH or PPK mix request, typed as the engine takes it."""
    prf = Prf(request.prf_id)  # type: ignore[union-attr]
    if isinstance(request, PpkMix):  # RFC 8784 3, as the keystore does it with that PPK_ID's PPK
        secret = (ppks or {}).get(request.ppk_id)
        if secret is None:
            return PpkMixed(found=False, reason="no_ppk")
        return PpkMixed(found=True, keys=mix_ppk(prf, secret, request.keys))
    assert isinstance(request, PskAuthRequest)
    key = prf.compute(psk, KEY_PAD)
    if request.purpose == "sign":
        return PskAuthReply(True, prf.compute(key, request.sign_octets))
    ok = hmac.compare_digest(prf.compute(key, request.verify_octets), request.verify_auth)
    if not ok:
        return PskAuthReply(False, b"", "auth_mismatch")
    auth = prf.compute(key, request.sign_octets) if request.purpose == "verify-and-sign" else b""
    return PskAuthReply(True, auth)


class Seeded:
    """A seeded random source for an engine (`random=s.octets, uniform=s.uniform`), whose
    state can be copied into another engine's."""

    def __init__(self, seed: int) -> None:
        self.source = random.Random(seed)

    def octets(self, n: int) -> bytes:
        return self.source.randbytes(n)

    def uniform(self, low: float, high: float) -> float:
        return self.source.uniform(low, high)

    def clone(self) -> Seeded:
        copy = Seeded(0)
        copy.source.setstate(self.source.getstate())
        return copy


# children with PFS (a CREATE_CHILD_SA carries a DH value): vpn `ipsec-policy = { template = "p" }`
PFS_TEMPLATE = """
[[ike.ipsec-policy-template]]
name = "p"
[[ike.ipsec-policy-template.esp-proposal]]
enc-alg = "aes128-cbc"
auth-alg = "hmac-sha256"
dh-group = "ecp256"
"""

RESPONDER_TOML = """
[[ike.pre-shared-key]]
local-id = "gw.example"
remote-id = "peer.example"
secret = "shared-secret-0123456789"

[[ike.vpn]]
name = "rw"
local-address = "192.0.2.1"
local-id = "gw.example"
remote-id = "peer.example"
{extra_vpn}
[[ike.vpn.security-policy]]
name = "net"
local-ts = {{ subnet = "10.100.0.0/24" }}
remote-ts = {{ subnet = "10.200.0.0/24" }}
{extra}
"""

INITIATOR_TOML = """
[[ike.pre-shared-key]]
local-id = "peer.example"
remote-id = "gw.example"
secret = "shared-secret-0123456789"

[[ike.vpn]]
name = "hq"
local-address = "192.0.2.2"
remote-address = "192.0.2.1"
local-id = "peer.example"
remote-id = "gw.example"
{extra_vpn}
[[ike.vpn.security-policy]]
name = "net"
local-ts = {{ subnet = "10.200.0.0/24" }}
remote-ts = {{ subnet = "10.100.0.0/24" }}
{extra}
"""


def config(template: str, extra: str = "", extra_vpn: str = "") -> Config:
    return parse_config(template.format(extra=extra, extra_vpn=extra_vpn))


def cert_keystore(store: CertStore, request: KeystoreCall) -> CertAuthReply:
    """Certificate AUTH through the keystore's own code (services/keystore/certs.py)."""
    assert isinstance(request, CertAuthRequest)
    return cert_auth(store, request)


@dataclass
class Side:
    engine: IkeEngine
    psk: bytes
    address: str
    effects: list[Effect] = field(default_factory=list)
    ppks: dict[bytes, bytes] = field(default_factory=dict)  # PPK_ID -> PPK, the keystore's
    certs: CertStore | None = None
    # answers VipLease (a stand-in for the farm's KV lease store, which the service tests
    # exercise on a real nats-server: tests/service/test_vip_leases.py)
    leases: Any = None


@dataclass
class Nat:
    """A NAPT in front of the initiator: its datagrams leave from `outside`, each inside port
    mapped to its own outside port (so a float to 4500 changes the port the responder sees)."""

    outside: str
    ports: dict[int, int] = field(default_factory=dict)
    first_port: int = 40000

    def translate(self, inside: Endpoint) -> Endpoint:
        port = self.ports.setdefault(inside.port, self.first_port + len(self.ports))
        return Endpoint(self.outside, port)

    def untranslate(self, outside: Endpoint, inside_address: str) -> Endpoint:
        inside = {v: k for k, v in self.ports.items()}
        return Endpoint(inside_address, inside[outside.port])


@dataclass
class Wire:
    """Two engines joined by a lossless in-memory network; `drop` filters datagrams; `nat`
    puts the initiator behind a NAPT."""

    initiator: Side
    responder: Side
    now: float = 1000.0
    log: list[tuple[str, bytes]] = field(default_factory=list)
    nat: Nat | None = None

    def side(self, address: str) -> Side:
        return self.initiator if address == self.initiator.address else self.responder

    def run(
        self, effects: list[Effect], source: Side, *, drop: Any = None, limit: int = 200
    ) -> None:
        queue = [(source, e) for e in effects]
        steps = 0
        while queue and steps < limit:
            steps += 1
            side, effect = queue.pop(0)
            side.effects.append(effect)
            if isinstance(effect, KeystoreRequest):
                if effect.operation == VIP_LEASE:
                    assert side.leases is not None
                    reply: KeystoreAnswer = side.leases(effect.request)
                elif effect.operation == CERT_AUTH:
                    assert side.certs is not None
                    reply = cert_keystore(side.certs, effect.request)
                else:
                    reply = keystore_stand_in(side.psk, effect.request, effect.operation, side.ppks)
                queue += [
                    (side, e)
                    for e in side.engine.keystore_reply(effect.request_id, reply, self.now)
                ]
            elif isinstance(effect, SendDatagram):
                self.log.append((side.address, effect.data))
                if drop is not None and drop(side, effect):
                    continue
                source = Endpoint(effect.local.address, effect.local.port)
                destination = Endpoint(effect.remote.address, effect.remote.port)
                if self.nat is not None:
                    if side is self.initiator:
                        source = self.nat.translate(source)
                    elif destination.address == self.nat.outside:
                        destination = self.nat.untranslate(destination, self.initiator.address)
                target = self.side(destination.address)
                out = target.engine.receive(effect.data, destination, source, self.now)
                queue += [(target, e) for e in out]


def pair(
    responder_extra: str = "",
    initiator_extra: str = "",
    *,
    responder_vpn: str = "",
    initiator_vpn: str = "",
    initiator_psk: bytes = b"shared-secret-0123456789",
    initiator_ppks: dict[bytes, bytes] | None = None,
    responder_ppks: dict[bytes, bytes] | None = None,
) -> Wire:
    responder = IkeEngine(
        engine_policy(config(RESPONDER_TOML, responder_extra, responder_vpn)), shard=1
    )
    initiator = IkeEngine(
        engine_policy(config(INITIATOR_TOML, initiator_extra, initiator_vpn)), shard=2
    )
    return Wire(
        Side(initiator, initiator_psk, "192.0.2.2", ppks=dict(initiator_ppks or {})),
        Side(responder, b"shared-secret-0123456789", "192.0.2.1", ppks=dict(responder_ppks or {})),
    )


# Containers that grow and are cut back by design (amortized O(1)), not per-SA leftovers:
# their bound is checked by `assert_bounded_caches` instead of an exact size.
BOUNDED_CACHES = frozenset({"_child_spis", "_child_index"})


def assert_bounded_caches(engine: Any) -> None:
    """The engine's remembered child SPIs stay within the bound its rebuild keeps."""
    from ikefarm.shared.ikev2 import engine as engine_module

    live = sum(len(sa.children) for sa in engine.sas.values())
    assert len(engine._child_spis) <= engine._child_spis_limit + 1
    assert engine._child_spis_limit <= 2 * max(live, len(engine._child_spis)) + (
        engine_module.CHILD_SPI_SLACK
    )
    # children by unique id: the same bound, the same rebuild
    assert len(engine._child_index) <= engine._child_index_limit + 1
    assert engine._child_index_limit <= 2 * max(live, len(engine._child_index)) + (
        engine_module.CHILD_SPI_SLACK
    )


def container_sizes(root: object, path: str, seen: set[int], out: dict[str, int]) -> None:
    """The entries of every dict, list, set and deque reachable from `root`, by attribute
    path; the members of one container are summed under `[*]` (their keys are peers, SPIs)."""
    if id(root) in seen or isinstance(root, str | bytes | int | float | bool | type(None)):
        return
    seen.add(id(root))
    if isinstance(root, dict | list | set | frozenset | deque | tuple):
        out[path] = out.get(path, 0) + len(root)
    members = root.values() if isinstance(root, dict) else root
    if isinstance(root, dict | list | tuple | set | frozenset | deque):
        for value in members:  # type: ignore[union-attr]
            container_sizes(value, f"{path}[*]", seen, out)
    elif hasattr(root, "__dict__") and not callable(root):
        for name, value in vars(root).items():
            if name not in BOUNDED_CACHES:
                container_sizes(value, f"{path}.{name}", seen, out)
