"""Manual SA control on one engine (seed 004 "Manually ..." sections, seed 002 `ipsec clear sa`).

Pure, like the engine: `execute()` selects SAs by VPN, security policy, unique id
or state, runs the operation on each (initiate, rekey, reauth, flush, clear) and
returns what happened: a count, the lines the seeds print, the effects for the
driver, and the ids whose deletion the caller may wait for. SAs live on many ike
workers: the service runs the same command on every worker and the CLI sums the
counts and concatenates the lines (`Initiated 2 IKE SA rekey.`).

Grammar (`parse_words`), as the CLI takes it:

    initiate child-sa security-policy NAME      initiate ike-sa vpn NAME
    rekey    ike-sa vpn NAME | unique-id N      rekey child-sa security-policy NAME | unique-id N
    reauth   ike-sa vpn NAME | unique-id N
    flush    ike-sa vpn NAME | unique-id N      flush child-sa security-policy NAME | unique-id N
    clear    sa all | tunnel NAME | state STATE [phase 1|2]

`clear sa` (JunosE) "reinitializes" SAs: it deletes them with the peer, and
they come back by the peer or by their start-action. Phase 1 names IKE SAs,
phase 2 child SAs; without a phase an IKE SA goes with its children. A tunnel is
a VPN.

Reauthentication (seed 004) lives with the exchanges (`exchanges/reauth.py`);
`reauth` runs it on each selected SA.

`Watches` follows an initiation to its end (established, or failed and why) for
`ikefarm initiate`, from the typed effects the engine returns (`SaEvent`,
`SaFailed`, `ChildFailed`), never from log event names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ikefarm.shared.ikev2.effects import ChildFailed, Effect, SaEvent, SaFailed
from ikefarm.shared.ikev2.exchanges import ike_init, informational, reauth
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

VERBS = ("initiate", "rekey", "reauth", "flush", "clear")
# verb -> target -> selectors it accepts
GRAMMAR: dict[str, dict[str, tuple[str, ...]]] = {
    "initiate": {"child-sa": ("security-policy",), "ike-sa": ("vpn",)},
    "rekey": {"ike-sa": ("vpn", "unique-id"), "child-sa": ("security-policy", "unique-id")},
    "reauth": {"ike-sa": ("vpn", "unique-id")},
    "flush": {"ike-sa": ("vpn", "unique-id"), "child-sa": ("security-policy", "unique-id")},
    "clear": {"sa": ("all", "tunnel", "state")},
}
USAGE = {
    "initiate": "initiate child-sa security-policy NAME | initiate ike-sa vpn NAME",
    "rekey": "rekey ike-sa vpn NAME|unique-id N | rekey child-sa security-policy NAME|unique-id N",
    "reauth": "reauth ike-sa vpn NAME|unique-id N",
    "flush": "flush ike-sa vpn NAME|unique-id N | flush child-sa security-policy NAME|unique-id N"
    " | flush kernel unique-id N|reqid N|all",
    "clear": "clear sa all|tunnel NAME|state STATE [phase 1|2]",
}
MAX_VALUE_LENGTH = 255
IKE_STATES = tuple(str(s) for s in IkeSaState if s != IkeSaState.DELETED)
CHILD_STATES = tuple(str(s) for s in ChildSaState if s != ChildSaState.DELETED)


class CommandError(ValueError):
    """A command that cannot run as written; the message is for the operator."""


@dataclass(frozen=True)
class Command:
    verb: str
    target: str  # "ike-sa", "child-sa" or "sa"
    selector: str  # "vpn", "security-policy", "unique-id", "all", "tunnel" or "state"
    value: str = ""
    phase: int = 0  # clear: 0 = IKE SAs with their children, 1 = IKE SAs, 2 = child SAs

    def words(self) -> str:
        out = [self.verb, self.target, self.selector]
        if self.value:
            out.append(self.value)
        if self.phase:
            out += ["phase", str(self.phase)]
        return " ".join(out)


@dataclass
class Outcome:
    """What one engine did with a command."""

    ok: bool = True
    error: str = ""
    count: int = 0
    lines: list[str] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    ike_unique_id: int | None = None  # initiate: the IKE SA that carries the result
    pending_ike: list[int] = field(default_factory=list)  # IKE SAs being deleted
    pending_child: list[tuple[int, int]] = field(default_factory=list)  # (IKE SA, child) deleted
    on_existing: bool = False  # initiate child-sa: CREATE_CHILD_SA on an IKE SA already up

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls(ok=False, error=error)


# -- grammar ------------------------------------------------------------------------------------


def check(command: Command) -> Command:
    """Refuse a command outside the grammar (the bus may carry anything)."""
    targets = GRAMMAR.get(command.verb)
    if targets is None:
        raise CommandError(f"unknown command {command.verb!r}; one of {', '.join(VERBS)}")
    usage = f"usage: {USAGE[command.verb]}"
    selectors = targets.get(command.target)
    if selectors is None or command.selector not in selectors:
        raise CommandError(usage)
    if len(command.value) > MAX_VALUE_LENGTH:
        raise CommandError(f"name longer than {MAX_VALUE_LENGTH} characters")
    needs_value = command.selector != "all"
    if needs_value != bool(command.value):
        raise CommandError(usage)
    if command.selector == "unique-id" and (
        not (command.value.isascii() and command.value.isdigit()) or len(command.value) > 12
    ):
        raise CommandError(f"unique-id must be a number, not {command.value!r}")
    if command.phase not in (0, 1, 2) or (command.phase and command.verb != "clear"):
        raise CommandError(usage)
    if command.selector == "state":
        states = IKE_STATES if command.phase == 1 else CHILD_STATES if command.phase == 2 else ()
        allowed = states or tuple(dict.fromkeys(IKE_STATES + CHILD_STATES))
        if command.value not in allowed:
            raise CommandError(
                f"unknown state {command.value!r}; one of {', '.join(sorted(allowed))}"
            )
    return command


def parse_words(verb: str, words: list[str]) -> Command:
    """`rekey ike-sa vpn hq` -> Command; CommandError with the usage otherwise."""
    if verb not in GRAMMAR:
        raise CommandError(f"unknown command {verb!r}; one of {', '.join(VERBS)}")
    usage = f"usage: {USAGE[verb]}"
    rest = list(words)
    phase = 0
    if verb == "clear" and len(rest) >= 2 and rest[-2] == "phase":
        if rest[-1] not in ("1", "2"):
            raise CommandError("phase is 1 (IKE SAs) or 2 (child SAs)")
        phase = int(rest[-1])
        rest = rest[:-2]
    if len(rest) < 2:
        raise CommandError(usage)
    target, selector, *value = rest
    if len(value) > 1:
        raise CommandError(usage)
    return check(Command(verb, target, selector, value[0] if value else "", phase))


# -- selection ----------------------------------------------------------------------------------


def _known_vpn(engine: IkeEngine, name: str) -> VpnPolicy:
    vpn = engine.policy.vpn(name)
    if vpn is None:
        known = ", ".join(v.name for v in engine.policy.vpns) or "none"
        raise CommandError(f"no vpn named {name!r} (configured: {known})")
    return vpn


def _known_policy(engine: IkeEngine, name: str) -> list[SecurityPolicy]:
    found = [p for v in engine.policy.vpns for p in v.security_policies if p.name == name]
    if not found:
        known = sorted({p.name for v in engine.policy.vpns for p in v.security_policies})
        raise CommandError(
            f"no security-policy named {name!r} (configured: {', '.join(known) or 'none'})"
        )
    return found


def _live(sa: IkeSa) -> bool:
    """An SA a command may act on: not gone, not replaced by a rekey, not being deleted."""
    return (
        sa.state not in (IkeSaState.DELETED, IkeSaState.DELETING, IkeSaState.REKEYED)
        and informational.successor_of(sa) is None
        and sa.delete_reason is None
    )


def _ike_sas(engine: IkeEngine, command: Command) -> list[IkeSa]:
    sas = sorted((sa for sa in engine.sas.values() if _live(sa)), key=lambda s: s.unique_id)
    if command.selector == "unique-id":
        return [sa for sa in sas if sa.unique_id == int(command.value)]
    if command.selector in ("vpn", "tunnel"):
        _known_vpn(engine, command.value)
        return [sa for sa in sas if sa.vpn is not None and sa.vpn.name == command.value]
    if command.selector == "state":
        return [sa for sa in sas if str(sa.state) == command.value]
    return sas  # all


def _children(engine: IkeEngine, command: Command) -> list[tuple[IkeSa, ChildSa]]:
    found: list[tuple[IkeSa, ChildSa]] = []
    if command.selector == "security-policy":
        _known_policy(engine, command.value)
    elif command.selector == "tunnel":
        _known_vpn(engine, command.value)
    for sa in sorted(engine.sas.values(), key=lambda s: s.unique_id):
        if not _live(sa):
            continue
        for child in sa.children:
            if child.state in (ChildSaState.DELETING, ChildSaState.DELETED):
                continue
            if (
                (command.selector == "unique-id" and child.unique_id == int(command.value))
                or (command.selector == "security-policy" and child.name == command.value)
                or (command.selector == "tunnel" and child.policy.vpn == command.value)
                or (command.selector == "state" and str(child.state) == command.value)
                or command.selector == "all"
            ):
                found.append((sa, child))
    return found


def sa_by_unique_id(engine: IkeEngine, unique_id: int) -> IkeSa | None:
    return next((sa for sa in engine.sas.values() if sa.unique_id == unique_id), None)


# -- execution ----------------------------------------------------------------------------------


def execute(engine: IkeEngine, command: Command, now: float) -> Outcome:
    """Run a checked command on this engine's SAs. Never raises for an operator mistake."""
    try:
        check(command)
        handler = _HANDLERS[command.verb]
        return handler(engine, command, now)
    except CommandError as exc:
        return Outcome.failed(str(exc))


def _initiate(engine: IkeEngine, command: Command, now: float) -> Outcome:
    if command.target == "ike-sa":
        vpn = _known_vpn(engine, command.value)
        return initiate_ike(engine, vpn, None, now)
    policies = _known_policy(engine, command.value)
    if len(policies) > 1:
        vpns = ", ".join(p.vpn for p in policies)
        raise CommandError(f"security-policy {command.value!r} is in several vpns ({vpns})")
    (policy,) = policies
    return initiate_child(engine, _known_vpn(engine, policy.vpn), policy, now)


def initiate_child(
    engine: IkeEngine, vpn: VpnPolicy, policy: SecurityPolicy, now: float
) -> Outcome:
    """One child of `policy`: on the VPN's established IKE SA, else with a new IKE SA
    ("its IKE SA if not yet established", seed 004). Raises CommandError."""
    for sa in sorted(engine.sas.values(), key=lambda s: s.unique_id):
        if _live(sa) and sa.state == IkeSaState.ESTABLISHED and sa.vpn and sa.vpn.name == vpn.name:
            return _create_child(engine, sa, policy, now)
    return initiate_ike(engine, vpn, policy, now)


def initiate_ike(
    engine: IkeEngine,
    vpn: VpnPolicy,
    policy: SecurityPolicy | None,
    now: float,
    *,
    remote_address: str | None = None,
    remote_id: str | None = None,
) -> Outcome:
    """A new IKE SA for `vpn` (childless when `policy` is None and the peer allows, RFC 6023)."""
    try:
        new, effects = ike_init.start(
            engine,
            vpn.name,
            policy.name if policy else None,
            now,
            remote_address=remote_address,
            remote_id=remote_id,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if new.local_spi not in engine.sas:  # refused at once (nothing was sent)
        return Outcome(ok=False, error=f"initiating IKE_SA {vpn.name} failed", effects=effects)
    line = f"initiating IKE_SA {informational.ike_label(new)} to {new.remote.address}"
    return Outcome(count=1, lines=[line], effects=effects, ike_unique_id=new.unique_id)


def _create_child(engine: IkeEngine, sa: IkeSa, policy: SecurityPolicy, now: float) -> Outcome:
    try:
        effects = engine.create_child(sa, policy.name, now)
    except NotImplementedError:
        raise CommandError(
            "creating a child SA on an established IKE SA is not available yet"
        ) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    line = f"establishing CHILD_SA {policy.name} in IKE_SA {informational.ike_label(sa)}"
    return Outcome(
        count=1, lines=[line], effects=effects, ike_unique_id=sa.unique_id, on_existing=True
    )


def _rekey(engine: IkeEngine, command: Command, now: float) -> Outcome:
    outcome = Outcome()
    try:
        if command.target == "ike-sa":
            for sa in _ike_sas(engine, command):
                if sa.state == IkeSaState.ESTABLISHED:
                    outcome.effects += engine.rekey_ike(sa, now)
                    outcome.count += 1
        else:
            for sa, child in _children(engine, command):
                if child.state == ChildSaState.INSTALLED and sa.state == IkeSaState.ESTABLISHED:
                    outcome.effects += engine.rekey_child(sa, child, now)
                    outcome.count += 1
    except NotImplementedError:
        what = "IKE SA" if command.target == "ike-sa" else "child SA"
        raise CommandError(f"{what} rekeying is not available yet") from None
    return outcome


def _reauth(engine: IkeEngine, command: Command, now: float) -> Outcome:
    outcome = Outcome()
    for sa in _ike_sas(engine, command):
        if sa.state != IkeSaState.ESTABLISHED:
            continue
        done = reauth.reauth(engine, sa, now)
        outcome.effects += done.effects
        if done.ok:
            outcome.count += 1
        else:
            label = informational.ike_label(sa)
            outcome.lines.append(f"reauthenticating IKE_SA {label} failed: {done.error}")
    return outcome


def _flush(engine: IkeEngine, command: Command, now: float) -> Outcome:
    outcome = Outcome()
    if command.target == "ike-sa":
        for sa in _ike_sas(engine, command):
            _delete_ike(engine, sa, now, "flushed", outcome)
    else:
        for sa, child in _children(engine, command):
            _delete_child(engine, sa, child, now, "flushed", outcome)
    return outcome


def _clear(engine: IkeEngine, command: Command, now: float) -> Outcome:
    outcome = Outcome()
    if command.phase in (0, 1):
        for sa in _ike_sas(engine, command):
            _delete_ike(engine, sa, now, "cleared", outcome)
    if command.phase == 2 or (command.phase == 0 and command.selector == "state"):
        for sa, child in _children(engine, command):
            _delete_child(engine, sa, child, now, "cleared", outcome)
    return outcome


def _delete_ike(engine: IkeEngine, sa: IkeSa, now: float, reason: str, outcome: Outcome) -> None:
    outcome.lines.append(informational.deleting_ike_line(sa))
    if sa.established_at is not None:
        outcome.pending_ike.append(sa.unique_id)
    outcome.effects += informational.initiate_ike_delete(engine, sa, now, reason)
    outcome.count += 1


def _delete_child(
    engine: IkeEngine, sa: IkeSa, child: ChildSa, now: float, reason: str, outcome: Outcome
) -> None:
    outcome.lines.append(informational.closing_child_line(child))
    outcome.pending_child.append((sa.unique_id, child.unique_id))
    outcome.effects += informational.initiate_child_delete(engine, sa, child, now, reason)
    outcome.count += 1


_HANDLERS: dict[str, Callable[[IkeEngine, Command, float], Outcome]] = {
    "initiate": _initiate,
    "rekey": _rekey,
    "reauth": _reauth,
    "flush": _flush,
    "clear": _clear,
}


# -- following an initiation --------------------------------------------------------------------


@dataclass
class Watch:
    """An initiation the operator waits for (`ikefarm initiate ...`)."""

    ike_unique_id: int
    child: str | None  # the security policy asked for, None for a childless IKE SA
    existing: bool = False  # a CREATE_CHILD_SA on an IKE SA that was already up
    lines: list[str] = field(default_factory=list)
    established: bool = False
    child_done: bool = False
    child_failed: str = ""
    reason: str = ""
    label: str = ""  # "vpn[unique id]", remembered while the SA exists
    done: bool = False
    ok: bool = False


def watch_for(outcome: Outcome, command: Command) -> Watch | None:
    """The watch of an `initiate` outcome, or None when there is nothing to wait for."""
    if command.verb != "initiate" or not outcome.ok or outcome.ike_unique_id is None:
        return None
    child = command.value if command.target == "child-sa" else None
    existing = outcome.on_existing
    return Watch(outcome.ike_unique_id, child, existing=existing, established=existing)


# the AUTH methods (RFC 7296 3.8, RFC 7427) in the words charon and the vSR print
AUTH_METHOD_WORDS = {
    "RSA_DIGITAL_SIGNATURE": "RSA signature",
    "SHARED_KEY_MIC": "pre-shared key",
    "DSS_DIGITAL_SIGNATURE": "DSS signature",
    "ECDSA_SHA256_P256": "ECDSA-256 signature",
    "ECDSA_SHA384_P384": "ECDSA-384 signature",
    "ECDSA_SHA512_P521": "ECDSA-521 signature",
    "GENERIC_SECURE_PASSWORD": "secure password method",
    "NULL_AUTH": "NULL authentication",
    "DIGITAL_SIGNATURE": "digital signature",
}


def _with_method(method: object) -> str:
    """' with <method>' for an AUTH method name from the SA event, '' when it is unknown."""
    if not method:
        return ""
    return f" with {AUTH_METHOD_WORDS.get(str(method), str(method))}"


def established_lines(
    sa: IkeSa | None, detail: dict[str, Any], label: str, now: float
) -> list[str]:
    local_method = _with_method(detail.get("local_auth"))
    remote_method = _with_method(detail.get("remote_auth"))
    lines = [
        f"authentication of '{detail.get('local_id')}' (myself){local_method}",
        f"authentication of '{detail.get('remote_id')}'{remote_method} successful",
        f"IKE_SA {label} established between {detail.get('local', '').split('[')[0]}"
        f"[{detail.get('local_id')}]...{detail.get('remote', '').split('[')[0]}"
        f"[{detail.get('remote_id')}]",
    ]
    if sa is not None and sa.rekey_at is not None:
        lines.append(f"scheduling rekeying in {max(0, round(sa.rekey_at - now))}s")
    if sa is not None and sa.expire_at is not None:
        lines.append(f"maximum IKE_SA lifetime {max(0, round(sa.expire_at - now))}s")
    return lines


def child_established_line(detail: dict[str, Any]) -> str:
    """'CHILD_SA trunk{3} established with SPIs c8f78eab_i c691944f_o and TS ... === ...'"""
    return (
        f"CHILD_SA {detail.get('name')}{{{detail.get('unique_id')}}} established with SPIs "
        f"{detail.get('spi_in')}_i {detail.get('spi_out')}_o and TS "
        f"{' '.join(detail.get('local_ts', []))} === {' '.join(detail.get('remote_ts', []))}"
    )


class Watches:
    """Initiations in progress on one engine, advanced by the effects it returns."""

    def __init__(self) -> None:
        self.active: list[Watch] = []

    def add(self, watch: Watch) -> Watch:
        self.active.append(watch)
        return watch

    def observe(self, engine: IkeEngine, effects: list[Effect], now: float) -> list[Watch]:
        """Advance every watch with one batch of effects; return the ones now finished."""
        if not self.active:
            return []
        finished: list[Watch] = []
        for watch in self.active:
            self._advance(engine, watch, effects, now)
            if watch.done:
                finished.append(watch)
        self.active = [w for w in self.active if not w.done]
        return finished

    def _advance(self, engine: IkeEngine, watch: Watch, effects: list[Effect], now: float) -> None:
        uid = watch.ike_unique_id
        sa = sa_by_unique_id(engine, uid)
        if sa is not None:
            watch.label = informational.ike_label(sa)
        label = watch.label or f"[{uid}]"
        for effect in effects:
            if isinstance(effect, SaEvent) and effect.ike_unique_id == uid:
                if effect.kind == "ike-established":
                    watch.established = True
                    name = f"{effect.vpn}[{uid}]"
                    watch.lines += established_lines(sa, effect.detail, name, now)
                elif effect.kind == "child-installed" and (
                    not watch.existing or effect.detail.get("name") == watch.child
                ):
                    watch.lines.append(child_established_line(effect.detail))
                    if effect.detail.get("name") == watch.child:
                        watch.child_done = True
            elif isinstance(effect, SaFailed) and effect.ike_unique_id == uid:
                watch.reason = effect.reason
            elif (
                isinstance(effect, ChildFailed)
                and watch.child is not None
                and effect.policy == watch.child
            ):
                watch.child_failed = effect.reason
        if sa is None and not (watch.established and (watch.child is None or watch.child_done)):
            reason = watch.reason or ("deleted" if watch.established else "peer not responding")
            watch.lines.append(f"establishing IKE_SA {label} failed: {reason}")
            watch.done, watch.ok = True, False
            return
        if not watch.established:
            return
        if watch.child is None or watch.child_done:
            watch.done, watch.ok = True, True
        elif watch.child_failed or not watch.existing:
            # a first child is decided with IKE_AUTH: not installed now means refused
            why = watch.child_failed or "refused by the peer"
            watch.lines.append(f"establishing CHILD_SA {watch.child} failed: {why}")
            watch.done, watch.ok = True, False

    def cancel(self, watch: Watch) -> None:
        self.active = [w for w in self.active if w is not watch]
