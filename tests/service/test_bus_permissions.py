"""Per-service NATS users: `ikefarm up` gives each service only the subjects it needs.

The embedded broker gets an `authorization` block built from
`proto.subjects.PERMISSIONS`; credentials live 0600 under the state dir. The
ingress user cannot reach the keystore, the ike user can, and the CLI (user
`admin`) still sees everything it shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import PskAuthReply, PskAuthRequest
from ikefarm.shared.bus.auth import authorization_block, ensure_credentials, read_credentials
from ikefarm.shared.bus.embedded import EmbeddedNats
from tests.service.test_up import SERVICES, status, wait_for

KEYSTORE_SUBJECTS = (subjects.KEYSTORE_PSK_AUTH, subjects.KEYSTORE_CERT_AUTH)


def nats_match(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


def test_only_ike_workers_may_publish_keystore_requests() -> None:
    for user in subjects.PERMISSIONS:
        allowed = subjects.permissions(user)["publish"]
        reaches = any(nats_match(p, s) for p in allowed for s in KEYSTORE_SUBJECTS)
        assert reaches == (user == "ike"), user
    # every subject a service answers is subscribable by that service
    for service in subjects.SERVICES:
        subscribe = subjects.permissions(service)["subscribe"]
        assert any(nats_match(p, subjects.service_endpoint(service, "ping")) for p in subscribe)


def test_flow_subjects_follow_the_roles() -> None:
    """Only the kernel (dataplane) feeds flow events, only flow answers with verdicts, and
    only the CLI asks for show/clear (docs/flow-sessions.md)."""
    who_may = {
        subjects.FLOW_EVENTS: {"kernel"},
        subjects.KERNEL_FLOW_VERDICTS: {"flow"},
        subjects.FLOW_SHOW: {subjects.ADMIN_USER},
        subjects.FLOW_CLEAR: {subjects.ADMIN_USER},
    }
    for subject, publishers in who_may.items():
        allowed = {
            user
            for user in subjects.PERMISSIONS
            if any(nats_match(p, subject) for p in subjects.permissions(user)["publish"])
        }
        assert allowed == publishers, subject
    flow_reads = subjects.permissions("flow")["subscribe"]
    for subject in (subjects.FLOW_EVENTS, subjects.FLOW_SHOW, subjects.FLOW_CLEAR):
        assert any(nats_match(p, subject) for p in flow_reads), subject
    kernel_reads = subjects.permissions("kernel")["subscribe"]
    assert any(nats_match(p, subjects.KERNEL_FLOW_VERDICTS) for p in kernel_reads)


def test_credentials_files_are_private_and_reused(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path / "auth")
    assert set(first) == {*subjects.SERVICES, subjects.ADMIN_USER}
    assert stat.S_IMODE((tmp_path / "auth").stat().st_mode) == 0o700
    for user in first.values():
        assert user.path is not None and stat.S_IMODE(user.path.stat().st_mode) == 0o600
        assert user.password not in repr(user)
    again = ensure_credentials(tmp_path / "auth")
    assert {u.password for u in again.values()} == {u.password for u in first.values()}
    block = authorization_block(first, with_passwords=False)
    assert all(u.password not in block for u in first.values())
    assert '"ikefarm.keystore.>"' in block and "allow_responses: true" in block


async def _keystore_request(url: str, credentials: Path) -> tuple[object, list[str]]:
    """Ask the keystore for a PSK AUTH as this user: its reply or the exception, and errors."""
    user = read_credentials(credentials)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        url,
        user=user.user,
        password=user.password,
        inbox_prefix=subjects.inbox_prefix(user.user),
        error_cb=on_error,
        max_reconnect_attempts=1,
    )
    request = PskAuthRequest(5, "gw.example", "peer.example", b"o", b"a" * 32, b"s")
    try:
        reply = await nc.request(subjects.KEYSTORE_PSK_AUTH, envelope.pack(request), timeout=1.5)
        outcome: object = envelope.unpack_reply(reply.data, PskAuthReply)
    except Exception as exc:
        outcome = exc
    await asyncio.sleep(0.2)  # the server's -ERR arrives asynchronously
    await nc.close()
    return outcome, errors


def test_up_gives_each_service_its_own_user(  # type: ignore[no-untyped-def]
    authorized_farm, ikefarm_argv: list[str], loopback_config: Path
) -> None:
    state_dir, log_path = authorized_farm
    up = json.loads((state_dir / "up.json").read_text())
    auth_dir = Path(up["credentials_dir"])
    assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in auth_dir.iterdir())
    assert files == sorted(
        [f"{u}.json" for u in (*subjects.SERVICES, "admin")] + ["authorization.conf"]
    )
    for path in auth_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwords = [read_credentials(auth_dir / f"{u}.json").password for u in subjects.PERMISSIONS]
    # no password on a command line or in the logs
    for pid in [up["broker_pid"], *up["children"].values()]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(p in cmdline for p in passwords)
    text = log_path.read_text()
    assert not any(p in text for p in passwords)

    url = up["nats_url"]
    outcome, errors = asyncio.run(_keystore_request(url, auth_dir / "ingress.json"))
    assert not isinstance(outcome, PskAuthReply)  # nobody answered the ingress user
    violation = 'permissions violation for publish to "ikefarm.keystore.psk.auth"'
    assert any(violation in e.lower() for e in errors), errors
    outcome, errors = asyncio.run(_keystore_request(url, auth_dir / "ike.json"))
    assert isinstance(outcome, PskAuthReply) and not errors  # the ike user is answered

    async def anonymous() -> None:
        async def quiet(_exc: Exception) -> None:
            return None

        connecting = nats.connect(
            url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2, error_cb=quiet
        )
        nc = await asyncio.wait_for(connecting, 10)
        await nc.close()

    with pytest.raises(Exception, match=r"(?i)authorization"):
        asyncio.run(anonymous())

    # the CLI (user admin) still works: status, show ike-sa, show/flush kernel, flow sessions
    flow_summary = ["show", "security", "flow", "session", "summary"]
    flush_kernel = ["flush", "kernel", "all"]
    for words in (["show", "ike-sa"], ["show", "kernel"], ["status"], flow_summary, flush_kernel):
        done = subprocess.run(
            [*ikefarm_argv, *words, "-c", str(loopback_config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
        assert done.returncode == 0, (words, done.stdout, done.stderr)
    rows = status(ikefarm_argv, loopback_config)
    assert rows["keystore"]["counters"].get("bus_refused.internal_error", 0) == 0


def test_config_nats_auth_prints_the_block_for_an_external_server(
    ikefarm_argv: list[str], tmp_path: Path
) -> None:
    done = subprocess.run(
        [*ikefarm_argv, "config", "nats-auth", str(tmp_path / "auth")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "auth" / "authorization.conf"
    assert str(conf.resolve()) in done.stdout and "include authorization.conf" in done.stdout
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    for user in subjects.PERMISSIONS:
        password = read_credentials(tmp_path / "auth" / f"{user}.json").password
        assert password not in done.stdout and password in conf.read_text()
        assert f'user: "{user}"' in done.stdout


def test_a_service_with_unreadable_credentials_stops_with_a_reason(
    ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [*ikefarm_argv, "service", "keystore", "-c", str(loopback_config),
         "--nats", "nats://127.0.0.1:1", "--nats-credentials", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert "NATS credentials" in done.stderr and "none.json" in done.stderr


def test_up_against_an_external_nats_set_up_with_config_nats_auth(
    ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path
) -> None:
    """The README recipe: `ikefarm config nats-auth DIR`, a nats-server including the block,
    `[nats] url` and `credentials = DIR`: every service connects as its own user."""
    auth_dir = tmp_path / "auth"
    subprocess.run(
        [*ikefarm_argv, "config", "nats-auth", str(auth_dir)], check=True, capture_output=True
    )
    server_conf = tmp_path / "nats-server.conf"
    server_conf.write_text("include auth/authorization.conf\n")  # relative to this file
    with EmbeddedNats(tmp_path / "external", config_file=server_conf) as external:
        text = loopback_config.read_text().replace(
            'url = ""', f'url = "{external.url}"\ncredentials = "{auth_dir}"', 1
        )
        loopback_config.write_text(text)
        log = (tmp_path / "up.log").open("w")
        process = subprocess.Popen(
            [*ikefarm_argv, "up", "-c", str(loopback_config)], stdout=log, stderr=log
        )
        try:
            rows = wait_for(
                lambda: (r := status(ikefarm_argv, loopback_config)) and set(r) == SERVICES and r,
                30,
            )
            assert rows and set(rows) == SERVICES
            ingress = auth_dir / "ingress.json"
            outcome, errors = asyncio.run(_keystore_request(external.url, ingress))
            assert not isinstance(outcome, PskAuthReply) and errors
            outcome, errors = asyncio.run(_keystore_request(external.url, auth_dir / "ike.json"))
            assert isinstance(outcome, PskAuthReply)
        finally:
            process.terminate()
            process.wait(15)
            log.close()


def test_kernel_events_reach_ike_and_come_only_from_the_kernel() -> None:
    for subject in (subjects.EVENT_KERNEL_ACQUIRE, subjects.EVENT_KERNEL_EXPIRE):
        for user in subjects.PERMISSIONS:
            allowed = subjects.permissions(user)
            publishes = any(nats_match(p, subject) for p in allowed["publish"])
            subscribes = any(nats_match(p, subject) for p in allowed["subscribe"])
            assert publishes == (user == "kernel"), (user, subject)
            assert subscribes == (user in ("ike", "flow", subjects.ADMIN_USER)), (user, subject)
    # ike hears the kernel's events, not every event on the bus; the kernel publishes no IKE
    # SA event (its child-SA events are the userspace dataplane's lifetimes)
    ike = subjects.permissions("ike")["subscribe"]
    assert not any(nats_match(p, subjects.EVENT_IKE_SA) for p in ike)
    kernel = subjects.permissions("kernel")["publish"]
    assert not any(nats_match(p, subjects.EVENT_IKE_SA) for p in kernel)


def test_kernel_counters_come_only_from_the_kernel_and_reach_ike() -> None:
    """The batched child counters (docs/kernel-counters.md): published by the kernel user
    alone (an ike worker cannot forge another's traffic), read by the ike workers."""
    subject = subjects.IKE_KERNEL_COUNTERS
    for user in subjects.PERMISSIONS:
        allowed = subjects.permissions(user)
        publishes = any(nats_match(p, subject) for p in allowed["publish"])
        assert publishes == (user == "kernel"), user
    assert any(nats_match(p, subject) for p in subjects.permissions("ike")["subscribe"])
