"""A missing test prerequisite (root, ip/unshare, strongSwan, libreswan, /dev/net/tun).

Outside CI the test is skipped, naming exactly what is missing and how to get it.
Under `CI=true` the test fails instead: a CI run where every interop test was
skipped would otherwise pass without having tested anything.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skip this test because `reason`; under CI=true, fail it."""
    if in_ci():
        pytest.fail(f"CI=true and a test prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)
