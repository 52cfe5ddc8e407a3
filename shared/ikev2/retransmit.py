"""Retransmission timeouts exactly as seed 004 defines them (RFC 7296 2.4 leaves them local).

    timeout(try) = min(retransmit-limit, retransmit-timeout * retransmit-base ** try)
                   * (1 - random(0, retransmit-jitter) / 100)

`try` runs from 0 (the first transmission) to retransmit-tries; a limit of 0
means no cap, a jitter of 0 no randomness. After the timeout of the last try
expires without an answer, the exchange has failed.
"""

from __future__ import annotations

from collections.abc import Callable

from ikefarm.shared.ikev2.policy import RetransmitPolicy


def base_timeout(policy: RetransmitPolicy, attempt: int) -> float:
    """The timeout of one try before jitter: the seed's 'timeout-with-limit'."""
    timeout = policy.timeout * policy.base**attempt
    if policy.limit:
        timeout = min(float(policy.limit), timeout)
    return timeout


def retransmit_timeout(
    policy: RetransmitPolicy, attempt: int, uniform: Callable[[float, float], float]
) -> float:
    jitter = uniform(0.0, float(policy.jitter)) if policy.jitter else 0.0
    return base_timeout(policy, attempt) * (1 - jitter / 100)


def total_timeout(policy: RetransmitPolicy) -> float:
    """How long an unanswered request lives, without jitter (the seed's 'Total timeout')."""
    return sum(base_timeout(policy, attempt) for attempt in range(policy.tries + 1))
