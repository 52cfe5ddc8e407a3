"""The leak finder itself: a secret is found in every encoding and alignment it may travel in."""

from __future__ import annotations

import base64
import os

from tests.leaks import find_secrets


def test_secret_found_raw_hex_and_base64_at_any_alignment() -> None:
    secret = os.urandom(32)
    for prefix in range(6):
        blob = os.urandom(prefix) + secret + os.urandom(5)
        for text in (
            blob,
            blob.hex().encode(),
            blob.hex().upper().encode(),
            base64.b64encode(blob),
            base64.urlsafe_b64encode(blob),
        ):
            found = find_secrets(b"log: " + text + b" end", [os.urandom(16), secret])
            assert len(found) == 1 and found[0].startswith("secret[1]/")


def test_unrelated_data_is_clean() -> None:
    assert find_secrets(os.urandom(4096).hex(), [os.urandom(32)]) == []
