"""Looking for secrets where they must not be: bus traffic, log lines, files, test output.

`encodings(secret)` lists the forms a leaked secret could take in text or binary:
the octets themselves, hex (either case), and base64 (standard and URL-safe,
with and without padding, at each of the three alignments a secret can take
inside a longer base64 text). `find_secrets(data, secrets)` names which of
`secrets` appear; `assert_no_secret` fails naming the secret's index and
encoding, never printing the secret. Add a kind of secret (a private key, a
certificate's key) by passing its octets in `secrets`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

MIN_LENGTH = 8  # shorter fragments match by chance


def _base64_forms(secret: bytes) -> list[bytes]:
    forms = []
    for shift in range(3):
        # inside longer base64 text a secret starts at any of 3 alignments: encode it behind
        # `shift` filler octets and keep only the characters that depend on the secret alone
        encoded = base64.b64encode(bytes(shift) + secret)
        skip = {0: 0, 1: 2, 2: 3}[shift]
        tail = len(secret) + shift
        keep = (tail // 3) * 4  # whole groups only: the last partial group depends on padding
        core = encoded[skip:keep]
        if len(core) >= MIN_LENGTH:
            forms += [core, core.replace(b"+", b"-").replace(b"/", b"_")]
    whole = base64.b64encode(secret)
    forms += [whole, whole.rstrip(b"="), base64.urlsafe_b64encode(secret).rstrip(b"=")]
    return forms


def encodings(secret: bytes) -> list[tuple[str, bytes]]:
    forms = [
        ("raw", secret),
        ("hex", secret.hex().encode()),
        ("HEX", secret.hex().upper().encode()),
    ]
    forms += [("base64", form) for form in _base64_forms(secret)]
    return [(name, form) for name, form in forms if len(form) >= MIN_LENGTH]


def find_secrets(data: bytes | str, secrets: Iterable[bytes]) -> list[str]:
    """`secret[i]/encoding` for each secret found in `data`, in any of its encodings."""
    raw = data.encode(errors="surrogateescape") if isinstance(data, str) else data
    found = []
    for index, secret in enumerate(secrets):
        for name, form in encodings(secret):
            if form in raw:
                found.append(f"secret[{index}]/{name}")
                break
    return found


def assert_no_secret(data: bytes | str, secrets: Iterable[bytes]) -> None:
    found = find_secrets(data, secrets)
    assert not found, f"secret material found: {', '.join(found)}"
