"""overlay-cni, run the way a container runtime runs it: a process with the CNI_* environment and
the network config on stdin, its stdout parsed as JSON and its exit status checked.

First without an agent (the plugin's own checks, and the requests it would send, through a fake
agent), then against real agents in etcd mode on a lab, with containers as network namespaces
the tests create."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overlay.cmd import cni
from overlay.io import control
from overlay.lab import Lab, wait_for
from tests.labkit import VNI, etcd_agent_argv, new_lab_with_etcd, overlay_ip, start_agent, status

PLUGIN = [sys.executable, "-m", "overlay.cmd.cni"]


def config(**over: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "blue", "type": "overlay-cni", **over}


@dataclass
class Outcome:
    status: int
    out: Any  # the parsed stdout, or None when it was empty
    stderr: str


def invoke(
    command: str | None,
    conf: dict[str, Any] | bytes | None,
    *,
    container: str = "c0ffee",
    netns: str | None = "/run/netns/none",
    ifname: str | None = "eth0",
    args: str | None = None,
    via: list[str] | None = None,
) -> Outcome:
    """Run the plugin as a runtime does; None drops that variable from the environment."""
    env = {"PATH": os.environ["PATH"], "CNI_PATH": "/opt/cni/bin"}
    for key, value in (
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
    ):
        if value is not None:
            env[key] = value
    stdin = conf if isinstance(conf, bytes) else b"" if conf is None else json.dumps(conf).encode()
    result = subprocess.run((via or []) + PLUGIN, input=stdin, env=env, capture_output=True, timeout=90, check=False)
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    text = result.stdout.decode()
    out = json.loads(text) if text.strip() else None
    if result.returncode != 0:  # every failure is one CNI error object and exit status 1
        assert result.returncode == 1, (result.returncode, text, stderr)
        assert isinstance(out, dict) and {"cniVersion", "code", "msg", "details"} <= out.keys(), text
        assert isinstance(out["code"], int) and out["msg"]
    return Outcome(result.returncode, out, stderr)


def error_code(outcome: Outcome) -> int:
    assert outcome.status != 0, outcome
    return int(outcome.out["code"])


# --- the plugin on its own --------------------------------------------------------------------


def test_version_lists_the_supported_versions() -> None:
    outcome = invoke("VERSION", {"cniVersion": "1.0.0"}, container=None, netns=None, ifname=None)
    assert outcome.status == 0
    assert outcome.out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}


def test_version_needs_no_config() -> None:
    outcome = invoke("VERSION", None, container=None, netns=None, ifname=None)
    assert outcome.status == 0 and "1.0.0" in outcome.out["supportedVersions"]


@pytest.mark.parametrize("stdin", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"blue"'])
def test_a_config_that_does_not_decode_is_code_6(stdin: bytes) -> None:
    assert error_code(invoke("ADD", stdin)) == cni.DECODING_FAILURE


@pytest.mark.parametrize("version", ["0.2.0", "0.3.0", "1.1.0", "2.0.0"])
def test_an_unsupported_cni_version_is_code_1(version: str) -> None:
    outcome = invoke("ADD", config(cniVersion=version))
    assert error_code(outcome) == cni.INCOMPATIBLE_VERSION and version in outcome.out["msg"]
    assert outcome.out["cniVersion"] == "1.0.0"  # not one we could speak


def test_a_config_without_cni_version_is_code_7() -> None:
    conf = config()
    del conf["cniVersion"]
    assert error_code(invoke("ADD", conf)) == cni.INVALID_CONFIG


def test_an_error_speaks_the_configs_cni_version() -> None:
    outcome = invoke("ADD", config(cniVersion="0.4.0", ip="300.1.1.1/24"))
    assert error_code(outcome) == cni.INVALID_CONFIG and outcome.out["cniVersion"] == "0.4.0"


@pytest.mark.parametrize(
    "command,missing",
    [
        (None, "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME"),
        ("ADD", "CNI_NETNS"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_IFNAME"),
        ("CHECK", "CNI_NETNS"),
    ],
)
def test_a_missing_environment_variable_is_code_4(command: str | None, missing: str) -> None:
    names = {"CNI_CONTAINERID": "container", "CNI_IFNAME": "ifname", "CNI_NETNS": "netns"}
    kw: dict[str, Any] = {names[missing]: None} if missing in names else {}
    outcome = invoke(command, config(prevResult={}), **kw)
    assert error_code(outcome) == cni.INVALID_ENVIRONMENT and missing in outcome.out["msg"]


@pytest.mark.parametrize("command", ["GC", "STATUS", "add", "BOGUS"])
def test_an_unknown_command_is_code_4(command: str) -> None:
    assert error_code(invoke(command, config())) == cni.INVALID_ENVIRONMENT


@pytest.mark.parametrize(
    "kw",
    [
        {"container": "-starts-with-a-dash"},
        {"container": "has/slash"},
        {"ifname": "a-name-longer-than-15"},
        {"ifname": "eth:0"},
        {"ifname": ".."},
        {"ifname": "eth 0"},
        {"netns": "relative/path"},
        {"args": "IP"},
        {"args": "FOO=bar"},  # not KEY=VALUE; an unknown key without IgnoreUnknown
    ],
)
def test_invalid_environment_values_are_code_4(kw: dict[str, str]) -> None:
    assert error_code(invoke("ADD", config(), **kw)) == cni.INVALID_ENVIRONMENT


@pytest.mark.parametrize(
    "over,code",
    [
        ({"ip": "198.19.0.300/24"}, cni.INVALID_CONFIG),
        ({"ip": 3322085127}, cni.INVALID_CONFIG),
        ({"ip": "2001:db8::1/64"}, cni.INVALID_CONFIG),  # IPv4 only
        ({"mac": "02:00:00:00:00"}, cni.INVALID_CONFIG),
        ({"mac": "01:00:5e:00:00:01"}, cni.INVALID_CONFIG),  # multicast
        ({"gateway": "198.19.0"}, cni.INVALID_CONFIG),
        ({"network": 1 << 24}, cni.INVALID_CONFIG),
        ({"network": ""}, cni.INVALID_CONFIG),
        ({"name": "-blue"}, cni.INVALID_CONFIG),
        ({"agent": "a-tap-name-too-long"}, cni.INVALID_CONFIG),
        ({"runtimeConfig": {"ips": ["198.19.0.7/24", "198.19.0.8/24"]}}, cni.INVALID_CONFIG),
        ({"prevResult": {"interfaces": {}}}, cni.INVALID_CONFIG),
        ({"ipam": {"type": "host-local"}}, cni.UNSUPPORTED_FIELD),
    ],
)
def test_a_bad_network_config_is_refused_before_asking_the_agent(over: dict[str, Any], code: int) -> None:
    assert error_code(invoke("ADD", config(**over))) == code


def test_check_is_not_part_of_cni_0_3_1() -> None:
    assert error_code(invoke("CHECK", config(cniVersion="0.3.1", prevResult={}))) == cni.INCOMPATIBLE_VERSION


def test_check_without_prev_result_is_code_7() -> None:
    outcome = invoke("CHECK", config())
    assert error_code(outcome) == cni.INVALID_CONFIG and "prevResult" in outcome.out["msg"]


def test_without_the_named_agent_add_and_check_are_code_100_and_del_is_try_again_later() -> None:
    conf = config(agent=f"nope{os.getpid() % 100000}")
    assert error_code(invoke("ADD", conf)) == cni.NO_AGENT
    assert error_code(invoke("CHECK", {**conf, "prevResult": {}})) == cni.NO_AGENT
    assert error_code(invoke("DEL", conf)) == cni.TRY_AGAIN_LATER


@pytest.mark.root
def test_with_no_agent_in_the_namespace_add_is_code_100_and_del_is_code_11() -> None:
    fresh = ["unshare", "--net"]  # a namespace of our own: nobody's agent listens there
    add = invoke("ADD", config(), via=fresh)
    assert error_code(add) == cni.NO_AGENT and "no overlay agent" in add.out["msg"]
    assert error_code(invoke("DEL", config(), netns=None, via=fresh)) == cni.TRY_AGAIN_LATER


# --- what the plugin asks and how it reads answers (a fake agent, in process) ------------------

ANSWER = {
    "id": "cni/c0ffee/eth0",
    "vni": VNI,
    "network": "net42",
    "netns": "/run/netns/pod",
    "ifname": "eth0",
    "host_ifname": "ovc1a2b3c4",
    "mac": "02:00:00:00:01:07",
    "address": "198.19.0.7/24",
    "gateway": "198.19.0.1",
    "mtu": 1450,
}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod", "CNI_IFNAME": "eth0"}


class FakeAgent:
    def __init__(self, answer: Any = None, error: Exception | None = None) -> None:
        self.answer, self.error = answer, error
        self.calls: list[tuple[str, str | None, dict[str, Any]]] = []

    def __call__(self, cmd: str, tap: str | None = None, timeout: float = 5.0, **params: Any) -> Any:
        self.calls.append((cmd, tap, params))
        if self.error is not None:
            raise self.error
        return self.answer


def run(conf: dict[str, Any], agent: FakeAgent, agents: tuple[str, ...] = ("ovl0",), **env: str) -> Any:
    return cni.run({**ENV, **env}, json.dumps(conf).encode(), ask=agent, agents=lambda: list(agents))


def test_add_asks_the_agent_to_attach_with_the_contracts_parameters() -> None:
    agent = FakeAgent(ANSWER)
    run(config(network=42, ip="198.19.0.7/24", mac="02:00:00:00:01:07", gateway="198.19.0.1"), agent)
    assert agent.calls == [
        (
            "attach",
            "ovl0",
            {
                "netns": "/run/netns/pod",
                "net": "42",
                "ifname": "eth0",
                "id": "cni/c0ffee/eth0",
                "ip": "198.19.0.7/24",
                "mac": "02:00:00:00:01:07",
                "gateway": "198.19.0.1",
                "ip6": None,
                "gateway6": None,
            },
        )
    ]


def test_the_network_defaults_to_the_configs_name_and_the_address_to_the_agents_choice() -> None:
    agent = FakeAgent(ANSWER)
    run(config(), agent)
    assert agent.calls[0][2] == {
        "netns": "/run/netns/pod",
        "net": "blue",
        "ifname": "eth0",
        "id": "cni/c0ffee/eth0",
        "ip": None,
        "mac": None,
        "gateway": None,
        "ip6": None,
        "gateway6": None,
    }


def test_cni_args_override_the_config_and_runtime_config_overrides_both() -> None:
    agent = FakeAgent(ANSWER)
    conf = config(ip="198.19.0.5/24", mac="02:00:00:00:01:05")
    run(conf, agent, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web;IP=198.19.0.6/24;MAC=02:00:00:00:01:06")
    assert (agent.calls[-1][2]["ip"], agent.calls[-1][2]["mac"]) == ("198.19.0.6/24", "02:00:00:00:01:06")
    run(
        {**conf, "runtimeConfig": {"ips": ["198.19.0.7/24"], "mac": "02:00:00:00:01:07"}},
        agent,
        CNI_ARGS="IP=198.19.0.6/24;MAC=02:00:00:00:01:06",
    )
    assert (agent.calls[-1][2]["ip"], agent.calls[-1][2]["mac"]) == ("198.19.0.7/24", "02:00:00:00:01:07")


def test_the_add_result_of_1_0_0() -> None:
    result = run(config(), FakeAgent({**ANSWER, "host_mac": "02:00:00:00:ff:01"}))
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "ovc1a2b3c4", "mac": "02:00:00:00:ff:01"},
            {"name": "eth0", "mac": "02:00:00:00:01:07", "sandbox": "/run/netns/pod"},
        ],
        "ips": [{"address": "198.19.0.7/24", "gateway": "198.19.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "198.19.0.1"}],
        "dns": {},
    }


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_before_1_0_0_ips_carry_their_version(version: str) -> None:
    result = run(
        config(cniVersion=version, dns={"nameservers": ["198.19.0.1"]}), FakeAgent({**ANSWER, "gateway": None})
    )
    assert result["cniVersion"] == version
    assert result["ips"] == [{"version": "4", "address": "198.19.0.7/24", "interface": 1}]  # no gateway, no routes
    assert "routes" not in result and result["dns"] == {"nameservers": ["198.19.0.1"]}


def test_a_chained_add_keeps_the_previous_result_and_points_past_it() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": "/run/netns/pod"}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
    }
    result = run(config(prevResult=prev), FakeAgent(ANSWER))
    assert [i["name"] for i in result["interfaces"]] == ["lo", "ovc1a2b3c4", "eth0"]
    assert result["ips"][1] == {"address": "198.19.0.7/24", "gateway": "198.19.0.1", "interface": 2}


DUAL = {**ANSWER, "address6": "2001:2:0:42::7/64", "gateway6": "2001:2:0:42::1"}


def test_a_dual_stack_add_result_has_both_addresses_gateways_and_default_routes() -> None:
    result = run(config(), FakeAgent({**DUAL, "host_mac": "02:00:00:00:ff:01"}))
    assert result["ips"] == [
        {"address": "198.19.0.7/24", "gateway": "198.19.0.1", "interface": 1},
        {"address": "2001:2:0:42::7/64", "gateway": "2001:2:0:42::1", "interface": 1},
    ]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.0.1"}, {"dst": "::/0", "gw": "2001:2:0:42::1"}]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_before_1_0_0_the_ipv6_entry_says_version_6(version: str) -> None:
    result = run(config(cniVersion=version), FakeAgent({**DUAL, "gateway6": None}))
    assert [ip["version"] for ip in result["ips"]] == ["4", "6"]
    assert result["ips"][1] == {"version": "6", "address": "2001:2:0:42::7/64", "interface": 1}
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.19.0.1"}]  # no gateway6, no ::/0


def test_an_ipv6_only_attachment_gives_one_ipv6_entry() -> None:
    result = run(config(), FakeAgent({**DUAL, "address": None, "gateway": None}))
    assert result["ips"] == [{"address": "2001:2:0:42::7/64", "gateway": "2001:2:0:42::1", "interface": 1}]
    assert result["routes"] == [{"dst": "::/0", "gw": "2001:2:0:42::1"}]


def test_ip6_and_gateway6_come_from_the_config_cni_args_and_runtime_config_ips() -> None:
    agent = FakeAgent(DUAL)
    run(config(ip6="2001:2:0:42::5/64", gateway6="2001:2:0:42::1"), agent)
    assert (agent.calls[-1][2]["ip6"], agent.calls[-1][2]["gateway6"]) == ("2001:2:0:42::5/64", "2001:2:0:42::1")
    run(config(ip6="none"), agent)
    assert agent.calls[-1][2]["ip6"] == "none"
    run(config(ip6="2001:2:0:42::5/64"), agent, CNI_ARGS="IP=198.19.0.6/24,2001:2:0:42:0:0:0:6/64")
    assert (agent.calls[-1][2]["ip"], agent.calls[-1][2]["ip6"]) == ("198.19.0.6/24", "2001:2:0:42::6/64")
    run(config(ip="198.19.0.5/24", runtimeConfig={"ips": ["2001:2:0:42::8/64"]}), agent)
    assert (agent.calls[-1][2]["ip"], agent.calls[-1][2]["ip6"]) == ("198.19.0.5/24", "2001:2:0:42::8/64")


@pytest.mark.parametrize(
    "conf, env, said",
    [
        (config(ip6="2001:2:0:42::5/129"), {}, "\"ip6\": '2001:2:0:42::5/129' is not an IPv6 address"),
        (config(gateway6="198.19.0.1"), {}, "\"gateway6\": '198.19.0.1' is not an IPv6 address"),
        (config(runtimeConfig={"ips": ["2001:2:0:42::8/64", "2001:2:0:42::9/64"]}), {}, "runtimeConfig ips"),
        (config(), {"CNI_ARGS": "IP=198.19.0.6/24,198.19.0.7/24"}, "CNI_ARGS IP"),
    ],
)
def test_bad_ipv6_settings_are_invalid_config(conf: dict[str, Any], env: dict[str, str], said: str) -> None:
    with pytest.raises(cni.CniError) as e:
        run(conf, FakeAgent(DUAL), **env)
    assert e.value.code == cni.INVALID_CONFIG and said in e.value.msg


def test_check_holds_the_ipv6_address_and_gateway6_against_the_previous_result() -> None:
    prev = prev_result()
    prev["ips"].append({"address": "2001:2:0:42::7/64", "gateway": "2001:2:0:42::1", "interface": 1})
    assert run(config(prevResult=prev), FakeAgent(DUAL), CNI_COMMAND="CHECK") is None
    for answer, said in (
        ({**DUAL, "address6": "2001:2:0:42::8/64"}, "has address 2001:2:0:42::8/64"),
        ({**DUAL, "gateway6": None}, "has gateway None"),
    ):
        with pytest.raises(cni.CniError) as e:
            run(config(prevResult=prev), FakeAgent(answer), CNI_COMMAND="CHECK")
        assert e.value.code == cni.MISMATCH and said in e.value.msg
    with pytest.raises(cni.CniError) as e:
        run(config(prevResult=prev_result()), FakeAgent(DUAL), CNI_COMMAND="CHECK")
    assert e.value.code == cni.MISMATCH and "2001:2:0:42::7/64" in e.value.msg


def test_del_asks_to_detach_and_prints_nothing() -> None:
    agent = FakeAgent({"detached": []})
    assert run(config(), agent, CNI_COMMAND="DEL", CNI_NETNS="") is None
    assert agent.calls == [("detach", "ovl0", {"id": "cni/c0ffee/eth0"})]


def prev_result(**ip: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "ovc1a2b3c4"},
            {"name": "eth0", "mac": "02:00:00:00:01:07", "sandbox": "/run/netns/pod"},
        ],
        "ips": [{"address": "198.19.0.7/24", "gateway": "198.19.0.1", "interface": 1, **ip}],
    }


def test_check_passes_when_the_agents_attachment_is_the_previous_result() -> None:
    agent = FakeAgent(ANSWER)
    assert run(config(prevResult=prev_result()), agent, CNI_COMMAND="CHECK") is None
    assert agent.calls == [("check", "ovl0", {"id": "cni/c0ffee/eth0"})]


@pytest.mark.parametrize(
    "answer,said",
    [
        ({**ANSWER, "mac": "02:00:00:00:01:99"}, "MAC"),
        ({**ANSWER, "address": "198.19.0.8/24"}, "address"),
        ({**ANSWER, "gateway": None}, "gateway"),
    ],
)
def test_check_fails_when_the_attachment_differs_from_the_previous_result(answer: dict[str, Any], said: str) -> None:
    with pytest.raises(cni.CniError) as e:
        run(config(prevResult=prev_result()), FakeAgent(answer), CNI_COMMAND="CHECK")
    assert e.value.code == cni.MISMATCH and said in e.value.msg


def test_check_fails_when_the_previous_result_has_no_such_interface() -> None:
    with pytest.raises(cni.CniError) as e:
        run(config(prevResult=prev_result()), FakeAgent(ANSWER), CNI_COMMAND="CHECK", CNI_NETNS="/run/netns/other")
    assert e.value.code == cni.MISMATCH


@pytest.mark.parametrize(
    "kind,code", [("netns", 3), ("network", 101), ("address", 102), ("invalid", 7), (None, 5), ("something-new", 5)]
)
def test_the_agents_refusals_become_cni_codes(kind: str | None, code: int) -> None:
    with pytest.raises(cni.CniError) as e:
        run(config(), FakeAgent(error=control.ControlError("refused for a reason", kind)))
    assert e.value.code == code and e.value.msg == "refused for a reason"


def test_a_refusal_naming_the_agents_flags_says_what_they_are_called_here() -> None:
    with pytest.raises(cni.CniError) as e:
        run(
            config(),
            FakeAgent(error=control.ControlError("address in use: pick another, or leave out --ip", "address")),
        )
    assert e.value.code == cni.ADDRESS and '"ip"' in e.value.details


def test_an_address_without_a_prefix_length_is_passed_on_for_the_agent_to_complete() -> None:
    agent = FakeAgent(ANSWER)
    run(config(ip="198.19.0.7"), agent, CNI_ARGS="")
    assert agent.calls[0][2]["ip"] == "198.19.0.7"


def test_the_shipped_conflist_is_a_valid_config_for_the_plugin() -> None:
    conflist = json.loads((Path(__file__).parents[2] / "deploy/cni/10-overlay.conflist").read_text())
    assert conflist["cniVersion"] in cni.SUPPORTED and conflist["plugins"][0]["type"] == "overlay-cni"
    # the runtime gives each plugin the list's name and version (CNI spec, network configuration lists)
    plugin = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    agent = FakeAgent(ANSWER)
    run(plugin, agent)
    assert agent.calls[0][2]["net"] == "blue"


def test_an_agent_that_went_away_meanwhile_is_no_agent() -> None:
    gone = control.ControlError("no overlay agent for TAP ovl0 in this network namespace")
    for command, code in (("ADD", cni.NO_AGENT), ("DEL", cni.TRY_AGAIN_LATER)):
        with pytest.raises(cni.CniError) as e:
            run(config(), FakeAgent(error=gone), CNI_COMMAND=command)
        assert e.value.code == code


def test_several_agents_need_one_named_in_the_config() -> None:
    with pytest.raises(cni.CniError) as e:
        run(config(), FakeAgent(ANSWER), agents=("ovl0", "ovl1"))
    assert e.value.code == cni.INVALID_CONFIG and "agent" in e.value.details
    agent = FakeAgent(ANSWER)
    run(config(agent="ovl1"), agent, agents=("ovl0", "ovl1"))
    assert agent.calls[0][1] == "ovl1"


def test_an_answer_that_is_not_an_attachment_is_an_io_failure() -> None:
    with pytest.raises(cni.CniError) as e:
        run(config(), FakeAgent({"unexpected": True}))
    assert e.value.code == cni.IO_FAILURE


# --- published ports (portMappings), the container's name, DNS ---------------------------------


def test_port_mappings_become_publications_in_the_attach_request() -> None:
    agent = FakeAgent({**ANSWER, "published": []})
    mappings = [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
        {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "198.18.0.1"},
        {"containerPort": 443},  # no hostPort: a random one; no protocol: tcp
        {"hostPort": 0, "containerPort": 22, "hostIP": "2001:2:0:1::1"},
        {"hostPort": 9090, "containerPort": 90, "hostIP": "0.0.0.0"},  # every address, as ""
        {"hostPort": 9091, "containerPort": 91, "protocol": "", "hostIP": "::"},
    ]
    run(config(runtimeConfig={"portMappings": mappings}), agent)
    assert agent.calls[0][2]["publish"] == [
        "8080:80/tcp",
        "198.18.0.1:5353:53/udp",
        "443/tcp",
        "[2001:2:0:1::1]::22/tcp",
        "9090:90/tcp",
        "9091:91/tcp",
    ]
    assert agent.calls[0][2]["expose"] == ["80/tcp", "53/udp", "443/tcp", "22/tcp", "90/tcp", "91/tcp"]


def test_port_mappings_expose_each_container_port_once() -> None:
    agent = FakeAgent({**ANSWER, "published": []})
    mappings = [
        {"hostPort": 8080, "containerPort": 80},
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp"},  # a second host port, one container port
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
        {"hostPort": 5354, "containerPort": 53, "protocol": "tcp"},  # another protocol: another port
    ]
    run(config(runtimeConfig={"portMappings": mappings}), agent)
    params = agent.calls[0][2]
    assert params["publish"] == ["8080:80/tcp", "8081:80/tcp", "5353:53/udp", "5354:53/tcp"]
    assert params["expose"] == ["80/tcp", "53/udp", "53/tcp"]
    assert cni.exposed_ports(()) == () and cni.exposed_ports(("198.18.0.1::53/udp",)) == ("53/udp",)


def test_without_port_mappings_or_a_name_the_attach_request_is_as_before() -> None:
    agent = FakeAgent(ANSWER)
    run(config(runtimeConfig={"portMappings": []}), agent, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=x")
    assert "publish" not in agent.calls[0][2] and "name" not in agent.calls[0][2]
    assert "expose" not in agent.calls[0][2]


@pytest.mark.parametrize(
    "mappings, said",
    [
        ({"hostPort": 80}, "runtimeConfig portMappings: {'hostPort': 80} is not a list"),
        (["8080:80"], "runtimeConfig portMappings[0]: '8080:80' is not an object"),
        ([{"hostPort": 8080}], "portMappings[0]: containerPort None is not a port (1 to 65535)"),
        ([{"hostPort": 8080, "containerPort": 70000}], "containerPort 70000 is not a port"),
        ([{"hostPort": "8080", "containerPort": 80}], "hostPort '8080' is not a port"),
        ([{"hostPort": True, "containerPort": 80}], "hostPort True is not a port"),
        ([{"containerPort": 80, "protocol": "sctp"}], "protocol 'sctp' is not tcp or udp"),
        ([{"containerPort": 80}, {"containerPort": 80, "hostIP": "somewhere"}], "portMappings[1]: hostIP 'somewhere'"),
    ],
)
def test_a_bad_port_mapping_is_invalid_config_saying_which_and_the_form(mappings: Any, said: str) -> None:
    agent = FakeAgent(ANSWER)
    with pytest.raises(cni.CniError) as e:
        run(config(runtimeConfig={"portMappings": mappings}), agent)
    assert e.value.code == cni.INVALID_CONFIG and said in e.value.msg, e.value.msg
    assert '"containerPort": 80' in e.value.details and agent.calls == []


def test_an_agent_that_ignores_port_mappings_fails_the_add_so_the_runtime_deletes() -> None:
    older = FakeAgent(ANSWER)  # an attachment without "published": an agent from before publishing
    with pytest.raises(cni.CniError) as e:
        run(config(runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 80}]}), older)
    assert e.value.code == cni.UNSUPPORTED_FIELD and "portMappings" in e.value.msg and "upgrade" in e.value.details


@pytest.mark.parametrize(
    "pod, name",
    [
        ("web", "web"),
        ("Web_Server.1", "web-server-1"),
        ("--db--", "db"),
        ("a" * 70, "a" * 63),
        ("x" * 62 + "_y", "x" * 62),  # cut at 63 and no '-' left at the end
        ("___", None),
        ("ünïcode", "n-code"),
    ],
)
def test_the_pod_name_becomes_the_containers_dns_name(pod: str, name: str | None) -> None:
    assert cni.dns_label(pod) == name
    agent = FakeAgent(ANSWER)
    run(config(), agent, CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}")
    assert agent.calls[0][2].get("name") == name


def test_k8s_pod_name_is_understood_without_ignore_unknown() -> None:
    agent = FakeAgent(ANSWER)
    run(config(), agent, CNI_ARGS="K8S_POD_NAME=web")
    assert agent.calls[0][2]["name"] == "web"
    with pytest.raises(cni.CniError) as e:
        run(config(), agent, CNI_ARGS="K8S_POD_NAME=web;K8S_POD_NAMESPACE=default")
    assert e.value.code == cni.INVALID_ENVIRONMENT and "K8S_POD_NAME" in e.value.details


def test_the_result_dns_comes_from_the_agent_when_the_config_gives_none() -> None:
    dns = {"nameservers": ["198.19.0.1"], "search": ["blue"]}
    assert run(config(), FakeAgent({**ANSWER, "dns": dns}))["dns"] == dns
    assert run(config(), FakeAgent({**ANSWER, "dns": None}))["dns"] == {}  # a network without a gateway
    assert run(config(), FakeAgent({**ANSWER, "dns": {"nameservers": [], "search": ["blue"]}}))["dns"] == {}
    mine = {"nameservers": ["198.18.0.53"]}
    assert run(config(dns=mine), FakeAgent({**ANSWER, "dns": dns}))["dns"] == mine  # the operator's wins


def test_the_shipped_conflist_asks_for_port_mappings() -> None:
    conflist = json.loads((Path(__file__).parents[2] / "deploy/cni/10-overlay.conflist").read_text())
    assert conflist["plugins"][0]["capabilities"] == {"mac": True, "ips": True, "portMappings": True}


# --- against real agents: a lab with etcd, containers as namespaces ---------------------------

SUBNET = ipaddress.IPv4Network(f"{overlay_ip(0)}/24")  # the agents' network 42: 198.19.0.0/24


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two hosts, each with an agent in etcd mode on network 42 (named net42 in etcd)."""
    logs = tmp_path_factory.mktemp("logs")
    with new_lab_with_etcd(hosts=2, prefix="cn") as (lab, etcd):
        for h in (1, 2):
            start_agent(lab, h, [], log_dir=logs, argv=etcd_agent_argv(lab, h, [etcd.endpoint], "--lease-ttl", "5"))
        yield lab


@dataclass
class Pod:
    host: int  # the lab host whose agent attaches it (the plugin runs there)
    ns: str  # its network namespace
    id: str  # CNI_CONTAINERID

    @property
    def netns(self) -> str:
        return f"/run/netns/{self.ns}"


class Pods:
    """Containers as network namespaces; teardown DELs what was added and deletes them."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.pods: list[Pod] = []

    def new(self, host: int) -> Pod:
        pod = Pod(host, f"{self.lab.name}-c{len(self.pods) + 1}", f"pod{len(self.pods) + 1}")
        subprocess.run(["ip", "netns", "add", pod.ns], check=True, capture_output=True)
        self.pods.append(pod)
        return pod

    def cni(self, command: str, pod: Pod, conf: dict[str, Any], **kw: Any) -> Outcome:
        kw.setdefault("netns", pod.netns)
        return invoke(command, conf, container=pod.id, via=self.lab.argv(pod.host, []), **kw)

    def add(self, pod: Pod, **over: Any) -> dict[str, Any]:
        outcome = self.cni("ADD", pod, config(**{"network": "net42", **over}))
        assert outcome.status == 0, outcome
        return outcome.out

    def links(self, pod: Pod) -> dict[str, dict[str, Any]]:
        out = subprocess.run(["ip", "-n", pod.ns, "-j", "addr"], capture_output=True, text=True, check=True).stdout
        return {link["ifname"]: link for link in json.loads(out)}

    def host_link(self, pod: Pod, ifname: str) -> bool:
        return self.lab.run(pod.host, ["ip", "link", "show", "dev", ifname], check=False).returncode == 0

    def close(self) -> None:
        for pod in self.pods:
            self.cni("DEL", pod, config(network="net42"))  # releases what the test left attached
            if Path(pod.netns).exists():
                pids = subprocess.run(
                    ["ip", "netns", "pids", pod.ns], capture_output=True, text=True, check=False
                ).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
                subprocess.run(["ip", "netns", "del", pod.ns], capture_output=True, check=False)


@pytest.fixture
def pods(lab: Lab) -> Iterator[Pods]:
    p = Pods(lab)
    try:
        yield p
    finally:
        p.close()


def inet(link: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("family") == "inet"]


def ping(pod: Pod, address: str) -> bool:
    argv = ["ip", "netns", "exec", pod.ns, "ping", "-n", "-c", "1", "-W", "1", address]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


@pytest.mark.root
@pytest.mark.etcd
def test_add_puts_the_interface_with_the_returned_mac_and_address_into_the_namespace(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    result = pods.add(pod, ip="198.19.0.11/24", mac="02:00:00:00:01:11", gateway=overlay_ip(1))
    host, inside = result["interfaces"]
    assert inside == {"name": "eth0", "mac": "02:00:00:00:01:11", "sandbox": pod.netns}
    assert result["ips"] == [{"address": "198.19.0.11/24", "gateway": overlay_ip(1), "interface": 1}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": overlay_ip(1)}] and result["cniVersion"] == "1.0.0"
    eth0 = pods.links(pod)["eth0"]
    assert eth0["address"] == "02:00:00:00:01:11" and inet(eth0) == ["198.19.0.11/24"]
    assert eth0["operstate"] in ("UP", "UNKNOWN") and eth0["mtu"] == status(lab, 1)["agent"]["mtu"]
    routes = json.loads(
        subprocess.run(["ip", "-n", pod.ns, "-j", "route"], capture_output=True, text=True, check=True).stdout
    )
    assert any(r["dst"] == "default" and r.get("gateway") == overlay_ip(1) for r in routes)
    assert pods.host_link(pod, host["name"])
    if "mac" in host:
        assert (
            json.loads(lab.run(1, ["ip", "-j", "link", "show", "dev", host["name"]]).stdout)[0]["address"]
            == host["mac"]
        )


@pytest.mark.root
@pytest.mark.etcd
def test_two_cni_containers_on_two_hosts_ping_each_other(lab: Lab, pods: Pods) -> None:
    a, b = pods.new(1), pods.new(2)
    first = pods.add(a, ip="198.19.0.21/24")
    second = pods.add(b, network=VNI)  # by VNI, the address chosen by the agent
    address = ipaddress.IPv4Interface(second["ips"][0]["address"])
    assert address.network == SUBNET and str(address.ip) not in (overlay_ip(1), overlay_ip(2), "198.19.0.21")
    assert inet(pods.links(b)["eth0"]) == [str(address)]
    wait_for(lambda: ping(a, str(address.ip)), 20, f"ping {address.ip} from {a.ns}")
    wait_for(lambda: ping(b, "198.19.0.21"), 20, f"ping 198.19.0.21 from {b.ns}")
    assert first["interfaces"][1]["mac"] != second["interfaces"][1]["mac"]


@pytest.mark.root
@pytest.mark.etcd
def test_del_removes_the_interface_and_a_second_del_is_a_no_op(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    host_ifname = pods.add(pod)["interfaces"][0]["name"]
    first = pods.cni("DEL", pod, config(network="net42"))
    assert (first.status, first.out) == (0, None)
    assert "eth0" not in pods.links(pod) and not pods.host_link(pod, host_ifname)
    again = pods.cni("DEL", pod, config(network="net42"))
    assert (again.status, again.out) == (0, None)
    without_netns = pods.cni("DEL", pod, config(network="net42"), netns=None)
    assert (without_netns.status, without_netns.out) == (0, None)


@pytest.mark.root
@pytest.mark.etcd
def test_an_address_is_free_again_after_del(lab: Lab, pods: Pods) -> None:
    a, b = pods.new(1), pods.new(1)
    pods.add(a, ip="198.19.0.31/24")
    assert pods.cni("DEL", a, config(network="net42")).status == 0
    assert pods.add(b, ip="198.19.0.31")["ips"][0]["address"] == "198.19.0.31/24"  # the network's prefix


@pytest.mark.root
@pytest.mark.etcd
def test_del_after_the_namespace_was_deleted_succeeds(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    host_ifname = pods.add(pod)["interfaces"][0]["name"]
    subprocess.run(["ip", "netns", "del", pod.ns], check=True, capture_output=True)
    outcome = pods.cni("DEL", pod, config(network="net42"))
    assert (outcome.status, outcome.out) == (0, None)
    wait_for(lambda: not pods.host_link(pod, host_ifname), 10, f"{host_ifname} to leave host 1")


@pytest.mark.root
@pytest.mark.etcd
def test_check_passes_then_fails_once_the_interface_is_broken(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    result = pods.add(pod, ip="198.19.0.41/24")
    check = config(network="net42", prevResult=result)
    ok = pods.cni("CHECK", pod, check)
    assert (ok.status, ok.out) == (0, None)

    other_mac = {
        **result,
        "interfaces": [result["interfaces"][0], {**result["interfaces"][1], "mac": "02:00:00:00:09:99"}],
    }
    assert error_code(pods.cni("CHECK", pod, config(network="net42", prevResult=other_mac))) == cni.MISMATCH

    subprocess.run(["ip", "-n", pod.ns, "addr", "flush", "dev", "eth0"], check=True, capture_output=True)
    flushed = pods.cni("CHECK", pod, check)
    assert error_code(flushed) == cni.MISMATCH and "198.19.0.41" in flushed.out["msg"], flushed.out

    subprocess.run(["ip", "-n", pod.ns, "link", "del", "eth0"], check=True, capture_output=True)
    # The veth pair is gone with it: broken, or (once the agent's reaper noticed, within 2 s) unknown.
    assert error_code(pods.cni("CHECK", pod, check)) in (cni.MISMATCH, cni.UNKNOWN_CONTAINER)


@pytest.mark.root
@pytest.mark.etcd
def test_check_of_something_never_added_fails(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "x"}, {"name": "eth0", "mac": "02:00:00:00:01:51", "sandbox": pod.netns}],
        "ips": [{"address": "198.19.0.51/24", "interface": 1}],
    }
    assert pods.cni("CHECK", pod, config(network="net42", prevResult=prev)).status != 0


@pytest.mark.root
@pytest.mark.etcd
def test_add_to_a_network_the_agent_does_not_know_is_code_101(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    assert error_code(pods.cni("ADD", pod, config(network="no-such-net"))) == cni.UNKNOWN_NETWORK
    assert error_code(pods.cni("ADD", pod, config(network=4242))) == cni.UNKNOWN_NETWORK
    assert "eth0" not in pods.links(pod)


@pytest.mark.root
@pytest.mark.etcd
def test_add_into_a_namespace_that_does_not_exist_is_code_3(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    missing = pods.cni("ADD", pod, config(network="net42"), netns=f"/run/netns/{lab.name}-nowhere")
    assert error_code(missing) == cni.UNKNOWN_CONTAINER


@pytest.mark.root
@pytest.mark.etcd
def test_an_address_in_use_or_outside_the_subnet_is_code_102(lab: Lab, pods: Pods) -> None:
    a, b = pods.new(1), pods.new(2)
    pods.add(a, ip="198.19.0.61/24")
    assert error_code(pods.cni("ADD", b, config(network="net42", ip="198.19.0.61/24"))) == cni.ADDRESS  # other host
    assert (
        error_code(pods.cni("ADD", b, config(network="net42", ip=f"{overlay_ip(1)}/24"))) == cni.ADDRESS
    )  # an agent's
    assert error_code(pods.cni("ADD", b, config(network="net42", ip="198.19.1.5/24"))) == cni.ADDRESS
    assert "eth0" not in pods.links(b)


@pytest.mark.root
@pytest.mark.etcd
def test_the_agent_named_in_the_config_is_asked_and_a_missing_one_is_code_100(lab: Lab, pods: Pods) -> None:
    pod = pods.new(1)
    assert error_code(pods.cni("ADD", pod, config(network="net42", agent="ovl9"))) == cni.NO_AGENT
    assert pods.add(pod, agent="ovl0")["interfaces"][1]["sandbox"] == pod.netns


@pytest.mark.root
@pytest.mark.etcd
def test_a_0_3_1_runtime_gets_a_0_3_1_result(lab: Lab, pods: Pods) -> None:
    pod = pods.new(2)
    result = pods.add(pod, cniVersion="0.3.1")
    assert result["cniVersion"] == "0.3.1" and result["ips"][0]["version"] == "4"
