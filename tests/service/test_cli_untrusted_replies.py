"""The CLI validates what it gathers from the bus: a malformed reply is an error line, not a crash.

On an open nats-server (no authorization, so a test client may answer anything) a stand-in
answers `show` and discovery with well-formed and malformed replies; the real `ikefarm`
command prints the good ones and one line per bad one, and exits like it would otherwise.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import subjects
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.ikev2.show import format_details, format_summary, row_problem

UNREACHABLE = "nats://127.0.0.1:1"  # nothing listens on port 1


def good_row(unique_id: int) -> dict[str, Any]:
    return {
        "vpn": "rw",
        "unique_id": unique_id,
        "state": "established",
        "version": 2,
        "initiator": False,
        "spi_i": "00" * 8,
        "spi_r": "11" * 8,
        "local_address": "192.0.2.1",
        "local_port": 500,
        "remote_address": "192.0.2.2",
        "remote_port": 500,
        "local_id": "gw.example",
        "remote_id": "peer.example",
        "proposal": "AES_GCM_16_256/PRF_HMAC_SHA2_384/CURVE_25519",
        "udp_encap": False,
        "ppk_used": False,
        "established_ago": 3,
        "rekey_in": 100,
        "local_auth": None,
        "remote_auth": None,
        "children": [
            {
                "name": "net",
                "unique_id": 1,
                "reqid": 1,
                "state": "installed",
                "mode": "tunnel",
                "proposal": "AES_GCM_16_256",
                "spi_in": "c1c2c3c4",
                "spi_out": "d1d2d3d4",
                "bytes_in": 0,
                "packets_in": 0,
                "bytes_out": 0,
                "packets_out": 0,
                "installed_ago": 3,
                "rekey_in": None,
                "expires_in": None,
                "local_ts": ["10.100.0.0/24"],
                "remote_ts": ["10.200.0.0/24"],
            }
        ],
    }


@contextmanager
def stand_in(url: str, answers: dict[str, list[bytes]]) -> Iterator[None]:
    """A thread-free stand-in: a subprocess answering each subject with the given replies."""
    script = f"""
import asyncio, nats, sys
from ikefarm.shared.bus.runtime import subscriptions_in_place
ANSWERS = {answers!r}
async def main():
    nc = await nats.connect({url!r})
    for subject, replies in ANSWERS.items():
        async def answer(msg, replies=replies):
            for reply in replies:
                await nc.publish(msg.reply, reply)
        await nc.subscribe(subject, cb=answer)
    await subscriptions_in_place(nc)  # flush() proves nothing about SUBs
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
    import sys

    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield
    finally:
        process.kill()
        process.wait()


def show_reply(rows: list[Any], instance: str = "ike-0") -> bytes:
    return msgpack.packb(
        {"v": 1, "ok": True, "body": {"instance": instance, "shard": 0, "sas": rows}}
    )


def test_show_keeps_good_rows_and_names_each_bad_one(
    nats_server: EmbeddedNats, ikefarm_argv: list[str]
) -> None:
    missing_id = good_row(7)
    del missing_id["unique_id"]
    bad_child = good_row(8)
    bad_child["children"][0]["local_ts"] = [{"x": 1}]
    answers = {
        subjects.IKE_SHOW: [
            show_reply([good_row(1), missing_id, bad_child]),
            show_reply(["not a row"]),  # the schema refuses the whole reply
            b"\xc1garbage",
            msgpack.packb({"v": 1, "ok": True, "body": {"instance": 5, "sas": "x"}}),
        ]
    }
    with stand_in(nats_server.url, answers):
        for words in (["--json"], ["details"], []):
            done = subprocess.run(
                [*ikefarm_argv, "show", "ike-sa", *words, "--nats", nats_server.url],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            assert "Traceback" not in done.stderr
            errors = done.stderr.strip().splitlines()
            assert sum("ignored a malformed row" in e for e in errors) == 2, errors
            assert sum("answered badly" in e for e in errors) == 3, errors
            if words == ["--json"]:
                assert [r["unique_id"] for r in json.loads(done.stdout)] == [1]
            else:
                assert "peer.example" in done.stdout


def test_status_reports_bad_discovery_replies_and_keeps_going(
    nats_server: EmbeddedNats, ikefarm_argv: list[str]
) -> None:
    def info(name: str, instance: Any, version: Any = "0.1.0") -> bytes:
        return json.dumps(
            {"name": name, "id": "X1", "version": version, "metadata": {"instance": instance}}
        ).encode()

    answers = {
        subjects.micro_subject("INFO", "keystore"): [
            b"{not json",
            b"[1, 2]",
            info("ikefarm-ingress", "keystore-0"),  # names another kind than the one asked
            info("ikefarm-keystore", "a.b.>"),  # not a subject token
            info("ikefarm-keystore", "keystore-9", version=["x"]),
            info("ikefarm-keystore", "keystore-0"),
        ],
    }
    with stand_in(nats_server.url, answers):
        done = subprocess.run(
            [*ikefarm_argv, "status", "--json", "--nats", nats_server.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = json.loads(done.stdout)
    assert [(r["name"], r["instance"]) for r in rows] == [("keystore", "keystore-0")]
    assert len(done.stderr.strip().splitlines()) == 5, done.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(sorted(good_row(1))), inner, max_size=6)
        ),
        max_leaves=20,
    )
)
def test_row_check_guards_the_formatters(row: Any) -> None:
    """Whatever a reply holds, a row the check passes formats; the rest are refused."""
    candidates = [row]
    if isinstance(row, dict):
        merged = {**good_row(1), **row}
        candidates.append(merged)
    for candidate in candidates:
        if row_problem(candidate) is None:
            format_summary([candidate])
            format_details([candidate])


def test_a_service_stops_at_once_on_sigterm_while_the_broker_is_unreachable(
    ikefarm_argv: list[str], loopback_config: Any
) -> None:
    """SIGTERM ends a service that is still trying to reach its broker (issue 16)."""
    for service in ("keystore", "kernel"):
        process = subprocess.Popen(
            [*ikefarm_argv, "service", service, "-c", str(loopback_config), "--nats", UNREACHABLE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # it is connecting (and saying so) before we stop it
            assert process.stderr is not None
            seen = b""
            while b"nats_connect_failed" not in seen:
                line = process.stderr.readline()
                assert line, f"{service} exited: {seen.decode(errors='replace')[-2000:]}"
                seen += line
            process.terminate()
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
