"""The `ikefarm` command: run the farm, run one service, look at it, check a config."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ikefarm.shared.config.loader import Config, ConfigError, load_config

if TYPE_CHECKING:
    from ikefarm.proto.messages import KernelState

SERVICE_CLASSES = {
    "ingress": "ikefarm.services.ingress.service:IngressService",
    "ike": "ikefarm.services.ike.service:IkeService",
    "keystore": "ikefarm.services.keystore.service:KeystoreService",
    "kernel": "ikefarm.services.kernel.service:KernelService",
    "flow": "ikefarm.services.flow.service:FlowService",
}


def bundled_config_path() -> str:
    """The example config `ikefarm up` uses without -c: a PSK responder on loopback."""
    return str(resources.files("ikefarm.shared.config").joinpath("default.toml"))


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None


def _absolute(path: str) -> str:
    """The config path the services are given; a symlink loop is left for load_config to name."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return path


def _running_farm(args: argparse.Namespace, config: Config | None) -> dict[str, Any] | None:
    """The `up.json` of a running `ikefarm up`: --state-dir, the config's, or the default."""
    from ikefarm.shared.bus.embedded import default_state_dir
    from ikefarm.shared.cli.supervisor import read_up_state, state_dir_of

    state_dir = (
        Path(args.state_dir)
        if getattr(args, "state_dir", None)
        else (state_dir_of(config) if config is not None else default_state_dir())
    )
    return read_up_state(state_dir)


def _nats_url(args: argparse.Namespace, config: Config | None) -> str:
    """--nats, else the config's [nats] servers or url, else the broker a running `ikefarm up`
    started."""
    from ikefarm.shared.bus.servers import configured_nats_url

    if getattr(args, "nats", None):
        return str(args.nats)
    if config is not None and configured_nats_url(config):
        return configured_nats_url(config)
    state = _running_farm(args, config)
    if state and state.get("nats_url"):
        return str(state["nats_url"])
    print(
        "ikefarm: no broker to talk to: pass --nats URL, set [nats] url or servers, or start "
        "`ikefarm up`",
        file=sys.stderr,
    )
    raise SystemExit(2)


def _nats_credentials(args: argparse.Namespace, config: Config | None) -> str | None:
    """The credentials file to connect with: --nats-credentials, $IKEFARM_NATS_CREDENTIALS,
    [nats] credentials, else the CLI user `admin` of a running `ikefarm up`.

    A missing file is no error: a broker without authorization takes anyone.
    """
    import os

    from ikefarm.proto.subjects import ADMIN_USER
    from ikefarm.shared.bus.auth import ENV_CREDENTIALS, credentials_for

    explicit = getattr(args, "nats_credentials", None) or os.environ.get(ENV_CREDENTIALS)
    if explicit:
        return str(credentials_for(explicit, ADMIN_USER))
    if config is not None and config.nats.credentials:
        return str(credentials_for(config.nats.credentials, ADMIN_USER))
    state = _running_farm(args, config)
    if state and state.get("credentials_dir"):
        path = Path(state["credentials_dir"]) / f"{ADMIN_USER}.json"
        return str(path) if path.exists() else None
    return None


def cmd_up(args: argparse.Namespace) -> int:
    from ikefarm.shared.cli.supervisor import Supervisor
    from ikefarm.shared.observability.logging import configure_logging

    path = _absolute(args.config) if args.config else bundled_config_path()
    config = _load_or_exit(path)
    configure_logging(
        "up", "supervisor", config.ike.logging.to_dict(), log_format=config.telemetry.log_format
    )
    master_key = None
    if args.master_key_fd is not None:
        # read once before the preflight opens the store; the keystore gets it down its own pipe
        from ikefarm.services.keystore.store import receive_master_key, received_master_key

        receive_master_key(config, args.master_key_fd)
        master_key = received_master_key()
    refused = _preflight_all(config)
    if refused:
        return refused
    return Supervisor(config, path, master_key=master_key).run()


def _preflight_all(config: Config) -> int:
    """Every service's own start-up check (a locked keystore, an unusable kernel backend), run
    before anything starts: `up` then exits 1 with the reason instead of restarting forever."""
    from ikefarm.shared.bus.runtime import ServiceUnavailable

    for name, target in SERVICE_CLASSES.items():
        module_name, class_name = target.split(":")
        try:
            getattr(importlib.import_module(module_name), class_name).preflight(config)
        except ServiceUnavailable as exc:
            print(f"ikefarm up: {name}: {exc}", file=sys.stderr)
            return 1
    return 0


def _shard_argument(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard number or `auto`") from None


def _listen_argument(text: str) -> str:
    from ikefarm.shared.config.kinds import ListenAddressError, format_listen, parse_listen

    try:
        return format_listen(*parse_listen(text))
    except ListenAddressError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def cmd_service(args: argparse.Namespace) -> int:
    import os

    from ikefarm.shared.bus.auth import (
        ENV_CREDENTIALS,
        CredentialsError,
        credentials_for,
        read_credentials,
    )
    from ikefarm.shared.bus.runtime import run_service

    path = args.config or bundled_config_path()
    config = _load_or_exit(path)
    module_name, class_name = SERVICE_CLASSES[args.name].split(":")
    service_cls = getattr(importlib.import_module(module_name), class_name)
    if args.name == "keystore":
        service_cls.receive_master_key(config, args.master_key_fd)
    elif args.master_key_fd is not None:
        print(f"ikefarm {args.name}: --master-key-fd is for the keystore only", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "shard": args.shard,
        "config_path": str(Path(path).resolve()),
        "metrics_listen": args.metrics_listen,
    }
    credentials = getattr(args, "nats_credentials", None) or config.nats.credentials
    if credentials is None:
        credentials = os.environ.get(ENV_CREDENTIALS)
    if credentials:
        credentials = str(credentials_for(credentials, args.name))
        try:
            read_credentials(credentials)
        except (OSError, CredentialsError) as exc:
            print(f"ikefarm {args.name}: NATS credentials: {exc}", file=sys.stderr)
            return 1
        options["credentials"] = credentials
    return run_service(service_cls, config, _nats_url(args, config), args.instance, options)


def cmd_status(args: argparse.Namespace) -> int:
    from ikefarm.shared.cli.manage import connect
    from ikefarm.shared.cli.status import discover, format_dos, format_shards, format_table

    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)

    async def run() -> int:
        try:
            nc = await connect(url, _nats_credentials(args, config))
        except Exception as exc:
            print(f"ikefarm status: cannot reach NATS at {url}: {exc}", file=sys.stderr)
            return 2
        problems: list[str] = []
        try:
            rows = await discover(nc, window=args.wait, problems=problems)
        finally:
            await nc.close()
        for problem in problems:
            print(f"ikefarm status: {problem}", file=sys.stderr)
        if args.json:
            import json
            from dataclasses import asdict

            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            print(format_table(rows))
            shards = format_shards(rows)
            if shards:
                print(f"\nShards:\n{shards}")
            dos = format_dos(rows)
            if dos:
                print(f"\nDoS protection:\n{dos}")
        return 0 if rows else 1

    return asyncio.run(run())


def cmd_show(args: argparse.Namespace) -> int:
    if args.what == "kernel":
        return cmd_show_kernel(args)
    if args.what == "vip-pool":
        return cmd_show_vip_pool(args)
    if args.what == "security":
        from ikefarm.shared.cli.flow import cmd_flow

        return cmd_flow("show", args, ["security", *args.words])

    from ikefarm.shared.cli.manage import connect
    from ikefarm.shared.cli.status import ike_sa_rows
    from ikefarm.shared.ikev2.show import format_details, format_summary

    unknown = [w for w in args.words if w != "details"]
    if unknown:
        print(
            f"ikefarm show ike-sa: unknown word(s) {' '.join(unknown)}; try: details",
            file=sys.stderr,
        )
        return 2
    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)
    details = "details" in args.words

    async def run() -> int:
        try:
            nc = await connect(url, _nats_credentials(args, config))
        except Exception as exc:
            print(f"ikefarm show: cannot reach NATS at {url}: {exc}", file=sys.stderr)
            return 2
        problems: list[str] = []
        try:
            rows = await ike_sa_rows(nc, details, args.wait, problems)
        finally:
            await nc.close()
        for problem in problems:
            print(f"ikefarm show: {problem}", file=sys.stderr)
        if args.json:
            import json

            print(json.dumps(rows, indent=2))
        elif details:
            print(format_details(rows))
        else:
            print(format_summary(rows))
        return 0

    return asyncio.run(run())


def _ask_one(
    args: argparse.Namespace, subject: str, request: Any, reply_type: Any, what: str, timeout: float
) -> Any:
    """One request to one service over the farm's bus and its typed answer; None (the
    reason printed) when the bus or the service does not answer."""
    from ikefarm.proto import envelope
    from ikefarm.shared.cli.manage import connect

    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)

    async def run() -> Any:
        try:
            nc = await connect(url, _nats_credentials(args, config))
        except Exception as exc:
            print(f"ikefarm show: cannot reach NATS at {url}: {exc}", file=sys.stderr)
            return None
        try:
            reply = await nc.request(subject, envelope.pack(request), timeout=timeout)
            return envelope.unpack_reply(reply.data, reply_type)
        except Exception as exc:
            print(f"ikefarm show {what}: no answer ({type(exc).__name__})", file=sys.stderr)
            return None
        finally:
            await nc.close()

    return asyncio.run(run())


def cmd_show_vip_pool(args: argparse.Namespace) -> int:
    """The farm's VIP pools: size, used, free and each lease (one ike worker reads the
    farm-wide lease bucket; docs/vip-pools.md)."""
    import json

    from ikefarm.proto import subjects
    from ikefarm.proto.messages import VipPoolShow, VipPoolShowRequest
    from ikefarm.shared.ikev2.show import format_vip_pools

    if len(args.words) > 1:
        print(f"ikefarm show vip-pool: unknown word(s) {' '.join(args.words[1:])}", file=sys.stderr)
        return 2
    name = args.words[0] if args.words else ""
    shown = _ask_one(
        args, subjects.IKE_VIP_POOL_SHOW, VipPoolShowRequest(name), VipPoolShow, "vip-pool", 5
    )
    if shown is None:
        return 2
    if name and not shown.pools:
        print(f"ikefarm show vip-pool: no pool named {name!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(shown.pools, indent=2))
    else:
        print(format_vip_pools(shown.pools))
    return 0


def cmd_show_kernel(args: argparse.Namespace) -> int:
    """The kernel service's SAD, SPD and trap policies (never key material)."""
    import json

    from ikefarm.proto import subjects
    from ikefarm.proto.messages import KernelShowRequest, KernelState

    if args.words:
        print(f"ikefarm show kernel: unknown word(s) {' '.join(args.words)}", file=sys.stderr)
        return 2
    state = _ask_one(args, subjects.KERNEL_SHOW, KernelShowRequest(), KernelState, "kernel", 2)
    if state is None:
        return 2
    body = {"backend": state.backend, "sas": state.sas, "policies": state.policies,
            "traps": state.traps, "vips": state.vips}  # fmt: skip
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for line in kernel_lines(state):
        print(line)
    return 0


def kernel_lines(state: KernelState) -> list[str]:
    """`show kernel` as text, in the vSR `show state` layout (seed 004: one `key value` per
    line, a nested block indented and closed by `..`): SAs (algorithms and key sizes, never
    keys; the dataplane's counters and lifetimes where the backend reports them), policies,
    traps."""
    lines = [f"backend {state.backend}"]
    for sa in state.sas:
        lines.append(f"sa spi {sa['spi']} direction {sa['direction']}")
        fields: list[tuple[str, Any]] = [
            ("unique-id", sa.get("unique_id")),
            ("reqid", sa.get("reqid")),
            ("protocol", sa.get("protocol", "esp")),
            ("mode", sa.get("mode")),
            ("source", sa.get("src")),
            ("destination", sa.get("dst")),
            ("udp-encap", "true" if sa.get("encap") else "false"),
        ]
        if sa.get("encap"):
            fields += [
                ("source-port", sa.get("src_port")),
                ("destination-port", sa.get("dst_port")),
            ]
        if sa.get("integ"):
            fields += [("enc-alg", sa.get("encr")), ("auth-alg", sa["integ"])]
        else:  # vSR names a combined mode aead-alg
            fields.append(("aead-alg", sa.get("encr")))
        fields += [
            ("esn", "true" if sa.get("esn") else "false"),
            ("replay-window", sa.get("replay_window", 0)),
        ]
        # netlink reads the kernel's counters into "counters"; the userspace dataplane
        # (and the memory test double) reports its own beside the SA's fields
        counters = sa.get("counters") or (sa if "packets" in sa else None)
        if counters:
            fields += [("bytes", counters["bytes"]), ("packets", counters["packets"])]
        lifetime = sa.get("lifetime")
        if lifetime:
            fields += [
                ("rekey-time", lifetime["soft_seconds"]),
                ("life-time", lifetime["hard_seconds"]),
            ]
        lines += [f"    {key} {value}" for key, value in fields if value is not None]
        lines.append("    ..")
    for policy in state.policies:
        lines += [
            f"policy direction {policy['direction']}",
            f"    source {policy['src']}",
            f"    destination {policy['dst']}",
            f"    reqid {policy['reqid']}",
            f"    mode {policy['mode']}",
            f"    template {policy.get('tmpl_src', '-')} -> {policy.get('tmpl_dst', '-')}",
            "    ..",
        ]
    for trap in state.traps:
        lines.append(f"trap vpn {trap['vpn']} security-policy {trap['name']}")
        lines.append(f"    reqid {trap['reqid']}")
        lines.append(f"    mode {trap['mode']}")
        lines += [f"    local-ts subnet {ts}" for ts in trap["local_ts"]]
        lines += [f"    remote-ts subnet {ts}" for ts in trap["remote_ts"]]
        lines.append("    ..")
    return lines


def cmd_snmp(args: argparse.Namespace) -> int:
    """`snmp pass-persist`: the net-snmp pass_persist program (shared/cli/snmp.py)."""
    from ikefarm.shared.cli.snmp import PassPersist, bus_fetcher, parse_oid

    config = _load_or_exit(args.config)
    if not config.ike.global_options.snmp:
        print(
            "ikefarm snmp: SNMP is off: set `snmp = true` in [ike.global-options]",
            file=sys.stderr,
        )
        return 2
    base = parse_oid(args.base)
    if base is None:
        print(f"ikefarm snmp: --base {args.base!r} is not an OID", file=sys.stderr)
        return 2
    fetch = bus_fetcher(_nats_url(args, config), _nats_credentials(args, config), args.wait)
    PassPersist(fetch, cache=args.cache, base=base).serve(sys.stdin, sys.stdout)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(config.render(), end="")
    return 0


def cmd_config_reference(_args: argparse.Namespace) -> int:
    from ikefarm.shared.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return 0


def cmd_config_nats_auth(args: argparse.Namespace) -> int:
    """Create (or reuse) one credentials file per service and print how to wire them."""
    from ikefarm.shared.bus.auth import (
        authorization_block,
        ensure_credentials,
        write_server_config,
    )

    directory = Path(args.directory)
    users = ensure_credentials(directory)
    server_config = write_server_config(directory, users)
    print(f"# {server_config.resolve()} (mode 0600) holds the users with their passwords;")
    print("# nats-server resolves `include` relative to the including file: beside it,")
    print(f"#   include {server_config.name}")
    print("# each service: ikefarm service NAME --nats URL --nats-credentials FILE")
    for name, user in users.items():
        print(f"#   {name:9} {user.path}")
    print("# the permissions, passwords left out:")
    print(authorization_block(users, with_passwords=False), end="")
    return 0


def cmd_config_nats_node(args: argparse.Namespace) -> int:
    """Write one cluster node's nats-server config beside the credentials (0600)."""
    from ikefarm.shared.bus.auth import ensure_credentials
    from ikefarm.shared.bus.cluster import node_config, write_node_config

    directory = Path(args.directory)
    users = ensure_credentials(directory)
    text = node_config(
        name=args.name,
        listen=args.listen,
        cluster_listen=args.cluster_listen,
        routes=args.route,
        store_dir=args.store_dir,
        credentials=users,
        cluster_name=args.cluster_name,
        monitor=args.monitor,
    )
    path = write_node_config(directory / f"nats-node-{args.name}.conf", text)
    print(f"# {path.resolve()} (mode 0600, it holds the passwords); run: nats-server -c {path}")
    print("# ikefarm: [nats] servers = the nodes' nats://HOST:PORT, replicas = 3,")
    print(f"#          credentials = {directory.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ikefarm", description="IKEv2/IPsec gateway over NATS")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole farm (embedded nats-server by default)")
    up.add_argument(
        "--master-key-fd",
        type=int,
        help="read the keystore's master key from this inherited descriptor (a file or pipe) "
        "instead of the environment; `ops/up` hands its key file this way",
    )
    up.add_argument("-c", "--config", help="TOML config (default: bundled loopback example)")
    up.set_defaults(func=cmd_up)

    service = commands.add_parser("service", help="run one service process")
    service.add_argument("name", choices=sorted(SERVICE_CLASSES))
    service.add_argument("-c", "--config", help="TOML config")
    service.add_argument("--nats", help="NATS URL (default: [nats] url or the running `up`)")
    service.add_argument("--instance", help="instance name (default: service-host-pid)")
    service.add_argument(
        "--shard",
        type=_shard_argument,
        default=None,
        help="ike: SPI shard this worker owns, or `auto`: the lowest free one (claimed on the bus)",
    )
    service.add_argument(
        "--metrics-listen",
        type=_listen_argument,
        default=None,
        help="ADDRESS:PORT of the Prometheus endpoint (default: [telemetry] metrics-listen)",
    )
    service.add_argument("--state-dir", help=argparse.SUPPRESS)
    service.add_argument(
        "--nats-credentials", help="file with this service's NATS user (default: none)"
    )
    service.add_argument(
        "--master-key-fd",
        type=int,
        help="keystore: read the master key from this inherited pipe (how `ikefarm up` hands it)",
    )
    service.set_defaults(func=cmd_service)

    status = commands.add_parser("status", help="services found by discovery")
    status.add_argument("-c", "--config")
    status.add_argument("--nats")
    status.add_argument("--state-dir")
    status.add_argument("--json", action="store_true")
    status.add_argument("--wait", type=float, default=0.5, help="seconds to collect replies")
    status.set_defaults(func=cmd_status)

    show = commands.add_parser(
        "show",
        help="show state: `show ike-sa [details]`, `show kernel` (SAs, policies, traps), "
        "`show security flow session [summary] [filters]`, `show vip-pool [NAME]`",
    )
    show.add_argument("what", choices=["ike-sa", "kernel", "security", "vip-pool"])
    show.add_argument(
        "words",
        nargs="*",
        help="ike-sa: details; security: flow session [summary] [filters]; vip-pool: [NAME]",
    )
    show.add_argument("-c", "--config")
    show.add_argument("--nats")
    show.add_argument("--state-dir")
    show.add_argument("--json", action="store_true")
    show.add_argument("--wait", type=float, default=0.5, help="seconds to collect replies")
    show.set_defaults(func=cmd_show)

    from ikefarm.shared.cli.manage import add_parsers

    add_parsers(commands)

    snmp = commands.add_parser(
        "snmp", help="IKE state over SNMP: `snmp pass-persist`, for snmpd's pass_persist"
    )
    snmp.add_argument("mode", choices=["pass-persist"])
    snmp.add_argument("-c", "--config", required=True)
    snmp.add_argument("--nats")
    snmp.add_argument("--nats-credentials")
    snmp.add_argument("--state-dir")
    snmp.add_argument("--base", default=".1.3.6.1.4.1.32473.1", help="OID of the subtree")
    snmp.add_argument("--cache", type=float, default=5.0, help="seconds a bus snapshot answers")
    snmp.add_argument("--wait", type=float, default=0.5, help="seconds to collect replies")
    snmp.set_defaults(func=cmd_snmp)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="print the effective config, or the errors")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    reference = config_commands.add_parser("reference", help="every option, default and range")
    reference.set_defaults(func=cmd_config_reference)
    nats_auth = config_commands.add_parser(
        "nats-auth",
        help="per-service NATS users for an external nats-server: credentials and permissions",
    )
    nats_auth.add_argument("directory", help="where the credentials files are kept (0600)")
    nats_auth.set_defaults(func=cmd_config_nats_auth)
    nats_node = config_commands.add_parser(
        "nats-node",
        help="one node of a NATS cluster for the farm (JetStream clustered, the farm's users)",
    )
    nats_node.add_argument(
        "directory", help="the credentials directory (`config nats-auth`); the config goes there"
    )
    nats_node.add_argument("--name", required=True, help="this node's server name")
    nats_node.add_argument("--listen", required=True, help="client listener HOST:PORT")
    nats_node.add_argument("--cluster-listen", required=True, help="route listener HOST:PORT")
    nats_node.add_argument(
        "--route", action="append", default=[], help="another node's route HOST:PORT (repeat)"
    )
    nats_node.add_argument("--store-dir", required=True, help="this node's JetStream store")
    nats_node.add_argument("--cluster-name", default="ikefarm")
    nats_node.add_argument("--monitor", help="monitoring listener HOST:PORT (default: none)")
    nats_node.set_defaults(func=cmd_config_nats_node)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
