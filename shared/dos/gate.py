"""The ingress gate: what happens to a new IKE_SA_INIT before any worker spends DH on it.

Order, cheapest and most specific first:

1. the peer is backing off after a failure (Junos backoff-timeouts)         -> drop
2. cookies required (half-open >= threshold) and no valid COOKIE            -> answer N(COOKIE)
   (RFC 7296 2.6: stateless, so a spoofed flood costs one HMAC per packet)
3. ike-sa-limit: established + half-open + pending reach it                 -> drop
4. init-limit-job-load: inits handed to workers and not answered reach it   -> drop
5. half-open ceiling (init-limit-half-open / Junos max-count)               -> drop
6. block-threshold: half-open SAs of this peer IP reach it                  -> drop
7. discard-duplicate: this peer already has a half-open SA                  -> drop
8. otherwise forward to a worker; the init counts as pending until a worker's
   load snapshot shows it answered, so the next decision already counts it.

Half-open counts include the pending inits: the gate never lets more through
than the limits allow, as far as this ingress can see. With several ingress
instances two may decide at the same instant; the workers' admission check
(`admission.py`) is the final authority for the SA limits.

Mode changes (cookies on/off, a limit reached/cleared) come back as events
for a level-1 log line; nothing here logs per packet.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ikefarm.shared.dos.cookies import CookieJar, InitRequest, cookie_response
from ikefarm.shared.dos.limits import DosLimits
from ikefarm.shared.dos.load import BackoffTable, FarmLoad

FORWARD = "forward"
COOKIE = "cookie"
DROP = "drop"


@dataclass(frozen=True)
class Verdict:
    action: str  # FORWARD, COOKIE or DROP
    reason: str = ""  # drop reason / why a cookie was asked ("required", "invalid")
    reply: bytes | None = None  # the N(COOKIE) response to send back


@dataclass(frozen=True)
class ModeChange:
    """A gate mode changed: `what` is "cookies" or a limit name, `active` its new state."""

    what: str
    active: bool
    half_open: int


@dataclass
class IngressGate:
    limits: DosLimits
    load: FarmLoad
    cookies: CookieJar | None = None
    backoff: BackoffTable = field(default_factory=BackoffTable)
    counters: Counter[str] = field(default_factory=Counter)
    half_open_peak: int = 0  # the largest half-open count a decision saw (observability)
    _modes: dict[str, bool] = field(default_factory=dict)
    _changes: list[ModeChange] = field(default_factory=list)

    # -- state for observability -------------------------------------------------------------

    def half_open(self, now: float) -> int:
        return self.load.half_open(now) + self.load.pending(now)

    def cookies_active(self, now: float) -> bool:
        return self.limits.cookies_required(self.half_open(now))

    def take_changes(self) -> list[ModeChange]:
        changes, self._changes = self._changes, []
        return changes

    def _mode(self, what: str, active: bool, half_open: int) -> None:
        if self._modes.get(what, False) != active:
            self._modes[what] = active
            self._changes.append(ModeChange(what, active, half_open))

    def refresh_modes(self, now: float) -> None:
        """Re-evaluate the modes (on a timer too, so "cookies off" is seen without traffic)."""
        half_open = self.half_open(now)
        self._mode("cookies", self.limits.cookies_required(half_open), half_open)
        for name, reached in self._limits_reached(now, half_open).items():
            self._mode(name, reached, half_open)

    def _limits_reached(self, now: float, half_open: int) -> dict[str, bool]:
        limits = self.limits
        reached: dict[str, bool] = {}
        if limits.ike_sa_limit is not None:
            reached["ike-sa-limit"] = self.load.established(now) + half_open >= limits.ike_sa_limit
        if limits.job_load_limit is not None:
            reached["init-limit-job-load"] = self.load.pending(now) >= limits.job_load_limit
        if limits.half_open_limit is not None:
            reached[limits.half_open_limit_name] = half_open >= limits.half_open_limit
        return reached

    # -- the decision --------------------------------------------------------------------------

    def decide(self, request: InitRequest, peer: str, now: float) -> Verdict:
        """The fate of a new IKE_SA_INIT (SPIr = 0, no init route) from `peer`."""
        limits = self.limits
        phase = self.backoff.phase(peer, now)
        if phase is not None:
            return self.drop(f"backoff.{phase}-phase-failure")
        half_open = self.half_open(now)
        self.half_open_peak = max(self.half_open_peak, half_open)
        cookies_on = limits.cookies_required(half_open)
        self._mode("cookies", cookies_on, half_open)
        if cookies_on:
            if self.cookies is None:
                return self.drop("cookie_secret_unavailable")
            if request.cookie is None:
                return self._ask_cookie(request, peer, "required")
            if not self.cookies.verify(request.cookie, request.nonce_i, peer, request.spi_i):
                self.counters["gate.cookie_invalid"] += 1
                return self._ask_cookie(request, peer, "invalid")
            self.counters["gate.cookie_valid"] += 1
        for name, reached in self._limits_reached(now, half_open).items():
            self._mode(name, reached, half_open)
            if reached:
                return self.drop(f"limit.{name}")
        peer_half_open = self.load.peer_half_open(peer, now, spi_i=request.spi_i)
        if limits.block_threshold is not None and peer_half_open >= limits.block_threshold:
            return self.drop("limit.block-threshold")
        if limits.discard_duplicate and peer_half_open > 0:
            return self.drop("discard-duplicate")
        self.load.forwarded(peer, now, request.spi_i)
        self.counters["gate.forwarded"] += 1
        return Verdict(FORWARD)

    def drop(self, reason: str) -> Verdict:
        self.counters[f"gate.dropped.{reason}"] += 1
        return Verdict(DROP, reason)

    def _ask_cookie(self, request: InitRequest, peer: str, why: str) -> Verdict:
        assert self.cookies is not None
        cookie = self.cookies.make(request.nonce_i, peer, request.spi_i)
        self.counters["gate.cookie_sent"] += 1
        return Verdict(COOKIE, why, cookie_response(request, cookie))
