"""Manual SA commands reach ike workers over a real nats-server: answers, refusals, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import IkeCommand, IkeCommandResult, IkeShow, IkeShowRequest
from ikefarm.services.ike.service import IkeService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import load_config

CONFIG = """
[ike.global-options]
retransmit-tries = 1
retransmit-timeout = 0.2

[[ike.pre-shared-key]]
secret = "management-test-psk"

[[ike.vpn]]
name = "hq"
local-address = "127.0.0.1"
remote-address = "127.0.0.2"
local-id = "peer.example"
remote-id = "gw.example"
[[ike.vpn.security-policy]]
name = "net"
local-ts = { subnet = "10.200.0.0/24" }
remote-ts = { subnet = "10.100.0.0/24" }

[[ike.vpn]]
name = "rw"
local-address = "127.0.0.1"
[[ike.vpn.security-policy]]
name = "net"
local-ts = { subnet = "10.100.0.0/24" }
remote-ts = { subnet = "10.200.0.0/24" }
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "ikefarm.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
async def workers(nats_server: EmbeddedNats, config_path: Path) -> AsyncIterator[list[Runtime]]:
    config = load_config(config_path)
    runtimes = [
        Runtime(
            IkeService, config, nats_server.url, instance=f"ike-{shard}", options={"shard": shard}
        )
        for shard in (0, 1)
    ]
    for runtime in runtimes:
        await runtime.start()
    try:
        yield runtimes
    finally:
        for runtime in runtimes:
            await runtime.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def gather(nc: Client, subject: str, payload: bytes, expect: int = 2) -> list[bytes]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=expect)
    await nc.publish(subject, payload, reply=inbox)
    replies = []
    for _ in range(expect):
        replies.append((await sub.next_msg(timeout=3)).data)
    return replies


def command(verb: str, target: str, selector: str, value: str = "", **extra: Any) -> IkeCommand:
    return IkeCommand(verb=verb, target=target, selector=selector, value=value, **extra)


async def test_every_worker_answers_a_broadcast_command(
    workers: list[Runtime], client: Client
) -> None:
    raws = await gather(client, subjects.IKE_COMMAND, envelope.pack(command("clear", "sa", "all")))
    results = sorted(
        (envelope.unpack_reply(r, IkeCommandResult) for r in raws), key=lambda r: r.shard
    )
    assert [(r.shard, r.ok, r.count) for r in results] == [(0, True, 0), (1, True, 0)]
    raws = await gather(
        client, subjects.IKE_COMMAND, envelope.pack(command("flush", "ike-sa", "vpn", "nope"))
    )
    for raw in raws:
        result = envelope.unpack_reply(raw, IkeCommandResult)
        assert not result.ok and result.error.startswith("no vpn named 'nope'")
    assert sum(w.counters["command_refused"] for w in workers) == 2


async def test_initiate_is_not_broadcast(workers: list[Runtime], client: Client) -> None:
    raws = await gather(
        client, subjects.IKE_COMMAND, envelope.pack(command("initiate", "ike-sa", "vpn", "hq"))
    )
    assert all("one worker" in envelope.unpack_reply(r, IkeCommandResult).error for r in raws)
    assert all(not w.service.engine.sas for w in workers)  # type: ignore[union-attr]


async def test_an_initiation_nobody_answers_is_reported_failed_after_the_retransmissions(
    workers: list[Runtime], client: Client
) -> None:
    reply = await client.request(
        subjects.IKE_INITIATE, envelope.pack(command("initiate", "ike-sa", "vpn", "hq")), timeout=5
    )
    result = envelope.unpack_reply(reply.data, IkeCommandResult)
    assert not result.ok and result.ike_unique_id
    assert result.lines[0] == f"initiating IKE_SA hq[{result.ike_unique_id}] to 127.0.0.2"
    assert result.lines[-1] == (
        f"establishing IKE_SA hq[{result.ike_unique_id}] failed: peer not responding"
    )


async def test_an_initiation_still_running_at_the_timeout_says_so(
    workers: list[Runtime], client: Client
) -> None:
    message = command("initiate", "child-sa", "security-policy", "net", timeout=0.05)
    reply = await client.request(subjects.IKE_INITIATE, envelope.pack(message), timeout=5)
    result = envelope.unpack_reply(reply.data, IkeCommandResult)
    # "net" is in two vpns: the worker says so instead of guessing
    assert not result.ok and "in several vpns (hq, rw)" in result.error
    message = command("initiate", "ike-sa", "vpn", "hq", timeout=0.05)
    reply = await client.request(subjects.IKE_INITIATE, envelope.pack(message), timeout=5)
    result = envelope.unpack_reply(reply.data, IkeCommandResult)
    assert not result.ok and result.lines[-1] == "no outcome after 0.1s; the negotiation goes on"


def _body(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "kind": "ike-command", "body": fields})


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1", "bad_encoding"),
        (_body(verb="flush"), "missing_field"),
        (_body(verb="flush", target="ike-sa", selector="vpn", value=7), "bad_field"),
        (_body(verb="flush", target="ike-sa", selector="vpn", phase="1"), "bad_field"),
        (msgpack.packb({"v": 3, "kind": "ike-command", "body": {}}), "bad_version"),
        (envelope.pack(IkeShowRequest()), "wrong_kind"),
    ],
)
@pytest.mark.parametrize(
    "subject", [subjects.IKE_COMMAND, subjects.IKE_INITIATE, subjects.ike_shard_command(1)]
)
async def test_malformed_commands_get_structured_errors_and_change_nothing(
    workers: list[Runtime], client: Client, subject: str, payload: bytes, code: str
) -> None:
    reply = await client.request(subject, payload, timeout=3)
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(reply.data)
    assert refused.value.code == code
    await asyncio.sleep(0.05)
    assert sum(w.counters[f"bus_dropped.{code}"] for w in workers) >= 1
    # still serving
    raws = await gather(client, subjects.IKE_SHOW, envelope.pack(IkeShowRequest()))
    assert all(envelope.unpack_reply(r, IkeShow).sas == [] for r in raws)


@pytest.mark.parametrize(
    "fields",
    [
        {"verb": "rm", "target": "ike-sa", "selector": "vpn", "value": "hq"},
        {"verb": "flush", "target": "sa", "selector": "all"},
        {"verb": "clear", "target": "sa", "selector": "state", "value": "bogus"},
        {"verb": "rekey", "target": "ike-sa", "selector": "unique-id", "value": "-1"},
        {"verb": "clear", "target": "sa", "selector": "all", "phase": 9},
        {"verb": "initiate", "target": "ike-sa", "selector": "vpn", "value": "x" * 10_000},
    ],
)
async def test_well_formed_nonsense_is_refused_with_a_reason(
    workers: list[Runtime], client: Client, fields: dict[str, Any]
) -> None:
    message = IkeCommand(**fields, timeout=0.05)
    reply = await client.request(subjects.IKE_INITIATE, envelope.pack(message), timeout=5)
    result = envelope.unpack_reply(reply.data, IkeCommandResult)
    assert not result.ok and result.error and result.count == 0


async def test_a_timeout_that_is_not_a_number_waits_the_bounded_default(
    workers: list[Runtime], client: Client
) -> None:
    message = command("initiate", "ike-sa", "vpn", "hq", timeout=float("nan"))
    reply = await client.request(subjects.IKE_INITIATE, envelope.pack(message), timeout=5)
    result = envelope.unpack_reply(reply.data, IkeCommandResult)
    assert not result.ok and result.lines[-1].endswith("failed: peer not responding")


# -- the CLI --------------------------------------------------------------------------------------


def cli(url: str, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ikefarm.shared.cli.main", *words, "--nats", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_cli_exit_codes(workers: list[Runtime], nats_server: EmbeddedNats) -> None:
    url = nats_server.url

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        return cli(url, *words)

    done = await asyncio.to_thread(run, "clear", "sa", "all")
    assert (done.returncode, done.stdout) == (0, "No SA to clear.\n")
    done = await asyncio.to_thread(run, "flush", "ike-sa", "vpn", "nope")
    assert done.returncode == 1 and "no vpn named 'nope'" in done.stderr
    assert done.stderr.count("no vpn named") == 1  # both workers said it; printed once
    done = await asyncio.to_thread(run, "rekey", "ike-sa", "vpn", "hq")
    assert done.returncode == 1 and "no IKE SA matches vpn hq" in done.stderr
    done = await asyncio.to_thread(run, "flush", "child-sa", "unique-id", "42")
    assert done.returncode == 1 and "no child SA matches unique-id 42" in done.stderr
    done = await asyncio.to_thread(run, "reauth", "ike-sa", "vpn")
    assert done.returncode == 2 and "usage: reauth ike-sa" in done.stderr
    done = await asyncio.to_thread(run, "initiate", "ike-sa", "vpn", "hq", "--timeout", "5")
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("initiating IKE_SA hq[")
    assert done.stdout.splitlines()[-1].endswith("failed: peer not responding")


async def test_cli_without_workers(nats_server: EmbeddedNats) -> None:
    done = await asyncio.to_thread(cli, nats_server.url, "flush", "ike-sa", "vpn", "hq")
    assert done.returncode == 2 and "no ike worker answered" in done.stderr
    done = await asyncio.to_thread(cli, nats_server.url, "initiate", "ike-sa", "vpn", "hq")
    assert done.returncode == 2 and "no ike worker answered" in done.stderr
