"""`ikefarm initiate|rekey|reauth|flush|clear ...`: manual SA control over the bus (seeds 004, 002).

The words follow the vSR commands (`cmd ike initiate child-sa security-policy
trunk`, `cmd ike rekey ike-sa vpn vpn-hq`, `flush ike child-sa unique-id 6`) and
JunosE's `ipsec clear sa all|tunnel NAME|state STATE [phase 1|2]`; the grammar
and the work live in `shared/ikev2/management.py`.

- initiate: one worker does it (`subjects.IKE_INITIATE`, a queue group), or, for
  a child of a VPN whose IKE SA is up, the worker owning that SA
  (`subjects.ike_shard_command`). The answer comes when the SA is established
  or has failed; the exit code says which.
- rekey, reauth, flush, clear: every worker acts on the SAs it owns
  (`subjects.IKE_COMMAND`); the answers are gathered like `show`, counts summed,
  lines concatenated. flush and clear then wait (up to --timeout) for the SA
  events that say the deletes are done.

Exit codes: 0 done, 1 refused, failed, nothing matched or timed out, 2 bad
words or no worker answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 15.0
HELP = {
    "initiate": "initiate an IKE SA (childless) or a child SA: initiate ike-sa vpn NAME",
    "rekey": "rekey IKE or child SAs: rekey ike-sa vpn NAME | rekey child-sa unique-id N",
    "reauth": "reauthenticate IKE SAs (honours make-before-break): reauth ike-sa vpn NAME",
    "flush": "delete IKE or child SAs: flush child-sa security-policy NAME; remove kernel "
    "state: flush kernel unique-id N|reqid N|all",
    "clear": "JunosE: clear sa all|tunnel NAME|state STATE [phase 1|2]; Junos SRX: clear "
    "security flow session all|session-identifier N|protocol NAME|...",
}


def add_parsers(commands: Any) -> None:
    """Register the management commands on the `ikefarm` sub-command parser."""
    from ikefarm.shared.ikev2.management import USAGE, VERBS

    for verb in VERBS:
        parser = commands.add_parser(verb, help=HELP[verb], description=f"usage: {USAGE[verb]}")
        parser.add_argument("words", nargs="+", help=USAGE[verb])
        parser.add_argument("-c", "--config")
        parser.add_argument("--nats")
        parser.add_argument("--state-dir")
        parser.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            help="seconds to wait for the outcome (initiate) or the deletes (flush, clear)",
        )
        parser.add_argument("--wait", type=float, default=0.5, help="seconds to gather answers")
        if verb == "clear":
            parser.add_argument("--json", action="store_true", help="flow sessions: as JSON")
        parser.set_defaults(func=cmd_manage, verb=verb)


def cmd_manage(args: argparse.Namespace) -> int:
    from ikefarm.shared.cli.main import _load_or_exit, _nats_url
    from ikefarm.shared.ikev2.management import CommandError, parse_words

    if args.verb == "flush" and args.words[:1] == ["kernel"]:
        return cmd_flush_kernel(args, list(args.words[1:]))
    if args.verb == "clear" and args.words[:1] == ["security"]:
        from ikefarm.shared.cli.flow import cmd_flow

        return cmd_flow("clear", args, list(args.words))
    try:
        command = parse_words(args.verb, list(args.words))
    except CommandError as exc:
        print(f"ikefarm {args.verb}: {exc}", file=sys.stderr)
        return 2
    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)
    if config is None:
        config = _config_of_running_farm(args)
    return asyncio.run(_run(command, url, args, config))


def cmd_flush_kernel(args: argparse.Namespace, words: list[str]) -> int:
    """`flush kernel unique-id N | reqid N | all`: remove installed child SAs from the
    dataplane; their ike workers then delete them with the peers."""
    from ikefarm.proto.messages import FLUSH_SELECTORS, KernelFlush
    from ikefarm.shared.cli.main import _load_or_exit, _nats_url

    name = "ikefarm flush kernel"
    usage = f"{name}: expected unique-id N | reqid N | all"
    if words == ["all"]:
        request = KernelFlush("all")
    elif len(words) == 2 and words[0] in FLUSH_SELECTORS and words[1].isdigit():
        value = int(words[1])
        if not 0 < value <= 0xFFFFFFFF:
            print(usage, file=sys.stderr)
            return 2
        request = KernelFlush(words[0], value)
    else:
        print(usage, file=sys.stderr)
        return 2
    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)
    return asyncio.run(_flush_kernel(request, url, args, config))


async def _flush_kernel(request: Any, url: str, args: argparse.Namespace, config: Any) -> int:
    from ikefarm.proto import subjects
    from ikefarm.proto.messages import KernelFlushResult

    answer, failed = await ask_one(
        url,
        args,
        config,
        subjects.KERNEL_FLUSH,
        request,
        KernelFlushResult,
        timeout=args.timeout,
        name="ikefarm flush kernel",
        answerer="kernel service",
    )
    if failed is not None:
        return failed
    if not answer.removed:
        print("No kernel SA to flush.")
        return 0
    ids = " ".join(f"#{unique_id}" for unique_id in answer.removed)
    print(f"Flushed {len(answer.removed)} child SA(s) from the kernel: {ids}")
    return 0


async def ask_one(
    url: str,
    args: argparse.Namespace,
    config: Any,
    subject: str,
    message: Any,
    reply_type: Any,
    *,
    timeout: float,
    name: str,
    answerer: str,
) -> tuple[Any, int | None]:
    """Connect, `request_one`, disconnect: (the answer, None) or (None, exit code), the
    reason said on stderr (2 when NATS cannot be reached)."""
    from ikefarm.shared.cli.main import _nats_credentials

    try:
        nc = await connect(url, _nats_credentials(args, config))
    except Exception as exc:
        print(f"{name}: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return None, 2
    try:
        return await request_one(
            nc, subject, message, reply_type, timeout=timeout, name=name, answerer=answerer
        )
    finally:
        await nc.close()


def _config_of_running_farm(args: argparse.Namespace) -> Any:
    """The config a running `ikefarm up` uses (for mapping a security policy to its VPN)."""
    from ikefarm.shared.bus.embedded import default_state_dir
    from ikefarm.shared.cli.supervisor import read_up_state
    from ikefarm.shared.config.loader import ConfigError, load_config

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    state = read_up_state(state_dir) or {}
    path = state.get("config")
    if not path:
        return None
    try:
        return load_config(path)
    except (ConfigError, OSError):
        return None


async def connect(url: str, credentials: str | None = None) -> Any:
    """A short-lived CLI connection: a broker that is not there is an error, not a retry loop
    (nats-py retries an initial connect forever with max_reconnect_attempts=0)."""
    import nats

    async def quiet(_exc: Exception) -> None:
        return None

    auth: dict[str, str] = {}
    if credentials:
        from ikefarm.shared.bus.auth import read_credentials

        user = read_credentials(credentials)
        auth = {"user": user.user, "password": user.password}
    from ikefarm.proto import subjects
    from ikefarm.shared.bus.servers import server_urls

    return await nats.connect(
        servers=server_urls(url),
        **auth,
        # the CLI's replies come to its own inbox prefix, the only one user admin may read
        inbox_prefix=subjects.inbox_prefix(subjects.ADMIN_USER),
        connect_timeout=2,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        error_cb=quiet,
    )


async def _run(command: Any, url: str, args: argparse.Namespace, config: Any) -> int:
    try:
        from ikefarm.shared.cli.main import _nats_credentials

        nc = await connect(url, _nats_credentials(args, config))
    except Exception as exc:
        print(f"ikefarm {command.verb}: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return 2
    try:
        if command.verb == "initiate":
            return await _initiate(nc, command, args, config)
        return await _broadcast(nc, command, args)
    finally:
        await nc.close()


def _message(command: Any, timeout: float) -> Any:
    from ikefarm.proto.messages import IkeCommand

    return IkeCommand(
        verb=command.verb,
        target=command.target,
        selector=command.selector,
        value=command.value,
        phase=command.phase,
        timeout=timeout,
    )


async def request_one(
    nc: Any,
    subject: str,
    message: Any,
    reply_type: Any,
    *,
    timeout: float,
    name: str,
    answerer: str,
) -> tuple[Any, int | None]:
    """One request to one service: (its answer, None), or (None, exit code) after saying why
    on stderr: 1 when the service refused, 2 when nobody answered."""
    from ikefarm.proto import envelope

    try:
        reply = await nc.request(subject, envelope.pack(message), timeout=timeout)
        return envelope.unpack_reply(reply.data, reply_type), None
    except envelope.BusError as exc:
        print(f"{name}: refused: {exc}", file=sys.stderr)
        return None, 1
    except Exception as exc:  # no responders, timeout
        print(f"{name}: no {answerer} answered ({type(exc).__name__})", file=sys.stderr)
        return None, 2


async def _initiate(nc: Any, command: Any, args: argparse.Namespace, config: Any) -> int:
    from ikefarm.proto.messages import IkeCommandResult

    subject = await _initiate_subject(nc, command, args, config)
    result, failed = await request_one(
        nc,
        subject,
        _message(command, args.timeout),
        IkeCommandResult,
        timeout=args.timeout + 5,
        name="ikefarm initiate",
        answerer="ike worker",
    )
    if failed is not None:
        return failed
    for line in result.lines:
        print(line)
    if not result.ok:
        if result.error and result.error not in result.lines:
            print(f"ikefarm initiate: {result.error}", file=sys.stderr)
        return 1
    return 0


async def _initiate_subject(nc: Any, command: Any, args: argparse.Namespace, config: Any) -> str:
    """The worker owning an established IKE SA of the policy's VPN, else any worker."""
    from ikefarm.proto import subjects

    if command.target != "child-sa":
        return subjects.IKE_INITIATE
    vpns = set()
    if config is not None:
        vpns = {
            vpn.name
            for vpn in config.ike.vpn
            if vpn.enabled and any(sp.name == command.value for sp in vpn.security_policy)
        }
    for row, shard in await _show_rows(nc, args.wait):
        if row.get("state") != "established":
            continue
        has_child = any(c.get("name") == command.value for c in row.get("children", []))
        if row.get("vpn") in vpns or (not vpns and has_child):
            return subjects.ike_shard_command(shard)
    return subjects.IKE_INITIATE


async def _show_rows(nc: Any, window: float) -> list[tuple[dict[str, Any], int]]:
    from ikefarm.proto import envelope, subjects
    from ikefarm.proto.messages import IkeShow, IkeShowRequest
    from ikefarm.shared.cli.status import gather
    from ikefarm.shared.ikev2.show import row_problem

    rows: list[tuple[dict[str, Any], int]] = []
    for reply in await gather(nc, subjects.IKE_SHOW, envelope.pack(IkeShowRequest()), window):
        try:
            show = envelope.unpack_reply(reply.data, IkeShow)
        except envelope.BusError:
            continue
        rows += [(row, show.shard) for row in show.sas if row_problem(row) is None]
    return sorted(rows, key=lambda r: r[0].get("unique_id", 0))


async def _broadcast(nc: Any, command: Any, args: argparse.Namespace) -> int:
    from ikefarm.proto import envelope, subjects
    from ikefarm.proto.messages import IkeCommandResult, SaEventNotice
    from ikefarm.shared.cli.status import gather

    events: asyncio.Queue[Any] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        with contextlib.suppress(envelope.BusError):
            await events.put(envelope.unpack(msg.data, SaEventNotice))

    from ikefarm.shared.bus.runtime import subscriptions_in_place

    sub = await nc.subscribe(f"{subjects.PREFIX}.event.>", cb=on_event)
    await subscriptions_in_place(nc)
    try:
        replies = await gather(
            nc, subjects.IKE_COMMAND, envelope.pack(_message(command, args.timeout)), args.wait
        )
        results: list[IkeCommandResult] = []
        errors: list[str] = []
        for reply in replies:
            if not reply.data:  # the broker's "no responders" status, not a worker
                continue
            try:
                results.append(envelope.unpack_reply(reply.data, IkeCommandResult))
            except envelope.BusError as exc:
                errors.append(str(exc))
        if not results and not errors:
            print(f"ikefarm {command.verb}: no ike worker answered", file=sys.stderr)
            return 2
        errors += [r.error for r in results if not r.ok]
        good = [r for r in results if r.ok]
        if not good:
            for error in dict.fromkeys(errors):
                print(f"ikefarm {command.verb}: {error}", file=sys.stderr)
            return 1
        count = sum(r.count for r in good)
        for result in sorted(good, key=lambda r: r.shard):
            for line in result.lines:
                print(line)
        code = _summary(command, count)
        pending_ike = {uid for r in good for uid in r.pending_ike}
        pending_child = {(p[0], p[1]) for r in good for p in r.pending_child if len(p) == 2}
        waiting = code == 0 and (pending_ike or pending_child)
        if waiting and not await _wait_deleted(events, pending_ike, pending_child, args.timeout):
            print(
                f"ikefarm {command.verb}: the peer has not confirmed every delete after "
                f"{args.timeout:g}s (retransmitting)",
                file=sys.stderr,
            )
            return 1
        return code
    finally:
        await sub.unsubscribe()


def _summary(command: Any, count: int) -> int:
    """Print the seed's summary line (or say nothing matched); the exit code."""
    what = "IKE SA" if command.target == "ike-sa" else "child SA"
    if command.verb == "rekey" and count:
        print(f"Initiated {count} {what} rekey.")
    elif command.verb == "reauth" and count:
        print(f"Initiated {count} IKE SA reauthentication.")
    if count:
        return 0
    if command.verb == "clear":
        print("No SA to clear.")
        return 0
    name = f"unique-id {command.value}" if command.selector == "unique-id" else command.value
    kind = "vpn" if command.selector == "vpn" else "security-policy"
    target = name if command.selector == "unique-id" else f"{kind} {name}"
    print(f"ikefarm {command.verb}: no {what} matches {target}", file=sys.stderr)
    return 1


async def _wait_deleted(
    events: asyncio.Queue[Any],
    pending_ike: set[int],
    pending_child: set[tuple[int, int]],
    timeout: float,
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending_ike or pending_child:
        left = deadline - loop.time()
        if left <= 0:
            return False
        try:
            event = await asyncio.wait_for(events.get(), left)
        except TimeoutError:
            return False
        if event.kind == "ike-deleted":
            pending_ike.discard(event.ike_unique_id)
            pending_child = {p for p in pending_child if p[0] != event.ike_unique_id}
        elif event.kind == "child-deleted":
            unique_id = event.detail.get("unique_id")
            pending_child = {p for p in pending_child if p[1] != unique_id}
    return True
