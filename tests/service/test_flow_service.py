"""The flow service over a real nats-server: recorded dataplane events in, show/clear/ageing out.

The events are what a dataplane publishes for a ping, a TCP connection and a UDP exchange
through a tunnel, plus the gateway's own IKE flow (a tunnel session), in the batches of
`proto/messages.py:FlowEvents` (docs/flow-sessions.md). They are recorded here as data: the
userspace dataplane that will publish them is another issue's work.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import (
    FlowChange,
    FlowClearRequest,
    FlowClearResult,
    FlowEvents,
    FlowOpen,
    FlowRefresh,
    FlowShow,
    FlowShowRequest,
    FlowTuple,
    FlowVerdicts,
)
from ikefarm.services.flow.service import FlowService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import parse_config
from tests.harness.runtime import running

CONFIG = """
[flow]
max-sessions = 6
[flow.tcp-session]
rst-invalidate-session = true
"""
# for the ageing tests only: the others must not see a session age while the machine is slow
SHORT = (
    CONFIG
    + """
tcp-initial-timeout = 4
[flow.session-timeouts]
udp = 4
invalidated = 4
"""
)

PING = FlowTuple(1, "10.200.0.2", 7, "10.100.0.2", 7)
TCP = FlowTuple(6, "10.200.0.2", 40000, "10.100.0.2", 22)
UDP = FlowTuple(17, "10.200.0.2", 40001, "10.100.0.2", 53)
IKE = FlowTuple(17, "198.51.100.2", 500, "192.0.2.1", 500)


def recorded() -> list[FlowEvents]:
    """A ping, an ssh connection and a DNS exchange from the peer's subnet, then traffic."""
    opened = [
        FlowOpen(init=IKE, ingress="eth0", egress="eth0", policy="self", tunnel=True),
        FlowOpen(init=PING, ingress="tun-rw", egress="eth1", policy="net"),
        FlowOpen(init=TCP, ingress="tun-rw", egress="eth1", policy="net", tcp_flags="S"),
        FlowOpen(init=UDP, ingress="tun-rw", egress="eth1", policy="net"),
    ]
    refreshes = [
        FlowRefresh(init=PING, idle=0.0, packets_in=1, bytes_in=84, packets_out=1, bytes_out=84),
        FlowRefresh(
            init=TCP, idle=0.0, packets_in=12, bytes_in=2900, packets_out=10, bytes_out=3100
        ),
        FlowRefresh(init=UDP, idle=0.0, packets_in=1, bytes_in=60, packets_out=1, bytes_out=120),
    ]
    return [
        FlowEvents(instance="kernel-0", seq=1, opened=opened),
        FlowEvents(
            instance="kernel-0",
            seq=2,
            changes=[FlowChange(init=TCP, change="established")],
            refreshes=refreshes,
        ),
    ]


@pytest.fixture
async def flow(nats_server: EmbeddedNats) -> AsyncIterator[Runtime]:
    async with running(FlowService, parse_config(CONFIG), nats_server.url, "flow-0") as runtime:
        yield runtime


@pytest.fixture
async def short_flow(nats_server: EmbeddedNats) -> AsyncIterator[Runtime]:
    async with running(FlowService, parse_config(SHORT), nats_server.url, "flow-0") as runtime:
        yield runtime


@pytest.fixture
async def verdicts(nats_client: Client) -> AsyncIterator[list[FlowVerdicts]]:
    seen: list[FlowVerdicts] = []

    async def on_verdict(msg: Any) -> None:
        seen.append(envelope.unpack(msg.data, FlowVerdicts))

    sub = await nats_client.subscribe(subjects.KERNEL_FLOW_VERDICTS, cb=on_verdict)
    await subscriptions_in_place(nats_client)
    yield seen
    await sub.unsubscribe()


async def feed(nc: Client, batches: list[FlowEvents]) -> None:
    for batch in batches:
        await nc.publish(subjects.FLOW_EVENTS, envelope.pack(batch))
    await nc.flush()


async def show(nc: Client, *words: str) -> FlowShow:
    reply = await nc.request(
        subjects.FLOW_SHOW, envelope.pack(FlowShowRequest(list(words))), timeout=2
    )
    return envelope.unpack_reply(reply.data, FlowShow)


async def clear(nc: Client, *words: str) -> int:
    reply = await nc.request(
        subjects.FLOW_CLEAR, envelope.pack(FlowClearRequest(list(words))), timeout=2
    )
    return envelope.unpack_reply(reply.data, FlowClearResult).count


async def eventually(check: Any, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(0.1)


def by_protocol(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["protocol"]: row for row in rows if not row["tunnel"]}


async def rows_when(nc: Client, count: int, *words: str) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]]:
        rows = (await show(nc, *words)).rows
        return rows if len(rows) == count else []

    return await eventually(enough)


async def test_recorded_flows_show_with_protocol_counters_and_timeouts(
    flow: Runtime, nats_client: Client
) -> None:
    await feed(nats_client, recorded())

    async def tcp_counted() -> list[dict[str, Any]]:
        rows = (await show(nats_client)).rows
        tcp = by_protocol(rows).get(6)
        return rows if tcp and tcp["packets_in"] == 12 else []

    rows = await eventually(tcp_counted)
    assert len(rows) == 4
    sessions = by_protocol(rows)
    assert set(sessions) == {1, 6, 17}
    assert (sessions[1]["packets_in"], sessions[1]["bytes_out"]) == (1, 84)
    assert (sessions[6]["bytes_in"], sessions[6]["bytes_out"]) == (2900, 3100)
    assert sessions[6]["state"] == "established" and 1790 <= sessions[6]["timeout"] <= 1800
    assert 50 <= sessions[17]["timeout"] <= 60 and sessions[17]["in_interface"] == "tun-rw"
    tunnel = (await show(nats_client, "tunnel")).rows
    assert [r["in"] for r in tunnel] == [[17, "198.51.100.2", 500, "192.0.2.1", 500]]
    summary = (await show(nats_client, "summary")).summary
    assert summary["sessions_in_use"] == 4 and summary["maximum_sessions"] == 6


async def test_udp_ages_out_and_the_dataplane_is_told(
    short_flow: Runtime, nats_client: Client, verdicts: list[FlowVerdicts]
) -> None:
    await feed(nats_client, recorded())

    async def told() -> bool:
        return any(v.init == UDP and v.reason == "aged" for b in verdicts for v in b.closed)

    assert await eventually(told)  # it was opened, and aged after its 4 s
    assert (await show(nats_client, "destination-port", "53")).rows == []
    assert short_flow.counters["closed.aged"] >= 1


async def test_rst_invalidates_and_an_unanswered_syn_goes(
    short_flow: Runtime, nats_client: Client
) -> None:
    await feed(nats_client, recorded())
    await rows_when(nats_client, 1, "protocol", "tcp")
    rst = FlowEvents(instance="kernel-0", seq=3, changes=[FlowChange(init=TCP, change="rst")])
    syn = FlowTuple(6, "10.200.0.2", 40002, "10.100.0.2", 80)
    lonely = FlowEvents(
        instance="kernel-0",
        seq=4,
        opened=[FlowOpen(init=syn, ingress="tun-rw", egress="eth1", tcp_flags="S")],
    )
    await feed(nats_client, [rst, lonely])

    async def invalidated() -> list[dict[str, Any]]:
        rows = (await show(nats_client, "protocol", "tcp", "destination-port", "22")).rows
        return rows if rows and not rows[0]["valid"] else []

    (row,) = await eventually(invalidated)
    assert row["timeout"] <= 4
    # the SYN without answer leaves after tcp-initial-timeout (4 s), the ssh one after 4 s too
    assert await rows_when(nats_client, 0, "protocol", "tcp") == []
    assert short_flow.counters["closed.handshake-timeout"] == 1


async def test_clear_by_protocol_and_all_keeps_the_tunnel(
    flow: Runtime, nats_client: Client, verdicts: list[FlowVerdicts]
) -> None:
    await feed(nats_client, recorded())
    await rows_when(nats_client, 4)
    assert await clear(nats_client, "protocol", "icmp") == 1
    assert await clear(nats_client, "all") == 2  # tcp and udp; the IKE tunnel session stays
    rows = (await show(nats_client)).rows
    assert [r["tunnel"] for r in rows] == [True]
    assert any(v.init == PING and v.reason == "cleared" for b in verdicts for v in b.closed)
    # a cleared flow's next first packet opens a new session
    await feed(
        nats_client, [FlowEvents(instance="kernel-0", seq=5, opened=recorded()[0].opened[1:2])]
    )
    (new,) = await rows_when(nats_client, 1, "protocol", "icmp")
    assert new["session_id"] > max(r["session_id"] for r in rows)


async def test_max_sessions_refuses_counts_and_says_full(
    flow: Runtime, nats_client: Client, verdicts: list[FlowVerdicts]
) -> None:
    await feed(nats_client, recorded())
    extra = [
        FlowOpen(
            init=FlowTuple(17, "10.200.0.2", 50000 + n, "10.100.0.2", 53), ingress="t", egress="e"
        )
        for n in range(4)
    ]
    await feed(nats_client, [FlowEvents(instance="kernel-0", seq=9, opened=extra)])

    async def refused() -> bool:
        return any(v.reason == "max-sessions" for b in verdicts for v in b.closed)

    assert await eventually(refused)
    assert any(b.table_full for b in verdicts)
    summary = (await show(nats_client, "summary")).summary
    assert summary["sessions_in_use"] == 6 and summary["failed_sessions"] == 2


BAD_BATCHES = [
    b"\xc1",  # not msgpack
    msgpack.packb({"v": 1, "kind": "flow-events", "body": {"instance": "k", "seq": "x"}}),
    envelope.pack(
        FlowEvents(
            instance="k",
            seq=1,
            opened=[FlowOpen(init=FlowTuple(6, "10.0.0.1", 1, "::1", 2), ingress="a", egress="b")],
        )
    ),
    envelope.pack(
        FlowEvents(
            instance="k",
            seq=1,
            opened=[
                FlowOpen(init=FlowTuple(300, "10.0.0.1", 1, "10.0.0.2", 2), ingress="a", egress="b")
            ],
        )
    ),
    envelope.pack(
        FlowEvents(
            instance="k",
            seq=1,
            opened=recorded()[0].opened,  # good items, then one bad: the batch changes nothing
            refreshes=[
                FlowRefresh(
                    init=UDP, idle=-1.0, packets_in=1, bytes_in=1, packets_out=1, bytes_out=1
                )
            ],
        )
    ),
    envelope.pack(FlowEvents(instance="k", seq=1, changes=[FlowChange(init=TCP, change="boom")])),
]


async def test_malformed_batches_are_counted_and_change_nothing(
    flow: Runtime, nats_client: Client
) -> None:
    for raw in BAD_BATCHES:
        await nats_client.publish(subjects.FLOW_EVENTS, raw)
    await nats_client.flush()

    async def all_counted() -> bool:
        dropped = sum(v for k, v in flow.counters.items() if "dropped" in k)
        return dropped == len(BAD_BATCHES)

    assert await eventually(all_counted)
    assert (await show(nats_client)).rows == []
    for words in (["protocol", "nope"], ["bogus"], ["session-identifier"]):
        with pytest.raises(envelope.BusError) as caught:
            await show(nats_client, *words)
        assert caught.value.code == "bad_field"
    with pytest.raises(envelope.BusError):
        await clear(nats_client)  # clear without words clears nothing
    # the service still works
    await feed(nats_client, recorded())
    assert len(await rows_when(nats_client, 4)) == 4


def cli(argv: list[str], url: str, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv, *words, "--nats", url], capture_output=True, text=True, timeout=30, check=False
    )


async def test_cli_show_and_clear_in_the_srx_layout(
    flow: Runtime, nats_client: Client, nats_server: EmbeddedNats, ikefarm_argv: list[str]
) -> None:
    await feed(nats_client, recorded())
    await rows_when(nats_client, 4)
    url = nats_server.url
    shown = await asyncio.to_thread(
        cli, ikefarm_argv, url, "show", "security", "flow", "session", "protocol", "udp"
    )
    assert shown.returncode == 0, shown.stderr
    assert "Policy name: net" in shown.stdout
    assert "In: 10.200.0.2/40001 --> 10.100.0.2/53;udp, If: tun-rw" in shown.stdout
    assert "Out: 10.100.0.2/53 --> 10.200.0.2/40001;udp, If: eth1" in shown.stdout
    assert shown.stdout.rstrip().endswith("Total sessions: 2")  # the IKE flow is UDP too
    as_json = await asyncio.to_thread(
        cli, ikefarm_argv, url, "show", "security", "flow", "session", "tunnel", "--json"
    )
    assert [r["tunnel"] for r in json.loads(as_json.stdout)] == [True]
    summary = await asyncio.to_thread(
        cli, ikefarm_argv, url, "show", "security", "flow", "session", "summary"
    )
    assert "Sessions-in-use: 4" in summary.stdout and "Maximum-sessions: 6" in summary.stdout
    cleared = await asyncio.to_thread(
        cli, ikefarm_argv, url, "clear", "security", "flow", "session", "all"
    )
    assert cleared.returncode == 0 and cleared.stdout.strip() == "3 active sessions cleared"
    bad = await asyncio.to_thread(
        cli, ikefarm_argv, url, "clear", "security", "flow", "session", "protocol", "bogus"
    )
    assert bad.returncode == 2 and "protocol" in bad.stderr


WATERMARKS = """
[flow]
max-sessions = 10
[flow.aging]
high-watermark = 50
low-watermark = 30
early-ageout = 100
"""


async def test_aggressive_aging_kicks_in_and_out_at_the_watermarks(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    config = parse_config(WATERMARKS)
    async with running(FlowService, config, nats_server.url, "flow-0") as flow:
        six = [
            FlowOpen(
                init=FlowTuple(17, "10.200.0.2", 50000 + n, "10.100.0.2", 53),
                ingress="t",
                egress="e",
            )
            for n in range(6)
        ]
        await feed(nats_client, [FlowEvents(instance="kernel-0", seq=1, opened=six[:5])])
        await rows_when(nats_client, 5)
        assert (await show(nats_client, "summary")).summary["aggressive_aging"] is False  # 50%
        await feed(nats_client, [FlowEvents(instance="kernel-0", seq=2, opened=six[5:])])

        async def gone() -> bool:
            summary = (await show(nats_client, "summary")).summary
            return summary["sessions_in_use"] == 0 and not summary["aggressive_aging"]

        # above 50% every session (60 s left < early-ageout 100) is invalidated, so all go
        # after the invalidated 4 s, and below 30% aggressive aging stops
        assert await eventually(gone, timeout=30)
        assert flow.service is not None
        counters = flow.service.gauges()
        assert counters["table.aggressive_aging.on"] == 1
        assert counters["table.aggressive_aging.off"] == 1
        assert counters["table.early_ageout"] == 6
