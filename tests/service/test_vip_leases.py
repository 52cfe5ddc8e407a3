"""Farm-wide VIP leases in JetStream KV on a real nats-server (services/ike/vip_leases.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import subjects
from ikefarm.services.ike.vip_leases import LeaseRecord, VipLeases, holder_key, lease_key
from ikefarm.shared.bus.auth import ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.ikev2.effects import VipLease, VipRelease
from ikefarm.shared.ikev2.pools import Pool
from tests.harness.bus_users import connect_as

pytestmark = pytest.mark.timeout(60)


def _pools(*entries: str) -> dict[str, Pool]:
    item = SimpleNamespace(
        name="rw", address=list(entries), dns=[], nbns=[], dhcp=[], subnet=[], netmask=[]
    )
    return {"rw": Pool.from_config(item)}


def _call(identity: str, owner: int, versions: tuple[int, ...] = (4,)) -> VipLease:
    return VipLease(("rw",), versions, identity, owner)


async def _worker(url: str, pools: dict[str, Pool]) -> tuple[Client, VipLeases]:
    nc = await nats.connect(url)
    leases = VipLeases(nc, pools)
    await leases.open()
    return nc, leases


async def test_two_workers_never_lease_the_same_address(nats_server: EmbeddedNats) -> None:
    pools = _pools("10.9.0.1-10.9.0.10")
    nc1, one = await _worker(nats_server.url, pools)
    nc2, two = await _worker(nats_server.url, pools)
    try:
        calls = [
            (one if i % 2 else two).lease(_call(f"client{i}.example", 1000 + i)) for i in range(12)
        ]
        answers = await asyncio.gather(*calls)
        granted = [a.addresses[0][1] for a in answers if a.addresses]
        assert len(granted) == 10 and len(set(granted)) == 10  # ten distinct, two refused
        assert sum(1 for a in answers if not a.addresses) == 2
        assert one.counters.get("vip.exhausted.v4", 0) + two.counters.get("vip.exhausted.v4", 0)
        shown = await one.leases(pools["rw"])
        assert sorted(address for address, _r, live in shown if live) == sorted(granted)
    finally:
        await nc1.close()
        await nc2.close()


async def test_the_same_identity_gets_its_address_back_after_release(
    nats_server: EmbeddedNats,
) -> None:
    pools = _pools("10.9.0.0/24", "2001:db8:9::/64")
    nc1, one = await _worker(nats_server.url, pools)
    nc2, two = await _worker(nats_server.url, pools)
    try:
        first = await one.lease(_call("laptop.example", 5, (4, 6)))
        assert first.addresses[0][1].startswith("10.9.0.")
        assert ipaddress.ip_address(first.addresses[1][1]) in ipaddress.ip_network(
            "2001:db8:9::/64"
        )
        await one.release(VipRelease(5, first.addresses))
        assert not [r for r in await one.leases(pools["rw"]) if r[2]]
        again = await two.lease(_call("laptop.example", 9, (4, 6)))  # another worker
        assert again.addresses == first.addresses
    finally:
        await nc1.close()
        await nc2.close()


async def test_release_frees_only_what_the_owner_still_holds(nats_server: EmbeddedNats) -> None:
    pools = _pools("10.9.0.1")
    nc, leases = await _worker(nats_server.url, pools)
    try:
        old = await leases.lease(_call("phone.example", 1))
        # the same identity reconnects before the old SA is gone: it takes the lease over
        new = await leases.lease(_call("phone.example", 2))
        assert new.addresses == old.addresses
        await leases.release(VipRelease(1, old.addresses))  # the old SA's deletion
        [(_address, record, live)] = await leases.leases(pools["rw"])
        assert record is not None and record.owner == 2 and live
        assert not (await leases.lease(_call("other.example", 3))).addresses
        await leases.release(VipRelease(2, new.addresses))
        assert (await leases.lease(_call("other.example", 3))).addresses == old.addresses
    finally:
        await nc.close()


async def test_a_dead_workers_leases_are_reclaimed(nats_server: EmbeddedNats) -> None:
    pools = _pools("10.9.0.1-10.9.0.2")
    nc1, dead = await _worker(nats_server.url, pools)
    nc2, alive = await _worker(nats_server.url, pools)
    try:
        for i in range(2):
            assert (await dead.lease(_call(f"c{i}.example", i + 1))).addresses
        assert not (await alive.lease(_call("new.example", 10))).addresses
        # what the holder bucket's age limit does to a worker that stopped renewing
        holders = await nc2.jetstream().key_value(subjects.VIP_HOLDER_BUCKET)
        await holders.delete(holder_key(dead.token))
        taken = await alive.lease(_call("new.example", 10))
        assert taken.addresses and alive.counters["vip.lease_reclaimed"] == 1
        rows = {address: live for address, _r, live in await alive.leases(pools["rw"])}
        assert rows[taken.addresses[0][1]] is True and list(rows.values()).count(False) == 1
    finally:
        await nc1.close()
        await nc2.close()


async def test_leases_of_a_worker_killed_without_releasing_expire_with_its_holder_record(
    nats_server: EmbeddedNats,
) -> None:
    """kill -9 as the broker sees it: the connection drops, nothing is released or renewed;
    once the holder record's age limit passed, the addresses are leased again."""
    pools = _pools("10.9.0.1")
    nc1 = await nats.connect(nats_server.url)
    killed = VipLeases(nc1, pools, holder_ttl=1.0)
    await killed.open()
    assert (await killed.lease(_call("gone.example", 1))).addresses
    await nc1.close()  # no release, no renewal from here on
    nc2 = await nats.connect(nats_server.url)
    alive = VipLeases(nc2, pools, holder_ttl=1.0)
    await alive.open()
    try:
        assert not (await alive.lease(_call("new.example", 2))).addresses  # still held
        taken = None
        for _ in range(40):  # the broker expires the record within a few seconds
            await asyncio.sleep(0.25)
            taken = await alive.lease(_call("new.example", 2))
            if taken.addresses:
                break
        assert taken is not None and taken.addresses == (("rw", "10.9.0.1"),)
    finally:
        await nc2.close()


async def test_a_worker_that_stops_cleanly_frees_its_leases_at_once(
    nats_server: EmbeddedNats,
) -> None:
    pools = _pools("10.9.0.1")
    nc1, stopping = await _worker(nats_server.url, pools)
    nc2, other = await _worker(nats_server.url, pools)
    try:
        assert (await stopping.lease(_call("old.example", 1))).addresses
        assert not (await other.lease(_call("new.example", 2))).addresses
        await stopping.retire()
        assert (await other.lease(_call("new.example", 2))).addresses == (("rw", "10.9.0.1"),)
    finally:
        await nc1.close()
        await nc2.close()


async def test_a_record_that_is_not_a_lease_is_reclaimed_not_trusted(
    nats_server: EmbeddedNats,
) -> None:
    pools = _pools("10.9.0.1")
    nc, leases = await _worker(nats_server.url, pools)
    try:
        kv = await nc.jetstream().key_value(subjects.VIP_LEASE_BUCKET)
        await kv.put(lease_key("rw", "10.9.0.1"), b"\xff not json")
        assert (await leases.lease(_call("x.example", 4))).addresses == (("rw", "10.9.0.1"),)
    finally:
        await nc.close()


@given(st.binary(max_size=200))
def test_lease_records_from_random_octets_decode_or_are_refused(raw: bytes) -> None:
    record = LeaseRecord.decode(raw)
    if record is not None:
        assert LeaseRecord.decode(record.encode()) == record


async def test_the_ike_user_may_lease_and_list_and_ingress_may_not(tmp_path: Path) -> None:
    users = ensure_credentials(tmp_path / "auth")
    config = write_server_config(tmp_path / "auth", users)
    pools = _pools("10.9.0.1-10.9.0.3")
    with EmbeddedNats(tmp_path / "nats", config_file=config) as broker:
        errors: dict[str, list[str]] = {"ike": [], "ingress": []}
        for user, refusals in errors.items():
            nc = await connect_as(broker.url, users[user], refusals)
            try:
                leases = VipLeases(nc, pools)
                if user == "ike":
                    await leases.open()
                    granted = await leases.lease(_call("a.example", 1))
                    assert granted.addresses
                    listed = [r[0] for r in await leases.leases(pools["rw"])]
                    assert listed == [granted.addresses[0][1]]
                    await leases.release(VipRelease(1, granted.addresses))
                else:
                    with pytest.raises(Exception):  # noqa: B017 - refused by the broker
                        await asyncio.wait_for(leases.open(), 5)
                        await asyncio.wait_for(leases.lease(_call("b.example", 2)), 5)
            finally:
                await nc.close()
    assert errors["ike"] == []
    assert any("permissions violation" in e.lower() for e in errors["ingress"]), errors


async def test_an_adopting_worker_keeps_the_adopted_sas_addresses_from_reclaim(
    nats_server: EmbeddedNats,
) -> None:
    """The worker that continues a dead worker's SAs rewrites their leases to its own life
    (docs/vip-pools.md): when the dead worker's holder record is gone, a new allocation
    reclaims only the addresses no adopted SA holds."""
    pools = _pools("10.9.0.1-10.9.0.2")
    nc1, dead = await _worker(nats_server.url, pools)
    nc2, adopter = await _worker(nats_server.url, pools)
    try:
        first = (await dead.lease(_call("kept.example", 1))).addresses
        second = (await dead.lease(_call("gone.example", 2))).addresses
        # the SA of owner 1 was restored by the adopter; owner 2's had no record
        assert await adopter.adopt(1, first) == 1
        assert await adopter.adopt(1, first) == 0  # already its own: nothing to rewrite
        assert await adopter.adopt(99, second) == 0  # another SA's lease: left alone
        assert adopter.counters["vip.adopted"] == 1 and adopter.counters["vip.adopt_taken"] == 1
        holders = await nc2.jetstream().key_value(subjects.VIP_HOLDER_BUCKET)
        await holders.delete(holder_key(dead.token))  # the dead worker's record expired
        taken = await adopter.lease(_call("new.example", 10))
        assert taken.addresses == second  # the orphaned address, never the adopted one
        rows = {address: live for address, _r, live in await adopter.leases(pools["rw"])}
        assert rows == {first[0][1]: True, second[0][1]: True}
    finally:
        await nc1.close()
        await nc2.close()
