"""Virtual IPs: pool arithmetic, CP attribute codec bounds, and CFG_REQUEST/CFG_REPLY between
two engines (RFC 7296 2.19, 3.15; docs/vip-pools.md)."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.shared.config.loader import ConfigError, parse_config
from ikefarm.shared.ikev2.constants import CfgAttribute, CfgType, NotifyType
from ikefarm.shared.ikev2.effects import LocalVip, SaEvent, VipLease, VipLeased, VipRelease
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads import ConfigAttribute, CpPayload
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.pools import Pool
from ikefarm.shared.ikev2.sa import IkeSaState
from ikefarm.shared.ikev2.show import format_details, ike_sa_row
from tests.engine_helpers import INITIATOR_TOML, RESPONDER_TOML, Side, Wire

# -- pool arithmetic -------------------------------------------------------------------------


def _pool(*entries: str) -> Pool:
    item = SimpleNamespace(
        name="p",
        address=list(entries),
        dns=["192.0.2.53", "2001:db8::53"],
        nbns=[],
        dhcp=["192.0.2.67"],
        subnet=["10.100.0.0/24", "2001:db8:100::/64"],
        netmask=["255.255.255.0"],
    )
    return Pool.from_config(item)


def test_pool_counts_single_addresses_ranges_and_subnets_per_family() -> None:
    pool = _pool("10.9.0.7", "10.9.1.1-10.9.1.3", "10.9.2.0/30", "2001:db8:9::/126")
    # a /30 hands out its two host addresses; an IPv6 /126 all but the anycast one
    assert pool.size(4) == 1 + 3 + 2
    assert pool.size(6) == 3
    assert [str(pool.address_at(4, i)) for i in range(6)] == [
        "10.9.0.7", "10.9.1.1", "10.9.1.2", "10.9.1.3", "10.9.2.1", "10.9.2.2",
    ]  # fmt: skip
    assert str(pool.address_at(6, 0)) == "2001:db8:9::1"
    with pytest.raises(IndexError):
        pool.address_at(4, 6)
    with pytest.raises(IndexError):
        pool.address_at(4, -1)
    assert pool.index_of("10.9.2.2") == 5
    assert pool.index_of("10.9.2.3") is None  # broadcast
    assert pool.index_of("2001:db8:9::3") == 2


@given(st.integers(0, 2**16 - 3))
@settings(max_examples=50, deadline=None)
def test_index_and_address_are_inverse(index: int) -> None:
    pool = _pool("10.0.0.0/16", "10.1.0.1-10.1.0.9")
    address = pool.address_at(4, index % pool.size(4))
    assert pool.index_of(address) == index % pool.size(4)


def test_pool_attributes_follow_the_assigned_families() -> None:
    pool = _pool("10.9.0.0/24")
    only_v4 = pool.attributes({4})
    kinds = [a.attribute_type for a in only_v4]
    assert CfgAttribute.INTERNAL_IP4_DNS in kinds
    assert CfgAttribute.INTERNAL_IP6_DNS not in kinds
    subnet = next(a for a in only_v4 if a.attribute_type == CfgAttribute.INTERNAL_IP4_SUBNET)
    assert subnet.network() == ipaddress.ip_network("10.100.0.0/24")
    six = next(a for a in pool.attributes({6}) if a.attribute_type == 15)
    assert six.network() == ipaddress.ip_network("2001:db8:100::/64")


# -- codec bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "length"),
    [(1, 3), (1, 5), (8, 16), (3, 16), (10, 4), (13, 4), (15, 16), (2, 1)],
)
def test_a_known_attribute_with_a_wrong_length_is_malformed(attribute: int, length: int) -> None:
    tail = attribute.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\x00" * length
    with pytest.raises(MalformedMessage):
        CpPayload.from_wire({"cfg_type": CfgType.CFG_REPLY}, tail)


def test_an_ipv6_prefix_above_128_is_malformed() -> None:
    value = ipaddress.ip_address("2001:db8::1").packed + bytes([129])
    tail = (8).to_bytes(2, "big") + (17).to_bytes(2, "big") + value
    with pytest.raises(MalformedMessage):
        CpPayload.from_wire({"cfg_type": CfgType.CFG_REPLY}, tail)


def test_unknown_and_private_attributes_keep_any_length() -> None:
    tail = (0x6000).to_bytes(2, "big") + (3).to_bytes(2, "big") + b"abc"
    cp = CpPayload.from_wire({"cfg_type": CfgType.CFG_REPLY}, tail)
    assert cp.attributes == [ConfigAttribute(0x6000, b"abc")]


@given(st.binary(max_size=80))
@settings(max_examples=300, deadline=None)
def test_cp_attributes_from_random_octets_decode_or_are_malformed(tail: bytes) -> None:
    try:
        cp = CpPayload.from_wire({"cfg_type": CfgType.CFG_REPLY}, tail)
    except MalformedMessage:
        return
    for attribute in cp.attributes:  # what decoded can be read back without surprises
        if attribute.attribute_type in (13, 15):
            attribute.network()
        elif attribute.attribute_type in (1, 2, 3, 4, 6, 8, 9, 10, 11, 12):
            attribute.address()
        assert CpPayload.from_wire({"cfg_type": 2}, cp.encode_tail()) == cp


# -- config ----------------------------------------------------------------------------------

POOL = """
[[ike.pool]]
name = "rw-pool"
address = ["10.9.0.1-10.9.0.2", "2001:db8:9::/120"]
dns = ["192.0.2.53", "2001:db8::53"]
subnet = ["10.100.0.0/24"]
"""
# the engine helpers' pair, with a pool and the peer's side of the child left to its VIP
RESPONDER = RESPONDER_TOML.format(extra_vpn='vip-pool = ["rw-pool"]', extra=POOL).replace(
    'remote-ts = { subnet = "10.200.0.0/24" }\n', ""
)
INITIATOR = INITIATOR_TOML.format(extra_vpn='vip-request = ["0.0.0.0"]', extra="").replace(
    'local-ts = { subnet = "10.200.0.0/24" }\n', ""
)


def test_vip_pool_radius_without_eap_and_unknown_pools_are_refused() -> None:
    radius = ("radius", 'needs remote-auth-method = "eap-radius"')
    for name, words in (radius, ("nope", "not the name")):
        with pytest.raises(ConfigError) as refused:
            parse_config(RESPONDER.replace('vip-pool = ["rw-pool"]', f'vip-pool = ["{name}"]'))
        assert any(words in str(p) for p in refused.value.problems)


# -- engines ---------------------------------------------------------------------------------


class FirstFree:
    """Stand-in lease store for engine tests: the first address of the first pool not held
    (the farm-wide KV store is tested against nats-server in tests/service)."""

    def __init__(self, engine: IkeEngine, capacity: int | None = None) -> None:
        self.engine = engine
        self.held: dict[str, int] = {}
        self.capacity = capacity
        self.calls: list[VipLease] = []

    def __call__(self, call: VipLease) -> VipLeased:
        self.calls.append(call)
        granted = []
        for version in call.versions:
            pool = self.engine.policy.pools[call.pools[0]]
            for index in range(pool.size(version)):
                address = str(pool.address_at(version, index))
                if address not in self.held and (
                    self.capacity is None or len(self.held) < self.capacity
                ):
                    self.held[address] = call.ike_unique_id
                    granted.append((pool.name, address))
                    break
        return VipLeased(tuple(granted))


def _wire(responder_toml: str = RESPONDER, initiator_toml: str = INITIATOR, **kw: int) -> Wire:
    responder = IkeEngine(engine_policy(parse_config(responder_toml)), shard=1)
    initiator = IkeEngine(engine_policy(parse_config(initiator_toml)), shard=2)
    psk = b"shared-secret-0123456789"
    return Wire(
        Side(initiator, psk, "192.0.2.2"),
        Side(responder, psk, "192.0.2.1", leases=FirstFree(responder, kw.get("capacity"))),
    )


def _connect(wire: Wire) -> None:
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)


def test_road_warrior_gets_an_address_dns_and_a_narrowed_child() -> None:
    wire = _wire()
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    [isa] = wire.initiator.engine.sas.values()
    assert rsa.state == isa.state == IkeSaState.ESTABLISHED
    assert rsa.remote_vips == [("rw-pool", "10.9.0.1")]
    assert isa.local_vips == ["10.9.0.1"]
    assert isa.cfg_dns == ["192.0.2.53"]  # only the family assigned
    [call] = wire.responder.leases.calls
    assert call == VipLease(("rw-pool",), (4,), "peer.example", rsa.unique_id)
    # the remote-ts without subnet is the assigned address (RFC 7296 2.19)
    [rchild] = rsa.children
    [ichild] = isa.children
    assert [str(ts) for ts in rchild.remote_ts] == [str(ts) for ts in ichild.local_ts]
    assert "10.9.0.1" in str(rchild.remote_ts[0]) and "10.9.0.1" in str(ichild.local_ts[0])
    established = [
        e for e in wire.responder.effects if isinstance(e, SaEvent) and e.kind == "ike-established"
    ]
    assert established[0].detail["remote_vips"] == ["10.9.0.1"]
    details = format_details([ike_sa_row(isa, wire.now)])
    assert "local  vip 10.9.0.1" in details and "dns 192.0.2.53" in details
    assert "remote vip 10.9.0.1" in format_details([ike_sa_row(rsa, wire.now)])
    assert wire.responder.engine.counters["vip.leased"] == 1


def test_both_families_are_asked_and_assigned() -> None:
    wire = _wire(initiator_toml=INITIATOR.replace('["0.0.0.0"]', '["0.0.0.0", "::"]'))
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    [isa] = wire.initiator.engine.sas.values()
    assert rsa.remote_vips == [("rw-pool", "10.9.0.1"), ("rw-pool", "2001:db8:9::1")]
    assert isa.local_vips == ["10.9.0.1", "2001:db8:9::1"]
    assert isa.cfg_dns == ["192.0.2.53", "2001:db8::53"]


def test_an_exhausted_pool_answers_internal_address_failure_and_no_child() -> None:
    wire = _wire(capacity=0)
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    assert rsa.children == [] and rsa.remote_vips == []
    assert wire.responder.engine.counters["vip.pool_exhausted"] == 1
    assert wire.initiator.engine.counters["child_refused_by_peer"] == 1
    isas = list(wire.initiator.engine.sas.values())
    assert all(not sa.children and not sa.local_vips for sa in isas)
    failed = [
        e for e in wire.initiator.effects if getattr(e, "reason", "") == "INTERNAL_ADDRESS_FAILURE"
    ]
    assert failed, wire.initiator.effects
    assert NotifyType.INTERNAL_ADDRESS_FAILURE == 36


def test_the_lease_is_released_when_the_ike_sa_is_deleted() -> None:
    wire = _wire()
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    owner = rsa.unique_id
    [isa] = wire.initiator.engine.sas.values()
    wire.run(wire.initiator.engine.delete_ike(isa, wire.now), wire.initiator)
    releases = [e for e in wire.responder.effects if isinstance(e, VipRelease)]
    assert releases == [VipRelease(owner, (("rw-pool", "10.9.0.1"),))]
    assert not wire.responder.engine.sas


def test_an_ike_rekey_keeps_the_lease_under_its_owner() -> None:
    wire = _wire()
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    owner = rsa.unique_id
    [isa] = wire.initiator.engine.sas.values()
    wire.run(wire.initiator.engine.rekey_ike(isa, wire.now), wire.initiator)
    [new] = [sa for sa in wire.responder.engine.sas.values() if sa.state == IkeSaState.ESTABLISHED]
    assert new.unique_id != owner
    assert new.remote_vips == [("rw-pool", "10.9.0.1")] and new.vip_owner == owner
    assert not [e for e in wire.responder.effects if isinstance(e, VipRelease)]
    [newi] = [sa for sa in wire.initiator.engine.sas.values() if sa.state == IkeSaState.ESTABLISHED]
    assert newi.local_vips == ["10.9.0.1"]


def test_a_cfg_request_without_pools_gets_no_reply_and_the_initiator_counts_it() -> None:
    wire = _wire(responder_toml=RESPONDER.replace('vip-pool = ["rw-pool"]\n', ""))
    _connect(wire)
    assert not wire.responder.leases.calls
    assert wire.initiator.engine.counters["vip.no_reply"] == 1
    request = CpPayload(CfgType.CFG_REQUEST, [ConfigAttribute(1)])
    assert CpPayload.from_wire({"cfg_type": 1}, request.encode_tail()) == request


def test_a_malformed_cp_in_ike_auth_is_refused_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ikefarm.shared.ikev2.exchanges import config as cfg_exchange

    bad = CpPayload(CfgType.CFG_REQUEST, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS, b"x")])
    monkeypatch.setattr(cfg_exchange, "request_payload", lambda vpn: bad)
    wire = _wire()
    _connect(wire)
    assert not wire.responder.leases.calls
    assert not [sa for sa in wire.responder.engine.sas.values() if sa.remote_vips]
    assert all(sa.state != IkeSaState.ESTABLISHED for sa in wire.responder.engine.sas.values())
    dropped = {k: v for k, v in wire.responder.engine.counters.items() if "bad_attribute" in k}
    assert dropped, dict(wire.responder.engine.counters)


def test_the_initiator_installs_its_vip_and_removes_it_with_the_ike_sa() -> None:
    wire = _wire()
    _connect(wire)
    [isa] = wire.initiator.engine.sas.values()
    installs = [e for e in wire.initiator.effects if isinstance(e, LocalVip)]
    assert installs == [LocalVip(True, "10.9.0.1", "192.0.2.2", isa.unique_id)]
    wire.run(wire.initiator.engine.rekey_ike(isa, wire.now), wire.initiator)  # kept
    assert len([e for e in wire.initiator.effects if isinstance(e, LocalVip)]) == 1
    [new] = [sa for sa in wire.initiator.engine.sas.values() if sa.state == IkeSaState.ESTABLISHED]
    wire.run(wire.initiator.engine.delete_ike(new, wire.now), wire.initiator)
    removes = [e for e in wire.initiator.effects if isinstance(e, LocalVip) and not e.install]
    assert removes == [LocalVip(False, "10.9.0.1", "192.0.2.2", isa.unique_id)]


def test_a_snapshot_keeps_the_vips_and_the_restored_sa_releases_them() -> None:
    from ikefarm.shared.ikev2.snapshot import SaSnapshot

    wire = _wire()
    _connect(wire)
    [rsa] = wire.responder.engine.sas.values()
    snapshot, secrets = wire.responder.engine.snapshot(rsa, wire.now)
    snapshot = SaSnapshot.from_json(snapshot.to_json())
    assert snapshot.remote_vips == [["rw-pool", "10.9.0.1"]]
    other = IkeEngine(wire.responder.engine.policy, shard=1)
    restored = other.restore(snapshot, secrets, wire.now)
    assert restored.remote_vips == [("rw-pool", "10.9.0.1")] and restored.vip_owner == rsa.unique_id
    effects = other.remove_sa(restored, "expired", wire.now)  # where every deletion ends
    assert VipRelease(rsa.unique_id, (("rw-pool", "10.9.0.1"),)) in effects
    # an older snapshot without the fields still reads
    raw = snapshot.to_json().replace(b',"remote_vips":[["rw-pool","10.9.0.1"]]', b"")
    assert SaSnapshot.from_json(raw).remote_vips == []
