"""The `netlink` kernel backend: child SAs, policies, traps and routes in the Linux kernel.

It keeps the same books as the memory backend (a `MemoryKernel` records every
child and trap: validation, `show` and the counts come from there) and programs
the kernel alongside, through `xfrm.py` (XFRM netlink) and `routes.py`
(rtnetlink). Per child SA (docs/kernel-netlink.md):

- two SAs: inbound (remote -> local, our SPI, `svti-id-in` as if_id) and
  outbound (local -> remote, the peer's SPI, `svti-id-out`), with the
  negotiated algorithms, ESN and replay window (0 = off), UDP encapsulation
  when NAT-T floated the IKE SA, and the ipsec-policy's rekey-time / life-time
  as the kernel's soft / hard lifetimes in seconds;
- policies out (local -> remote) and in, plus fwd in tunnel mode, each with a
  template naming the SA's endpoints and reqid, at the security policy's
  `priority` (or, left at 0, a default that prefers narrower selectors);
- routes: `install-routes` for non-SVTI children, `inject-routes` per
  security policy (routes.py).

Policies are shared by reference count: a trap and the children it starts (and
a child and its rekeyed successor) program the same selectors, and only the
last one out deletes them. Whatever the kernel refuses comes back as
`KernelRefusal` with the kernel's errno text; what was already programmed for
that request is taken back, so a refused child leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.proto.messages import (
    ChildCounters,
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    KernelAcquire,
    KernelExpire,
    TrapInstall,
    TrapRemove,
)
from ikefarm.services.kernel import xfrm
from ikefarm.services.kernel.memory import (
    InvalidChild,
    KernelRefusal,
    MemoryKernel,
    PolicyEntry,
    SaEntry,
    TrapEntry,
    _Child,
    check_update,
    delete_request_of,
)
from ikefarm.services.kernel.routes import MAIN_TABLE, Route, RouteError, Routes
from ikefarm.shared.config.loader import Config
from ikefarm.shared.ikev2.constants import EncrId, IntegId
from ikefarm.shared.ikev2.policy import engine_policy

BACKEND_NAME = "netlink"
NATT_PORT = 4500

# IKEv2 transform ids -> Linux crypto names (and ICV bits for the AEAD ciphers)
AEAD_NAMES: dict[int, tuple[str, int]] = {
    EncrId.AES_GCM_8: ("rfc4106(gcm(aes))", 64),
    EncrId.AES_GCM_12: ("rfc4106(gcm(aes))", 96),
    EncrId.AES_GCM_16: ("rfc4106(gcm(aes))", 128),
    EncrId.AES_CCM_8: ("rfc4309(ccm(aes))", 64),
    EncrId.AES_CCM_12: ("rfc4309(ccm(aes))", 96),
    EncrId.AES_CCM_16: ("rfc4309(ccm(aes))", 128),
    EncrId.CHACHA20_POLY1305: ("rfc7539esp(chacha20,poly1305)", 128),
    EncrId.NULL_AUTH_AES_GMAC: ("rfc4543(gcm(aes))", 128),
}
CIPHER_NAMES: dict[int, str] = {
    EncrId.AES_CBC: "cbc(aes)",
    EncrId.AES_CTR: "rfc3686(ctr(aes))",
    EncrId.DES3: "cbc(des3_ede)",
    EncrId.NULL: "ecb(cipher_null)",
}
INTEG_NAMES: dict[int, tuple[str, int]] = {
    IntegId.HMAC_MD5_96: ("hmac(md5)", 96),
    IntegId.HMAC_SHA1_96: ("hmac(sha1)", 96),
    IntegId.AES_XCBC_96: ("xcbc(aes)", 96),
    IntegId.HMAC_SHA2_256_128: ("hmac(sha256)", 128),
    IntegId.HMAC_SHA2_384_192: ("hmac(sha384)", 192),
    IntegId.HMAC_SHA2_512_256: ("hmac(sha512)", 256),
}

ACQ_EXPIRES = Path("/proc/sys/net/core/xfrm_acq_expires")

# default priority when a security policy leaves it at 0: lower wins, narrower is lower
DEFAULT_PRIORITY_BASE = 200_000

_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58}
_PROTOCOLS["sctp"] = 132
_TS = re.compile(r"^(?P<addr>[^\[\]]+?)(?:\[(?P<meta>[^\[\]]*)\])?$")


@dataclass(frozen=True)
class _Part:
    network: str
    proto: int
    port: int


def selector_parts(text: str) -> list[_Part]:
    """A traffic selector as printed by the engine (`10.0.0.0/24`, `a..b[tcp/80]`) in
    XFRM terms: the prefixes covering it, its protocol, one port or any.

    Raises InvalidChild for what an XFRM selector cannot express (a port range).
    """
    match = _TS.match(text.strip())
    if match is None:
        raise InvalidChild(f"traffic selector {text!r} is malformed")
    proto = port = 0
    meta = match.group("meta")
    if meta:
        name, _, ports = meta.partition("/")
        proto = _PROTOCOLS.get(name, -1) if not name.isdigit() else int(name)
        if not 0 <= proto <= 255:
            raise InvalidChild(f"traffic selector {text!r} has an unknown protocol")
        if ports:
            if not ports.isdigit() or not 0 <= int(ports) <= 0xFFFF:
                raise InvalidChild(
                    f"traffic selector {text!r}: only a single port fits an XFRM selector"
                )
            port = int(ports)
    address = match.group("addr")
    try:
        if ".." in address:
            first, last = (ipaddress.ip_address(a) for a in address.split("..", 1))
            networks = list(ipaddress.summarize_address_range(first, last))  # type: ignore[type-var]
        else:
            networks = [ipaddress.ip_network(address, strict=False)]
    except (ValueError, TypeError):
        raise InvalidChild(f"traffic selector {text!r} is malformed") from None
    if len(networks) > 32:
        raise InvalidChild(f"traffic selector {text!r} needs more than 32 prefixes")
    return [_Part(str(n), proto, port) for n in networks]


def _version(part: _Part) -> int:
    return ipaddress.ip_network(part.network).version


def _selector(src: _Part, dst: _Part) -> xfrm.Selector:
    proto = src.proto or dst.proto
    return xfrm.Selector(src.network, dst.network, proto=proto, sport=src.port, dport=dst.port)


@dataclass(frozen=True)
class PolicyOptions:
    """What the config says about one security policy (found by vpn and name)."""

    priority: int = 0
    svti_id_in: int = 0
    svti_id_out: int = 0
    rekey_time: float = 0.0
    life_time: float = 0.0
    inject_routes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NetlinkOptions:
    install_routes: bool = False
    routing_table: int = 220
    routing_table_prio: int = 220
    sp_hash_ipv4: tuple[int, int] = (32, 32)
    sp_hash_ipv6: tuple[int, int] = (128, 128)
    policies: dict[tuple[str, str], PolicyOptions] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> NetlinkOptions:
        options = config.ike.global_options
        engine = engine_policy(config)
        policies: dict[tuple[str, str], PolicyOptions] = {}
        for vpn in config.ike.vpn:
            engine_vpn = engine.vpn(vpn.name)
            for sp in vpn.security_policy:
                engine_sp = next(
                    (p for p in engine_vpn.security_policies if p.name == sp.name), None
                ) if engine_vpn is not None else None  # fmt: skip
                policies[(vpn.name, sp.name)] = PolicyOptions(
                    priority=sp.priority,
                    svti_id_in=sp.svti_id_in or 0,
                    svti_id_out=sp.svti_id_out or 0,
                    rekey_time=engine_sp.rekey_time if engine_sp else 0.0,
                    life_time=engine_sp.life_time if engine_sp else 0.0,
                    inject_routes=dict(engine_sp.inject_routes) if engine_sp else {},
                )
        return cls(
            install_routes=bool(options.install_routes),
            routing_table=options.routing_table,
            routing_table_prio=options.routing_table_prio,
            sp_hash_ipv4=(options.sp_hash_ipv4.local, options.sp_hash_ipv4.remote),
            sp_hash_ipv6=(options.sp_hash_ipv6.local, options.sp_hash_ipv6.remote),
            policies=policies,
        )


@dataclass
class _Programmed:
    """What one child or trap holds in the kernel, to take it back."""

    sas: list[tuple[str, str, int, xfrm.Mark | None]] = field(default_factory=list)
    policies: list[tuple[Any, ...]] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


def _refusal(exc: xfrm.XfrmError | RouteError | OSError) -> KernelRefusal:
    if isinstance(exc, RouteError):
        return KernelRefusal("route_refused", exc.text)
    if isinstance(exc, xfrm.XfrmError):
        name = errno.errorcode.get(exc.errno or 0, "error").lower()
        return KernelRefusal(f"kernel_{name}", str(exc))
    return KernelRefusal("kernel_unreachable", f"XFRM netlink: {exc}")


class NetlinkKernel:
    """Linux XFRM + routes; the books (validation, show, counts) are a MemoryKernel's."""

    name = BACKEND_NAME

    def __init__(
        self,
        options: NetlinkOptions | None = None,
        *,
        netns: str | None = None,
        socket: xfrm.XfrmSocket | None = None,
        routes: Routes | None = None,
    ) -> None:
        self.options = options or NetlinkOptions()
        self.netns = netns
        self.books = MemoryKernel()
        self.xfrm = socket if socket is not None else xfrm.XfrmSocket(netns)
        self.routes = routes if routes is not None else Routes(netns)
        self._policy_users: dict[tuple[Any, ...], int] = {}
        self._programmed: dict[int, _Programmed] = {}  # child unique id -> kernel state
        self._trap_programmed: dict[int, _Programmed] = {}  # reqid -> kernel state
        self._lifetimes: dict[tuple[bytes, str], xfrm.Lifetime] = {}  # for show
        # per child, the counters of the last batch (moved_counters)
        self._reported: dict[int, tuple[int, int, int, int]] = {}
        self.refusals = 0
        self.warnings: list[str] = []  # start-up settings the kernel did not take

    @classmethod
    def from_config(cls, config: Config, netns: str | None = None) -> NetlinkKernel:
        """The backend for `config`: SPD hash thresholds set and, in the service's own
        namespace, the kernel's acquire lifetime set to `acquire-timeout`."""
        backend = cls(NetlinkOptions.from_config(config), netns=netns)
        backend.set_spd_hash()
        if netns is None:
            backend.set_acquire_timeout(config.ike.global_options.acquire_timeout)
        return backend

    def set_acquire_timeout(self, seconds: int) -> None:
        """How long the kernel keeps the larval state of an ACQUIRE (and so queues nothing
        new for that flow) before giving up: `net.core.xfrm_acq_expires` of this namespace.

        A sysctl this process may not write (a read-only /proc/sys) is noted in
        `warnings` and the kernel's own value stays.
        """
        try:
            ACQ_EXPIRES.write_text(f"{int(seconds)}\n")
        except OSError as exc:
            self.warnings.append(f"acquire-timeout not applied ({ACQ_EXPIRES}: {exc.strerror})")

    def __repr__(self) -> str:
        return f"NetlinkKernel(children={self.child_count}, sas={len(self.sad)})"

    def close(self) -> None:
        self.xfrm.close()
        self.routes.close()

    # -- the books ------------------------------------------------------------------------------
    @property
    def sad(self) -> dict[tuple[bytes, str], SaEntry]:
        return self.books.sad

    @property
    def traps(self) -> dict[int, TrapEntry]:
        return self.books.traps

    @property
    def policy_count(self) -> int:
        return len(self._policy_users)

    @property
    def child_count(self) -> int:
        return self.books.child_count

    def set_spd_hash(self) -> None:
        """SPD hash thresholds from `sp-hash-ipv4` / `sp-hash-ipv6` (XFRM_MSG_NEWSPDINFO)."""
        try:
            self.xfrm.set_spd_hash(self.options.sp_hash_ipv4, self.options.sp_hash_ipv6)
        except (xfrm.XfrmError, OSError) as exc:
            raise _refusal(exc) from None

    # -- specs ------------------------------------------------------------------------------------
    def _policy_options(self, vpn: str, name: str) -> PolicyOptions:
        return self.options.policies.get((vpn, name), PolicyOptions())

    @staticmethod
    def _algorithms(request: ChildInstall, direction: str) -> dict[str, xfrm.Algorithm | None]:
        encr_key = request.encr_key_in if direction == "in" else request.encr_key_out
        integ_key = request.integ_key_in if direction == "in" else request.integ_key_out
        if request.encr_id in AEAD_NAMES:
            name, icv = AEAD_NAMES[request.encr_id]
            return {"aead": xfrm.Algorithm(name, encr_key, icv), "crypt": None, "auth": None}
        if request.encr_id not in CIPHER_NAMES:
            raise KernelRefusal("unsupported_algorithm", f"cipher {request.encr_id} unsupported")
        auth = None
        if request.integ_id not in (None, IntegId.NONE):
            if request.integ_id not in INTEG_NAMES:
                raise KernelRefusal(
                    "unsupported_algorithm", f"integrity {request.integ_id} unsupported"
                )
            name, bits = INTEG_NAMES[request.integ_id]
            auth = xfrm.Algorithm(name, integ_key, bits)
        crypt = xfrm.Algorithm(CIPHER_NAMES[request.encr_id], encr_key)
        return {"aead": None, "crypt": crypt, "auth": auth}

    def _sa_spec(self, request: ChildInstall, sa: SaEntry, opts: PolicyOptions) -> xfrm.SaSpec:
        encap = None
        if request.udp_encap:
            encap = xfrm.Encap(sa.src_port or NATT_PORT, sa.dst_port or NATT_PORT)
        lifetime = xfrm.Lifetime(
            soft_seconds=math.ceil(opts.rekey_time) if opts.rekey_time else 0,
            hard_seconds=math.ceil(opts.life_time) if opts.life_time else 0,
        )
        if_id = opts.svti_id_in if sa.direction == "in" else opts.svti_id_out
        try:
            return xfrm.SaSpec(
                src=sa.src,
                dst=sa.dst,
                spi=int.from_bytes(sa.spi, "big"),
                reqid=request.reqid,
                mode=request.mode,
                protocol=request.protocol,
                esn=request.esn,
                replay_window=request.replay_window,
                encap=encap,
                lifetime=lifetime,
                if_id=if_id,
                **self._algorithms(request, sa.direction),
            )
        except ValueError as exc:
            raise InvalidChild(str(exc)) from None

    def _policy_specs(
        self, entries: tuple[PolicyEntry, ...], opts: PolicyOptions
    ) -> list[xfrm.PolicySpec]:
        specs = []
        for entry in entries:
            template = xfrm.Template(entry.tmpl_src, entry.tmpl_dst, entry.reqid, entry.mode)
            if_id = opts.svti_id_out if entry.direction == "out" else opts.svti_id_in
            for src in selector_parts(entry.src):
                for dst in selector_parts(entry.dst):
                    if _version(src) != _version(dst):
                        continue  # an IPv4 selector never pairs with an IPv6 one
                    try:
                        selector = _selector(src, dst)
                    except ValueError as exc:
                        raise InvalidChild(str(exc)) from None
                    priority = opts.priority or self._default_priority(src, dst)
                    specs.append(
                        xfrm.PolicySpec(
                            selector, entry.direction, priority, (template,), if_id=if_id
                        )
                    )
        if entries and not specs:
            raise InvalidChild("no local and remote traffic selector of the same address family")
        return specs

    @staticmethod
    def _default_priority(src: _Part, dst: _Part) -> int:
        lengths = (
            ipaddress.ip_network(src.network).prefixlen
            + ipaddress.ip_network(dst.network).prefixlen
        )
        return DEFAULT_PRIORITY_BASE - 2 * lengths - (1 if src.proto or dst.proto else 0)

    # -- kernel operations with undo -----------------------------------------------------------
    @staticmethod
    def _policy_key(spec: xfrm.PolicySpec) -> tuple[Any, ...]:
        return (spec.direction, spec.selector, spec.if_id)

    def _add_policy(self, spec: xfrm.PolicySpec, done: _Programmed) -> None:
        key = self._policy_key(spec)
        users = self._policy_users.get(key, 0)
        if users == 0:
            try:
                self.xfrm.add_policy(spec)
            except xfrm.XfrmError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                self.xfrm.add_policy(spec, update=True)  # left by a previous run: take it over
        else:
            self.xfrm.add_policy(spec, update=True)  # the newest user's template wins
        self._policy_users[key] = users + 1
        done.policies.append(key)

    def _release_policy(self, key: tuple[Any, ...]) -> None:
        users = self._policy_users.get(key, 0) - 1
        if users > 0:
            self._policy_users[key] = users
            return
        self._policy_users.pop(key, None)
        direction, selector, if_id = key
        with contextlib.suppress(xfrm.XfrmError, OSError):
            self.xfrm.delete_policy(selector, direction, if_id=if_id)

    async def _undo(self, done: _Programmed) -> None:
        for key in reversed(done.policies):
            self._release_policy(key)
        for src, dst, spi, mark in reversed(done.sas):
            with contextlib.suppress(xfrm.XfrmError, OSError):
                self.xfrm.delete_sa(src, dst, spi, mark=mark)
        for route in reversed(done.routes):
            with contextlib.suppress(RouteError):
                await self.routes.remove(route)

    async def child_routes(self, request: ChildInstall, opts: PolicyOptions) -> list[Route]:
        """install-routes (non-SVTI) and inject-routes: one route per remote selector prefix."""
        prefixes = [p.network for ts in request.remote_ts for p in selector_parts(ts)]
        routes: list[Route] = []
        inject = opts.inject_routes
        if inject.get("next-hop"):
            vrf = inject.get("vrf")
            gateway, oif = await self.routes.next_hop(inject["next-hop"], vrf)
            table = inject.get("table") or MAIN_TABLE
            if inject.get("l3vrf"):
                table = await self.routes.l3vrf_table(inject["l3vrf"], vrf)
            routes += [Route(p, table, gateway, oif, vrf) for p in prefixes]
        if self.options.install_routes and not opts.svti_id_out:
            gateway, oif = await self.routes.via_peer(request.remote_address)
            table = self.options.routing_table
            for prefix in prefixes:
                family = Route(prefix, table).family
                await self.routes.ensure_rule(family, table, self.options.routing_table_prio)
                routes.append(Route(prefix, table, gateway, oif))
        return routes

    # -- the backend interface ----------------------------------------------------------------
    async def install(self, request: ChildInstall) -> tuple[SaEntry, SaEntry]:
        """Both SAs, the policies and the routes of one child; all or nothing."""
        sa_in, sa_out = self.books.install(request)  # validation; raises before any kernel call
        done = _Programmed()
        try:
            opts = self._policy_options(request.vpn, request.name)
            specs = [self._sa_spec(request, sa, opts) for sa in (sa_in, sa_out)]
            policies = self._policy_specs(self.books.child_policies(request.unique_id), opts)
            for spec in specs:
                self.xfrm.add_sa(spec)
                done.sas.append((spec.src, spec.dst, spec.spi, spec.mark))
            for policy in policies:
                self._add_policy(policy, done)
            for route in await self.child_routes(request, opts):
                await self.routes.add(route)
                done.routes.append(route)
        except BaseException as exc:
            await self._undo(done)
            self.books.delete(delete_request_of(request))
            if isinstance(exc, (xfrm.XfrmError, RouteError, OSError)):
                self.refusals += 1
                raise _refusal(exc) from None
            raise
        self._programmed[request.unique_id] = done
        for sa, spec in zip((sa_in, sa_out), specs, strict=True):
            self._lifetimes[(sa.spi, sa.direction)] = spec.lifetime
        return sa_in, sa_out

    async def delete(self, request: ChildDelete) -> _Child:
        child = self.books.delete(request)
        for key in child.sa_keys:
            self._lifetimes.pop(key, None)
        self._reported.pop(child.unique_id, None)
        done = self._programmed.pop(child.unique_id, None)
        if done is not None:
            await self._undo(done)
        return child

    async def update(self, request: ChildUpdate) -> tuple[SaEntry, SaEntry]:
        """MOBIKE moved the child (RFC 4555 3.5): XFRM_MSG_MIGRATE per policy moves its
        templates and the SA each names; the kernel keeps keys, sequence numbers and replay
        state. The kernel keeps an SA's old encapsulation when a migration names none, so
        turning UDP encapsulation off is refused (not implemented)."""
        local, remote = check_update(request)
        old_in = self.books.sad.get((request.spi_in, "in"))
        old_out = self.books.sad.get((request.spi_out, "out"))
        if old_in is None or old_out is None or old_in.unique_id != request.unique_id:
            raise KernelRefusal("not_found", "not found")
        if old_in.encap and not request.udp_encap:
            raise KernelRefusal(
                "not_implemented", "not implemented: turning UDP encapsulation off in XFRM"
            )
        old_local, old_remote = old_out.src, old_out.dst
        installed = self.books.installed(request.unique_id)
        assert installed is not None
        entries = installed.policies
        opts = self._policy_options(installed.vpn, installed.name)
        try:
            for entry in entries:
                outbound = entry.direction == "out"
                migration = xfrm.Migration(
                    old_src=old_local if outbound else old_remote,
                    old_dst=old_remote if outbound else old_local,
                    new_src=local if outbound else remote,
                    new_dst=remote if outbound else local,
                    reqid=entry.reqid,
                    mode=entry.mode,
                )
                encap = None
                if request.udp_encap:
                    ports = (request.local_port, request.remote_port)
                    encap = xfrm.Encap(*(ports if outbound else ports[::-1]))
                for spec in self._policy_specs((entry,), opts):
                    self.xfrm.migrate(
                        spec.selector, spec.direction, [migration], encap=encap, if_id=spec.if_id
                    )
        except (xfrm.XfrmError, OSError) as exc:
            self.refusals += 1
            raise _refusal(exc) from None
        except ValueError as exc:
            raise InvalidChild(str(exc)) from None
        sa_in, sa_out = self.books.update(request)
        done = self._programmed.get(request.unique_id)
        if done is not None:
            moved = {sa_in.spi: sa_in, sa_out.spi: sa_out}
            done.sas = [
                (moved[spi.to_bytes(4, "big")].src, moved[spi.to_bytes(4, "big")].dst, spi, mark)
                if spi.to_bytes(4, "big") in moved
                else (src, dst, spi, mark)
                for src, dst, spi, mark in done.sas
            ]
        return sa_in, sa_out

    async def install_trap(self, request: TrapInstall) -> tuple[TrapEntry, bool]:
        """The trap policies of a security policy: traffic matching them raises ACQUIRE."""
        previous = self._trap_programmed.pop(request.reqid, None)
        entry, replaced = self.books.install_trap(request)
        done = _Programmed()
        try:
            opts = self._policy_options(request.vpn, request.name)
            for policy in self._policy_specs(entry.policies, opts):
                self._add_policy(policy, done)
        except BaseException as exc:
            await self._undo(done)
            self.books.traps.pop(request.reqid, None)
            if previous is not None:
                await self._undo(previous)
            if isinstance(exc, (xfrm.XfrmError, OSError)):
                self.refusals += 1
                raise _refusal(exc) from None
            raise
        if previous is not None:
            await self._undo(previous)  # after the new ones: the selectors never go unguarded
        self._trap_programmed[request.reqid] = done
        return entry, replaced

    async def remove_trap(self, request: TrapRemove) -> TrapEntry:
        entry = self.books.remove_trap(request)
        done = self._trap_programmed.pop(request.reqid, None)
        if done is not None:
            await self._undo(done)
        return entry

    def counters(self, sa: SaEntry) -> dict[str, int] | None:
        """Bytes/packets the kernel counted on one SA (XFRM_MSG_GETSA), None if unreadable."""
        try:
            info = self.xfrm.get_sa(sa.src, sa.dst, int.from_bytes(sa.spi, "big"))
        except (xfrm.XfrmError, OSError, TimeoutError):
            return None
        return {"bytes": info.bytes, "packets": info.packets, "use_time": info.use_time}

    def children_matching(self, selector: str, value: int) -> list[ChildDelete]:
        return self.books.children_matching(selector, value)

    def moved_counters(self) -> list[ChildCounters]:
        """The counters of the children whose kernel counters moved since the previous call.

        XFRM has no "changed since" query: this reads both SAs of every child
        (XFRM_MSG_GETSA), O(children) per batch (docs/kernel-counters.md). An SA the
        kernel cannot read (gone, or refused) is skipped until the next batch.
        """
        moved: list[ChildCounters] = []
        for unique_id, keys in self.books.child_sa_keys():
            read = [self.sad.get(key) for key in keys]
            counters = [self.counters(sa) if sa is not None else None for sa in read]
            by_direction = {
                sa.direction: c for sa, c in zip(read, counters, strict=True) if sa and c
            }
            if len(by_direction) != 2:
                continue
            now = (
                by_direction["in"]["bytes"],
                by_direction["in"]["packets"],
                by_direction["out"]["bytes"],
                by_direction["out"]["packets"],
            )
            if self._reported.get(unique_id, (0, 0, 0, 0)) != now:
                self._reported[unique_id] = now
                moved.append(ChildCounters(unique_id, *now))
        return moved

    def show(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sas, policies = self.books.show()
        for row, (key, sa) in zip(sas, self.books.sad.items(), strict=True):
            row["counters"] = self.counters(sa)
            lifetime = self._lifetimes.get(key)
            if lifetime is not None:
                row["lifetime"] = {
                    "soft_seconds": lifetime.soft_seconds,
                    "hard_seconds": lifetime.hard_seconds,
                }
        return sas, policies

    def show_traps(self) -> list[dict[str, Any]]:
        return self.books.show_traps()

    def show_routes(self) -> list[dict[str, Any]]:
        return self.routes.show()

    # -- events -------------------------------------------------------------------------------
    def open_events(self) -> xfrm.XfrmEvents:
        """A socket on the kernel's ACQUIRE and EXPIRE groups (the service polls it)."""
        return xfrm.XfrmEvents(self.netns)

    def event_message(self, event: xfrm.Acquire | xfrm.Expire) -> KernelAcquire | KernelExpire:
        """The bus message for one kernel event; an expiring SA is named from the books."""
        if isinstance(event, xfrm.Acquire):
            return KernelAcquire(
                backend=self.name,
                reqid=event.reqid,
                local_address=event.src,
                remote_address=event.dst,
                local_ts=event.selector_src,
                remote_ts=event.selector_dst,
            )
        sa = event.sa
        spi = sa.spi.to_bytes(4, "big")
        entry = next(
            (
                e
                for d in ("in", "out")
                if (e := self.books.sad.get((spi, d))) is not None and e.dst == sa.dst
            ),
            None,
        )
        return KernelExpire(
            backend=self.name,
            hard=event.hard,
            unique_id=entry.unique_id if entry is not None else 0,
            reqid=sa.reqid,
            direction=entry.direction if entry is not None else "",
            spi=spi,
            src=sa.src,
            dst=sa.dst,
            bytes=sa.bytes,
            packets=sa.packets,
        )
