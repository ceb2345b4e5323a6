"""The control socket's requests, typed, and the refusal every control command answers with.
Pure: the socket (overlay.io.control) moves JSON lines; this module says what a request means.

A request arrives as a JSON object of parameters (``{"cmd": ..., ...}`` without its ``cmd``);
``from_params`` turns it into a frozen request or raises ``Refused`` with kind "invalid":

- a text parameter is a string; an integer is taken as its decimal text (a PID as a netns, a
  VNI as a net), a boolean or anything else is refused ("X must be a string, not float");
- an absent parameter, ``null`` and ``""`` are the same: absent; a required one is refused
  ("missing X");
- parameters it does not know are ignored (a newer client may say more).

Refusal kinds (``Refused.kind``; the client sees them as ``overlay.io.control.ControlError.kind``
and the CNI plugin maps them to codes): "netns" no such namespace, "network" network unknown or
not joined, "address" outside the subnet, in use or none left, "invalid" a bad request,
"unknown" no such attachment, "broken" check found it damaged, "etcd" the registry is
unreachable, "permission" the caller is not root. ("agent", no agent answers, is the client's
own, never an agent's refusal.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from overlay.core import ports
from overlay.core.ports import PortSpec
from overlay.core.registry import DNS_LABEL, DNS_LABEL_FORM

KINDS = frozenset({"netns", "network", "address", "invalid", "unknown", "broken", "etcd", "permission"})


class Refused(Exception):
    """Raised by a handler: the request cannot be done; the message tells the user why, and
    ``kind`` (one of ``KINDS``, or None) what was wrong."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class AttachRequest:
    """``overlay attach`` and CNI ADD: put the namespace ``netns`` on network ``net`` (a name or a
    VNI). ``id`` names the attachment (CNI: "cni/<container id>/<ifname>"); without one the
    agent names it after the namespace. Unset ``ip``, ``mac`` and ``gateway`` are chosen by the
    agent (a free address, a random MAC, the network's gateway); so are unset ``ip6`` (a free
    address of the network's subnet6, if it has one; "none": no IPv6 address) and ``gateway6``
    (the network's gateway6)."""

    netns: str
    net: str
    ifname: str = "eth0"
    id: str | None = None
    ip: str | None = None  # A.B.C.D/len, or A.B.C.D when the network has a subnet to take the length from
    mac: str | None = None
    gateway: str | None = None
    ip6: str | None = None  # V6/len, or V6 (the network's subnet6 gives the length), or "none"
    gateway6: str | None = None
    name: str | None = None  # a DNS label: `<name>` and `<name>.<network>` resolve to it
    publish: tuple[PortSpec, ...] = ()  # ports of the host published onto the container's
    expose: tuple[str, ...] = ()  # ports the container serves, "80/tcp" (recorded in its endpoint)

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> AttachRequest:
        netns = _required(params, "netns")
        ifname = _text(params, "ifname") or "eth0"
        net = _required(params, "net")
        return cls(
            netns,
            net,
            ifname,
            id=_text(params, "id"),
            gateway=_text(params, "gateway"),
            mac=_text(params, "mac"),
            ip=_text(params, "ip"),
            ip6=_text(params, "ip6"),
            gateway6=_text(params, "gateway6"),
            name=_name(params, "name"),
            publish=tuple(_spec(s) for s in _texts(params, "publish")),
            expose=tuple(dict.fromkeys(_exposed(s) for s in _texts(params, "expose"))),
        )


@dataclass(frozen=True)
class PublishRequest:
    """``overlay publish`` / ``unpublish``: ``spec`` (overlay.core.ports) on the container
    ``target``: an attachment id, a container name, or a namespace (name, path or PID) with
    exactly one attachment. ``publish --all`` (``"all": true``, no spec) publishes every
    exposed port not published yet, each on a random free host port. Unpublish matches by protocol and host port (a spec's container
    port is not needed there: ``8080`` or ``8080/udp`` is enough, and ``all`` removes every one)."""

    target: str
    spec: PortSpec | None  # None: unpublish all; publish every exposed port (``all``)

    @classmethod
    def from_params(cls, params: Mapping[str, object], unpublish: bool = False) -> PublishRequest:
        target = _required(params, "target")
        if not unpublish and params.get("all") is True:
            if _text(params, "spec") is not None:
                raise Refused("give a port to publish or --all, not both", "invalid")
            return cls(target, None)
        text = _required(params, "spec")
        if unpublish:
            if text == "all":
                return cls(target, None)
            port, _, proto = text.partition("/")
            if port.isdigit() and ":" not in text:  # HOSTPORT[/proto]: the host port to close
                text = f"{port}:1/{proto or 'tcp'}"
        return cls(target, _spec(text))


@dataclass(frozen=True)
class NetRequest:
    """``overlay net join`` / ``net leave``: network ``net``, a name or a VNI."""

    net: str

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> NetRequest:
        return cls(_required(params, "net"))


@dataclass(frozen=True)
class DetachRequest:
    """``overlay detach`` and CNI DEL: by ``id``, or else by ``netns`` (and ``ifname``, or all of
    the namespace's attachments). One of ``id`` and ``netns`` is always given."""

    id: str | None = None
    netns: str | None = None
    ifname: str | None = None

    def __post_init__(self) -> None:
        if self.id is None and self.netns is None:
            raise Refused("say what to detach: a namespace (netns) or an attachment id", "invalid")

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> DetachRequest:
        attachment_id = _text(params, "id")
        ifname = _text(params, "ifname")
        return cls(attachment_id, _text(params, "netns"), ifname)


@dataclass(frozen=True)
class CheckRequest:
    """CNI CHECK: is attachment ``id`` still whole?"""

    id: str

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> CheckRequest:
        return cls(_required(params, "id"))


APPLIED_TIMEOUT, APPLIED_TIMEOUT_MAX = 10.0, 300.0


@dataclass(frozen=True)
class AppliedRequest:
    """``applied``: answer once the registry's events up to ``revision`` (an etcd revision, e.g.
    of an operator's put) are in this agent's forwarding table, or refuse after ``timeout`` s."""

    revision: int
    timeout: float = APPLIED_TIMEOUT

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> AppliedRequest:
        revision = params.get("revision")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise Refused("revision must be a whole number (an etcd revision) of 0 or more", "invalid")
        timeout = params.get("timeout", APPLIED_TIMEOUT)
        if timeout is None:
            timeout = APPLIED_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= APPLIED_TIMEOUT_MAX:
            raise Refused(f"timeout must be a number of seconds above 0 and up to {APPLIED_TIMEOUT_MAX:.0f}", "invalid")
        return cls(revision, float(timeout))


def _required(params: Mapping[str, object], name: str) -> str:
    value = _text(params, name)
    if value is None:
        raise Refused(f"missing {name}", "invalid")
    return value


def _text(params: Mapping[str, object], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise Refused(f"{name} must be a string, not {type(value).__name__}", "invalid")
    return value


def _texts(params: Mapping[str, object], name: str) -> list[str]:
    """A list of strings (absent: empty); one string is a list of one."""
    value = params.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Refused(f"{name} must be a list of strings", "invalid")
    return list(value)


def _spec(text: str) -> PortSpec:
    try:
        return ports.parse(text)
    except ValueError as e:
        raise Refused(str(e), "invalid") from None


def _exposed(text: str) -> str:
    try:
        return ports.parse_exposed(text)
    except ValueError as e:
        raise Refused(str(e), "invalid") from None


def _name(params: Mapping[str, object], name: str) -> str | None:
    value = _text(params, name)
    if value is not None and not DNS_LABEL.match(value):
        raise Refused(f"--name {value!r} is not a DNS label ({DNS_LABEL_FORM})", "invalid")
    return value.lower() if value is not None else None
