"""Keystore: holds PSKs, PPKs and private keys; computes what needs them, returns no secret."""

from __future__ import annotations

from ikefarm.shared.bus.runtime import ServiceBase


class KeystoreService(ServiceBase):
    name = "keystore"
    subsystem = "config"
    description = "ikefarm keystore: secret-bearing computations, secrets never leave"
