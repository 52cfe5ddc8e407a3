"""IKE state over SNMP (seed 004 `snmp`): net-snmp's real snmpd, on the gateway
namespace's loopback with a config this test writes, hands the ikefarm subtree to
`ikefarm snmp pass-persist`, which reads the farm over the bus as `admin`; `snmpwalk`
sees the SA a real strongSwan established."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.prerequisites import missing
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import PSK, peer_connection, psk_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

BASE = ".1.3.6.1.4.1.32473.1"
COMMUNITY = "ikefarm-test-ro"
SNMP_PORT = 16161  # on the gateway namespace's own loopback: no other process shares it


def tools() -> tuple[str, str]:
    snmpd = shutil.which("snmpd") or (
        "/usr/sbin/snmpd" if os.path.exists("/usr/sbin/snmpd") else None
    )
    snmpwalk = shutil.which("snmpwalk")
    if snmpd is None or snmpwalk is None:
        missing(
            "net-snmp's snmpd and snmpwalk (ops/install-test-peers: apt-get install snmpd snmp)"
        )
    return snmpd, snmpwalk


def walk(netns_pair: NetnsPair, snmpwalk: str) -> dict[str, str]:
    result = netns_pair.gw.run(
        [snmpwalk, "-v2c", "-c", COMMUNITY, "-On", "-Oe", "-t", "5", "-r", "1",
         f"udp:127.0.0.1:{SNMP_PORT}", BASE],
        timeout=30, check=False,
    )  # fmt: skip
    found = {}
    for line in result.stdout.splitlines():
        oid, _, value = line.partition(" = ")
        found[oid.strip()] = value.strip()
    return found


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return strongswan_factory(netns_pair.peer)


def test_snmpwalk_reads_the_sa_count_and_rows(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    tmp_path: Path,
) -> None:
    snmpd, snmpwalk = tools()
    gateway = gateway_factory(netns_pair.gw, psk=PSK, extra="\n[ike.global-options]\nsnmp = true\n")
    program = tmp_path / "ikefarm-snmp"
    program.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m ikefarm.shared.cli.main snmp pass-persist "
        f"-c {gateway.config_path} --cache 1 2>>{tmp_path / 'pass-persist.log'}\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    conf = tmp_path / "snmpd.conf"
    conf.write_text(f"rocommunity {COMMUNITY} 127.0.0.1 {BASE}\npass_persist {BASE} {program}\n")
    persistent = tmp_path / "snmp-state"
    persistent.mkdir()
    log = (tmp_path / "snmpd.log").open("wb")
    netns_pair.gw.popen(
        [snmpd, "-f", "-C", "-c", str(conf), "-Lf", str(tmp_path / "snmpd.log"),
         "-p", str(tmp_path / "snmpd.pid"), f"udp:127.0.0.1:{SNMP_PORT}"],
        stdout=log, stderr=log,
        env={**os.environ, "SNMP_PERSISTENT_DIR": str(persistent), "MIBS": ""},
    )  # fmt: skip

    # no SA yet: the count is there and says 0
    before = wait_for(
        lambda: walk(netns_pair, snmpwalk).get(f"{BASE}.1.1.0"),
        timeout=30,
        what="snmpwalk answered by snmpd and ikefarm's pass_persist program",
    )
    assert before == "Gauge32: 0"

    peer.load([peer_connection()], psks=[psk_for("a.peer.example")])
    peer.initiate(child="c-net", timeout=20)
    (row,) = gateway.wait_sas(1)

    def established() -> dict[str, str] | None:
        values = walk(netns_pair, snmpwalk)
        return values if values.get(f"{BASE}.1.2.0") == "Gauge32: 1" else None

    values = wait_for(established, timeout=20, what="the SA in the SNMP walk")
    assert values[f"{BASE}.1.1.0"] == "Gauge32: 1"
    assert values[f"{BASE}.1.4.0"] == "Gauge32: 1"  # its child
    assert values[f"{BASE}.1.6.0"] == "Gauge32: 1"  # one ike worker answered
    assert values[f"{BASE}.2.1.1.1"] == f'STRING: "{row["unique_id"]}"'
    assert values[f"{BASE}.2.1.2.1"] == 'STRING: "rw"'
    assert values[f"{BASE}.2.1.3.1"] == 'STRING: "established"'
    assert values[f"{BASE}.2.1.5.1"] == 'STRING: "192.0.2.2"'
    assert values[f"{BASE}.2.1.7.1"] == 'STRING: "a.peer.example"'
    assert values[f"{BASE}.2.1.9.1"] == f'STRING: "{row["spi_i"]}"'
    assert values[f"{BASE}.1.5.0"].startswith("Counter64: ")
    # the program never writes: a set is refused by the agent
    assert PSK not in "".join(values.values())
