"""Configuration payloads in IKE_AUTH (RFC 7296 2.19, 3.15): virtual IPs from pools.

Responder: a CFG_REQUEST that asks for INTERNAL_IP4_ADDRESS and/or INTERNAL_IP6_ADDRESS,
to a VPN with `vip-pool`s, makes the IKE_AUTH responder ask for leases (`VipLease`, one
address per family asked) once the peer's AUTH is verified. The ike service leases them
farm-wide (docs/vip-pools.md) and answers `VipLeased`; the CFG_REPLY carries the
addresses and the pool's DNS/NBNS/DHCP/SUBNET/NETMASK, and the leased address is the
child's remote traffic selector where the security policy leaves remote-ts unset. When no
address could be leased the answer is INTERNAL_ADDRESS_FAILURE and no child.

Initiator: `vip-request` (0.0.0.0 and/or ::) sends a CFG_REQUEST; the addresses and DNS
servers of the CFG_REPLY are recorded on the SA (`IkeSa.local_vips`, `IkeSa.cfg_dns`).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.constants import CfgAttribute, CfgType, NotifyType
from ikefarm.shared.ikev2.effects import Effect, LocalVip, VipLease, VipLeased, VipRelease
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import ConfigAttribute, CpPayload, NotifyPayload, Payload
from ikefarm.shared.ikev2.policy import VpnPolicy
from ikefarm.shared.ikev2.pools import Pool

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine
    from ikefarm.shared.ikev2.sa import IkeSa

_ADDRESS_KIND = {4: CfgAttribute.INTERNAL_IP4_ADDRESS, 6: CfgAttribute.INTERNAL_IP6_ADDRESS}
_DNS = (CfgAttribute.INTERNAL_IP4_DNS, CfgAttribute.INTERNAL_IP6_DNS)


def requested_versions(request: Message) -> tuple[int, ...]:
    """The address families a CFG_REQUEST asks an address of (empty: none asked)."""
    cp = request.get(CpPayload)
    if cp is None or cp.cfg_type != CfgType.CFG_REQUEST:
        return ()
    kinds = {int(a.attribute_type) for a in cp.attributes}
    return tuple(v for v, kind in _ADDRESS_KIND.items() if int(kind) in kinds)


def lease_call(sa: IkeSa, vpn: VpnPolicy, versions: tuple[int, ...], identity: str) -> VipLease:
    pools = tuple(pool for pool in vpn.vip_pools if pool != RADIUS_POOL)  # no store for it
    return VipLease(pools, versions, identity, sa.unique_id)


RADIUS_POOL = "radius"  # vip-pool radius: the SA's own pool from RADIUS attributes (seed 004)


def radius_pool(attributes: dict[str, list[str]]) -> Pool:
    """The pool a RADIUS Access-Accept makes for one IKE SA (docs/radius.md): its addresses
    and the DNS/NBNS/NETMASK attributes; shared with no other SA, leased from no store."""
    blocks = []
    for text in attributes.get("address", []):
        address = ipaddress.ip_address(text)
        blocks.append((address.version, int(address), int(address)))
    return Pool(
        name=RADIUS_POOL,
        blocks=tuple(blocks),
        dns=tuple(attributes.get("dns", [])),
        nbns=tuple(attributes.get("nbns", [])),
        netmask=tuple(attributes.get("netmask", [])),
    )


def radius_grants(pool: Pool, versions: tuple[int, ...]) -> list[tuple[str, str]]:
    """One address per family asked from the SA's RADIUS pool."""
    granted = []
    for version in versions:
        if pool.size(version):
            granted.append((RADIUS_POOL, str(pool.address_at(version, 0))))
    return granted


def reply_payloads(
    engine: IkeEngine,
    sa: IkeSa,
    leased: VipLeased | None,
    versions: tuple[int, ...],
    own_pool: Pool | None = None,
) -> tuple[list[Payload], bool]:
    """The CFG_REPLY (or INTERNAL_ADDRESS_FAILURE) and whether a child may follow;
    `own_pool` is the SA's RADIUS pool (its addresses are in `leased` as pool "radius")."""
    granted = list(leased.addresses) if leased is not None else []
    if not granted:
        engine.count("vip.pool_exhausted")
        return [NotifyPayload(NotifyType.INTERNAL_ADDRESS_FAILURE)], False
    if len(granted) < len(versions):
        engine.count("vip.family_exhausted")
    sa.remote_vips = granted
    sa.vip_owner = sa.unique_id
    attributes: list[ConfigAttribute] = []
    by_pool: dict[str, set[int]] = {}
    for pool_name, text in granted:
        address = ipaddress.ip_address(text)
        suffix = b"\x80" if address.version == 6 else b""  # prefix length /128 (RFC 7296 3.15.1)
        attributes.append(
            ConfigAttribute.from_address(_ADDRESS_KIND[address.version], address, suffix)
        )
        by_pool.setdefault(pool_name, set()).add(address.version)
    for pool_name, versions_of_pool in by_pool.items():
        pool = own_pool if pool_name == RADIUS_POOL else engine.policy.pools.get(pool_name)
        if pool is not None:
            attributes += pool.attributes(versions_of_pool)
    for _ in granted:
        engine.count("vip.leased")
    return [CpPayload(CfgType.CFG_REPLY, attributes)], True


def release(sa: IkeSa) -> list[Effect]:
    """Free the SA's leases and take our assigned VIPs away (its IKE SA is gone and no
    successor took them)."""
    effects: list[Effect] = []
    leased = tuple(vip for vip in sa.remote_vips if vip[0] != RADIUS_POOL)  # none held
    if leased:
        effects.append(VipRelease(sa.vip_owner or sa.unique_id, leased))
    if sa.remote_vips:
        sa.remote_vips = []
    for address in sa.local_vips:
        effects.append(LocalVip(False, address, sa.local.address, sa.vip_owner or sa.unique_id))
    sa.local_vips = []
    return effects


def move(old: IkeSa, new: IkeSa) -> None:
    """An IKE rekey: the leases stay with the SA that replaces `old`, under the same owner."""
    if old.remote_vips:
        new.remote_vips, new.vip_owner = old.remote_vips, old.vip_owner
        old.remote_vips = []
    if old.local_vips:
        new.local_vips, new.cfg_dns = old.local_vips, old.cfg_dns
        new.vip_owner = old.vip_owner
        old.local_vips = []


# -- initiator ----------------------------------------------------------------------------


def request_payload(vpn: VpnPolicy) -> CpPayload | None:
    """CFG_REQUEST for the families `vip-request` names, with DNS asked for each."""
    versions = sorted({ipaddress.ip_address(v).version for v in vpn.vip_request})
    if not versions:
        return None
    attributes = [ConfigAttribute(_ADDRESS_KIND[v]) for v in versions]
    attributes += [ConfigAttribute(_DNS[0 if v == 4 else 1]) for v in versions]
    return CpPayload(CfgType.CFG_REQUEST, attributes)


def record_reply(engine: IkeEngine, sa: IkeSa, response: Message) -> list[Effect]:
    """Keep the addresses and DNS servers of the peer's CFG_REPLY (others are ignored,
    as seed 004 says); the addresses are to be installed on our side."""
    cp = response.get(CpPayload)
    if cp is None or cp.cfg_type != CfgType.CFG_REPLY:
        if sa.vpn is not None and sa.vpn.vip_request:
            engine.count("vip.no_reply")
        return []
    for attribute in cp.attributes:
        try:
            address = attribute.address()
        except ValueError:
            continue
        if address is None:
            continue
        if attribute.attribute_type in _ADDRESS_KIND.values():
            sa.local_vips.append(str(address))
        elif attribute.attribute_type in _DNS:
            sa.cfg_dns.append(str(address))
    if not sa.local_vips:
        return []
    engine.count("vip.received")
    sa.vip_owner = sa.unique_id
    return [LocalVip(True, address, sa.local.address, sa.unique_id) for address in sa.local_vips]
