"""Virtual IPs with real strongSwan (RFC 7296 2.19, 3.15; docs/vip-pools.md).

- a strongSwan road warrior (`vips = 0.0.0.0`) against `ikefarm up`: it gets an address of
  the pool and the DNS server, its child's TS is narrowed to that address, `ikefarm show
  vip-pool` lists the lease; after a terminate the lease is released and the same identity
  gets the same address again; a second identity finds the one-address pool exhausted
  (INTERNAL_ADDRESS_FAILURE).
- ikefarm with `vip-request` against a strongSwan responder with a pool: the address and DNS
  server are recorded and shown.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway, farm_config
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PSK = "vip-psk-7d1c0e93a5b64f28"
POOL = """
[[ike.pool]]
name = "rw-pool"
address = ["10.9.0.7"]
dns = ["10.100.0.53"]
"""


def road_warrior(identity: str, name: str) -> Connection:
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=identity,
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(name=f"{name}-net", remote_ts="10.100.0.0/24", esp_proposals="aes256gcm16")
        ],
        options={"vips": "0.0.0.0"},
    )


def vip_gateway(
    factory: Callable[..., Gateway], ns: Namespace, addresses: str = '["10.9.0.7"]'
) -> Gateway:
    """`ikefarm up` with two workers, the pool, and remote-ts without subnet (the VIP)."""
    pool = POOL.replace('["10.9.0.7"]', addresses)
    gateway = factory(ns, start=False, psk=PSK, workers=2, extra=pool)
    text = gateway.config_path.read_text()
    # remote-ts without subnet: the assigned VIP (seed 004, "dynamic-vip")
    text = text.replace('remote-ts = { subnet = "10.200.0.0/16" }\n', "")
    text = text.replace(
        'ipsec-policy = { template = "ipsecpol" }\n',
        'ipsec-policy = { template = "ipsecpol" }\nvip-pool = ["rw-pool"]\n',
    )
    gateway.config_path.write_text('[kernel]\nbackend = "memory"\n' + text)
    gateway.start()
    return gateway


def test_strongswan_road_warrior_gets_a_pool_address_and_a_narrowed_child(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    gateway = vip_gateway(gateway_factory, netns_pair.gw)
    # the VIP must be on an interface for kernel-libipsec's route (tests/harness/strongswan.py)
    peer = strongswan_factory(netns_pair.peer, install_virtual_ip=True)
    peer.load(
        [road_warrior("a.peer.example", "a"), road_warrior("b.peer.example", "b")],
        psks=[Psk(PSK, ["a.peer.example", "b.peer.example", "gw.example"])],
    )
    peer.initiate(child="a-net", timeout=20)
    (sa,) = peer.list_sas()
    assert sa["local-vips"] == ["10.9.0.7"], sa
    (child,) = sa["child-sas"]
    assert child["local-ts"] == ["10.9.0.7/32"] and child["remote-ts"] == ["10.100.0.0/24"]
    assert "processing INTERNAL_IP4_DNS attribute" in peer.log_text()  # the pool's dns

    (row,) = gateway.wait_sas(1)
    assert row["remote_vips"] == ["10.9.0.7"]
    (ours,) = row["children"]
    assert ours["remote_ts"] == ["10.9.0.7/32"] and ours["local_ts"] == ["10.100.0.0/24"]
    assert "remote vip 10.9.0.7" in gateway.show_text("details")
    shown = gateway.run_cli("show", "vip-pool")
    assert shown.returncode == 0, shown.stderr
    assert "rw-pool" in shown.stdout and "a.peer.example" in shown.stdout
    lines = shown.stdout.splitlines()
    assert lines[1].split() == ["rw-pool", "1", "1", "0"], shown.stdout

    # the pool of one address is exhausted for another identity
    peer.initiate(child="b-net", timeout=20, check=False)
    wait_for(
        lambda: "INTERNAL_ADDRESS_FAILURE" in peer.log_text(),
        timeout=15,
        what="strongSwan sees INTERNAL_ADDRESS_FAILURE",
    )
    wait_for(
        lambda: gateway.counters("ike").get("vip.pool_exhausted", 0) >= 1,
        timeout=10,
        what="the exhaustion counted",
    )

    # terminate: the lease is released; the same identity gets the same address again
    peer.terminate(ike="a", timeout=15)
    wait_for(
        lambda: (
            gateway.run_cli("show", "vip-pool", "rw-pool").stdout.splitlines()[1].split()
            == ["rw-pool", "1", "0", "1"]
        ),
        timeout=15,
        what="the lease released",
    )
    peer.initiate(child="a-net", timeout=20)
    again = [s for s in peer.list_sas() if s.get("local-vips")]
    assert again and again[0]["local-vips"] == ["10.9.0.7"]


def test_ikefarm_with_vip_request_gets_the_address_of_a_strongswan_pool(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    peer = strongswan_factory(netns_pair.peer)
    responder = Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id="peer.example",
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[Child(name="net", local_ts="10.200.0.0/24", esp_proposals="aes256gcm16")],
        options={"pools": "p4"},
    )
    pools = "pools {\n  p4 {\n    addrs = 10.77.0.10/32\n    dns = 10.200.0.53\n  }\n}\n"
    peer.load([responder], psks=[Psk(PSK, ["peer.example", "gw.example"])], extra=pools)
    vpn = (
        "[[ike.vpn]]\n"
        'name = "hq"\nlocal-address = "192.0.2.1"\nremote-address = "192.0.2.2"\n'
        'local-id = "gw.example"\nremote-id = "peer.example"\n'
        'ike-policy = { template = "ikepol" }\nipsec-policy = { template = "ipsecpol" }\n'
        'vip-request = ["0.0.0.0"]\n'
        '[[ike.vpn.security-policy]]\nname = "net"\nremote-ts = { subnet = "10.200.0.0/24" }\n'
    )
    # the userspace backend (this kernel has no ESP states) puts VIPs on host interfaces;
    # the memory test double would only record them
    text = farm_config(
        tmp_path,
        psks=[("gw.example", "peer.example", PSK)],
        vpns=[vpn],
        kernel_backend="userspace",
    )
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = gateway.show()
    assert row["local_vips"] == ["10.77.0.10"] and row["dns"] == ["10.200.0.53"]
    (child,) = row["children"]
    assert child["local_ts"] == ["10.77.0.10/32"] and child["remote_ts"] == ["10.200.0.0/24"]
    (sa,) = peer.list_sas()
    assert sa["remote-vips"] == ["10.77.0.10"]
    details = gateway.show_text("details")
    assert "local  vip 10.77.0.10" in details and "dns 10.200.0.53" in details
    # installed on the interface of our IKE address (install-vip-on unset), removed on flush
    wait_for(
        lambda: any(a == "10.77.0.10/32" for a in netns_pair.gw.addresses()),
        timeout=10,
        what="the VIP on an interface of the gw namespace",
    )
    ike_address_line = [
        line
        for line in netns_pair.gw.run(["ip", "-o", "addr", "show"]).stdout.splitlines()
        if "10.77.0.10/32" in line
    ]
    assert ike_address_line and ike_address_line[0].split()[1] in {
        line.split()[1]
        for line in netns_pair.gw.run(["ip", "-o", "addr", "show"]).stdout.splitlines()
        if " 192.0.2.1/" in line
    }
    flushed = gateway.run_cli("flush", "ike-sa", "vpn", "hq")
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    wait_for(
        lambda: not any(a == "10.77.0.10/32" for a in netns_pair.gw.addresses()),
        timeout=10,
        what="the VIP removed with its IKE SA",
    )


def test_ten_road_warriors_on_two_workers_get_ten_distinct_addresses(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    gateway = vip_gateway(
        gateway_factory, netns_pair.gw, '["10.9.1.1-10.9.1.10", "2001:db8:9::/120"]'
    )
    peer = strongswan_factory(netns_pair.peer, install_virtual_ip=True)
    clients = []
    for n in range(10):
        conn = road_warrior(f"c{n}.peer.example", f"c{n}")
        # one remote host each, so each client's route (table 220) is its own
        conn.children[0].remote_ts = f"10.100.0.{n + 1}/32"  # type: ignore[misc]
        conn.options = {"vips": "0.0.0.0, ::"}  # type: ignore[misc]
        clients.append(conn)
    peer.load(clients, psks=[Psk(PSK, [*(f"c{n}.peer.example" for n in range(10)), "gw.example"])])
    for n in range(10):
        peer.initiate(child=f"c{n}-net", timeout=20)
    sas = peer.list_sas()
    assert len(sas) == 10
    v4 = [next(v for v in sa["local-vips"] if "." in v) for sa in sas]
    v6 = [next(v for v in sa["local-vips"] if ":" in v) for sa in sas]
    assert len(set(v4)) == 10 and all(v.startswith("10.9.1.") for v in v4)
    assert len(set(v6)) == 10 and all(v.startswith("2001:db8:9::") for v in v6)
    rows = gateway.wait_sas(10)
    assert {row["remote_vips"][0] for row in rows} == set(v4)
    shown = gateway.run_cli("show", "vip-pool", "rw-pool")
    assert shown.stdout.splitlines()[1].split() == ["rw-pool", "265", "20", "245"], shown.stdout


def test_a_killed_workers_sa_keeps_its_address_in_the_worker_that_restores_it(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    """kill -9 of the worker holding the only address of the pool: the restarted worker
    restores the SA (docs/failover.md) and rewrites its lease to its own life, so once the
    dead life's liveness record is gone (HOLDER_TTL) the lease is still online and nothing
    reclaims the address in use. (Reclaiming leases of SAs that are really gone:
    tests/service/test_vip_leases.py.)"""
    gateway = vip_gateway(gateway_factory, netns_pair.gw)
    peer = strongswan_factory(netns_pair.peer, install_virtual_ip=True)
    peer.load(
        [road_warrior("a.peer.example", "a"), road_warrior("b.peer.example", "b")],
        psks=[Psk(PSK, ["a.peer.example", "b.peer.example", "gw.example"])],
    )
    peer.initiate(child="a-net", timeout=20)
    (row,) = gateway.wait_sas(1)
    (before,) = peer.list_sas(ike="a")
    owner = f"ike-{row['unique_id'] // 10**9}"  # the shard is the high part of a unique id
    wait_for(
        lambda: any(
            r.get("gauges", {}).get("snapshots", {}).get("stored", 0)
            for r in gateway.status().get("ike", [])
        ),
        timeout=10,
        what="the SA snapshotted",
    )
    pid = gateway.service_pids()[owner]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: gateway.counters("ike").get("vip.adopted", 0) >= 1,
        timeout=30,
        what="the restarted worker took the restored SA's lease",
    )
    time.sleep(12)  # past the killed life's holder record (HOLDER_TTL 10 s)
    shown = gateway.run_cli("show", "vip-pool", "rw-pool").stdout.splitlines()
    assert shown[1].split() == ["rw-pool", "1", "1", "0"], shown
    assert "a.peer.example" in shown[3] and shown[3].split()[-1] == "online", shown
    (after,) = peer.list_sas(ike="a")
    assert after["local-vips"] == before["local-vips"] == ["10.9.0.7"]
    assert (after["initiator-spi"], after["responder-spi"]) == (
        before["initiator-spi"],
        before["responder-spi"],
    )
    assert not gateway.counters("ike").get("vip.lease_reclaimed", 0)
