"""The `memory` kernel backend: a SAD and SPD kept in a dict, for tests and hosts without XFRM.

It mirrors what the netlink backend will program: per child SA, two SAs (in:
remote -> local with our SPI, out: local -> remote with the peer's SPI) and the
policies binding the traffic selectors to them (out, in and, in tunnel mode,
fwd), all tagged with the child's reqid. Key material is never kept: the table
holds key lengths only, so neither `show` nor a repr can leak a key (docs/principles.md,
principle 4).

Trap policies (dpd-action trap) are kept apart, by reqid: the policies of a
security policy with no SA bound, so that the netlink backend's kernel raises an
acquire for matching traffic. A negotiated child of the same reqid does not
remove its trap (as strongSwan's trap manager keeps it): the trap catches the
traffic again once the child is gone.

UDP encapsulation (NAT-T, RFC 3948) is recorded on both SAs with the ports the
IKE SA floated to (4500 on our side, the peer's NAT-T port on the other).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

from ikefarm.proto.messages import (
    FLUSH_SELECTORS,
    ChildCounters,
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    KernelFlush,
    TrapInstall,
    TrapRemove,
)
from ikefarm.shared.ikev2.constants import EncrId, IntegId

BACKEND_NAME = "memory"
MODES = ("tunnel", "transport")
PROTOCOLS = ("esp",)
ESP_SPI_LENGTH = 4  # RFC 4303 2.1


class KernelRefusal(Exception):
    """An install or delete the SAD/SPD cannot take; `code` is the counter label."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class InvalidChild(ValueError):
    """A request whose fields cannot describe a child SA (a bad message, not a state clash)."""


@dataclass(frozen=True, slots=True)
class SaEntry:
    spi: bytes
    direction: str  # "in" or "out"
    unique_id: int
    reqid: int
    protocol: str
    mode: str
    src: str
    dst: str
    src_port: int
    dst_port: int
    encap: bool
    encr_id: int
    encr_key_bits: int | None
    encr_key_length: int
    integ_id: int | None
    integ_key_length: int
    esn: bool
    replay_window: int

    def show(self) -> dict[str, Any]:
        out = asdict(self)
        out["spi"] = self.spi.hex()
        out["encr"] = _name(EncrId, self.encr_id)
        out["integ"] = _name(IntegId, self.integ_id) if self.integ_id is not None else None
        return out


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    direction: str  # "out", "in", "fwd"
    src: str
    dst: str
    reqid: int
    unique_id: int
    mode: str
    tmpl_src: str  # the tunnel endpoints the policy's template names
    tmpl_dst: str

    def show(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrapEntry:
    vpn: str
    name: str
    reqid: int
    mode: str
    local: str
    remote: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    policies: tuple[PolicyEntry, ...]

    def show(self) -> dict[str, Any]:
        out = asdict(self)
        out["local_ts"] = list(self.local_ts)
        out["remote_ts"] = list(self.remote_ts)
        out["policies"] = [p.show() for p in self.policies]
        return out


@dataclass(frozen=True, slots=True)
class _Child:
    unique_id: int
    ike_unique_id: int
    name: str
    vpn: str
    reqid: int
    sa_keys: tuple[tuple[bytes, str], ...]
    policies: tuple[PolicyEntry, ...]


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


def _address(value: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidChild(f"{field} is not an IP address") from None


def _host_prefix(address: str) -> str:
    return str(ipaddress.ip_network(address))


def check_install(request: ChildInstall) -> None:
    if request.protocol not in PROTOCOLS:
        raise InvalidChild(f"protocol must be one of {', '.join(PROTOCOLS)}")
    if request.mode not in MODES:
        raise InvalidChild(f"mode must be one of {', '.join(MODES)}")
    for field in ("spi_in", "spi_out"):
        spi = getattr(request, field)
        if len(spi) != ESP_SPI_LENGTH or spi == bytes(ESP_SPI_LENGTH):
            raise InvalidChild(f"{field} must be {ESP_SPI_LENGTH} octets, not zero")
    for field in ("local_port", "remote_port"):
        if not 0 <= getattr(request, field) <= 0xFFFF:
            raise InvalidChild(f"{field} out of range 0-65535")
    local = ipaddress.ip_address(_address(request.local_address, "local_address"))
    remote = ipaddress.ip_address(_address(request.remote_address, "remote_address"))
    if local.version != remote.version:
        raise InvalidChild("local_address and remote_address are of different families")
    if request.mode == "tunnel" and (not request.local_ts or not request.remote_ts):
        raise InvalidChild("a tunnel-mode child needs local_ts and remote_ts")


MAX_SELECTORS = 64


def check_update(request: ChildUpdate) -> tuple[str, str]:
    """(local, remote) of a ChildUpdate whose fields can describe endpoints; InvalidChild."""
    for name in ("spi_in", "spi_out"):
        spi = getattr(request, name)
        if len(spi) != ESP_SPI_LENGTH or spi == bytes(ESP_SPI_LENGTH):
            raise InvalidChild(f"{name} must be {ESP_SPI_LENGTH} octets, not zero")
    for name in ("local_port", "remote_port"):
        if not 0 <= getattr(request, name) <= 0xFFFF:
            raise InvalidChild(f"{name} out of range 0-65535")
    local = _address(request.local_address, "local_address")
    remote = _address(request.remote_address, "remote_address")
    if ipaddress.ip_address(local).version != ipaddress.ip_address(remote).version:
        raise InvalidChild("local_address and remote_address are of different families")
    return local, remote


def delete_request_of(request: ChildInstall) -> ChildDelete:
    """The ChildDelete that undoes an install (a backend rolling back a refused one)."""
    return ChildDelete(
        unique_id=request.unique_id,
        reqid=request.reqid,
        spi_in=request.spi_in,
        spi_out=request.spi_out,
        local_address=request.local_address,
        remote_address=request.remote_address,
    )


def check_flush(request: KernelFlush) -> None:
    """InvalidChild unless `request` names a selector and, but for `all`, a 32-bit id."""
    if request.selector not in FLUSH_SELECTORS:
        raise InvalidChild(f"selector must be one of {', '.join(FLUSH_SELECTORS)}")
    if request.selector == "all":
        if request.value != 0:
            raise InvalidChild("flush all takes no value")
    elif not 0 < request.value <= 0xFFFFFFFF:
        raise InvalidChild("value out of range 1-4294967295")


def _check_trap(request: TrapInstall) -> tuple[str, str]:
    if request.mode not in MODES:
        raise InvalidChild(f"mode must be one of {', '.join(MODES)}")
    if not 0 < request.reqid <= 0xFFFFFFFF:
        raise InvalidChild("reqid out of range 1-4294967295")
    local = _address(request.local_address, "local_address")
    remote = _address(request.remote_address, "remote_address")
    if ipaddress.ip_address(local).version != ipaddress.ip_address(remote).version:
        raise InvalidChild("local_address and remote_address are of different families")
    for field in ("local_ts", "remote_ts"):
        selectors = getattr(request, field)
        if not selectors or len(selectors) > MAX_SELECTORS:
            raise InvalidChild(f"{field} needs 1 to {MAX_SELECTORS} selectors")
        if any(not s or len(s) > 128 for s in selectors):
            raise InvalidChild(f"{field} has an empty or overlong selector")
    return local, remote


class MemoryKernel:
    """In-memory SAD (keyed by (SPI, direction)) and SPD (policies per child), and traps."""

    name = BACKEND_NAME

    def __init__(self) -> None:
        self.sad: dict[tuple[bytes, str], SaEntry] = {}
        self._children: dict[int, _Child] = {}
        self.traps: dict[int, TrapEntry] = {}
        # test double of a dataplane's counters: what `record_traffic` was told, per child
        # (bytes_in, packets_in, bytes_out, packets_out), and the children it moved since
        # the last `moved_counters()`
        self._traffic: dict[int, tuple[int, int, int, int]] = {}
        self._moved: set[int] = set()

    def __repr__(self) -> str:
        return f"MemoryKernel(children={len(self._children)}, sas={len(self.sad)})"

    @property
    def policy_count(self) -> int:
        return sum(len(child.policies) for child in self._children.values())

    @property
    def child_count(self) -> int:
        return len(self._children)

    def install(self, request: ChildInstall) -> tuple[SaEntry, SaEntry]:
        """Install both SAs and the policies of one child; all or nothing."""
        check_install(request)
        if (request.spi_in, "in") in self.sad or (request.spi_out, "out") in self.sad:
            raise KernelRefusal("spi_exists", "spi exists")
        if request.unique_id in self._children:
            raise KernelRefusal("child_exists", "child exists")
        local = _address(request.local_address, "local_address")
        remote = _address(request.remote_address, "remote_address")
        common: dict[str, Any] = {
            "unique_id": request.unique_id,
            "reqid": request.reqid,
            "protocol": request.protocol,
            "mode": request.mode,
            "encap": request.udp_encap,
            "encr_id": request.encr_id,
            "encr_key_bits": request.encr_key_bits,
            "integ_id": request.integ_id,
            "esn": request.esn,
            "replay_window": request.replay_window,
        }
        sa_in = SaEntry(
            spi=request.spi_in,
            direction="in",
            src=remote,
            dst=local,
            src_port=request.remote_port,
            dst_port=request.local_port,
            encr_key_length=len(request.encr_key_in),
            integ_key_length=len(request.integ_key_in),
            **common,
        )
        sa_out = SaEntry(
            spi=request.spi_out,
            direction="out",
            src=local,
            dst=remote,
            src_port=request.local_port,
            dst_port=request.remote_port,
            encr_key_length=len(request.encr_key_out),
            integ_key_length=len(request.integ_key_out),
            **common,
        )
        policies = self._policies(request, local, remote)
        self.sad[(sa_in.spi, "in")] = sa_in
        self.sad[(sa_out.spi, "out")] = sa_out
        self._children[request.unique_id] = _Child(
            unique_id=request.unique_id,
            ike_unique_id=request.ike_unique_id,
            name=request.name,
            vpn=request.vpn,
            reqid=request.reqid,
            sa_keys=((sa_in.spi, "in"), (sa_out.spi, "out")),
            policies=policies,
        )
        return sa_in, sa_out

    @staticmethod
    def _policies(
        request: ChildInstall | TrapInstall, local: str, remote: str, unique_id: int = 0
    ) -> tuple[PolicyEntry, ...]:
        """out: local_ts -> remote_ts; in (and fwd in tunnel mode): remote_ts -> local_ts."""
        if isinstance(request, ChildInstall):
            unique_id = request.unique_id
        if request.mode == "transport":
            local_ts = request.local_ts or [_host_prefix(local)]
            remote_ts = request.remote_ts or [_host_prefix(remote)]
        else:
            local_ts, remote_ts = request.local_ts, request.remote_ts
        directions = ("out", "in", "fwd") if request.mode == "tunnel" else ("out", "in")
        policies = []
        for lts in local_ts:
            for rts in remote_ts:
                for direction in directions:
                    outbound = direction == "out"
                    policies.append(
                        PolicyEntry(
                            direction=direction,
                            src=lts if outbound else rts,
                            dst=rts if outbound else lts,
                            reqid=request.reqid,
                            unique_id=unique_id,
                            mode=request.mode,
                            tmpl_src=local if outbound else remote,
                            tmpl_dst=remote if outbound else local,
                        )
                    )
        return tuple(policies)

    def children_matching(self, selector: str, value: int) -> list[ChildDelete]:
        """The deletes of the installed children `flush kernel` names (unique-id, reqid, all)."""
        chosen = [
            child
            for child in self._children.values()
            if selector == "all"
            or (selector == "unique-id" and child.unique_id == value)
            or (selector == "reqid" and child.reqid == value)
        ]
        deletes = []
        for child in chosen:
            (spi_in, _), (spi_out, _) = child.sa_keys
            sa_in = self.sad[(spi_in, "in")]
            deletes.append(
                ChildDelete(child.unique_id, child.reqid, spi_in, spi_out, sa_in.dst, sa_in.src)
            )
        return deletes

    def child_sa_keys(self) -> list[tuple[int, tuple[tuple[bytes, str], ...]]]:
        """(unique id, its SAs' keys in `sad`) of every installed child."""
        return [(uid, child.sa_keys) for uid, child in self._children.items()]

    def installed(self, unique_id: int) -> _Child | None:
        """The installed child with this unique id, if any."""
        return self._children.get(unique_id)

    def child_policies(self, unique_id: int) -> tuple[PolicyEntry, ...]:
        """The policies recorded for one installed child (empty if unknown)."""
        child = self._children.get(unique_id)
        return child.policies if child is not None else ()

    def delete(self, request: ChildDelete) -> _Child:
        """Remove a child's SAs and policies, found by unique id or else by its inbound SPI."""
        child = self._children.get(request.unique_id)
        if child is None:
            sa = self.sad.get((request.spi_in, "in"))
            child = self._children.get(sa.unique_id) if sa is not None else None
        if child is None:
            raise KernelRefusal("not_found", "not found")
        for key in child.sa_keys:
            self.sad.pop(key, None)
        del self._children[child.unique_id]
        self._traffic.pop(child.unique_id, None)
        self._moved.discard(child.unique_id)
        return child

    def update(self, request: ChildUpdate) -> tuple[SaEntry, SaEntry]:
        """Move an installed child to new endpoints (MOBIKE): its two SAs and its policies'
        templates; the outer family must stay (RFC 4555 3.5 is refused earlier otherwise)."""
        local, remote = check_update(request)
        child = self._children.get(request.unique_id)
        if child is None:
            raise KernelRefusal("not_found", "not found")
        (in_key, out_key) = child.sa_keys
        if in_key != (request.spi_in, "in") or out_key != (request.spi_out, "out"):
            raise KernelRefusal("spi_mismatch", "the SPIs are not the child's")
        old_in, old_out = self.sad[in_key], self.sad[out_key]
        if ipaddress.ip_address(local).version != ipaddress.ip_address(old_in.dst).version:
            raise KernelRefusal("family", "the outer address family cannot change")
        sa_in = dataclasses.replace(
            old_in,
            src=remote,
            dst=local,
            src_port=request.remote_port,
            dst_port=request.local_port,
            encap=request.udp_encap,
        )
        sa_out = dataclasses.replace(
            old_out,
            src=local,
            dst=remote,
            src_port=request.local_port,
            dst_port=request.remote_port,
            encap=request.udp_encap,
        )
        self.sad[in_key], self.sad[out_key] = sa_in, sa_out
        policies = tuple(
            dataclasses.replace(
                p,
                tmpl_src=local if p.direction == "out" else remote,
                tmpl_dst=remote if p.direction == "out" else local,
            )
            for p in child.policies
        )
        self._children[child.unique_id] = dataclasses.replace(child, policies=policies)
        return sa_in, sa_out

    def record_traffic(
        self,
        unique_id: int,
        *,
        bytes_in: int = 0,
        packets_in: int = 0,
        bytes_out: int = 0,
        packets_out: int = 0,
    ) -> None:
        """Test double of a dataplane counting packets on an installed child (added up)."""
        if unique_id not in self._children:
            raise KernelRefusal("not_found", "not found")
        old = self._traffic.get(unique_id, (0, 0, 0, 0))
        self._traffic[unique_id] = (
            old[0] + bytes_in,
            old[1] + packets_in,
            old[2] + bytes_out,
            old[3] + packets_out,
        )
        self._moved.add(unique_id)

    def moved_counters(self) -> list[ChildCounters]:
        """The counters of the children whose counters moved since the previous call."""
        moved, self._moved = self._moved, set()
        return [ChildCounters(uid, *self._traffic[uid]) for uid in moved if uid in self._traffic]

    def install_trap(self, request: TrapInstall) -> tuple[TrapEntry, bool]:
        """Install the trap of a security policy (replacing its previous one); (entry, replaced)."""
        local, remote = _check_trap(request)
        entry = TrapEntry(
            vpn=request.vpn,
            name=request.name,
            reqid=request.reqid,
            mode=request.mode,
            local=local,
            remote=remote,
            local_ts=tuple(request.local_ts),
            remote_ts=tuple(request.remote_ts),
            policies=self._policies(request, local, remote),
        )
        replaced = request.reqid in self.traps
        self.traps[request.reqid] = entry
        return entry, replaced

    def remove_trap(self, request: TrapRemove) -> TrapEntry:
        entry = self.traps.pop(request.reqid, None)
        if entry is None:
            raise KernelRefusal("not_found", "no trap with this reqid")
        return entry

    def show(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sas = [sa.show() for sa in self.sad.values()]
        for row in sas:
            traffic = self._traffic.get(row["unique_id"])
            if traffic is not None:
                inbound = row["direction"] == "in"
                row["bytes"] = traffic[0] if inbound else traffic[2]
                row["packets"] = traffic[1] if inbound else traffic[3]
        policies = [policy.show() for child in self._children.values() for policy in child.policies]
        return sas, policies

    def show_traps(self) -> list[dict[str, Any]]:
        return [trap.show() for trap in self.traps.values()]
