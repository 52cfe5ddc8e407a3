"""Reply isolation on the farm's own broker: no bus user reads or forges another user's replies.

Each user has its own reply inbox prefix (`_INBOX_<user>.`) and may subscribe only there;
replies go out through `allow_responses`; discovery is asked per service kind on subjects only
that kind's user may subscribe to (proto/subjects.py). Everything here runs against a real
`ikefarm up` and its embedded nats-server with the per-user credentials it wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import CookieSecrets, PskAuthReply, PskAuthRequest
from ikefarm.shared.bus.auth import read_credentials
from ikefarm.shared.bus.runtime import subscriptions_in_place
from tests.service.test_bus_permissions import nats_match
from tests.service.test_up import status, wait_for

OTHER_INBOXES = ("_INBOX", *(subjects.inbox_prefix(u) for u in subjects.PERMISSIONS))


def test_no_user_may_read_or_write_another_users_inbox() -> None:
    for user in subjects.PERMISSIONS:
        allowed = subjects.permissions(user)
        for prefix in OTHER_INBOXES:
            probe = f"{prefix}.AbCdEf123.x"
            own = prefix == subjects.inbox_prefix(user)
            assert any(nats_match(p, probe) for p in allowed["subscribe"]) == own, (user, prefix)
            assert any(nats_match(p, probe) for p in allowed["publish"]) == own, (user, prefix)


def test_only_a_service_kind_answers_its_own_discovery_subjects() -> None:
    for asked in subjects.SERVICES:
        for verb in subjects.MICRO_VERBS:
            kind_subject = subjects.micro_subject(verb, asked)
            for user in subjects.PERMISSIONS:
                subscribe = subjects.permissions(user)["subscribe"]
                for subject in (kind_subject, f"{kind_subject}.some-instance-id"):
                    reaches = any(nats_match(p, subject) for p in subscribe)
                    assert reaches == (user == asked), (user, subject)


async def _connect(url: str, credentials: Path, errors: list[str]) -> Client:
    user = read_credentials(credentials)

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    return await nats.connect(
        url,
        user=user.user,
        password=user.password,
        inbox_prefix=subjects.inbox_prefix(user.user),
        error_cb=on_error,
        max_reconnect_attempts=1,
    )


def _farm_url(state_dir: Path) -> tuple[str, Path]:
    up = json.loads((state_dir / "up.json").read_text())
    return up["nats_url"], Path(up["credentials_dir"])


async def _cookie_secrets(url: str, auth_dir: Path) -> set[bytes]:
    """The cookie secrets in the farm's KV record, read as ingress (the one user allowed)."""
    errors: list[str] = []
    nc = await _connect(url, auth_dir / "ingress.json", errors)
    try:
        kv = await nc.jetstream().key_value(subjects.COOKIE_SECRET_BUCKET)
        entry = await kv.get(subjects.COOKIE_RECORD)
        record = envelope.unpack(entry.value or b"", CookieSecrets)
        return {record.key, *([record.previous_key] if record.previous_key else [])}
    finally:
        await nc.close()


def test_other_users_see_no_reply_and_no_cookie_secret(  # type: ignore[no-untyped-def]
    authorized_farm,
    ikefarm_argv: list[str],
    loopback_config: Path,
) -> None:
    """Every user but ingress listens on everything it can (and tries every inbox) while the
    keystore answers the ike user, the CLI gathers its answers and a restarted ingress reads
    the cookie secret from its KV bucket: none of those replies reaches anyone else."""
    state_dir, _log = authorized_farm
    url, auth_dir = _farm_url(state_dir)
    secrets_seen: set[bytes] = set()
    replies: list[bytes] = []

    async def scenario() -> tuple[dict[str, list[tuple[str, bytes]]], dict[str, list[str]]]:
        captured: dict[str, list[tuple[str, bytes]]] = {}
        errors: dict[str, list[str]] = {}
        listeners: list[Client] = []
        for user in ("flow", "kernel", "keystore", "admin"):
            errors[user] = []
            captured[user] = []
            nc = await _connect(url, auth_dir / f"{user}.json", errors[user])
            listeners.append(nc)

            async def record(msg: Any, user: str = user) -> None:
                captured[user].append((msg.subject, bytes(msg.data)))

            # what the broker lets this user subscribe to, and every inbox it must not read
            patterns = [*subjects.permissions(user)["subscribe"], "_INBOX.>", ">"]
            patterns += [f"{subjects.inbox_prefix(u)}.>" for u in subjects.PERMISSIONS]
            for pattern in dict.fromkeys(patterns):
                await nc.subscribe(pattern, cb=record)
            await subscriptions_in_place(nc)  # flush() proves nothing about SUBs
        secrets_seen.update(await _cookie_secrets(url, auth_dir))

        # the ike user asks the keystore (a psk-auth reply travels to its inbox)
        ike_errors: list[str] = []
        ike = await _connect(url, auth_dir / "ike.json", ike_errors)
        request = PskAuthRequest(5, "gw.example", "peer.example", b"o", b"a" * 32, b"s")
        reply = await ike.request(subjects.KEYSTORE_PSK_AUTH, envelope.pack(request), timeout=5)
        assert isinstance(envelope.unpack_reply(reply.data, PskAuthReply), PskAuthReply)
        replies.append(bytes(reply.data))
        await ike.close()

        # ingress restarts: it reads the secret again through its own inbox
        up = json.loads((state_dir / "up.json").read_text())
        ingress_pid = next(pid for name, pid in up["children"].items() if "ingress" in name)
        os.kill(ingress_pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        rows = await asyncio.to_thread(
            wait_for,
            lambda: (r := status(ikefarm_argv, loopback_config)) and "ingress" in r and r,
            30,
        )
        assert rows and "ingress" in rows
        secrets_seen.update(await _cookie_secrets(url, auth_dir))
        await asyncio.sleep(0.3)
        for nc in listeners:
            await nc.close()
        return captured, errors

    captured, errors = asyncio.run(scenario())
    assert secrets_seen and replies
    for user, messages in captured.items():
        own = subjects.inbox_prefix(user) + "."
        foreign = [s for s, _ in messages if s.startswith("_INBOX") and not s.startswith(own)]
        assert foreign == [], (user, foreign[:5])
        blob = b"".join(data for _, data in messages)
        assert not any(secret in blob for secret in secrets_seen), user
        assert not any(reply in blob for reply in replies), user
        # the broker said no to every foreign inbox and to `>`
        assert any('subscription to "_inbox.>"' in e for e in errors[user]), errors[user]
        assert any('subscription to ">"' in e for e in errors[user]), errors[user]


def test_an_ingress_user_cannot_forge_status_show_or_keystore_replies(  # type: ignore[no-untyped-def]
    authorized_farm,
    ikefarm_argv: list[str],
    loopback_config: Path,
) -> None:
    state_dir, _log = authorized_farm
    url, auth_dir = _farm_url(state_dir)
    forged_info = {
        "type": "io.nats.micro.v1.info_response",
        "name": "ikefarm-keystore",
        "id": "FORGED",
        "version": "6.6.6",
        "metadata": {"instance": "keystore-FORGED"},
        "endpoints": [],
    }

    async def scenario() -> tuple[list[str], int]:
        errors: list[str] = []
        attacker = await _connect(url, auth_dir / "ingress.json", errors)
        answered = 0

        async def forge(msg: Any) -> None:
            nonlocal answered
            answered += 1
            if msg.reply:
                await attacker.publish(msg.reply, json.dumps(forged_info).encode())

        # the bare discovery subjects stay open to generic tools: answer them falsely
        for verb in subjects.MICRO_VERBS:
            await attacker.subscribe(f"{subjects.MICRO_PREFIX}.{verb}", cb=forge)
        # the keystore's own discovery subjects and the workers' show are refused
        await attacker.subscribe(subjects.micro_subject("INFO", "keystore"), cb=forge)
        await attacker.subscribe(subjects.IKE_SHOW, cb=forge)
        await attacker.flush()

        # a forged keystore answer published straight into an ike inbox (worst case: the
        # attacker knows its name) never reaches the ike worker
        ike_errors: list[str] = []
        ike = await _connect(url, auth_dir / "ike.json", ike_errors)
        inbox = ike.new_inbox()
        waiting = await ike.subscribe(inbox)
        await ike.flush()
        verified = {"v": 1, "ok": True, "body": {"verified": True, "auth": b"x" * 32}}
        import msgpack

        await attacker.publish(inbox, msgpack.packb(verified))
        await attacker.publish(f"{subjects.inbox_prefix('admin')}.guess", b"{}")
        await attacker.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await waiting.next_msg(timeout=1.0)
        await ike.close()

        done = await asyncio.to_thread(
            subprocess.run,
            [*ikefarm_argv, "status", "-c", str(loopback_config), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert all(r["instance"] != "keystore-FORGED" for r in rows), rows
        assert {r["name"] for r in rows} == set(subjects.SERVICES)
        show = await asyncio.to_thread(
            subprocess.run,
            [*ikefarm_argv, "show", "ike-sa", "-c", str(loopback_config), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert show.returncode == 0 and json.loads(show.stdout) == [], show.stderr
        await asyncio.sleep(0.2)
        await attacker.close()
        return errors, answered

    errors, _answered = asyncio.run(scenario())
    for refused in (
        f'subscription to "{subjects.micro_subject("INFO", "keystore")}"',
        f'subscription to "{subjects.IKE_SHOW}"',
        'publish to "_inbox_ike.',
        'publish to "_inbox_admin.guess"',
    ):
        assert any(refused.lower() in e for e in errors), (refused, errors)
