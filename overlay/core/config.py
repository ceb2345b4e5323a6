"""Agent configuration: command-line flags over a TOML file, validated with clear errors.

Pure: parses and checks values, touches no device or socket. Every error says which setting
was wrong, what was given, and what is accepted, so the CLI prints it as one line.

TOML keys are the long flag names (``vni``, ``local``, ``local6``, ``underlay_family``, ``peer``,
``tap``, ``address``, ``port``,
``mtu``, ``mac``, ``source_check``, ``allow_vlan``, ``ageing``, ``max_per_vni``, and for etcd
mode ``etcd``, ``host_id``, ``network``, ``prefix``, ``lease_ttl``); ``peer``, ``etcd`` and
``network`` are lists; ``bridge``, ``state_dir``, ``metrics``, ``probe_port`` and ``key_file``
in either mode (and ``rekey_after``); ``docker_plugin`` and ``docker_plugin_dir`` in etcd mode; ``encrypt`` and ``peer_key`` (a list of ``"ADDRESS=PUBKEY"``) in static mode.
A flag given on the command line replaces the file's value (``--peer``
replaces the whole list).

Two modes: static (``vni`` and ``peer``: the peers are given) and etcd (``etcd``, ``host_id``
and ``network``: peers, flood lists and remote endpoints come from the registry).

Encryption: each host has an X25519 key in ``key_file`` (default ``<state_dir>/<host_id>.key``,
``<state_dir>/static.key`` in static mode; ``AgentConfig.key_path``). In static mode
``encrypt`` seals all traffic of the VNI and needs every peer's public key (``peer_key``); in
etcd mode a network is encrypted or not in the registry (``overlay net set VNI --encrypted``)
and peers' keys come from their host values, so ``encrypt`` and ``peer_key`` are refused there.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from overlay.core.addresses import IPAddress, parse_address, parse_endpoint
from overlay.core.fdb import DEFAULT_AGEING, DEFAULT_MAX_PER_VNI
from overlay.core.keys import BadKey, key_file_name, parse_public
from overlay.core.registry import HOST_ID, HOST_ID_FORM
from overlay.core.underlay import UNDERLAY_FAMILIES, Underlay
from overlay.core.wire import DEFAULT_PORT, MTU_MAX, MTU_MIN, VNI_MAX, unicast_mac

PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a Docker plugin name: its socket's file name
TAP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no '/', ':' or spaces
DEFAULT_STATE_DIR = "/run/overlay"
DEFAULT_METRICS = "127.0.0.1:9465"
DEFAULT_REKEY_AFTER = 120.0  # WireGuard's REKEY_AFTER_TIME
DEFAULT_PROBE_PORT = 4799  # not 4790: that is VXLAN-GPE


class ConfigError(ValueError):
    """A setting the user can fix; the message names it and says what is accepted."""


@dataclass(frozen=True)
class AgentConfig:
    vni: int
    local: IPAddress  # the underlay address, either family
    peers: tuple[IPAddress, ...] = ()
    local6: ipaddress.IPv6Address | None = None  # a dual-stack host's IPv6 underlay address (local is IPv4)
    underlay_family: str = "auto"  # with a peer that has both families: auto (IPv6), 4 or 6
    tap: str = "ovl0"
    address: ipaddress.IPv4Interface | None = None
    port: int = DEFAULT_PORT
    mtu: int | None = None  # None: the underlay interface's MTU minus 50
    mac: int | None = None  # None: the kernel picks a random locally administered MAC
    source_check: bool = True
    allow_vlan: bool = False
    ageing: float = DEFAULT_AGEING
    max_per_vni: int = DEFAULT_MAX_PER_VNI
    etcd: tuple[str, ...] = ()  # etcd mode when not empty
    host_id: str | None = None
    networks: tuple[int, ...] = ()  # etcd mode: every network joined (vni is the first)
    prefix: str = "/overlay/v1"
    lease_ttl: int = 10
    etcd_ca: str | None = None  # TLS: CA file; with etcd_cert and etcd_key for client certificates
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    bridge: bool = False  # a Linux bridge per network holding the TAP (default on in etcd mode)
    state_dir: str = DEFAULT_STATE_DIR  # where attachments are remembered across restarts
    resolv_conf: str = "/etc/resolv.conf"  # the host's resolvers: the gateways' DNS forwards other names there
    metrics: str | None = None  # Prometheus endpoint HOST:PORT, "off"; None: the default, and best effort
    probe_port: int | None = None  # UDP port of peer probes, 0 = off; None: the default, and best effort
    encrypt: bool = False  # static mode: seal all traffic of the VNI (etcd mode: per network, in the registry)
    key_file: str | None = None  # the private key's file; None: <state_dir>/<host_id>.key (key_path)
    peer_keys: tuple[tuple[IPAddress, bytes], ...] = ()
    docker_plugin: str | None = None  # etcd mode: serve Docker's remote network and IPAM drivers under this name
    docker_plugin_dir: str = "/run/docker/plugins"  # where Docker looks for plugin sockets (<name>.sock)
    rekey_after: float = 120.0  # seconds: sessions are rekeyed this often (DEFAULT_REKEY_AFTER)  # static mode: (peer address, its public key)

    @property
    def locals(self) -> tuple[IPAddress, ...]:
        """This host's underlay addresses: ``local``, then ``local6`` if given."""
        return (self.local,) if self.local6 is None else (self.local, self.local6)

    @property
    def underlay(self) -> Underlay:
        v4 = self.local if self.local.version == 4 else None
        v6 = self.local if self.local.version == 6 else self.local6
        return Underlay(v4, v6, UNDERLAY_FAMILIES[self.underlay_family])

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_address(self.metrics if self.metrics is not None else DEFAULT_METRICS)

    @property
    def probe(self) -> int:
        return DEFAULT_PROBE_PORT if self.probe_port is None else self.probe_port

    @property
    def key_path(self) -> str:
        """This host's private key file: ``key_file``, else ``<state_dir>/<host_id>.key``
        (``<state_dir>/static.key`` in static mode)."""
        if self.key_file is not None:
            return self.key_file
        return f"{self.state_dir.rstrip('/')}/{key_file_name(self.host_id)}"


KEYS = (
    "vni",
    "local",
    "peer",
    "tap",
    "address",
    "port",
    "mtu",
    "mac",
    "source_check",
    "allow_vlan",
    "ageing",
    "max_per_vni",
    "etcd",
    "host_id",
    "network",
    "prefix",
    "lease_ttl",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
    "bridge",
    "state_dir",
    "resolv_conf",
    "metrics",
    "probe_port",
    "local6",
    "underlay_family",
    "encrypt",
    "key_file",
    "peer_key",
    "rekey_after",
    "docker_plugin",
    "docker_plugin_dir",
)
ETCD_KEYS = (
    "etcd",
    "host_id",
    "network",
    "prefix",
    "lease_ttl",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_password",
)


def parse_toml(text: str, origin: str) -> dict[str, Any]:
    """The settings of a TOML file; unknown keys are an error naming the known ones."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{origin}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return data


def build(settings: Mapping[str, Any]) -> AgentConfig:
    """Validate merged settings (file values overridden by flags) into an AgentConfig."""
    if settings.get("etcd"):
        return _build_etcd(settings)
    if settings.get("network") or settings.get("host_id"):
        raise ConfigError(
            "--network and --host-id are for etcd mode: give --etcd http://HOST:2379 too "
            "(or use --vni and --peer for static mode)"
        )
    if settings.get("docker_plugin") is not None:
        raise ConfigError(
            "--docker-plugin is for etcd mode (networks and addresses come from the registry): give --etcd, "
            "--host-id and --network too"
        )
    if settings.get("vni") is None:
        raise ConfigError("no VNI: give --vni N (0 to 16777215) or 'vni = N' in the config file")
    vni = _int("vni", settings["vni"], 0, VNI_MAX)
    if settings.get("local") is None:
        raise ConfigError("no local VTEP address: give --local A.B.C.D or --local V6 (this host's underlay address)")
    local = _ip("local", settings["local"])
    local6 = _ip("local6", settings["local6"]) if settings.get("local6") is not None else None
    if local6 is not None and (local6.version != 6 or local.version != 4):
        raise ConfigError(
            f"local6: {local6} beside --local {local}: --local6 is the IPv6 address of a host whose "
            f"--local is IPv4 (an IPv6-only host gives just --local V6)"
        )
    family = str(settings.get("underlay_family", "auto"))
    if family not in UNDERLAY_FAMILIES:
        raise ConfigError(f"underlay_family: {family!r} is not one of {', '.join(UNDERLAY_FAMILIES)}")
    peers_raw = settings.get("peer") or []
    if isinstance(peers_raw, str):
        peers_raw = [peers_raw]
    if not isinstance(peers_raw, (list, tuple)):
        raise ConfigError(f"peer: expected a list of IP addresses, got {peers_raw!r}")
    peers = tuple(dict.fromkeys(_ip("peer", p) for p in peers_raw))
    for p in peers:
        if p in (local, local6):
            raise ConfigError(f"peer {p} is this host's own --local address; list only the other hosts")
        if p.version not in {a.version for a in (local, local6) if a is not None}:
            have = "--local6 V6 (its IPv6 address)" if p.version == 6 else "--local A.B.C.D with --local6"
            raise ConfigError(
                f"peer {p} is IPv{p.version} but this host has no IPv{p.version} underlay address "
                f"(--local {local}): give {have}, or a peer of this host's family"
            )
    encrypt = _bool("encrypt", settings.get("encrypt", False))
    peer_keys = _peer_keys(settings.get("peer_key"), peers)
    if peer_keys and not encrypt and settings.get("encrypt") is None:
        raise ConfigError(
            "--peer-key without --encrypt: the traffic would still be plaintext; add --encrypt "
            "(or 'encrypt = false' in the file to keep the keys unused)"
        )
    if encrypt:
        keyed = {address for address, _ in peer_keys}
        for p in peers:
            if p not in keyed:
                raise ConfigError(f"--encrypt: peer {p} has no --peer-key {p}=PUBKEY (its `overlay key show`)")
    return AgentConfig(
        vni=vni,
        local=local,
        peers=peers,
        local6=local6,
        underlay_family=family,
        tap=_tap(settings.get("tap", "ovl0")),
        address=_interface(settings["address"]) if settings.get("address") is not None else None,
        port=_int("port", settings.get("port", DEFAULT_PORT), 1, 65535),
        mtu=_int("mtu", settings["mtu"], MTU_MIN, MTU_MAX) if settings.get("mtu") is not None else None,
        mac=_mac(settings["mac"]) if settings.get("mac") is not None else None,
        source_check=_bool("source_check", settings.get("source_check", True)),
        allow_vlan=_bool("allow_vlan", settings.get("allow_vlan", False)),
        ageing=_positive("ageing", settings.get("ageing", DEFAULT_AGEING)),
        max_per_vni=_int("max_per_vni", settings.get("max_per_vni", DEFAULT_MAX_PER_VNI), 1, 1 << 24),
        bridge=_bool("bridge", settings.get("bridge", False)),
        state_dir=_path("state_dir", settings.get("state_dir", DEFAULT_STATE_DIR)),
        resolv_conf=_path("resolv_conf", settings.get("resolv_conf", "/etc/resolv.conf")),
        metrics=_metrics(settings["metrics"]) if settings.get("metrics") is not None else None,
        probe_port=_int("probe_port", settings["probe_port"], 0, 65535)
        if settings.get("probe_port") is not None
        else None,
        encrypt=encrypt,
        key_file=_key_file(settings["key_file"]) if settings.get("key_file") is not None else None,
        peer_keys=peer_keys,
        rekey_after=_positive("rekey_after", settings.get("rekey_after", DEFAULT_REKEY_AFTER)),
    )


PEER_KEY_FORM = "ADDRESS=PUBKEY, like 198.18.0.2=<the 44 characters `overlay key show` prints on that host>"


def _peer_keys(value: Any, peers: tuple[IPAddress, ...]) -> tuple[tuple[IPAddress, bytes], ...]:
    """``peer_key`` items "ADDRESS=PUBKEY" -> ((address, key), ...), in the order of the peers."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"peer_key: expected a list of {PEER_KEY_FORM}; got {value!r}")
    keys: dict[IPAddress, bytes] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"peer_key: {item!r} is not {PEER_KEY_FORM}")
        address_text, key_text = (part.strip() for part in item.split("=", 1))
        try:
            address = ipaddress.ip_address(address_text)
        except ValueError:
            raise ConfigError(
                f"peer_key: {address_text!r} (before '=' in {item!r}) is not an IP address: write {PEER_KEY_FORM}"
            ) from None
        try:
            key = parse_public(key_text)
        except BadKey as e:
            raise ConfigError(f"peer_key {address}: {key_text!r} (after the first '='): {e}") from None
        if address not in peers:
            listed = ", ".join(map(str, peers)) or "none given"
            raise ConfigError(
                f"peer_key {address}: not one of the --peer addresses ({listed}): a key is given for a peer"
            )
        if keys.get(address, key) != key:
            raise ConfigError(f"peer_key {address}: given twice with different keys; keep the one it shows")
        keys[address] = key
    return tuple((p, keys[p]) for p in peers if p in keys)


def _key_file(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.endswith("/"):
        raise ConfigError(f"key_file: {value!r} is not an absolute file path like /var/lib/overlay/h1.key")
    return value


def _path(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{name}: {value!r} is not an absolute directory path like /run/overlay")
    return value


def _metrics(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'metrics: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9465) or "off"')
    try:
        parse_address(value)
    except ValueError as e:
        raise ConfigError(f"metrics: {e}") from None
    return value


DOCKER_KEYS = ("docker_plugin", "docker_plugin_dir")


def _docker(settings: Mapping[str, Any], bridge: bool) -> dict[str, Any]:
    """``docker_plugin`` (a name: its socket is ``<docker_plugin_dir>/<name>.sock``) and its dir."""
    name = settings.get("docker_plugin")
    directory = settings.get("docker_plugin_dir")
    if name is None:
        if directory is not None:
            raise ConfigError("--docker-plugin-dir goes with --docker-plugin")
        return {}
    if not isinstance(name, str) or not PLUGIN_NAME.match(name):
        raise ConfigError(
            f"docker_plugin: {name!r} is not a plugin name (letters, digits, '_', '.', '-', at most 64, e.g. overlay)"
        )
    if not bridge:
        raise ConfigError("--docker-plugin needs the bridges (leave out bridge = false)")
    return {"docker_plugin": name, "docker_plugin_dir": _path("docker_plugin_dir", directory or "/run/docker/plugins")}


def _build_etcd(settings: Mapping[str, Any]) -> AgentConfig:
    if settings.get("vni") is not None or settings.get("peer"):
        raise ConfigError("--vni and --peer are for static mode; with --etcd give --network VNI (peers come from etcd)")
    if _bool("encrypt", settings.get("encrypt", False)):
        raise ConfigError(
            "--encrypt is for static mode; with --etcd each network is encrypted or not in the registry: "
            "use `overlay net create VNI --encrypted` or `overlay net set VNI --encrypted`"
        )
    if settings.get("peer_key"):
        raise ConfigError(
            "--peer-key is for static mode; with --etcd each host publishes its public key in the registry"
        )
    endpoints = settings["etcd"]
    endpoints = [endpoints] if isinstance(endpoints, str) else endpoints
    if not isinstance(endpoints, (list, tuple)) or not all(isinstance(e, str) for e in endpoints):
        raise ConfigError(f'etcd: {settings["etcd"]!r} is not a list of URLs like ["http://198.18.0.250:2379"]')
    endpoints = list(endpoints)
    for e in endpoints:
        try:
            parse_endpoint(e)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for key in ("etcd_user", "etcd_password", "etcd_ca", "etcd_cert", "etcd_key"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ConfigError(f"{key}: {settings[key]!r} must be a string (quote it in TOML)")
    host_id = settings.get("host_id")
    if not isinstance(host_id, str) or not HOST_ID.match(host_id):
        raise ConfigError(f"host_id: {host_id!r} is not a host id ({HOST_ID_FORM}); give --host-id, e.g. --host-id h1")
    raw_networks = settings.get("network") or []
    raw_networks = [raw_networks] if isinstance(raw_networks, (str, int)) else list(raw_networks)
    if not raw_networks:
        raise ConfigError("no network: give --network VNI (repeat it to join several)")
    networks = tuple(dict.fromkeys(_int("network", n, 0, VNI_MAX) for n in raw_networks))
    if len(networks) > 1 and settings.get("address") is not None:
        raise ConfigError(
            "--address goes with a single --network (it is the TAP's address); with several "
            "networks each gets its own TAP without one"
        )
    if len(networks) > 1 and settings.get("mac") is not None:
        raise ConfigError("--mac goes with a single --network; with several each TAP gets a random MAC")
    static = build(
        {
            **{
                k: v
                for k, v in settings.items()
                if k not in ETCD_KEYS and k not in ("encrypt", "peer_key", *DOCKER_KEYS)
            },
            "vni": networks[0],
            "bridge": settings.get("bridge", True),
        }
    )
    if len(networks) > 1 and len(static.tap) + 1 + max(len(str(n)) for n in networks) > 15:
        raise ConfigError(
            f"tap: with several networks the TAPs are named {static.tap}-<vni>, which must fit "
            f"15 characters: choose a shorter --tap"
        )
    tls = {k: settings.get(k) for k in ("etcd_ca", "etcd_cert", "etcd_key")}
    if (tls["etcd_cert"] is None) != (tls["etcd_key"] is None):
        raise ConfigError("etcd client certificates need both --etcd-cert and --etcd-key")
    if tls["etcd_cert"] is not None and tls["etcd_ca"] is None:
        raise ConfigError("--etcd-cert needs --etcd-ca (the CA that signed etcd's certificate)")
    https = [e for e in endpoints if e.startswith("https://")]
    if tls["etcd_ca"] is not None and len(https) != len(endpoints):
        raise ConfigError("with --etcd-ca every --etcd endpoint must be https://")
    if https and tls["etcd_ca"] is None:
        raise ConfigError("an https:// etcd endpoint needs --etcd-ca (the CA that signed etcd's certificate)")
    if (settings.get("etcd_user") is None) != (settings.get("etcd_password") is None):
        raise ConfigError("etcd authentication needs both --etcd-user and --etcd-password")
    prefix = settings.get("prefix", "/overlay/v1")
    if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.rstrip("/") == "":
        raise ConfigError(f"prefix: {prefix!r} is not an etcd key prefix like /overlay/v1")
    return AgentConfig(
        **{
            **static.__dict__,
            "etcd": tuple(endpoints),
            "host_id": host_id,
            "networks": networks,
            "prefix": prefix,
            "lease_ttl": _int("lease_ttl", settings.get("lease_ttl", 10), 2, 3600),
            **tls,
            "etcd_user": settings.get("etcd_user"),
            "etcd_password": settings.get("etcd_password"),
            **_docker(settings, static.bridge),
        }
    )


def tap_names(cfg: AgentConfig) -> dict[int, str]:
    """VNI -> TAP name: ``tap`` itself for one network, ``<tap>-<vni>`` for each of several."""
    networks = cfg.networks or (cfg.vni,)
    if len(networks) == 1:
        return {networks[0]: cfg.tap}
    return {vni: f"{cfg.tap}-{vni}" for vni in networks}


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    try:
        number = int(value, 0) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int) or isinstance(number, bool) or not lo <= number <= hi:
        raise ConfigError(f"{name}: {value!r} is not an integer from {lo} to {hi}")
    return number


def _positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or not number > 0:
        raise ConfigError(f"{name}: {value!r} is not a positive number of seconds")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{name}: {value!r} is not true or false")


def _ip(name: str, value: Any) -> IPAddress:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(
            f"{name}: {value!r} is not an IPv4 or IPv6 address like 198.18.0.1 or 2001:2:0:1::1"
        ) from None
    if ip.is_unspecified or ip.is_multicast:
        raise ConfigError(f"{name}: {ip} is not a unicast address")
    return ip


def _interface(value: Any) -> ipaddress.IPv4Interface:
    if not isinstance(value, str) or "/" not in value:
        raise ConfigError(f"address: {value!r} needs a prefix length, like 198.19.0.1/24")
    try:
        return ipaddress.IPv4Interface(value)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise ConfigError(f"address: {value!r} is not an IPv4 address with prefix, like 198.19.0.1/24") from None


def _mac(value: Any) -> int:
    try:
        return unicast_mac(str(value))
    except ValueError as e:
        raise ConfigError(f"mac: {e}") from None


def _tap(value: Any) -> str:
    if not isinstance(value, str) or not TAP_NAME.match(value):
        raise ConfigError(f"tap: {value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return value
