"""The interop harness proves itself with real peers on both ends (no ikefarm yet).

Each test closes its namespaces itself at the end and asserts nothing is left
behind: no namespace, no daemon, no socket dir.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import netns, prerequisites
from tests.harness.libreswan import (
    Libreswan,
    LibreswanConn,
    LibreswanPpk,
    LibreswanPsk,
    parse_showstates,
)
from tests.harness.netns import Namespace, NetnsPair
from tests.harness.strongswan import (
    Child,
    Connection,
    Ppk,
    Psk,
    StrongSwan,
    parse_list_sas,
    swanctl_conf,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

PSK = "interop-selftest-psk-0123456789abcdef"
PPK_ID = "ppk-selftest"
PPK = "post-quantum-preshared-key-0123456789"
GW_INNER, PEER_INNER = "198.51.100.1", "198.51.100.2"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_left(names: list[str], pids: list[int], dirs: list[Path]) -> None:
    present = set(netns.list_namespaces())
    assert not present & set(names), f"namespaces left behind: {present & set(names)}"
    alive = [p for p in pids if _pid_alive(p)]
    assert not alive, f"processes left behind: {alive}"
    left = [d for d in dirs if d.exists()]
    assert not left, f"runtime dirs left behind: {left}"


# --------------------------------------------------------------------------
# strongSwan <-> strongSwan: PSK, x25519, AES-GCM, and a ping through libipsec
# --------------------------------------------------------------------------


def _psk_conn(
    local: str, remote: str, local_id: str, remote_id: str, lts: str, rts: str
) -> Connection:
    return Connection(
        name="c",
        local_addrs=local,
        remote_addrs=remote,
        local_id=local_id,
        remote_id=remote_id,
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name="net",
                local_ts=f"{lts}/32",
                remote_ts=f"{rts}/32",
                esp_proposals="aes256gcm16-x25519",
            )
        ],
    )


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_strongswan_pair_psk_tunnel(
    netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan], family: str
) -> None:
    pair = netns_pair
    gw_addr = pair.gw_v4 if family == "ipv4" else pair.gw_v6
    peer_addr = pair.peer_v4 if family == "ipv4" else pair.peer_v6
    # kernel-libipsec routes the remote TS into its TUN device with a source
    # address from the local TS, so each side owns its inner address.
    pair.gw.add_address("lo", f"{GW_INNER}/32")
    pair.peer.add_address("lo", f"{PEER_INNER}/32")

    gw = strongswan_factory(pair.gw, "gw")
    peer = strongswan_factory(pair.peer, "peer")
    gw.load(
        [_psk_conn(gw_addr, peer_addr, "gw.example", "peer.example", GW_INNER, PEER_INNER)],
        psks=[Psk(PSK, ["gw.example", "peer.example"])],
    )
    peer.load(
        [_psk_conn(peer_addr, gw_addr, "peer.example", "gw.example", PEER_INNER, GW_INNER)],
        psks=[Psk(PSK, ["gw.example", "peer.example"])],
    )
    assert set(gw.list_conns()) == {"c"}

    out = peer.initiate(child="net", timeout=10)
    assert "initiate completed successfully" in out.stdout
    assert PSK not in out.stdout + gw.log_text() + peer.log_text()

    (i_sa,) = peer.list_sas()
    r_sa = gw.wait_ike_sa("c")
    for sa in (i_sa, r_sa):
        assert sa["state"] == "ESTABLISHED"
        assert sa["version"] == "2"
        assert sa["encr-alg"] == "AES_GCM_16"
        assert sa["encr-keysize"] == "256"
        assert sa["prf-alg"] == "PRF_HMAC_SHA2_384"
        assert sa["dh-group"] == "CURVE_25519"
        assert "integ-alg" not in sa  # AEAD
        assert "ppk" not in sa
    assert i_sa["initiator"] == "yes"
    assert "initiator" not in r_sa
    assert (i_sa["initiator-spi"], i_sa["responder-spi"]) == (
        r_sa["initiator-spi"],
        r_sa["responder-spi"],
    )
    assert i_sa["local-host"] == r_sa["remote-host"] == peer_addr
    assert i_sa["remote-host"] == r_sa["local-host"] == gw_addr
    assert (i_sa["local-id"], i_sa["remote-id"]) == ("peer.example", "gw.example")
    assert (r_sa["local-id"], r_sa["remote-id"]) == ("gw.example", "peer.example")

    (i_child,) = i_sa["child-sas"]
    r_child = gw.wait_child_sa("net")
    for child in (i_child, r_child):
        assert child["name"] == "net"
        assert child["state"] == "INSTALLED"
        assert child["protocol"] == "ESP"
        assert child["mode"] == "TUNNEL"
        assert child["encap"] == "yes"  # kernel-libipsec always UDP-encapsulates
        assert child["encr-alg"] == "AES_GCM_16"
        assert child["encr-keysize"] == "256"
    assert i_child["spi-in"] == r_child["spi-out"]
    assert i_child["spi-out"] == r_child["spi-in"]
    assert i_child["local-ts"] == r_child["remote-ts"] == [f"{PEER_INNER}/32"]
    assert i_child["remote-ts"] == r_child["local-ts"] == [f"{GW_INNER}/32"]

    # Userspace ESP over TUN: a ping between the inner addresses crosses the tunnel.
    assert pair.peer.ping(GW_INNER, src=PEER_INNER, count=2, timeout=5)
    (i_child,) = peer.list_sas()[0]["child-sas"]
    r_child = gw.wait_child_sa("net")
    assert int(i_child["packets-out"]) >= 2 and int(i_child["packets-in"]) >= 2
    assert int(r_child["packets-out"]) >= 2 and int(r_child["packets-in"]) >= 2

    # rekey: new SPIs on both sides, the tunnel still carries traffic.
    old_spis = {i_child["spi-in"], i_child["spi-out"]}
    peer.rekey(child="net")
    new = netns.wait_for(
        lambda: [
            c
            for c in peer.list_sas()[0]["child-sas"]
            if c["state"] == "INSTALLED" and c["spi-in"] not in old_spis
        ],
        timeout=10,
        what="rekeyed CHILD SA",
    )
    assert new[0]["name"] == "net"
    assert pair.peer.ping(GW_INNER, src=PEER_INNER, count=1, timeout=5)

    # pause()/resume() stop and continue charon.
    gw.pause()
    assert netns.process_state(gw.pid) == "T"
    gw.resume()
    assert netns.process_state(gw.pid) != "T"

    # terminate: the IKE SA goes away on both sides.
    peer.terminate(ike="c", timeout=10)
    assert peer.list_sas() == []
    netns.wait_for(lambda: gw.list_sas() == [], timeout=10, what="responder IKE SA gone")

    pids = [gw.pid, peer.pid, *pair.gw.pids(), *pair.peer.pids()]
    dirs = [gw.rundir, peer.rundir]
    names = pair.names
    gw.stop()
    peer.stop()
    pair.close()
    assert_nothing_left(names, pids, dirs)


# --------------------------------------------------------------------------
# libreswan -> strongSwan with PPK (RFC 8784)
# --------------------------------------------------------------------------


def test_libreswan_initiates_to_strongswan_with_ppk(
    netns_pair: NetnsPair,
    strongswan_factory: Callable[..., StrongSwan],
    libreswan_factory: Callable[..., Libreswan],
) -> None:
    pair = netns_pair
    pair.gw.add_address("lo", f"{GW_INNER}/32")  # strongSwan installs its CHILD SA (libipsec)
    gw = strongswan_factory(pair.gw, "gw")
    gw.load(
        [
            Connection(
                name="c",
                local_addrs=pair.gw_v4,
                remote_addrs=pair.peer_v4,
                local_id="gw.example",
                remote_id="peer.example",
                proposals="aes256gcm16-prfsha384-x25519",
                ppk_id=PPK_ID,
                ppk_required=True,
                children=[
                    Child(
                        local_ts=f"{GW_INNER}/32",
                        remote_ts=f"{PEER_INNER}/32",
                        esp_proposals="aes256gcm16",
                    )
                ],
            )
        ],
        psks=[Psk(PSK, ["gw.example", "peer.example"])],
        ppks=[Ppk(PPK_ID, PPK)],
    )
    lsw = libreswan_factory(pair.peer, "peer")
    lsw.load(
        [
            LibreswanConn(
                name="c",
                left=pair.peer_v4,
                right=pair.gw_v4,
                leftid="peer.example",
                rightid="gw.example",
                leftsubnet=f"{PEER_INNER}/32",
                rightsubnet=f"{GW_INNER}/32",
                ike="aes_gcm256-sha2_384-dh31",
                esp="aes_gcm256",
                ppk="insist",
            )
        ],
        [
            LibreswanPsk(PSK, ["peer.example", "gw.example"]),
            LibreswanPpk(PPK_ID, PPK, ["peer.example", "gw.example"]),
        ],
    )

    out = lsw.initiate("c", timeout=15)
    assert "initiator established IKE SA" in out.stdout
    assert lsw.ike_sa_established("c")
    lsw_log = "\n".join(lsw.log_lines())
    assert "PPK AUTH calculated as initiator" in lsw_log
    # No ESP in this kernel: libreswan's CHILD SA fails and it drops the IKE SA.
    assert not lsw.ike_sa_up("c")

    sa = gw.wait_ike_sa("c")
    assert sa["ppk"] == "yes"
    assert sa["remote-id"] == "peer.example"
    assert sa["remote-host"] == pair.peer_v4
    assert sa["dh-group"] == "CURVE_25519"
    assert sa["prf-alg"] == "PRF_HMAC_SHA2_384"
    assert f"using PPK for PPK_ID '{PPK_ID}'" in gw.log_text()
    for secret in (PSK, PPK):
        assert secret not in out.stdout + gw.log_text()

    pids = [gw.pid, lsw.pid, *pair.gw.pids(), *pair.peer.pids()]
    dirs = [gw.rundir, lsw.rundir]
    names = pair.names
    pair.close()  # kills both daemons with the namespaces
    gw.stop()
    lsw.stop()
    assert_nothing_left(names, pids, dirs)


def test_strongswan_initiates_to_libreswan(
    netns_pair: NetnsPair,
    strongswan_factory: Callable[..., StrongSwan],
    libreswan_factory: Callable[..., Libreswan],
) -> None:
    """libreswan as responder: its log says `"c"[1] <ip> #1: responder established IKE SA`."""
    pair = netns_pair
    lsw = libreswan_factory(pair.gw, "gw")
    lsw.load(
        [
            LibreswanConn(
                name="c",
                left=pair.gw_v6,
                right="%any",
                leftid="gw.example",
                rightid="peer.example",
                ike="aes256-sha2_256-dh19",
                esp="aes256-sha2_256",
            )
        ],
        [LibreswanPsk(PSK, ["gw.example", "peer.example"])],
    )
    peer = strongswan_factory(pair.peer, "peer")
    peer.load(
        [
            Connection(
                local_addrs=pair.peer_v6,
                remote_addrs=pair.gw_v6,
                local_id="peer.example",
                remote_id="gw.example",
                proposals="aes256-sha256-ecp256",
                children=[Child(esp_proposals="aes256-sha256")],
            )
        ],
        psks=[Psk(PSK, ["gw.example", "peer.example"])],
    )
    peer.initiate(child="net", timeout=10, check=False)  # the child fails on libreswan's side
    lsw.wait_ike_sa_established("c", timeout=10)
    assert any("responder established IKE SA" in ln for ln in lsw.log_lines())
    pids = [lsw.pid, peer.pid]
    names = pair.names
    lsw.stop()
    peer.stop()
    pair.close()
    assert_nothing_left(names, pids, [lsw.rundir, peer.rundir])


# --------------------------------------------------------------------------
# certificate auth slots (pubkey), with certificates made on the fly
# --------------------------------------------------------------------------


def _make_pki(d: Path) -> dict[str, Path]:
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("ikefarm test CA"))
        .issuer_name(name("ikefarm test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("gw", "peer"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"{who}.example"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"{who}.example")]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{who}_cert"] = d / f"{who}.pem"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = d / f"{who}-key.pem"
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


def test_strongswan_pair_cert_auth(
    netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan], tmp_path: Path
) -> None:
    pair = netns_pair
    pki = _make_pki(tmp_path)
    pair.gw.add_address("lo", f"{GW_INNER}/32")
    pair.peer.add_address("lo", f"{PEER_INNER}/32")
    gw = strongswan_factory(pair.gw, "gw")
    peer = strongswan_factory(pair.peer, "peer")
    for ss, me, other, my_addr, other_addr, lts, rts in (
        (gw, "gw", "peer", pair.gw_v4, pair.peer_v4, GW_INNER, PEER_INNER),
        (peer, "peer", "gw", pair.peer_v4, pair.gw_v4, PEER_INNER, GW_INNER),
    ):
        ss.load(
            [
                Connection(
                    local_addrs=my_addr,
                    remote_addrs=other_addr,
                    local_id=f"{me}.example",
                    remote_id=f"{other}.example",
                    local_auth="pubkey",
                    remote_auth="pubkey",
                    local_certs=[pki[f"{me}_cert"]],
                    remote_cacerts=[pki["ca"]],
                    proposals="aes128gcm16-prfsha256-ecp256",
                    children=[
                        Child(
                            local_ts=f"{lts}/32",
                            remote_ts=f"{rts}/32",
                            esp_proposals="aes128gcm16",
                        )
                    ],
                )
            ],
            private_keys=[pki[f"{me}_key"]],
        )
    peer.initiate(child="net", timeout=10)
    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    assert sa["remote-id"] == "gw.example"
    assert sa["dh-group"] == "ECP_256"
    assert sa["child-sas"][0]["state"] == "INSTALLED"
    assert "authentication of 'gw.example' with ECDSA_WITH_SHA256_DER successful" in (
        peer.log_text()
    )
    pids = [gw.pid, peer.pid]
    names = pair.names
    gw.stop()
    peer.stop()
    pair.close()
    assert_nothing_left(names, pids, [gw.rundir, peer.rundir])


# --------------------------------------------------------------------------
# the plumbing on its own
# --------------------------------------------------------------------------


def test_namespace_cleanup_when_the_test_body_fails() -> None:
    if os.geteuid() != 0:
        prerequisites.missing("needs root: creates network namespaces")
    procs: list[subprocess.Popen[bytes]] = []
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Namespace("a") as a, Namespace("b") as b:
        names += [a.name, b.name]
        assert len(a.name) <= 15
        netns.link(a, b, "198.51.100.1/24", "198.51.100.2/24")
        procs.append(b.popen(["sleep", "60"]))
        b.popen(["sh", "-c", "sleep 60 & sleep 60"])  # a grandchild too
        assert a.ping("198.51.100.2")
        raise RuntimeError("boom")
    assert_nothing_left(names, [p.pid for p in procs], [])


def test_wait_udp_port_and_stale_namespace_reaping() -> None:
    if os.geteuid() != 0:
        prerequisites.missing("needs root: creates network namespaces")
    with Namespace("u") as ns:
        ns.popen(
            [
                "python3",
                "-c",
                "import socket,time; s=socket.socket(2,2); s.bind(('',4501)); time.sleep(60)",
            ]
        )
        ns.wait_udp_port(4501, timeout=10)
        with pytest.raises(TimeoutError):
            ns.wait_udp_port(4502, timeout=0.3)

    # A namespace named for a process that no longer exists is reaped.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}m-{netns._b36(dead.pid)}-zz"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in netns.reap_stale()
        assert stale not in netns.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], check=False, capture_output=True)


def test_raw_output_parsers() -> None:
    raw = (
        "list-sa event {c {uniqueid=3 version=2 state=ESTABLISHED local-host=192.0.2.1 "
        "local-id=C=CH, O=ikefarm, CN=gw.example remote-id=peer.example "
        "initiator-spi=c27c2a2fd661cbef responder-spi=8e0715fd2bc85a56 encr-alg=AES_CBC "
        "encr-keysize=128 integ-alg=HMAC_SHA2_256_128 prf-alg=PRF_HMAC_SHA2_256 "
        "dh-group=MODP_2048 ppk=yes child-sas {net-4 {name=net uniqueid=4 state=INSTALLED "
        "protocol=ESP encap=yes spi-in=43740c2e spi-out=f64bcda3 "
        "local-ts=[198.51.100.1/32 2001:db8:1::/48] remote-ts=[]}}}}\n"
        "list-sa event {d {uniqueid=4 state=CONNECTING child-sas {}}}\n"
        "list-sas reply {}\n"
    )
    sas = parse_list_sas(raw)
    assert [sa["name"] for sa in sas] == ["c", "d"]
    c = sas[0]
    assert c["local-id"] == "C=CH, O=ikefarm, CN=gw.example"
    assert c["ppk"] == "yes" and c["integ-alg"] == "HMAC_SHA2_256_128"
    (child,) = c["child-sas"]
    assert child["key"] == "net-4" and child["spi-out"] == "f64bcda3"
    assert child["local-ts"] == ["198.51.100.1/32", "2001:db8:1::/48"]
    assert child["remote-ts"] == []
    assert sas[1]["child-sas"] == []

    states = parse_showstates(
        '000 #1: "c":4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); REKEY in 28033s;\n'
        '000 #2: "c"[1] 192.0.2.2:4500 STATE_V2_ESTABLISHED_CHILD_SA (established Child SA);\n'
    )
    assert [(s["serial"], s["conn"], s["state"]) for s in states] == [
        (1, "c", "STATE_V2_ESTABLISHED_IKE_SA"),
        (2, "c", "STATE_V2_ESTABLISHED_CHILD_SA"),
    ]

    text = swanctl_conf(
        [Connection(ppk_id="p", ppk_required=True, mobike=False, extra_lines=["aggressive = no"])],
        psks=[Psk("s3cret", ["a", "b"])],
        ppks=[Ppk("p", b"\x00\x01")],
    )
    assert "ppk_required = yes" in text and "mobike = no" in text
    assert "aggressive = no" in text
    assert "secret = 0x733363726574" in text and "secret = 0x0001" in text
    assert "s3cret" not in text
