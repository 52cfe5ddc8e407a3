"""Load, check and present an ikefarm TOML configuration.

`load_config(path)` returns a `Config` (attribute access in snake_case over the
kebab-case keys, `config.ike.global_options.retransmit_tries`) or raises
`ConfigError` carrying every problem found, each naming the key, the value and
what is allowed. Secrets are `Secret` objects and render as `<masked>`.

Whatever the file holds (binary data, bytes that are not UTF-8, values nested
thousands deep, a list of a million items), loading raises nothing but
`ConfigError`, and each problem is one short line: values are cut to a few dozen
characters with their length, at most `MAX_PROBLEMS` problems are listed.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.shared.config.kinds import Rate, Secret, one_line, show_value
from ikefarm.shared.config.planned import planned_problems
from ikefarm.shared.config.schema import SCHEMA
from ikefarm.shared.config.tree import (
    MAX_PROBLEMS,
    ConfigProblem,
    Section,
    TableList,
    WalkResult,
    iter_reference,
    walk_section,
)

MAX_FILE_SIZE = 4 * 1024 * 1024  # octets; a real configuration is a few KiB
MAX_NESTING = 32  # arrays and inline tables inside each other; the schema needs a handful


class ConfigError(ValueError):
    def __init__(self, source: str, problems: list[ConfigProblem], omitted: int = 0) -> None:
        self.source = source
        self.problems = problems
        shown = problems[:MAX_PROBLEMS]
        omitted += len(problems) - len(shown)
        total = len(shown) + omitted
        lines = "\n".join(f"  {p}" for p in shown)
        if omitted:
            lines += f"\n  ... and {omitted} more problem(s) not shown"
        super().__init__(f"{one_line(source, 256)}: {total} configuration error(s)\n{lines}")


class Node:
    """Read-only view of one table; `node.retransmit_tries` reads `retransmit-tries`."""

    __slots__ = ("_data", "_path")

    def __init__(self, data: dict[str, Any], path: str = "") -> None:
        self._data = data
        self._path = path

    def __getattr__(self, name: str) -> Any:
        key = name.replace("_", "-")
        try:
            return _wrap(self._data[key], f"{self._path}.{key}" if self._path else key)
        except KeyError:
            raise AttributeError(f"no config key {key!r} under {self._path or '<root>'}") from None

    def __getitem__(self, key: str) -> Any:
        return _wrap(self._data[key], f"{self._path}.{key}" if self._path else key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._data else default

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def to_dict(self) -> dict[str, Any]:
        return self._data

    def __repr__(self) -> str:
        return f"Node({self._path or '<root>'})"


def _wrap(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return Node(value, path)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [Node(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


@dataclass
class Config(Node):
    """The effective configuration: values with defaults filled in, plus which keys were set."""

    data: dict[str, Any]
    explicit: set[str] = field(default_factory=set)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        Node.__init__(self, self.data, "")

    def __getattr__(self, name: str) -> Any:
        return Node.__getattr__(self, name)

    def is_explicit(self, path: str) -> bool:
        """Whether the operator wrote this dotted key (Junos semantics depend on it)."""
        return path in self.explicit

    def without_secrets(self) -> Config:
        """A copy whose secrets are gone: what an ike worker may hold.

        docs/principles.md, principle 4."""
        return Config(_strip_secrets(self.data), set(self.explicit), self.source)

    def render(self) -> str:
        return render_toml(self.data)


def _strip_secrets(value: Any) -> Any:
    if isinstance(value, Secret):
        return None
    if isinstance(value, dict):
        return {k: _strip_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_secrets(v) for v in value]
    return value


def load_config(path: str | Path) -> Config:
    source = str(path)
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(source, [ConfigProblem("<file>", f"cannot read: {reason}")]) from None
    except ValueError as exc:  # a path with a NUL byte
        raise ConfigError(source, [ConfigProblem("<file>", f"cannot read: {exc}")]) from None
    return parse_config(decode_config(data, source), source)


def _where(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"line {line}, column {column} (byte offset {offset})"


def decode_config(data: bytes, source: str = "<memory>") -> str:
    """The text of a config file, or ConfigError: too large, binary, or not UTF-8 (TOML 1.0)."""

    def refuse(message: str) -> ConfigError:
        return ConfigError(source, [ConfigProblem("<file>", message)])

    if len(data) > MAX_FILE_SIZE:
        raise refuse(f"larger than {MAX_FILE_SIZE // (1024 * 1024)} MiB: not a configuration")
    nul = data.find(b"\0")
    if nul >= 0:
        raise refuse(f"a binary file, not TOML text: NUL byte at {_where(data, nul)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8: invalid byte at {_where(data, exc.start)}") from None


LEAF_DEFAULTS: dict[str, Any] = {
    path: spec.default
    for path, spec in iter_reference(SCHEMA)
    if not isinstance(spec, Section | TableList)
}


def parse_config(text: str, source: str = "<memory>") -> Config:
    if len(text) > MAX_FILE_SIZE:
        raise ConfigError(
            source, [ConfigProblem("<file>", f"larger than {MAX_FILE_SIZE} characters")]
        )
    too_deep = nesting_problem(text)
    if too_deep is not None:
        raise ConfigError(source, [too_deep])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("<toml>", str(exc))]) from None
    except RecursionError:  # nesting_problem should have said so first
        raise ConfigError(
            source, [ConfigProblem("<toml>", f"nested deeper than {MAX_NESTING} levels")]
        ) from None
    except ValueError as exc:  # int() of a number beyond sys.get_int_max_str_digits()
        reason = "a number has too many digits" if "digits" in str(exc) else str(exc)
        raise ConfigError(source, [ConfigProblem("<toml>", reason)]) from None
    result = WalkResult(value=None)
    data = walk_section(SCHEMA, raw, "", result)
    config = Config(data, result.explicit, source)
    result.problems.extend(cross_check(config))
    result.problems.extend(planned_problems(data, result.explicit, LEAF_DEFAULTS))
    if result.problems:
        raise ConfigError(source, result.problems, result.omitted)
    return config


# what matters for nesting: string and comment openers (their insides are skipped), brackets,
# braces, `=` (ends a key) and newlines (end a statement outside brackets)
_NESTING_TOKEN = re.compile(r'"""|\'\'\'|["\'#\[\]{}=\n]')
_BASIC_STRING_END = re.compile(r'(?:[^"\\\n]|\\.)*"')
_MULTILINE_BASIC_END = re.compile(r'(?:[^"\\]|\\.|"(?!""))*"""', re.DOTALL)


def nesting_depth(text: str, limit: int) -> tuple[int, int, str]:
    """How deep arrays and inline tables (and table headers) nest in TOML `text`, without
    parsing it: (depth, line, key) where the depth first exceeds `limit`, else the deepest
    depth seen with (0, ""). tomllib recurses once per level, so a file nested thousands
    deep must be refused before it gets there.
    """
    depth = deepest = 0
    line = 1
    statement = 0  # where the current statement (outside brackets) starts
    opened = False  # whether a bracket or `=` of this statement was seen: looked at once
    header_at = -1  # where a `[table]` header being read starts
    header = key = ""
    pos = 0
    while match := _NESTING_TOKEN.search(text, pos):
        mark, pos = match.group(), match.end()
        if mark == "\n":
            line += 1
            if depth == 0:
                statement, opened = pos, False
        elif mark == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        elif mark in ('"', "'"):
            if mark == '"':
                closed = _BASIC_STRING_END.match(text, pos)
                end = closed.end() if closed else -1
            else:
                end = text.find("'", pos) + 1 or -1
                if end > 0 and "\n" in text[pos:end]:
                    end = -1
            if end < 0:  # unterminated: tomllib says where
                newline = text.find("\n", pos)
                pos = len(text) if newline < 0 else newline
            else:
                pos = end
        elif mark in ('"""', "'''"):
            if mark == '"""':
                closed = _MULTILINE_BASIC_END.match(text, pos)
                end = closed.end() if closed else len(text)
            else:
                found = text.find("'''", pos)
                end = len(text) if found < 0 else found + 3
            for _ in range(2):  # `""""` ends a string with a quote: up to two more may follow
                if text.startswith(mark[0], end):
                    end += 1
            line += text.count("\n", pos, end)
            pos = end
        elif mark in "[{":
            if depth == 0 and not opened:
                opened = True
                if not text[statement : match.start()].strip():
                    header_at = match.start()
            depth += 1
            if depth > limit:
                where = f"{header}.{key}" if header and key else header or key or "<toml>"
                return depth, line, where
            deepest = max(deepest, depth)
        elif mark in "]}":
            depth = max(0, depth - 1)
            if depth == 0 and header_at >= 0:
                header = text[header_at:pos].strip("[] \t")
                header_at, key = -1, ""
        elif depth == 0 and not opened:  # "="
            opened = True
            key = text[statement : match.start()].strip()
    return deepest, 0, ""


def nesting_problem(text: str) -> ConfigProblem | None:
    depth, line, key = nesting_depth(text, MAX_NESTING)
    if depth <= MAX_NESTING:
        return None
    return ConfigProblem(
        one_line(key, 128),
        f"arrays or inline tables nested deeper than {MAX_NESTING} levels (line {line})",
    )


def ppk_identity(ppk: Node) -> bytes | None:
    """The PPK_ID octets a `[[ike.ppk]]` entry names, whichever form it uses."""
    if ppk.id is not None:
        return ppk.id.encode()
    if ppk.id_hex is not None:
        return bytes.fromhex(ppk.id_hex)
    return None


def certificate_problems(config: Config) -> list[tuple[str, str]]:
    from ikefarm.shared.ikev2.certs import certificate_problems as check

    return check(config)


def flow_problems(flow: Any) -> list[tuple[str, str]]:
    from ikefarm.shared.flow.settings import config_problems

    return config_problems(flow.to_dict())


USERSPACE_NOT_IMPLEMENTED = 'not implemented with [kernel] backend = "userspace"'


def userspace_backend_problems(config: Config, backend: str | None = None) -> list[ConfigProblem]:
    """Options the userspace kernel backend cannot honour yet (docs/esp-dataplane.md).

    `backend`: the one the kernel service chose (`auto` resolves only at its start);
    by default the configured one."""
    if (backend or config.kernel.backend) != "userspace":
        return []
    problems: list[ConfigProblem] = []

    def problem(path: str, why: str) -> None:
        problems.append(ConfigProblem(path, f"{USERSPACE_NOT_IMPLEMENTED} ({why})"))

    options = config.ike.global_options
    for family, bits in (("sp-hash-ipv4", 32), ("sp-hash-ipv6", 128)):
        section = options[family]
        if section.local != bits or section.remote != bits:
            problem(f"ike.global-options.{family}", "it has no SPD hash")
    for index, vpn in enumerate(config.ike.vpn):
        for s_index, policy in enumerate(vpn.security_policy):
            path = f"ike.vpn[{index}].security-policy[{s_index}]"
            if policy.mode != "tunnel":
                problem(f"{path}.mode", f"{policy.mode} mode")
            if policy.svti_id_in is not None or policy.svti_id_out is not None:
                problem(f"{path}.svti-id-in", "no SVTI interfaces")
            if policy.inject_routes.next_hop is not None:
                problem(f"{path}.inject-routes", "no route injection")
    return problems


def cross_check(config: Config) -> list[ConfigProblem]:
    """Rules that span keys: references, exclusive options, unique PPK identities."""
    problems: list[ConfigProblem] = []
    ike = config.ike

    def problem(path: str, message: str) -> None:
        problems.append(ConfigProblem(path, message))

    ppk_names: set[str] = set()
    identities: dict[bytes, str] = {}
    for index, ppk in enumerate(ike.ppk):
        path = f"ike.ppk[{index}]"
        ppk_names.add(ppk.name)
        if (ppk.id is None) == (ppk.id_hex is None):
            problem(path, "exactly one of 'id' or 'id-hex' is required")
        if ppk.secret is None:
            problem(f"{path}.secret", "is required")
        identity = ppk_identity(ppk)
        if identity is not None:
            if identity in identities:
                problem(
                    path,
                    f"PPK identity {one_line(identity.hex(), 64)} (hex) is already used by "
                    f"{identities[identity]}",
                )
            else:
                identities[identity] = path

    nats = config.nats
    if nats.url and nats.servers:
        problem("nats.servers", "give either url or servers, not both")
    if nats.replicas > 1 and not (nats.url or nats.servers):
        problem(
            "nats.replicas",
            f"{nats.replicas} replicas need an external NATS cluster (url or servers): the "
            "embedded nats-server is one node",
        )

    for index, psk in enumerate(ike.pre_shared_key):
        if psk.secret is None:
            problem(f"ike.pre-shared-key[{index}].secret", "is required")

    for index, server in enumerate(ike.radius_server):
        if server.address is None:
            problem(f"ike.radius-server[{index}].address", "is required")
        if server.secret is None:
            problem(f"ike.radius-server[{index}].secret", "is required")

    for kind in ("ike-policy-template", "ipsec-policy-template"):
        proposal_key = "ike-proposal" if kind.startswith("ike-") else "esp-proposal"
        for index, template in enumerate(ike[kind]):
            for p_index, proposal in enumerate(template[proposal_key]):
                path = f"ike.{kind}[{index}].{proposal_key}[{p_index}]"
                problems.extend(
                    _check_proposal(path, proposal, is_ike=proposal_key == "ike-proposal")
                )

    ike_templates = {t.name for t in ike.ike_policy_template}
    ipsec_templates = {t.name for t in ike.ipsec_policy_template}
    pools = {p.name for p in ike.pool}
    for index, pool in enumerate(ike.pool):
        if [p.name for p in ike.pool].count(pool.name) > 1:
            problem(f"ike.pool[{index}].name", f"{show_value(pool.name)} names two pools")
    listen_addresses = list(config.ingress.listen or [])
    for index, vpn in enumerate(ike.vpn):
        path = f"ike.vpn[{index}]"
        template = vpn.ike_policy.template
        if template is not None and template not in ike_templates:
            problem(
                f"{path}.ike-policy.template",
                f"{show_value(template)} is not an ike-policy-template",
            )
        template = vpn.ipsec_policy.template
        if template is not None and template not in ipsec_templates:
            problem(
                f"{path}.ipsec-policy.template",
                f"{show_value(template)} is not an ipsec-policy-template",
            )
        if vpn.ppk is not None and vpn.ppk not in ppk_names:
            problem(f"{path}.ppk", f"{show_value(vpn.ppk)} is not the name of an [[ike.ppk]]")
        eap = vpn.ike_policy.remote_auth_method == "eap-radius"
        if eap and vpn.enabled and not ike.radius_server:
            problem(
                f"{path}.ike-policy.remote-auth-method",
                '"eap-radius" needs at least one [[ike.radius-server]]',
            )
        for pool in vpn.vip_pool:
            if pool == "radius":
                if not eap:
                    problem(
                        f"{path}.vip-pool",
                        '"radius" takes the addresses of a RADIUS authentication: it needs '
                        'remote-auth-method = "eap-radius"',
                    )
            elif pool not in pools:
                problem(
                    f"{path}.vip-pool", f"{show_value(pool)} is not the name of an [[ike.pool]]"
                )
        if vpn.local_address is not None:
            listen_addresses.append(vpn.local_address)
        for request in vpn.vip_request:
            if not ipaddress.ip_address(request).is_unspecified:
                problem(f"{path}.vip-request", f"{show_value(request)} must be 0.0.0.0 or ::")
        for s_index, policy in enumerate(vpn.security_policy):
            routes = policy.inject_routes
            sp_path = f"{path}.security-policy[{s_index}].inject-routes"
            if routes.table is not None and routes.l3vrf is not None:
                problem(sp_path, "'table' and 'l3vrf' are exclusive")
            if (routes.vrf or routes.table or routes.l3vrf) and routes.next_hop is None:
                problem(f"{sp_path}.next-hop", "is mandatory when inject-routes is used")
    for index, address in enumerate(config.ingress.listen or []):
        if ipaddress.ip_address(address).is_unspecified:
            problem(
                f"ingress.listen[{index}]",
                f"{show_value(address)} is a wildcard: name the addresses to listen on (NAT "
                "detection needs the real local address of each datagram)",
            )
    if ike.vpn and not listen_addresses:
        problem("ingress.listen", "no address to listen on: set it or a vpn local-address")
    problems.extend(psk_problems(config))
    problems.extend(userspace_backend_problems(config))

    reduce = ike.session.half_open.thresholds.reduce_timeout
    if (reduce.count is None) != (reduce.timeout is None):
        problem("ike.session.half-open.thresholds.reduce-timeout", "needs both count and timeout")

    aging = config.flow.aging
    if aging.low_watermark > aging.high_watermark:
        problem(
            "flow.aging.low-watermark",
            f"{aging.low_watermark} must not exceed high-watermark {aging.high_watermark}",
        )
    problems.extend(ConfigProblem(path, text) for path, text in flow_problems(config.flow))
    problems.extend(ConfigProblem(path, text) for path, text in certificate_problems(config))
    return problems


PSK_ANY_ID = "%any"  # strongSwan's wildcard identity, as the keystore takes it


def _psk_identity(configured: str | None) -> str | None:
    """An `[[ike.pre-shared-key]]` side as the keystore matches it: None matches any identity."""
    return None if configured is None or configured == PSK_ANY_ID else configured


def psk_problems(config: Config) -> list[ConfigProblem]:
    """Every enabled VPN that authenticates by PSK needs an `[[ike.pre-shared-key]]` entry its
    identities can select, or every handshake fails with AUTHENTICATION_FAILED.

    The rule is the keystore's (services/keystore/psk.py): an entry side that is unset or
    `%any` fits any identity, a named side fits that identity exactly. The keystore is
    asked with the VPN's local-id (else its local-address, else `%any`) and the identity
    the peer presents, which fits the VPN's remote-id as the engine matches it (unset,
    `%any` or `*` any, `*` globs, DNs; shared/ikev2/exchanges/ike_auth.py). Where an
    identity is only known at run time (a certificate's subject) nothing is refused.
    """
    from ikefarm.shared.ikev2.exchanges.ike_auth import identity_matches

    named_remotes: dict[str | None, set[str | None]] = {}  # local-id -> remote-ids, None: any
    for entry in config.ike.pre_shared_key:
        local = _psk_identity(entry.local_id)
        named_remotes.setdefault(local, set()).add(_psk_identity(entry.remote_id))

    def fits(local: str | None, remote_id: str | None) -> bool:
        """Some entry for `local` takes an identity the VPN's `remote_id` accepts."""
        remotes = named_remotes.get(local, set())
        if not remotes:
            return False
        if remote_id is None or None in remotes or remote_id in remotes:
            return True
        return any(r is not None and identity_matches(remote_id, r) for r in remotes)

    problems: list[ConfigProblem] = []
    for index, vpn in enumerate(config.ike.vpn):
        methods = (vpn.ike_policy.local_auth_method, vpn.ike_policy.remote_auth_method)
        if not vpn.enabled or "pre-shared-key" not in methods:
            continue
        local_id = vpn.local_id
        if local_id is None and vpn.local_certificate:
            continue  # the certificate's subject DN: known once the file is read
        if local_id is None:
            local_id = vpn.local_address or PSK_ANY_ID
        remote_id = vpn.remote_id
        if remote_id in (PSK_ANY_ID, "*"):
            remote_id = None
        if not (fits(local_id, remote_id) or fits(None, remote_id)):
            ids = f"local-id {show_value(local_id)} and remote-id " + (
                "any" if remote_id is None else show_value(remote_id)
            )
            problems.append(
                ConfigProblem(
                    f"ike.vpn[{index}]",
                    f"vpn {show_value(vpn.name)} authenticates by pre-shared key but no "
                    f'[[ike.pre-shared-key]] fits its {ids} (an unset or "%any" side fits '
                    "any identity)",
                )
            )
    return problems


def _check_proposal(path: str, proposal: Node, *, is_ike: bool) -> list[ConfigProblem]:
    problems = []
    has_aead = proposal.aead_alg is not None
    has_enc = proposal.enc_alg is not None
    if has_aead == has_enc:
        problems.append(ConfigProblem(path, "needs either aead-alg or enc-alg (with auth-alg)"))
    if has_enc and proposal.auth_alg is None:
        problems.append(ConfigProblem(f"{path}.auth-alg", "is required with enc-alg"))
    if has_aead and proposal.auth_alg is not None:
        problems.append(ConfigProblem(f"{path}.auth-alg", "must not be set with aead-alg"))
    if is_ike:
        if proposal.dh_group is None:
            problems.append(ConfigProblem(f"{path}.dh-group", "is required"))
        if has_aead and proposal.prf_alg is None:
            problems.append(ConfigProblem(f"{path}.prf-alg", "is required with aead-alg"))
    return problems


# --- rendering -------------------------------------------------------------------------------


_TOML_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # not allowed raw in a TOML basic string


def _toml_value(value: Any) -> str:
    if isinstance(value, Secret):
        return '"<masked>"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Rate):
        return f'"{value}"'
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + _TOML_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }"
    raise TypeError(f"cannot render {type(value).__name__}")


def render_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML text of the effective config; unset options are left out, secrets masked."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if value is None:
            continue
        is_table_list = isinstance(value, list) and value and isinstance(value[0], dict)
        if isinstance(value, dict) or is_table_list:
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            body = render_toml(value, name)
            if body.strip():
                out += (
                    f"\n\n[{name}]\n{body}" if not body.startswith("\n") else f"\n\n[{name}]{body}"
                )
        else:
            for item in value:
                body = render_toml(item, name)
                out += (
                    f"\n\n[[{name}]]\n{body}"
                    if not body.startswith("\n")
                    else f"\n\n[[{name}]]{body}"
                )
    return out.strip("\n") + "\n" if not prefix else out
