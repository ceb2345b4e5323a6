"""`overlay-cni`: the CNI plugin (spec 1.0.0; 0.4.0 and 0.3.1 accepted) that puts a container on
an overlay network by asking the host's agent to attach it.

A container runtime runs the plugin once per operation, in the host's network namespace, with
the operation in the environment and the network config on stdin::

    CNI_COMMAND=ADD|DEL|CHECK|VERSION  CNI_CONTAINERID  CNI_NETNS (a path)  CNI_IFNAME
    CNI_ARGS ("IP=198.19.0.7/24;MAC=02:..;IgnoreUnknown=1")  CNI_PATH (unused: nothing is delegated)

and reads one JSON document from stdout: the result (ADD), nothing (DEL, CHECK), the supported
versions (VERSION), or on failure ``{"cniVersion", "code", "msg", "details"}`` with a non-zero
exit status. Never a traceback.

The plugin itself holds no state and makes no device: it turns the invocation into one request
on the agent's control socket (overlay.control) and the answer into a CNI result. The agent
makes the interface, assigns and publishes the address, and remembers the attachment under the
id ``cni/<container id>/<ifname>``:

    ADD   -> attach(netns, net, ifname, id, ip, mac, gateway, ip6, gateway6[, name, publish, expose]) -> the attachment
    DEL   -> detach(id)  (idempotent: nothing attached is a success)
    CHECK -> check(id)   (the agent checks the live state; here the answer is held against prevResult)

Network config keys (besides cniVersion, name, type): "network" (an overlay network's name or
VNI; default the config's "name"), "agent" (the TAP naming the agent's control socket; default
the only agent in this namespace), "ip" ("A.B.C.D/len", or "A.B.C.D" for the network's prefix
length; default: the agent picks a free one), "mac", "gateway", "ip6" ("V6/len" or "V6" in the
network's subnet6, or "none" for no IPv6 address; default: a free one when the network has a
subnet6), "gateway6", "dns" (copied into the result). The addresses and MAC may be overridden,
weakest first, by CNI_ARGS IP= (an address of either family, or one of each separated by a
comma) / MAC= and by runtimeConfig "ips" (at most one address per family) / "mac" (the "ips"
and "mac" capabilities).

Reaching and being reached: runtimeConfig "portMappings" (the capability of that name, as
podman and the portmap plugin speak it: ``{"hostPort", "containerPort", "protocol", "hostIP"}``)
become the attachment's published ports (hostPort 0 or absent: a random free one; hostIP "" or
absent, 0.0.0.0 or ::: every address of the host), and each mapping's containerPort/protocol one
of the ports it exposes (its endpoint's "ports" in the registry); CNI_ARGS K8S_POD_NAME (podman sets it to the
container's name) becomes its DNS name, made a DNS label (lower case, other characters '-',
at most 63). The result's "dns" is the config's, else the agent's (the network's gateway as
nameserver, the network's name to search) when the network has a gateway.

The result has one ``ips`` entry per address, IPv4 first ("version": "4" or "6" before CNI
1.0.0), with its gateway, and a default route (0.0.0.0/0, ::/0) per gateway.

Layout: the pure part (parsing and validating the invocation, building and checking results)
raises CniError and does no IO; ``run`` adds the agent requests; ``main`` reads and writes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from overlay.core import ports
from overlay.core.registry import DNS_LABEL
from overlay.core.wire import mac_to_str, unicast_mac
from overlay.io import control

CURRENT = "1.0.0"
SUPPORTED = ("0.3.1", "0.4.0", "1.0.0")

# Well-known error codes (CNI spec), then this plugin's own (100 and up).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NO_AGENT = 100  # no agent runs in this namespace (or not the one the config names)
UNKNOWN_NETWORK = 101  # the agent does not serve that network
ADDRESS = 102  # address outside the subnet, in use, or none left
MISMATCH = 103  # CHECK: the attachment is not what prevResult says
INTERNAL = 999  # a bug in the plugin (libcni's ErrInternal)

# What the agent's refusal kind (overlay.control.ControlError.kind) means as a CNI code.
KIND_CODES = {
    "netns": UNKNOWN_CONTAINER,
    "unknown": UNKNOWN_CONTAINER,  # no such attachment
    "network": UNKNOWN_NETWORK,
    "address": ADDRESS,
    "invalid": INVALID_CONFIG,
    "broken": MISMATCH,  # check: the live state differs from the attachment
    "etcd": TRY_AGAIN_LATER,  # the agent cannot reach the registry right now
    "permission": IO_FAILURE,  # the runtime is not root
}

ATTACH_TIMEOUT = 30.0  # seconds per socket operation: an attach makes devices and writes etcd
CHECK_TIMEOUT = 10.0

CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
NETWORK_NAME = CONTAINER_ID
MAX_VNI = (1 << 24) - 1
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Invocation:
    """The environment of one run."""

    command: str
    container_id: str
    netns: str  # "" when the runtime gave none (allowed for DEL)
    ifname: str
    args: Mapping[str, str]  # CNI_ARGS, IgnoreUnknown removed
    path: str

    @property
    def attachment_id(self) -> str:
        return f"cni/{self.container_id}/{self.ifname}"


@dataclass(frozen=True)
class NetConf:
    """The network config, validated, with CNI_ARGS and runtimeConfig applied."""

    version: str
    name: str
    network: str
    agent: str | None
    ip: str | None
    mac: str | None
    gateway: str | None
    dns: dict[str, Any]
    prev_result: dict[str, Any] | None
    ip6: str | None = None  # V6/len, V6, or "none"
    gateway6: str | None = None
    container_name: str | None = None  # its DNS name (CNI_ARGS K8S_POD_NAME, made a DNS label)
    publish: tuple[str, ...] = ()  # runtimeConfig portMappings as publication specs (overlay.core.ports)
    expose: tuple[str, ...] = ()  # the portMappings' container ports, "80/tcp" (overlay.core.ports.parse_exposed)


# --- the pure part: environment, config, results --------------------------------------------


def parse_command(environ: Mapping[str, str]) -> str:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(
            INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "overlay-cni is a CNI plugin: a container runtime runs it with CNI_COMMAND=ADD, DEL, "
            "CHECK or VERSION, the CNI_* variables and the network config on stdin",
        )
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"invalid CNI_COMMAND {command!r}",
            f"overlay-cni supports {', '.join(COMMANDS)} (CNI {CURRENT})",
        )
    return command


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: ``K=V`` pairs separated by ``;``. IP and MAC are understood; anything else is an
    error unless IgnoreUnknown=1 (or true) is among them, as the CNI conventions say."""
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS: {item!r} is not KEY=VALUE",
                f"CNI_ARGS is KEY=VALUE pairs separated by ';', got {text!r}",
            )
        pairs[key] = value
    ignore = pairs.pop("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(set(pairs) - set(KNOWN_ARGS))
    if unknown and not ignore:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"CNI_ARGS: unknown {', '.join(unknown)}",
            "overlay-cni understands IP, MAC and K8S_POD_NAME; add IgnoreUnknown=1 to pass others",
        )
    return {k: v for k, v in pairs.items() if k in KNOWN_ARGS}


KNOWN_ARGS = ("IP", "MAC", "K8S_POD_NAME")


def dns_label(text: str) -> str | None:
    """A container's name as a DNS label (registry.DNS_LABEL): lower case, characters other than
    a-z, 0-9 and '-' made '-', no '-' at either end, at most 63 characters; None if nothing is left."""
    label = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")[:63].rstrip("-")
    return label if label and DNS_LABEL.match(label) else None


def port_mappings(value: Any) -> tuple[str, ...]:
    """runtimeConfig portMappings (the portMappings capability) as publication specs."""
    where = "runtimeConfig portMappings"
    form = (
        'a list of {"hostPort": 8080, "containerPort": 80, "protocol": "tcp" or "udp", "hostIP": ""}; '
        "hostPort 0 or absent: a random free port, hostIP empty or absent: every address of the host"
    )
    if not isinstance(value, list):
        raise CniError(INVALID_CONFIG, f"{where}: {value!r} is not a list", form)
    specs = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise CniError(INVALID_CONFIG, f"{at}: {m!r} is not an object", form)
        container, host = m.get("containerPort"), m.get("hostPort") or 0
        proto, host_ip = m.get("protocol") or "tcp", m.get("hostIP") or ""
        if isinstance(container, bool) or not isinstance(container, int) or not 1 <= container <= 65535:
            raise CniError(INVALID_CONFIG, f"{at}: containerPort {container!r} is not a port (1 to 65535)", form)
        if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host <= 65535:
            raise CniError(INVALID_CONFIG, f"{at}: hostPort {host!r} is not a port (1 to 65535, or 0: random)", form)
        if not isinstance(proto, str) or proto.lower() not in ports.PROTOCOLS:
            raise CniError(INVALID_CONFIG, f"{at}: protocol {proto!r} is not tcp or udp", form)
        if not isinstance(host_ip, str):
            raise CniError(INVALID_CONFIG, f"{at}: hostIP {host_ip!r} is not an address", form)
        address = ""
        if host_ip:
            try:
                ip = ipaddress.ip_address(host_ip)
            except ValueError:
                raise CniError(
                    INVALID_CONFIG, f"{at}: hostIP {host_ip!r} is not an IPv4 or IPv6 address", form
                ) from None
            if not ip.is_unspecified:  # 0.0.0.0 and :: say every address, as an empty hostIP
                address = f"[{ip}]:" if ip.version == 6 else f"{ip}:"
        text = (
            f"{address}{host or ''}:{container}/{proto.lower()}" if host or address else f"{container}/{proto.lower()}"
        )
        try:
            specs.append(str(ports.parse(text)))
        except ValueError as e:
            raise CniError(INVALID_CONFIG, f"{at}: {e}", form) from None
    return tuple(specs)


def exposed_ports(publish: tuple[str, ...]) -> tuple[str, ...]:
    """The container ports of publication specs (``port_mappings``) as exposed ports, "80/tcp",
    each once, in the order first mapped."""
    return tuple(dict.fromkeys(f"{spec.port}/{spec.proto}" for spec in map(ports.parse, publish)))


def parse_environment(environ: Mapping[str, str], command: str) -> Invocation:
    """The CNI_* variables ``command`` needs, validated as libcni validates them."""
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if not container_id:
        raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set")
    if not CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            INVALID_ENVIRONMENT,
            f"invalid CNI_CONTAINERID {container_id!r}",
            "a container id starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    if not ifname:
        raise CniError(INVALID_ENVIRONMENT, "CNI_IFNAME is not set")
    if len(ifname) > 15 or ifname in (".", "..") or any(c in ifname for c in "/:") or any(c.isspace() for c in ifname):
        raise CniError(
            INVALID_ENVIRONMENT,
            f"invalid CNI_IFNAME {ifname!r}",
            "an interface name has 1 to 15 characters, is not '.' or '..', and has no '/', ':' or spaces",
        )
    if command in ("ADD", "CHECK") and not netns:
        raise CniError(
            INVALID_ENVIRONMENT, "CNI_NETNS is not set", f"{command} needs the container's network namespace path"
        )
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENVIRONMENT, f"invalid CNI_NETNS {netns!r}", "give the namespace as an absolute path")
    return Invocation(
        command, container_id, netns, ifname, parse_cni_args(environ.get("CNI_ARGS", "")), environ.get("CNI_PATH", "")
    )


def decode(data: bytes) -> dict[str, Any]:
    """The network config from stdin: one JSON object."""
    try:
        conf = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CniError(DECODING_FAILURE, "the network config on stdin is not valid JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(
            DECODING_FAILURE, "the network config on stdin is not a JSON object", f"got a JSON {type(conf).__name__}"
        )
    return conf


def config_version(conf: Mapping[str, Any]) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(
            INVALID_CONFIG, "the network config has no cniVersion", f'set "cniVersion" to one of {", ".join(SUPPORTED)}'
        )
    if version not in SUPPORTED:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"CNI version {version} is not supported",
            f"overlay-cni supports {', '.join(SUPPORTED)}",
        )
    return version


_ADDRESS_FORMS = {
    4: "write it as A.B.C.D/LEN or A.B.C.D (the network's prefix length), e.g. 198.19.0.7/24; "
    "overlay-cni gives one IPv4 address per interface",
    6: "write it as V6/LEN or V6 (the network's subnet6 length), e.g. 2001:2:0:42::7/64; "
    "overlay-cni gives one IPv6 address per interface",
}


def _address(value: Any, where: str, version: int) -> str:
    """An address of ``version`` with or without a prefix length (without, the agent takes its
    subnet's)."""
    try:
        if isinstance(value, str):
            parsed = ipaddress.ip_interface(value) if "/" in value else ipaddress.ip_address(value)
            if parsed.version == version:
                return str(parsed)
    except ValueError:
        pass
    raise CniError(INVALID_CONFIG, f"{where}: {value!r} is not an IPv{version} address", _ADDRESS_FORMS[version])


def _by_family(values: list[Any], where: str) -> tuple[str | None, str | None]:
    """Addresses asked for (CNI_ARGS IP, runtimeConfig ips): (IPv4, IPv6), at most one of each."""
    v4: list[str] = []
    v6: list[str] = []
    for value in values:
        if isinstance(value, str) and ":" in value:
            v6.append(_address(value, where, 6))
        else:
            v4.append(_address(value, where, 4))
    if len(v4) > 1 or len(v6) > 1:
        raise CniError(
            INVALID_CONFIG,
            f"{where}: {values!r}",
            "overlay-cni gives one IPv4 and one IPv6 address per interface: pass at most one of each",
        )
    return (v4[0] if v4 else None), (v6[0] if v6 else None)


def _mac(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise CniError(INVALID_CONFIG, f"{where}: {value!r} is not a MAC address", "write it as 02:00:00:00:00:07")
    try:
        return mac_to_str(unicast_mac(value))
    except ValueError as e:
        raise CniError(INVALID_CONFIG, f"{where}: {e}") from None


def _optional_str(conf: Mapping[str, Any], key: str) -> str | None:
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_CONFIG, f'"{key}" in the network config must be a non-empty string, not {value!r}')
    return value


def netconf(conf: Mapping[str, Any], version: str, args: Mapping[str, str]) -> NetConf:
    """Validate the config and apply CNI_ARGS and runtimeConfig to the address and MAC."""
    name = conf.get("name")
    if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name):
        raise CniError(
            INVALID_CONFIG,
            f"invalid network name {name!r}",
            "\"name\" starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    if not isinstance(conf.get("type"), str):
        raise CniError(INVALID_CONFIG, 'the network config has no "type"', 'set "type": "overlay-cni"')
    if conf.get("ipam"):
        raise CniError(
            UNSUPPORTED_FIELD,
            'unsupported field "ipam"',
            'overlay-cni takes addresses from the overlay agent: set "ip" or let the agent choose',
        )
    network = conf.get("network", name)
    if isinstance(network, int) and not isinstance(network, bool):
        if not 0 <= network <= MAX_VNI:
            raise CniError(INVALID_CONFIG, f'"network": VNI {network} is out of range', f"a VNI is 0 to {MAX_VNI}")
        network = str(network)
    if not isinstance(network, str) or not network:
        raise CniError(INVALID_CONFIG, f'"network" must be an overlay network\'s name or VNI, not {network!r}')
    agent = _optional_str(conf, "agent")
    if agent is not None and len(agent) > 15:
        raise CniError(
            INVALID_CONFIG,
            f'"agent": {agent!r} is not a TAP name',
            "name the TAP of the agent's control socket (what `overlay status` shows as tap)",
        )
    ip = _address(conf["ip"], '"ip"', 4) if conf.get("ip") is not None else None
    mac = _mac(conf["mac"], '"mac"') if conf.get("mac") is not None else None
    gateway = _optional_str(conf, "gateway")
    if gateway is not None:
        try:
            gateway = str(ipaddress.IPv4Address(gateway))
        except ValueError:
            raise CniError(INVALID_CONFIG, f'"gateway": {gateway!r} is not an IPv4 address') from None
    ip6 = _optional_str(conf, "ip6")
    if ip6 is not None and ip6 != "none":
        ip6 = _address(ip6, '"ip6"', 6)
    gateway6 = _optional_str(conf, "gateway6")
    if gateway6 is not None:
        try:
            gateway6 = str(ipaddress.IPv6Address(gateway6))
        except ValueError:
            raise CniError(INVALID_CONFIG, f'"gateway6": {gateway6!r} is not an IPv6 address') from None
    dns = conf.get("dns", {})
    if not isinstance(dns, dict):
        raise CniError(INVALID_CONFIG, '"dns" must be an object')

    if "IP" in args:
        asked, asked6 = _by_family(args["IP"].split(","), "CNI_ARGS IP")
        ip, ip6 = asked or ip, asked6 or ip6
    if "MAC" in args:
        mac = _mac(args["MAC"], "CNI_ARGS MAC")
    runtime = conf.get("runtimeConfig", {})
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, '"runtimeConfig" must be an object')
    if runtime.get("mac") is not None:
        mac = _mac(runtime["mac"], "runtimeConfig mac")
    publish = port_mappings(runtime["portMappings"]) if runtime.get("portMappings") is not None else ()
    if runtime.get("ips") is not None:
        ips = runtime["ips"]
        if not isinstance(ips, list):
            raise CniError(
                INVALID_CONFIG,
                f"runtimeConfig ips: {ips!r}",
                "overlay-cni gives one IPv4 and one IPv6 address per interface: pass a list of at most one of each",
            )
        asked, asked6 = _by_family(ips, "runtimeConfig ips")
        ip, ip6 = asked or ip, asked6 or ip6

    prev = conf.get("prevResult")
    if prev is not None and (
        not isinstance(prev, dict)
        or any(not isinstance(prev.get(key, []), list) for key in ("interfaces", "ips", "routes"))
    ):
        raise CniError(
            INVALID_CONFIG, '"prevResult" must be a CNI result', "an object whose interfaces, ips and routes are lists"
        )
    pod_name = dns_label(args["K8S_POD_NAME"]) if args.get("K8S_POD_NAME") else None
    return NetConf(
        version,
        name,
        network,
        agent,
        ip,
        mac,
        gateway,
        dns,
        prev,
        ip6,
        gateway6,
        pod_name,
        publish,
        exposed_ports(publish),
    )


def _version_before_1(version: str) -> bool:
    return version in ("0.3.1", "0.4.0")


def add_result(conf: NetConf, inv: Invocation, answer: Mapping[str, Any], host_mac: str | None) -> dict[str, Any]:
    """The ADD result for the agent's ``answer``, after what a previous plugin in the chain made."""
    prev = conf.prev_result or {}
    interfaces = list(prev.get("interfaces") or [])
    ips = list(prev.get("ips") or [])
    routes = list(prev.get("routes") or [])
    host: dict[str, Any] = {"name": answer["host_ifname"]}
    if host_mac:
        host["mac"] = host_mac
    interfaces.append(host)
    interfaces.append({"name": inv.ifname, "mac": answer["mac"], "sandbox": inv.netns})
    for version, address, gateway, default in (
        ("4", "address", "gateway", "0.0.0.0/0"),
        ("6", "address6", "gateway6", "::/0"),
    ):
        if not answer.get(address):
            continue  # no address of this family (an IPv4-only or IPv6-only attachment)
        ip: dict[str, Any] = {"address": answer[address], "interface": len(interfaces) - 1}
        if _version_before_1(conf.version):
            ip = {"version": version, **ip}
        if answer.get(gateway):
            ip["gateway"] = answer[gateway]
            routes.append({"dst": default, "gw": answer[gateway]})
        ips.append(ip)
    result: dict[str, Any] = {"cniVersion": conf.version, "interfaces": interfaces, "ips": ips}
    if routes:
        result["routes"] = routes
    result["dns"] = prev.get("dns") or conf.dns or agent_dns(answer)
    return result


def agent_dns(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The result's dns from the attachment's: the network's gateway(s) as nameservers, its
    name to search; {} when the network has no gateway (or the agent predates DNS)."""
    dns = answer.get("dns")
    if not isinstance(dns, dict):
        return {}
    out = {}
    for key in ("nameservers", "search"):
        values = dns.get(key)
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            out[key] = list(values)
    return out if "nameservers" in out else {}


def check_result(conf: NetConf, inv: Invocation, answer: Mapping[str, Any]) -> None:
    """CHECK: prevResult must describe the attachment the agent holds (the agent has checked
    that the live interface matches it): CniError(MISMATCH) saying what differs."""
    prev = conf.prev_result or {}
    interfaces = prev.get("interfaces") or []
    index = next(
        (
            i
            for i, it in enumerate(interfaces)
            if isinstance(it, dict) and it.get("name") == inv.ifname and it.get("sandbox") == inv.netns
        ),
        None,
    )
    if index is None:
        raise CniError(
            MISMATCH,
            f"prevResult has no interface {inv.ifname} in {inv.netns}",
            f"prevResult interfaces: {json.dumps(interfaces)}",
        )
    want_mac = str(interfaces[index].get("mac", "")).lower()
    if want_mac != str(answer.get("mac", "")).lower():
        raise CniError(MISMATCH, f"{inv.ifname} has MAC {answer.get('mac')}, prevResult says {want_mac or 'none'}")
    ours = [ip for ip in prev.get("ips") or [] if isinstance(ip, dict) and ip.get("interface") == index]
    for address, gateway in (("address", "gateway"), ("address6", "gateway6")):
        if not answer.get(address):
            continue
        mine = next((ip for ip in ours if ip.get("address") == answer[address]), None)
        if mine is None:
            said = ", ".join(str(ip.get("address")) for ip in ours) or "none"
            raise CniError(MISMATCH, f"{inv.ifname} has address {answer[address]}, prevResult says {said}")
        if mine.get("gateway") != answer.get(gateway):
            raise CniError(
                MISMATCH, f"{inv.ifname} has gateway {answer.get(gateway)}, prevResult says {mine.get('gateway')}"
            )


ATTACHMENT_KEYS = ("host_ifname", "mac")  # and an address of one family at least: "address", "address6"


def _attachment(answer: Any, what: str) -> dict[str, Any]:
    if (
        not isinstance(answer, dict)
        or any(not isinstance(answer.get(k), str) for k in ATTACHMENT_KEYS)
        or not any(isinstance(answer.get(k), str) for k in ("address", "address6"))
    ):
        raise CniError(IO_FAILURE, f"the agent's answer to {what} is not an attachment", json.dumps(answer)[:500])
    return answer


# --- talking to the agent ---------------------------------------------------------------------


FLAGS_IN_CONFIG = (
    'the agent\'s --ip, --mac, --gateway, --ip6 and --gateway6 are "ip", "mac", "gateway", "ip6" and '
    '"gateway6" in the network config (or IP= and MAC= in CNI_ARGS)'
)


class NoAgent(Exception):
    """No agent to ask; the message says which were looked for."""


def agent_error(e: Exception, command: str) -> CniError:
    """The CNI error for a failed request to the agent (ControlError or NoAgent)."""
    message = str(e)
    kind = getattr(e, "kind", None)
    if isinstance(e, NoAgent) or kind == "agent" or message.startswith("no overlay agent"):
        if command == "DEL":
            return CniError(
                TRY_AGAIN_LATER,
                message,
                "the attachment is released by the agent: retry the DEL once the agent runs again",
            )
        return CniError(NO_AGENT, message, "start the overlay agent on this host (overlay agent ...)")
    details = FLAGS_IN_CONFIG if "--" in message else ""
    return CniError(KIND_CODES.get(kind or "", IO_FAILURE), message, details)


def choose_agent(wanted: str | None, running: list[str]) -> str:
    """The TAP of the agent to ask: the one the config names, or the only one running here."""
    if wanted is not None:
        if wanted not in running:
            here = ", ".join(running) or "none"
            raise NoAgent(f"no overlay agent for TAP {wanted} in this network namespace (agents here: {here})")
        return wanted
    if not running:
        raise NoAgent("no overlay agent is running in this network namespace")
    if len(running) > 1:
        raise CniError(
            INVALID_CONFIG,
            f"several overlay agents run here ({', '.join(running)})",
            'name one with "agent": "<tap>" in the network config',
        )
    return running[0]


def host_mac(ifname: str) -> str | None:
    """The MAC of ``ifname`` in this network namespace, or None (SIOCGIFHWADDR)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", ifname.encode()[:15]))
    except OSError:
        return None
    return ":".join(f"{b:02x}" for b in raw[18:24])


Ask = Callable[..., Any]


def run(
    environ: Mapping[str, str], stdin: bytes, ask: Ask | None = None, agents: Callable[[], list[str]] | None = None
) -> dict[str, Any] | None:
    """Do one invocation: the JSON to print, or None (DEL and CHECK print nothing). Raises CniError.

    ``ask`` and ``agents`` default to overlay.control's request and running_agents."""
    command = parse_command(environ)
    if command == "VERSION":
        return {"cniVersion": CURRENT, "supportedVersions": list(SUPPORTED)}
    raw = decode(stdin)
    version = config_version(raw)
    inv = parse_environment(environ, command)
    conf = netconf(raw, version, inv.args)
    if command == "CHECK":
        if version == "0.3.1":
            raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not part of CNI {version}", "CHECK came with CNI 0.4.0")
        if conf.prev_result is None:  # before asking the agent: this is the runtime's mistake
            raise CniError(
                INVALID_CONFIG,
                "CHECK needs prevResult in the network config",
                'the runtime passes the result of the ADD as "prevResult"',
            )
    ask = ask or control.request
    try:
        tap = choose_agent(conf.agent, (agents or control.running_agents)())
        if command == "ADD":
            answer = _attachment(
                ask(
                    "attach",
                    tap,
                    timeout=ATTACH_TIMEOUT,
                    netns=inv.netns,
                    net=conf.network,
                    ifname=inv.ifname,
                    id=inv.attachment_id,
                    ip=conf.ip,
                    mac=conf.mac,
                    gateway=conf.gateway,
                    ip6=conf.ip6,
                    gateway6=conf.gateway6,
                    **({"name": conf.container_name} if conf.container_name is not None else {}),
                    **({"publish": list(conf.publish)} if conf.publish else {}),
                    **({"expose": list(conf.expose)} if conf.expose else {}),
                ),
                "attach",
            )
            if conf.publish and "published" not in answer:  # an agent that ignored them: the runtime DELs
                raise CniError(
                    UNSUPPORTED_FIELD,
                    "the overlay agent does not publish ports (runtimeConfig portMappings): it predates them",
                    "upgrade the overlay agent on this host, or run the container without published ports",
                )
            return add_result(conf, inv, answer, answer.get("host_mac") or host_mac(answer["host_ifname"]))
        if command == "DEL":
            answer = ask("detach", tap, timeout=ATTACH_TIMEOUT, id=inv.attachment_id)
            if isinstance(answer, dict) and not answer.get("detached"):
                print(f"overlay-cni: DEL {inv.attachment_id}: nothing was attached", file=sys.stderr)
            return None
        answer = _attachment(ask("check", tap, timeout=CHECK_TIMEOUT, id=inv.attachment_id), "check")
        check_result(conf, inv, answer)
        return None
    except (control.ControlError, NoAgent) as e:
        raise agent_error(e, command) from None


def error_object(version: str, e: CniError) -> dict[str, Any]:
    return {"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}


def _version_of(stdin: bytes) -> str:
    """The config's cniVersion if it is one we speak, for error objects; else ours."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return CURRENT
    return version if version in SUPPORTED else CURRENT


def read_stdin() -> bytes:
    command = os.environ.get("CNI_COMMAND")
    if not command or (command == "VERSION" and sys.stdin.isatty()):  # a person at a terminal: don't block
        return b""
    try:
        return sys.stdin.buffer.read()
    except OSError as e:
        raise CniError(IO_FAILURE, "cannot read the network config from stdin", str(e)) from None


def main() -> None:
    stdin = b""
    status = 0
    try:
        stdin = read_stdin()
        out = run(os.environ, stdin)
    except CniError as e:
        out, status = error_object(_version_of(stdin), e), 1
    except KeyboardInterrupt:
        out, status = error_object(_version_of(stdin), CniError(IO_FAILURE, "overlay-cni was interrupted")), 1
    except Exception as e:
        err = CniError(
            INTERNAL,
            f"overlay-cni failed: {e.__class__.__name__}: {e}",
            "this is a bug in overlay-cni; please report it with the network config",
        )
        out, status = error_object(_version_of(stdin), err), 1
    if out is not None:
        try:
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
        except OSError:  # the runtime stopped listening; nothing more to tell it
            status = status or 1
    sys.exit(status)


if __name__ == "__main__":
    main()
