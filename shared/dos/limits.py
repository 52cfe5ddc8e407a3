"""The DoS knobs of seeds 004 (vSR `dos-protection`) and 000 (Junos `session`), resolved once.

Where the two vendors name the same thing the rule is written here:

* cookies: vSR `cookie-threshold` (0 disables the mechanism, "always" = from the
  first half-open SA) and Junos `half-open thresholds send-cookie`; where both are
  in force the lower count wins. Junos thresholds are in force when written, or
  by default unless `half-open max-count` is written without them (seed 000:
  an explicit max-count disables the thresholds that are not explicit).
* half-open ceiling: vSR `init-limit-half-open` (0 = none) and Junos
  `half-open max-count` (default 300, always in force): the lower one.
* `reduce-timeout` needs both its count and its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ikefarm.shared.config.kinds import Rate
from ikefarm.shared.config.loader import Config

_SESSION = "ike.session.half-open"
_THRESHOLDS = f"{_SESSION}.thresholds"


@dataclass(frozen=True)
class DosLimits:
    """Effective limits; None means the limit is off."""

    cookie_threshold: int | None = None  # half-open count from which cookies are required
    block_threshold: int | None = None  # half-open SAs per peer IP
    half_open_limit: int | None = None  # new IKE_SA_INIT refused at this half-open count
    half_open_limit_name: str = "init-limit-half-open"
    job_load_limit: int | None = None  # IKE_SA_INIT handed to workers and not answered
    ike_sa_limit: int | None = None  # established IKE SAs
    half_open_timeout: float = 60.0
    reduce_timeout_count: int | None = None
    reduce_timeout: float | None = None
    discard_duplicate: bool = False
    init_phase_backoff: float | None = None
    auth_phase_backoff: float | None = None
    ike_rekey_rate: Rate | None = None
    ipsec_rekey_rate: Rate | None = None
    keepalive_rate: Rate | None = None
    tx_invalid_cookie: bool = False

    def cookies_required(self, half_open: int) -> bool:
        return self.cookie_threshold is not None and half_open >= self.cookie_threshold

    def half_open_lifetime(self, half_open: int) -> float:
        """Lifetime of a new half-open SA: shorter once the reduce-timeout count is reached."""
        if (
            self.reduce_timeout_count is not None
            and self.reduce_timeout is not None
            and half_open >= self.reduce_timeout_count
        ):
            return self.reduce_timeout
        return self.half_open_timeout

    @property
    def cookie_mode(self) -> str:
        if self.cookie_threshold is None:
            return "disabled"
        return "always" if self.cookie_threshold == 0 else f"threshold {self.cookie_threshold}"


def _positive(value: int) -> int | None:
    return value if value > 0 else None


def dos_limits(config: Config) -> DosLimits:
    dos = config.ike.global_options.dos_protection
    half_open = config.ike.session.half_open
    thresholds = half_open.thresholds
    explicit = config.is_explicit
    # seed 000: writing max-count disables every threshold that is not written too
    max_count_written = explicit(f"{_SESSION}.max-count")

    def threshold_in_force(key: str) -> bool:
        return explicit(f"{_THRESHOLDS}.{key}") or not max_count_written

    cookie_candidates: list[int] = []
    vsr = dos.cookie_threshold
    vsr_disabled = vsr == 0
    if vsr == "always":
        cookie_candidates.append(0)
    elif not vsr_disabled:
        cookie_candidates.append(int(vsr))
    if not vsr_disabled and threshold_in_force("send-cookie"):
        cookie_candidates.append(int(thresholds.send_cookie))
    cookie_threshold = min(cookie_candidates) if cookie_candidates else None

    ceilings = [("max-count", int(half_open.max_count))]
    if dos.init_limit_half_open > 0:
        ceilings.append(("init-limit-half-open", int(dos.init_limit_half_open)))
    ceiling_name, ceiling = min(ceilings, key=lambda item: item[1])

    reduce = thresholds.reduce_timeout
    reduce_in_force = threshold_in_force("reduce-timeout")
    rates = config.ike.session.full_open.incoming_exchange_max_rates
    backoff = config.ike.session.backoff_timeouts
    return DosLimits(
        cookie_threshold=cookie_threshold,
        block_threshold=_positive(int(dos.block_threshold)),
        half_open_limit=ceiling,
        half_open_limit_name=ceiling_name,
        job_load_limit=_positive(int(dos.init_limit_job_load)),
        ike_sa_limit=_positive(int(dos.ike_sa_limit)),
        half_open_timeout=float(half_open.timeout),
        reduce_timeout_count=reduce.count if reduce_in_force else None,
        reduce_timeout=float(reduce.timeout)
        if reduce_in_force and reduce.timeout is not None
        else None,
        discard_duplicate=bool(half_open.discard_duplicate),
        init_phase_backoff=_seconds(backoff.init_phase_failure),
        auth_phase_backoff=_seconds(backoff.auth_phase_failure),
        ike_rekey_rate=rates.ike_rekey,
        ipsec_rekey_rate=rates.ipsec_rekey,
        keepalive_rate=rates.keepalive,
        tx_invalid_cookie=bool(config.ike.global_options.tx_invalid_cookie),
    )


def _seconds(value: int | None) -> float | None:
    return float(value) if value is not None else None
