"""The whole ikefarm configuration schema: every knob of the seeds, with its default and range.

Option names are the seeds' in kebab-case; sections follow the vSR tree
(`ike global-options ...`) and the Junos hierarchy (`security ike session ...`).
Sources: seed 004 (6WIND vSR IKE advanced configuration), seed 000 (Junos
`security ike session`), seed 002 (JunosE `tx-invalid-cookie`, `clear sa`),
seed 003 (Junos SRX flow sessions). Options added by ikefarm for running a farm
(`[farm]`, `[ingress]`, `[telemetry]`) say so in their doc.
"""

from __future__ import annotations

from typing import Any

from ikefarm.shared.config.kinds import (
    Address,
    AddressRange,
    Bool,
    Choice,
    Duration,
    Float,
    Int,
    IntOrKeyword,
    Kind,
    LevelOrDisable,
    ListenEndpoint,
    ListOf,
    Network,
    RateKind,
    SecretKind,
    Text,
    ValueRefused,
)
from ikefarm.shared.config.tree import Section, TableList
from ikefarm.shared.flow.settings import PROTOCOLS
from ikefarm.shared.ikev2.crypto.registry import AlgorithmKind, UnknownAlgorithm, lookup
from ikefarm.shared.observability.logging import SUBSYSTEMS

UINT32_MAX = 4_294_967_295

LOG_SUBSYSTEMS = SUBSYSTEMS  # the vSR subsystems (seed 004)


class AlgorithmName(Kind):
    def __init__(self, kind: AlgorithmKind) -> None:
        self.kind = kind
        self.default = None
        self.doc = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueRefused(f"must be a {self.kind.value} name")
        try:
            return lookup(self.kind, raw).name
        except UnknownAlgorithm as exc:
            raise ValueRefused(
                f"is not a known {self.kind.value}; known: {', '.join(exc.known)}"
            ) from None

    def describe(self) -> str:
        return f"{self.kind.value} name"


def _algorithms(kind: AlgorithmKind, doc: str) -> ListOf:
    return ListOf(item=AlgorithmName(kind), default=None, min_items=1, doc=doc)


def _logging_facility(default: int | str, doc: str) -> Section:
    fields: dict[str, Any] = {
        "default": LevelOrDisable(default=default, doc="level for subsystems not named below")
    }
    for subsystem in LOG_SUBSYSTEMS:
        fields[subsystem] = LevelOrDisable(default=None, doc=f"level for the {subsystem} subsystem")
    return Section(fields, doc=doc)


def _traffic_selector(doc: str) -> Section:
    return Section(
        {
            "subnet": Network(doc="address block; unset on remote-ts to accept an assigned VIP"),
            "protocol": Int(0, 255, default=0, doc="IP protocol number, 0 = any"),
            "port": Int(0, 65535, default=0, doc="port, 0 = any"),
        },
        doc=doc,
    )


SEND_COOKIE_DEFAULT = 250

GLOBAL_OPTIONS = Section(
    {
        "initiator-only": Bool(default=False, doc="refuse every incoming IKE_SA_INIT (seed 004)"),
        "retransmit-tries": Int(0, 100, default=5, doc="retransmissions before giving up"),
        "retransmit-timeout": Float(0.0, 60.0, default=4.0, doc="first retransmit timeout, s"),
        "retransmit-base": Float(0.0, 10.0, default=1.8, doc="exponential backoff base"),
        "retransmit-jitter": Int(0, 20, default=0, doc="percent a timeout is randomly reduced"),
        "retransmit-limit": Int(0, 100, default=0, doc="cap on one timeout, s; 0 = no cap"),
        "acquire-timeout": Int(
            1, 86400, default=30, doc="lifetime of an acquire SA (queued packets dropped after), s"
        ),
        "make-before-break": Bool(default=False, doc="reauth: new SAs before deleting old"),
        "install-vip-on": Text(default=None, doc="interface for VIPs (default: the IKE one)"),
        "install-routes": Bool(default=False, doc="routes to remote-ts of non-SVTI child SAs"),
        "routing-table": Int(1, UINT32_MAX, default=220, doc="table for installed routes"),
        "routing-table-prio": Int(0, 32767, default=220, doc="priority of the PBR rule"),
        "threads": Int(1, UINT32_MAX, default=16, doc="worker threads per ike worker process"),
        "sa-table-size": Int(1, UINT32_MAX, default=1, doc="IKE SA hash table size"),
        "sa-table-segments": Int(1, UINT32_MAX, default=1, doc="IKE SA hash table segments"),
        "sp-hash-ipv4": Section(
            {
                "local": Int(0, 32, default=32, doc="minimum local prefix length hashed"),
                "remote": Int(0, 32, default=32, doc="minimum remote prefix length hashed"),
            }
        ),
        "sp-hash-ipv6": Section(
            {
                "local": Int(0, 128, default=128, doc="minimum local prefix length hashed"),
                "remote": Int(0, 128, default=128, doc="minimum remote prefix length hashed"),
            }
        ),
        "mobike-prefer-best-path": Bool(
            default=False,
            doc="MOBIKE initiator: when an address appears, move SAs to the route's source",
        ),
        "snmp": Bool(
            default=False,
            doc="IKE state readable over SNMP through `ikefarm snmp pass-persist` (seed 004)",
        ),
        "tx-invalid-cookie": Bool(
            default=False,
            doc="answer unknown SPIs with INVALID_IKE_SPI, rate-limited (JunosE, seed 002)",
        ),
        "dos-protection": Section(
            {
                "cookie-threshold": IntOrKeyword(
                    keywords=("always",),
                    minimum=0,
                    maximum=UINT32_MAX,
                    default=10,
                    doc='half-open SAs that turn cookies on; "always"; 0 disables',
                ),
                "block-threshold": Int(0, UINT32_MAX, default=5, doc="half-open SAs per peer IP"),
                "init-limit-half-open": Int(0, UINT32_MAX, default=0, doc="0 disables"),
                "init-limit-job-load": Int(0, UINT32_MAX, default=0, doc="0 disables"),
                "ike-sa-limit": Int(0, UINT32_MAX, default=0, doc="established SAs; 0 disables"),
            }
        ),
    },
    doc="vSR `ike global-options` (seed 004)",
)

SESSION = Section(
    {
        "half-open": Section(
            {
                "max-count": Int(1, 10000, default=300, doc="responder half-open SAs"),
                "timeout": Int(1, 180, default=60, doc="half-open SA lifetime, s (responder)"),
                "discard-duplicate": Bool(default=False, doc="drop IKE_SA_INIT while half-open"),
                "thresholds": Section(
                    {
                        "send-cookie": Int(1, 10000, default=SEND_COOKIE_DEFAULT, doc="count"),
                        "reduce-timeout": Section(
                            {
                                "count": Int(1, 10000, default=None, doc="half-open count"),
                                "timeout": Int(1, 180, default=None, doc="reduced lifetime, s"),
                            }
                        ),
                    }
                ),
            }
        ),
        "full-open": Section(
            {
                "incoming-exchange-max-rates": Section(
                    {
                        "ike-rekey": RateKind(doc="peer-initiated IKE rekeys, per peer"),
                        "ipsec-rekey": RateKind(doc="peer-initiated child rekeys, per tunnel"),
                        "keepalive": RateKind(doc="peer-initiated DPD, per peer"),
                    }
                )
            }
        ),
        "backoff-timeouts": Section(
            {
                "init-phase-failure": Int(1, 180, default=None, doc="s; unset = disabled"),
                "auth-phase-failure": Int(1, 180, default=None, doc="s; unset = disabled"),
            }
        ),
    },
    doc="Junos `security ike session` (seed 000)",
)

IKE_PROPOSAL = Section(
    {
        "enc-alg": _algorithms(AlgorithmKind.ENC, "cipher(s), with auth-alg"),
        "auth-alg": _algorithms(AlgorithmKind.AUTH, "integrity algorithm(s)"),
        "aead-alg": _algorithms(AlgorithmKind.AEAD, "combined-mode cipher(s)"),
        "prf-alg": _algorithms(AlgorithmKind.PRF, "PRF(s); default follows auth-alg"),
        "dh-group": _algorithms(AlgorithmKind.DH, "key exchange group(s)"),
    }
)

ESP_PROPOSAL = Section(
    {
        "enc-alg": _algorithms(AlgorithmKind.ENC, "cipher(s), with auth-alg"),
        "auth-alg": _algorithms(AlgorithmKind.AUTH, "integrity algorithm(s)"),
        "aead-alg": _algorithms(AlgorithmKind.AEAD, "combined-mode cipher(s)"),
        "dh-group": _algorithms(AlgorithmKind.DH, "PFS group(s); unset = no PFS"),
        "esn": ListOf(item=Bool(), default=[False], doc="ESN choices by preference"),
    }
)

IKE_POLICY_TEMPLATE = TableList(
    Section(
        {
            "name": Text(),
            "ike-proposal": TableList(IKE_PROPOSAL, key=None, doc="by preference"),
            "dpd-delay": Duration(default=0.0, doc="idle time before a DPD check; 0 disables"),
            "require-ppk": Bool(default=False, doc="fail instead of proceeding without PPK"),
            "mobike": Bool(
                default=False,
                doc="MOBIKE (RFC 4555): a peer that changes address keeps its SAs",
            ),
            "fragmentation": Bool(default=True, doc="RFC 7383 IKE fragmentation"),
            "rekey-time": Duration(default=14400.0, doc="IKE SA rekey interval"),
            "reauth-time": Duration(default=0.0, doc="IKE SA reauthentication; 0 disables"),
            "over-time": Duration(default=None, doc="hard lifetime beyond rekey; default 10%"),
            "rand-time": Duration(default=None, doc="rekey jitter; default = over-time"),
        }
    ),
    doc="vSR `ike ike-policy-template`",
)

IPSEC_POLICY_TEMPLATE = TableList(
    Section(
        {
            "name": Text(),
            "esp-proposal": TableList(ESP_PROPOSAL, key=None, doc="by preference"),
            "replay-window": Int(0, 4096, default=32, doc="packets; 0 disables"),
            "dpd-action": Choice(("clear", "restart", "trap"), default="restart"),
            "start-action": Choice(
                ("none", "trap", "start"),
                default="trap",
                doc="trap: the first matching packet starts the child (VPNs with a remote-address)",
            ),
            "close-action": Choice(("none", "trap", "start"), default="none"),
            "rekey-time": Duration(default=3600.0, doc="child SA rekey interval"),
            "life-time": Duration(default=None, doc="hard lifetime; default rekey-time x 1.1"),
            "rand-time": Duration(default=None, doc="rekey jitter; default life - rekey"),
        }
    ),
    doc="vSR `ike ipsec-policy-template`",
)

AUTH_METHODS = ("pre-shared-key", "pubkey", "eap-radius")

SECURITY_POLICY = TableList(
    Section(
        {
            "name": Text(),
            "local-ts": _traffic_selector("local traffic selector"),
            "remote-ts": _traffic_selector("remote traffic selector"),
            "mode": Choice(("tunnel", "transport"), default="tunnel"),
            "action": Choice(("esp",), default="esp"),
            "priority": Int(0, UINT32_MAX, default=0),
            "svti-id-in": Int(0, UINT32_MAX, default=None),
            "svti-id-out": Int(0, UINT32_MAX, default=None),
            "inject-routes": Section(
                {
                    "next-hop": Text(default=None, doc="address or interface (mandatory)"),
                    "vrf": Text(default=None),
                    "table": Int(1, UINT32_MAX, default=None, doc="default: main (254)"),
                    "l3vrf": Text(default=None, doc="exclusive with table"),
                }
            ),
        }
    )
)

VPN = TableList(
    Section(
        {
            "name": Text(),
            "enabled": Bool(default=True),
            "version": Int(2, 2, default=2, doc="IKE version; only IKEv2"),
            "local-address": Address(default=None),
            "remote-address": Address(allow_any=True, default="any"),
            "local-id": Text(default=None, doc="default: local-address"),
            "remote-id": Text(default=None, doc="default: any identity with a PSK"),
            "ike-policy": Section(
                {
                    "template": Text(default=None),
                    "local-auth-method": Choice(AUTH_METHODS, default="pre-shared-key"),
                    "remote-auth-method": Choice(AUTH_METHODS, default="pre-shared-key"),
                    "require-ppk": Bool(default=None, doc="overrides the template"),
                    "mobike": Bool(default=None, doc="overrides the template"),
                    "dpd-delay": Duration(default=None, doc="overrides the template"),
                }
            ),
            "ipsec-policy": Section(
                {
                    "template": Text(default=None),
                    "replay-window": Int(0, 4096, default=None, doc="overrides the template"),
                    "dpd-action": Choice(("clear", "restart", "trap"), default=None),
                    "start-action": Choice(("none", "trap", "start"), default=None),
                    "close-action": Choice(("none", "trap", "start"), default=None),
                }
            ),
            "ppk": Text(default=None, doc="name of an [[ike.ppk]] to use when initiating"),
            "local-certificate": Text(
                default=None,
                doc="pubkey: PEM file, our certificate then its intermediates (CERT payloads)",
            ),
            "local-private-key": Text(
                default=None, doc="pubkey: PEM/DER key file of local-certificate; keystore only"
            ),
            "vip-request": ListOf(item=Address(), default=[], doc="0.0.0.0 and/or ::"),
            "vip-pool": ListOf(item=Text(), default=[], doc="names of [[ike.pool]]"),
            "security-policy": SECURITY_POLICY,
        }
    ),
    doc="vSR `ike vpn`",
)

POOL = TableList(
    Section(
        {
            "name": Text(),
            "address": ListOf(item=AddressRange(), default=[], doc="INTERNAL_IP4/6_ADDRESS"),
            "dns": ListOf(item=Address(), default=[], doc="INTERNAL_IP4/6_DNS"),
            "nbns": ListOf(item=Address(), default=[], doc="INTERNAL_IP4/6_NBNS"),
            "dhcp": ListOf(item=Address(), default=[], doc="INTERNAL_IP4/6_DHCP"),
            "subnet": ListOf(item=Network(), default=[], doc="INTERNAL_IP4/6_SUBNET"),
            "netmask": ListOf(item=Address(), default=[], doc="INTERNAL_IP4/6_NETMASK"),
        }
    )
)

PPK = TableList(
    Section(
        {
            "name": Text(),
            "id": Text(default=None, doc="PPK identity as text"),
            "id-hex": Text(default=None, pattern=r"([0-9a-fA-F]{2})+", doc="identity in hex"),
            "secret": SecretKind(doc="the post-quantum preshared key"),
        }
    ),
    doc="RFC 8784 PPKs (seed 004)",
)

PRE_SHARED_KEY = TableList(
    Section(
        {
            "name": Text(default=None),
            "local-id": Text(default=None),
            "remote-id": Text(default=None),
            "secret": SecretKind(),
        }
    ),
    key=None,
)

RADIUS_SERVER = TableList(
    Section(
        {
            "name": Text(default=None, doc="how logs and counters name the server"),
            "address": Address(default=None, doc="required"),
            "auth-port": Int(1, 65535, default=1812, doc="Access-Request port (RFC 2865)"),
            "acct-port": Int(1, 65535, default=1813, doc="Accounting-Request port (RFC 2866)"),
            "secret": SecretKind(doc="the RADIUS shared secret; keystore only"),
            "timeout": Float(0.1, 60.0, default=2.0, doc="s before a request is sent again"),
            "retries": Int(0, 10, default=2, doc="retransmissions before the next server"),
            "nas-identifier": Text(default="ikefarm", doc="NAS-Identifier (RFC 2865 5.32)"),
        }
    ),
    key=None,
    doc="ikefarm: RADIUS servers for eap-radius (docs/radius.md), tried in order",
)

RADIUS = Section(
    {
        "accounting": Bool(default=False, doc="RADIUS accounting (RFC 2866) of IKE SAs"),
        "interim-interval": Duration(
            default=0.0, doc="Interim-Update interval; 0 = Start and Stop only"
        ),
    },
    doc="ikefarm: RADIUS options (docs/radius.md)",
)

PKI = Section(
    {
        "ca-certificates": ListOf(
            item=Text(), default=[], doc="trust anchors for pubkey peers (PEM/DER files)"
        ),
        "crls": ListOf(item=Text(), default=[], doc="CRL files checked for every peer chain"),
    },
    doc="certificate authentication: trust store (RFC 7296 3.6-3.7)",
)

LOGGING = Section(
    {
        "daemon": _logging_facility(0, "facility daemon: level 0-4 or disable"),
        "authpriv": _logging_facility("disable", "facility authpriv: level 0-4 or disable"),
    },
    doc="vSR `ike logging`",
)

SCHEMA = Section(
    {
        "nats": Section(
            {
                "url": Text(default="", doc="empty: start an embedded nats-server"),
                "servers": ListOf(
                    item=Text(pattern=r"[^,\s]+"),
                    default=[],
                    doc="external NATS cluster: its nodes' URLs (instead of url); each process "
                    "connects to one and fails over to the others",
                ),
                "replicas": Int(
                    1,
                    5,
                    default=1,
                    doc="JetStream replicas of every bucket the farm creates: 3 on a 3-node "
                    "cluster (JetStream R3); the embedded nats-server is one node",
                ),
                "store-dir": Text(default=None, doc="JetStream store; default <state-dir>/nats"),
                "credentials": Text(
                    default=None,
                    doc="external NATS: credentials file, or directory of <user>.json files",
                ),
            }
        ),
        "farm": Section(
            {
                "state-dir": Text(
                    default=None, doc="default $IKEFARM_STATE_DIR, else /var/lib/ikefarm (root)"
                ),
                "ike-workers": Int(1, 256, default=1, doc="ike worker processes `up` starts"),
                "ingress-instances": Int(1, 64, default=1, doc="ingress processes `up` starts"),
            },
            doc="ikefarm: how many processes `ikefarm up` runs",
        ),
        "ingress": Section(
            {
                "listen": ListOf(item=Address(), default=None, doc="default: vpn local-addresses"),
                "ike-port": Int(1, 65535, default=500),
                "natt-port": Int(1, 65535, default=4500),
                "cookie-secret-lifetime": Duration(1, 86400, default=300.0),
            },
            doc="ikefarm: the UDP sockets",
        ),
        "telemetry": Section(
            {
                "otlp-endpoint": Text(default="", doc="OTLP/HTTP traces endpoint; empty = off"),
                "metrics-listen": ListenEndpoint(
                    default="",
                    doc="Prometheus /metrics of each service process; empty = off; "
                    "`up` gives its processes this port and the next ones",
                ),
                "log-format": Choice(("json", "console"), default="json"),
            },
            doc="ikefarm: traces and log format",
        ),
        "ike": Section(
            {
                "global-options": GLOBAL_OPTIONS,
                "session": SESSION,
                "logging": LOGGING,
                "ike-policy-template": IKE_POLICY_TEMPLATE,
                "ipsec-policy-template": IPSEC_POLICY_TEMPLATE,
                "vpn": VPN,
                "pool": POOL,
                "ppk": PPK,
                "pre-shared-key": PRE_SHARED_KEY,
                "pki": PKI,
                "radius-server": RADIUS_SERVER,
                "radius": RADIUS,
            }
        ),
        "keystore": Section(
            {
                "master-key-file": Text(
                    default=None,
                    doc="file holding the master key (text, 0x hex or 0s base64, >= 16 octets)",
                ),
                "master-key-env": Text(
                    default="IKEFARM_MASTER_KEY",
                    doc="env var holding the master key when master-key-file is unset",
                ),
                "store-file": Text(
                    default=None,
                    doc="secrets sealed with AES-GCM; default <state-dir>/keystore.bin",
                ),
            },
            doc="ikefarm: secrets at rest; the keystore starts only with the right master key",
        ),
        "kernel": Section(
            {
                "backend": Choice(
                    ("auto", "netlink", "userspace", "memory"),
                    default="auto",
                    doc="auto: netlink if the kernel takes ESP states, else userspace;"
                    " memory: a test double",
                )
            }
        ),
        "flow": Section(
            {
                "source": Choice(
                    ("dataplane", "netlink"),
                    default="dataplane",
                    doc="ikefarm: sessions from the dataplane's bus events, or from kernel "
                    "conntrack (pyroute2; ageing and clearing delete conntrack entries)",
                ),
                "max-sessions": Int(1, 100_000_000, default=1_000_000),
                "session-timeouts": Section(
                    {
                        "tcp": Int(4, 86400, default=1800, doc="s (seed 003)"),
                        "udp": Int(4, 86400, default=60, doc="s (seed 003)"),
                        "icmp": Int(4, 86400, default=60),
                        "other": Int(4, 86400, default=1800),
                        "invalidated": Int(1, 20, default=4, doc="timeout of an invalid session"),
                    }
                ),
                "tcp-session": Section(
                    {
                        "tcp-initial-timeout": Int(4, 300, default=20, doc="s; minimum 4"),
                        "time-wait-state": Int(
                            2,
                            600,
                            default=None,
                            doc="s a closed TCP session is held; unset: a close invalidates it",
                        ),
                        "rst-invalidate-session": Bool(default=False),
                        "fin-invalidate-session": Bool(default=False),
                        "no-syn-check": Bool(default=False),
                        "no-sequence-check": Bool(
                            default=False,
                            doc="true: the userspace dataplane does not drop TCP segments "
                            "outside their session's window (flow.drop.tcp_sequence)",
                        ),
                        "tcp-mss": Int(
                            64,
                            65535,
                            default=None,
                            doc="the userspace dataplane lowers a larger MSS option of TCP "
                            'SYN and SYN-ACK to this, both ways (flow.source = "dataplane")',
                        ),
                    }
                ),
                "aging": Section(
                    {
                        "early-ageout": Int(1, 65535, default=20, doc="s"),
                        "high-watermark": Int(0, 100, default=100, doc="percent of max-sessions"),
                        "low-watermark": Int(0, 100, default=100, doc="percent of max-sessions"),
                    }
                ),
                "application": TableList(
                    Section(
                        {
                            "name": Text(default=None, doc="required; shown in sessions"),
                            "protocol": IntOrKeyword(
                                keywords=tuple(PROTOCOLS),
                                minimum=0,
                                maximum=255,
                                default=None,
                                doc="required",
                            ),
                            "destination-port": Int(0, 65535, default=0, doc="0 = any"),
                            "inactivity-timeout": Int(
                                4, 86400, default=None, doc="required; s, overrides the protocol's"
                            ),
                            "policy": ListOf(
                                item=Text(), default=[], doc="policies it is tied to; [] = any"
                            ),
                        }
                    ),
                    doc="custom applications and their inactivity timeouts (seed 003)",
                ),
            },
            doc="Junos SRX flow sessions (seed 003)",
        ),
    }
)
