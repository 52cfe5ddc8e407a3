"""Test harness: network namespaces and real IKE peers (strongSwan, libreswan) in them.

    from tests.harness.netns import Namespace, link
    from tests.harness.strongswan import StrongSwan, Connection, Child, Psk, Ppk
    from tests.harness.libreswan import Libreswan, LibreswanConn, LibreswanPsk, LibreswanPpk

The pytest fixtures built on these live in tests/interop/conftest.py.
"""
