"""Seed 004 dos-protection and seed 000 session knobs resolve into one set of limits."""

from __future__ import annotations

from ikefarm.shared.config.kinds import Rate
from tests.dos_helpers import limits_of

DOS = "[ike.global-options.dos-protection]\n"
HALF_OPEN = "[ike.session.half-open]\n"
THRESHOLDS = "[ike.session.half-open.thresholds]\n"


def test_defaults_are_the_seeds_defaults() -> None:
    limits = limits_of("")
    assert limits.cookie_threshold == 10  # vSR 10 is lower than Junos send-cookie 250
    assert limits.block_threshold == 5
    assert limits.half_open_limit == 300 and limits.half_open_limit_name == "max-count"
    assert limits.job_load_limit is None and limits.ike_sa_limit is None
    assert limits.half_open_timeout == 60.0
    assert limits.reduce_timeout_count is None and limits.reduce_timeout is None
    assert not limits.discard_duplicate and not limits.tx_invalid_cookie
    assert limits.init_phase_backoff is None and limits.auth_phase_backoff is None
    assert limits.keepalive_rate is None
    assert limits.cookie_mode == "threshold 10"


def test_cookie_threshold_always_zero_and_n() -> None:
    assert limits_of(DOS + 'cookie-threshold = "always"').cookie_threshold == 0
    assert limits_of(DOS + 'cookie-threshold = "always"').cookie_mode == "always"
    off = limits_of(DOS + "cookie-threshold = 0")
    assert off.cookie_threshold is None and off.cookie_mode == "disabled"
    assert not off.cookies_required(10**6)
    three = limits_of(DOS + "cookie-threshold = 3")
    assert not three.cookies_required(2) and three.cookies_required(3)


def test_the_lower_of_cookie_threshold_and_send_cookie_wins() -> None:
    both = DOS + "cookie-threshold = 40\n" + THRESHOLDS + "send-cookie = 20\n"
    assert limits_of(both).cookie_threshold == 20
    both = DOS + "cookie-threshold = 15\n" + THRESHOLDS + "send-cookie = 20\n"
    assert limits_of(both).cookie_threshold == 15
    # Junos default 250 is still in force when vSR's is higher
    assert limits_of(DOS + "cookie-threshold = 1000").cookie_threshold == 250


def test_explicit_max_count_disables_the_thresholds_not_written() -> None:
    text = DOS + "cookie-threshold = 1000\n" + HALF_OPEN + "max-count = 500\n"
    assert limits_of(text).cookie_threshold == 1000  # Junos send-cookie no longer applies
    written = text + THRESHOLDS + "send-cookie = 30\n"
    assert limits_of(written).cookie_threshold == 30


def test_half_open_ceiling_is_the_lower_of_init_limit_and_max_count() -> None:
    limits = limits_of(DOS + "init-limit-half-open = 50")
    assert (limits.half_open_limit, limits.half_open_limit_name) == (50, "init-limit-half-open")
    limits = limits_of(DOS + "init-limit-half-open = 500\n" + HALF_OPEN + "max-count = 20\n")
    assert (limits.half_open_limit, limits.half_open_limit_name) == (20, "max-count")


def test_reduce_timeout_backoffs_rates_and_invalid_spi() -> None:
    limits = limits_of(
        "[ike.global-options]\ntx-invalid-cookie = true\n"
        + HALF_OPEN
        + "timeout = 30\ndiscard-duplicate = true\n"
        + "[ike.session.half-open.thresholds.reduce-timeout]\ncount = 7\ntimeout = 5\n"
        + "[ike.session.backoff-timeouts]\ninit-phase-failure = 9\nauth-phase-failure = 11\n"
        + "[ike.session.full-open.incoming-exchange-max-rates]\n"
        + 'ike-rekey = "1/60"\nipsec-rekey = "2/30"\nkeepalive = "3/10"\n'
    )
    assert limits.half_open_lifetime(6) == 30.0 and limits.half_open_lifetime(7) == 5.0
    assert limits.discard_duplicate and limits.tx_invalid_cookie
    assert (limits.init_phase_backoff, limits.auth_phase_backoff) == (9.0, 11.0)
    assert limits.ike_rekey_rate == Rate(1, 60) and limits.ipsec_rekey_rate == Rate(2, 30)
    assert limits.keepalive_rate == Rate(3, 10)


def test_zero_disables_block_threshold_job_load_and_ike_sa_limit() -> None:
    limits = limits_of(DOS + "block-threshold = 0\ninit-limit-job-load = 0\nike-sa-limit = 0\n")
    assert limits.block_threshold is None
    assert limits.job_load_limit is None and limits.ike_sa_limit is None
    limits = limits_of(DOS + "block-threshold = 2\ninit-limit-job-load = 3\nike-sa-limit = 4\n")
    assert (limits.block_threshold, limits.job_load_limit, limits.ike_sa_limit) == (2, 3, 4)


def test_the_hardened_example_sets_every_knob() -> None:
    from pathlib import Path

    from ikefarm.shared.config.loader import load_config
    from ikefarm.shared.dos.limits import dos_limits

    example = Path(__file__).resolve().parents[2] / "ops" / "examples" / "dos-hardened.toml"
    limits = dos_limits(load_config(example))
    assert limits.cookie_threshold == 10 and limits.block_threshold == 5
    assert (limits.half_open_limit, limits.half_open_limit_name) == (200, "init-limit-half-open")
    assert limits.job_load_limit == 50 and limits.ike_sa_limit == 5000
    assert limits.half_open_timeout == 30.0 and limits.discard_duplicate
    assert (limits.reduce_timeout_count, limits.reduce_timeout) == (100, 5.0)
    assert (limits.init_phase_backoff, limits.auth_phase_backoff) == (10.0, 30.0)
    assert limits.ike_rekey_rate == Rate(2, 60) and limits.keepalive_rate == Rate(30, 60)
    assert limits.ipsec_rekey_rate == Rate(10, 60) and limits.tx_invalid_cookie
