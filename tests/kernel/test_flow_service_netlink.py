"""The flow service with `[flow] source = "netlink"`, end to end inside a namespace.

A nats-server, the flow service process and the `ikefarm` CLI all run inside the gateway
namespace of a veth pair (so the service reads that namespace's conntrack, never the test
machine's). Real traffic from the peer namespace shows as sessions in
`ikefarm show security flow session`; `clear` and the UDP timeout remove them from the table
and from conntrack (`conntrack -L`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ikefarm.shared.bus.embedded import nats_server_binary
from tests.harness.netns import NetnsPair
from tests.kernel import test_flow_conntrack as conntrack_test
from tests.kernel.test_flow_conntrack import TCP_PORT, UDP_PORT, conntrack_list, make_traffic

pytestmark = pytest.mark.kernel

NATS_URL = "nats://127.0.0.1:4222"  # inside the test's own namespace: no clash
CONFIG = f"""
[nats]
url = "{NATS_URL}"

[flow]
source = "netlink"

[flow.session-timeouts]
udp = 4
"""
CLI = [sys.executable, "-m", "ikefarm.shared.cli.main"]
# the namespaces, nftables rules and traffic servers of the conntrack source's test
pair = conntrack_test.pair
traffic = conntrack_test.traffic


def ikefarm(namespaces: NetnsPair, *words: str) -> subprocess.CompletedProcess[str]:
    return namespaces.gw.run([*CLI, *words, "--nats", NATS_URL], check=False, timeout=30)


def eventually(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


@pytest.fixture
def flow_service(traffic: NetnsPair, tmp_path: Path) -> Iterator[NetnsPair]:
    config = tmp_path / "flow.toml"
    config.write_text(CONFIG)
    log = (tmp_path / "flow.log").open("w")
    traffic.gw.popen([nats_server_binary(), "-a", "127.0.0.1", "-p", "4222"])
    service = traffic.gw.popen(
        [*CLI, "service", "flow", "-c", str(config), "--nats", NATS_URL], stdout=log
    )

    def answers() -> bool:
        done = ikefarm(traffic, "show", "security", "flow", "session", "summary", "--json")
        return done.returncode == 0

    assert eventually(answers), (tmp_path / "flow.log").read_text()[-2000:]
    yield traffic
    service.terminate()
    log.close()


def rows(namespaces: NetnsPair, *words: str) -> list[dict[str, Any]]:
    done = ikefarm(namespaces, "show", "security", "flow", "session", *words, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_conntrack_flows_show_clear_and_age(flow_service: NetnsPair) -> None:
    namespaces = flow_service
    client = make_traffic(namespaces)
    try:

        def all_three() -> list[dict[str, Any]]:
            found = rows(namespaces)
            return found if {1, 6, 17} <= {r["protocol"] for r in found} else []

        sessions = eventually(all_three)
        # loopback (the service's own NATS connections) is not tracked: only the veth flows
        assert all(r["in"][1] == "192.0.2.2" for r in sessions), sessions
        found = {r["protocol"]: r for r in sessions}
        assert found[17]["in"] == [17, "192.0.2.2", 40001, "192.0.2.1", UDP_PORT]
        assert found[6]["state"] == "established"
        text = ikefarm(namespaces, "show", "security", "flow", "session", "protocol", "tcp").stdout
        assert f"In: 192.0.2.2/{found[6]['in'][2]} --> 192.0.2.1/{TCP_PORT};tcp" in text

        cleared = ikefarm(namespaces, "clear", "security", "flow", "session", "protocol", "tcp")
        assert cleared.stdout.strip() == "1 active sessions cleared", cleared.stderr
        assert f"dport={TCP_PORT}" not in conntrack_list(namespaces, "tcp")

        # the UDP session's 4 s run out: gone from the table and from conntrack
        assert eventually(lambda: rows(namespaces, "protocol", "udp") == [])
        assert f"dport={UDP_PORT}" not in conntrack_list(namespaces, "udp")
    finally:
        client.kill()
