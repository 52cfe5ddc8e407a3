"""EAP via RADIUS (RFC 7296 2.16, RFC 3579; docs/radius.md) with real parts: a strongSwan
road warrior authenticates with EAP through `ikefarm up` to a FreeRADIUS the test runs in
the gateway's namespace, with a users file and a client it writes.

- eap-md5 (no MSK: the last AUTHs use SK_pi/SK_pr): IKE and CHILD SAs are established; the
  EAP identity (`eap_id`) differs from the IKE identity, so the identity round is used;
- a wrong password: AUTHENTICATION_FAILED at the peer, "Login incorrect" in the server's log;
- an unreachable first server: the second one answers (failover);
- `vip-pool = ["radius"]`: the Framed-IP-Address and DNS of the Access-Accept are the
  peer's VIP and CFG_REPLY;
- eap-tls: the MSK (MS-MPPE keys) keys both last AUTHs, computed in the keystore;
- accounting: Start, Interim-Update and Stop (with the cause) in FreeRADIUS' detail file,
  one session id, the user and the assigned address; with the userspace dataplane, the
  counters of pings through the tunnel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.freeradius import FreeRadius
from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import DEFAULT_PLUGINS, Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PSK = "eap-gw-psk-5b2e91c0d7a4f318"
RADIUS_SECRET = "radius-secret-0c4f9e2a7b61d835"
PASSWORD = "alice-password-83d1f0b7"
USERS = f'alice Cleartext-Password := "{PASSWORD}"\n'
EAP_PLUGINS = ("eap-identity", "eap-md5", "md5")

SERVER = """
[[ike.radius-server]]
name = "{name}"
address = "127.0.0.1"
auth-port = {port}
secret = "{secret}"
timeout = 1.0
retries = {retries}
"""


def eap_gateway(
    factory: Callable[..., Gateway],
    ns: Namespace,
    servers: list[tuple[str, int, int]],
    extra_vpn: str = "",
    extra: str = "",
    *,
    dynamic_remote: bool = False,
    backend: str = "memory",
) -> Gateway:
    """`ikefarm up` whose VPN authenticates peers by EAP via RADIUS, and itself by PSK."""
    radius = "".join(
        SERVER.format(name=name, port=port, retries=retries, secret=RADIUS_SECRET)
        for name, port, retries in servers
    )
    gateway = factory(ns, start=False, psk=PSK, extra=radius + extra)
    text = gateway.config_path.read_text()
    text = text.replace(
        'ike-policy = { template = "ikepol" }\n',
        'ike-policy = { template = "ikepol", remote-auth-method = "eap-radius" }\n' + extra_vpn,
    )
    if dynamic_remote:  # remote-ts without subnet: the assigned VIP (seed 004, "dynamic-vip")
        text = text.replace('remote-ts = { subnet = "10.200.0.0/16" }\n', "")
    gateway.config_path.write_text(f'[kernel]\nbackend = "{backend}"\n' + text)
    gateway.start()
    return gateway


def road_warrior(name: str = "c", eap_id: str = "alice", **options: object) -> Connection:
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id="alice.peer.example",
        local_eap_id=eap_id,
        remote_id="gw.example",
        local_auth="eap-md5",
        remote_auth="psk",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name=f"{name}-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
        **options,  # type: ignore[arg-type]
    )


def eap_secret(identity: str, password: str) -> str:
    """An EAP secret for swanctl.conf (merged with the harness's `secrets` section)."""
    secret = "0x" + password.encode().hex()
    entry = f"  eap-{identity} {{\n    id = {identity}\n    secret = {secret}\n  }}\n"
    return f"secrets {{\n{entry}}}\n"


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return strongswan_factory(netns_pair.peer, plugins=[*DEFAULT_PLUGINS, *EAP_PLUGINS])


def test_eap_md5_through_freeradius_establishes_ike_and_child(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    peer: StrongSwan,
) -> None:
    server = freeradius_factory(
        netns_pair.gw, users=USERS, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    gateway = eap_gateway(gateway_factory, netns_pair.gw, [("fr", 18120, 1)])
    peer.load(
        [road_warrior()],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", PASSWORD),
    )
    peer.initiate(child="c-net", timeout=30)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    (child,) = sa["child-sas"]
    assert child["state"] == "INSTALLED"
    assert "EAP method EAP_MD5 succeeded, no MSK established" in peer.log_text()

    (row,) = gateway.wait_sas(1)
    assert row["remote_id"] == "alice.peer.example"
    assert row["children"] and row["children"][0]["local_ts"] == ["10.100.0.0/24"]
    assert "Login OK: [alice]" in server.log_text()
    counters = gateway.counters("keystore")
    assert counters.get("eap.accept", 0) == 1 and counters.get("eap.challenge", 0) >= 1
    assert gateway.counters("ike").get("eap.without_msk", 0) == 1


def test_a_wrong_password_ends_in_authentication_failed(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    peer: StrongSwan,
) -> None:
    server = freeradius_factory(
        netns_pair.gw, users=USERS, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    gateway = eap_gateway(gateway_factory, netns_pair.gw, [("fr", 18120, 1)])
    peer.load(
        [road_warrior()],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", "not-the-password"),
    )
    result = peer.initiate(child="c-net", timeout=30, check=False)
    assert result.returncode != 0
    wait_for(
        lambda: "received AUTHENTICATION_FAILED" in peer.log_text(),
        timeout=15,
        what="strongSwan sees AUTHENTICATION_FAILED",
    )
    assert peer.list_sas() == []
    assert "Login incorrect: [alice]" in server.log_text()
    wait_for(
        lambda: gateway.counters("ike").get("auth_failed.access_reject", 0) == 1,
        timeout=10,
        what="the reject counted",
    )
    assert gateway.show() == []


def test_an_unreachable_first_server_fails_over_to_the_second(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    peer: StrongSwan,
) -> None:
    freeradius_factory(
        netns_pair.gw, users=USERS, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    # nothing listens on 18110: the first server never answers
    gateway = eap_gateway(gateway_factory, netns_pair.gw, [("down", 18110, 0), ("fr", 18120, 1)])
    peer.load(
        [road_warrior()],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", PASSWORD),
    )
    peer.initiate(child="c-net", timeout=40)
    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    counters = gateway.counters("keystore")
    assert counters.get("radius.auth.failover", 0) >= 1
    assert counters.get("radius.auth.server_timeout", 0) >= 1


def test_vip_pool_radius_gives_the_framed_address_and_dns_of_the_accept(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    users = USERS.rstrip("\n") + (
        "\n    Framed-IP-Address = 10.9.0.42,\n    MS-Primary-DNS-Server = 10.100.0.53\n"
    )
    freeradius_factory(
        netns_pair.gw, users=users, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    gateway = eap_gateway(
        gateway_factory,
        netns_pair.gw,
        [("fr", 18120, 1)],
        extra_vpn='vip-pool = ["radius"]\n',
        dynamic_remote=True,
    )
    peer = strongswan_factory(
        netns_pair.peer, plugins=[*DEFAULT_PLUGINS, *EAP_PLUGINS], install_virtual_ip=True
    )
    connection = road_warrior(options={"vips": "0.0.0.0"})
    connection.children[0].local_ts = None
    peer.load(
        [connection],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", PASSWORD),
    )
    peer.initiate(child="c-net", timeout=30)
    (sa,) = peer.list_sas()
    assert sa["local-vips"] == ["10.9.0.42"], sa
    (child,) = sa["child-sas"]
    assert child["local-ts"] == ["10.9.0.42/32"]
    assert "processing INTERNAL_IP4_DNS attribute" in peer.log_text()

    (row,) = gateway.wait_sas(1)
    assert row["remote_vips"] == ["10.9.0.42"]
    assert row["children"][0]["remote_ts"] == ["10.9.0.42/32"]
    peer.terminate(ike="c", timeout=15)
    wait_for(lambda: gateway.show() == [], timeout=15, what="the SA gone")
    assert gateway.counters("ike").get("vip.released", 0) == 0  # nothing leased in a store


def test_eap_tls_makes_an_msk_that_keys_the_last_auths(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    from tests.harness.freeradius import TlsFiles
    from tests.pki import Pki

    pki = Pki(tmp_path / "pki", "rsa")
    radius_cert = pki.issue("radius", dns="gw.example")  # strongSwan's default aaa_id
    client = pki.issue("alice", dns="alice.peer.example")
    freeradius_factory(
        netns_pair.gw,
        users="",
        secret=RADIUS_SECRET,
        auth_port=18120,
        acct_port=18130,
        tls=TlsFiles(pki.ca_path, radius_cert.cert_path, radius_cert.key_path),
        default_eap="tls",
    )
    gateway = eap_gateway(gateway_factory, netns_pair.gw, [("fr", 18120, 1)])
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    peer = strongswan_factory(
        netns_pair.peer, plugins=[*DEFAULT_PLUGINS, "eap-identity", "eap-tls"]
    )
    connection = road_warrior(eap_id="alice.peer.example")
    connection.local_auth = "eap-tls"
    connection.local_certs = [client.cert_path]
    peer.load(
        [connection],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        private_keys=[client.key_path],
        cacerts=[pki.ca_path],
    )
    peer.initiate(child="c-net", timeout=40)
    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    assert "EAP method EAP_TLS succeeded, MSK established" in peer.log_text()
    gateway.wait_sas(1)
    assert gateway.counters("keystore").get("eap_auth.verified", 0) == 1
    assert gateway.counters("ike").get("eap.without_msk", 0) == 0


def test_accounting_start_interim_and_stop_reach_the_detail_file(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    users = USERS.rstrip("\n") + "\n    Framed-IP-Address = 10.9.0.42\n"
    server = freeradius_factory(
        netns_pair.gw, users=users, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    radius = SERVER.format(name="fr", port=18120, retries=1, secret=RADIUS_SECRET)
    radius += "acct-port = 18130\n\n[ike.radius]\naccounting = true\ninterim-interval = 2\n"
    gateway = eap_gateway(
        gateway_factory,
        netns_pair.gw,
        [],
        extra_vpn='vip-pool = ["radius"]\n',
        extra=radius,
        dynamic_remote=True,
    )
    peer = strongswan_factory(
        netns_pair.peer, plugins=[*DEFAULT_PLUGINS, *EAP_PLUGINS], install_virtual_ip=True
    )
    connection = road_warrior(options={"vips": "0.0.0.0"})
    connection.children[0].local_ts = None
    peer.load(
        [connection],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", PASSWORD),
    )
    peer.initiate(child="c-net", timeout=30)
    (row,) = gateway.wait_sas(1)
    session = f"{row['spi_i']}-{row['spi_r']}"

    def statuses() -> list[str]:
        return [r.get("Acct-Status-Type", "") for r in server.detail_records()]

    wait_for(lambda: "Interim-Update" in statuses(), timeout=20, what="an Interim-Update")
    peer.terminate(ike="c", timeout=15)
    wait_for(lambda: "Stop" in statuses(), timeout=20, what="the Stop record")
    records = server.detail_records()
    start = next(r for r in records if r["Acct-Status-Type"] == "Start")
    stop = next(r for r in records if r["Acct-Status-Type"] == "Stop")
    assert statuses().index("Start") < statuses().index("Interim-Update") < statuses().index("Stop")
    for record in records:
        assert record["Acct-Session-Id"] == session
        assert record["User-Name"] == "alice"
        assert record["Framed-IP-Address"] == "10.9.0.42"
        assert record["NAS-Identifier"] == "ikefarm"
    assert "Acct-Input-Octets" in stop and "Acct-Session-Time" in stop
    assert "Acct-Input-Octets" not in start
    assert stop["Acct-Terminate-Cause"] == "User-Request"


def test_interim_and_stop_carry_the_userspace_dataplane_counters(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    freeradius_factory: Callable[..., FreeRadius],
    peer: StrongSwan,
) -> None:
    """Pings through the userspace ESP dataplane: the kernel service's counters reach the
    Interim-Update and Stop records (docs/kernel-counters.md, docs/radius.md)."""
    server = freeradius_factory(
        netns_pair.gw, users=USERS, secret=RADIUS_SECRET, auth_port=18120, acct_port=18130
    )
    radius = SERVER.format(name="fr", port=18120, retries=1, secret=RADIUS_SECRET)
    radius += "acct-port = 18130\n\n[ike.radius]\naccounting = true\ninterim-interval = 2\n"
    netns_pair.gw.add_address("lo", "10.100.0.1/32")
    gateway = eap_gateway(gateway_factory, netns_pair.gw, [], extra=radius, backend="userspace")
    peer.load(
        [road_warrior()],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        extra=eap_secret("alice", PASSWORD),
    )
    peer.initiate(child="c-net", timeout=30)
    gateway.wait_sas(1)
    pings = 5
    assert netns_pair.peer.ping("10.100.0.1", src="10.200.0.1", count=pings, timeout=15)

    def interim_with_packets() -> dict[str, str] | None:
        for record in server.detail_records():
            if record.get("Acct-Status-Type") == "Interim-Update" and (
                int(record.get("Acct-Input-Packets", "0")) >= pings
            ):
                return record
        return None

    interim = wait_for(interim_with_packets, timeout=20, what="an Interim-Update with the pings")
    assert int(interim["Acct-Output-Packets"]) >= pings
    assert int(interim["Acct-Input-Octets"]) >= 84 * pings  # ICMP echo in IPv4
    peer.terminate(ike="c", timeout=15)

    def stop() -> dict[str, str] | None:
        records = server.detail_records()
        return next((r for r in records if r.get("Acct-Status-Type") == "Stop"), None)

    record = wait_for(stop, timeout=20, what="the Stop record")
    assert int(record["Acct-Input-Packets"]) >= pings
