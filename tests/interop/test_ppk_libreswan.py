"""libreswan 4.10 with `ppk=insist` initiates to `ikefarm up`: the IKE SA is made with the PPK.

This kernel has no ESP: libreswan establishes the IKE SA, fails to install its
CHILD SA and drops the IKE SA without a Delete (tests/harness/libreswan.py), so
the interop fact is the IKE SA: libreswan logs it established after computing
its AUTH with the PPK, and ikefarm, which keeps its side, shows it with
`ppk_used` and `/PPK`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway
from tests.harness.libreswan import Libreswan, LibreswanConn, LibreswanPpk, LibreswanPsk
from tests.harness.netns import NetnsPair

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "libreswan-ppk-psk-0d7e4a19c3"
PPK = "0x" + "c3a5e1f70b2d4968" * 4
PPK_ID = "lsw-ppk@ikefarm"


def test_libreswan_insisting_on_ppk_establishes_the_ike_sa_with_it(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    libreswan_factory: Callable[..., Libreswan],
) -> None:
    ppk_table = f'\n[[ike.ppk]]\nname = "lsw"\nid = "{PPK_ID}"\nsecret = "{PPK}"\n'
    gateway = gateway_factory(netns_pair.gw, psk=PSK, extra=ppk_table)
    lsw = libreswan_factory(netns_pair.peer, "peer")
    lsw.load(
        [
            LibreswanConn(
                name="c",
                left=netns_pair.peer_v4,
                right=netns_pair.gw_v4,
                leftid="a.peer.example",
                rightid="gw.example",
                leftsubnet="10.200.0.0/24",
                rightsubnet="10.100.0.0/24",
                ike="aes_gcm256-sha2_384-dh31",
                esp="aes_gcm256",
                ppk="insist",
            )
        ],
        [
            LibreswanPsk(PSK, ["a.peer.example", "gw.example"]),
            LibreswanPpk(PPK_ID, PPK, ["a.peer.example", "gw.example"]),
        ],
    )
    out = lsw.initiate("c", timeout=15)
    assert "initiator established IKE SA" in out.stdout, lsw.log_tail()
    assert lsw.ike_sa_established("c")
    assert "PPK AUTH calculated as initiator" in "\n".join(lsw.log_lines())

    (row,) = gateway.wait_sas(1)
    assert row["remote_id"] == "a.peer.example" and row["ppk_used"] is True
    assert row["proposal"] == "aes256-gcm-128/prf:hmac-sha384/x25519/PPK"
    assert gateway.counters("keystore").get("ppk_mix.mixed") == 1
    text = gateway.log_text() + out.stdout
    assert PSK not in text and PPK[2:] not in text.lower()
