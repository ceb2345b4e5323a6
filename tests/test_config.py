"""Agent configuration (overlay/config.py): TOML + flags, and the messages for bad values."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.config import ConfigError, build, parse_toml

BASE = {"vni": "42", "local": "198.18.0.1"}


def test_minimal_settings_get_sane_defaults() -> None:
    cfg = build(BASE)
    assert (cfg.vni, cfg.tap, cfg.port, cfg.mtu, cfg.mac, cfg.source_check, cfg.ageing) == (
        42, "ovl0", 4789, None, None, True, 300.0)


def test_toml_keys_are_the_flag_names() -> None:
    data = parse_toml('vni = 7\nlocal = "198.18.0.1"\npeer = ["198.18.0.2", "198.18.0.3"]\n'
                      'address = "198.19.0.1/24"\nmac = "02:00:00:00:00:01"\nsource_check = false\n', "a.toml")
    cfg = build(data)
    assert cfg.peers == (ipaddress.IPv4Address("198.18.0.2"), ipaddress.IPv4Address("198.18.0.3"))
    assert cfg.address == ipaddress.IPv4Interface("198.19.0.1/24") and cfg.mac == 0x020000000001
    assert cfg.source_check is False


def test_flags_override_the_file() -> None:
    data = parse_toml('vni = 7\nlocal = "198.18.0.1"\npeer = ["198.18.0.2"]\n', "a.toml")
    cfg = build({**data, "peer": ["198.18.0.9"], "vni": "8"})
    assert cfg.vni == 8 and cfg.peers == (ipaddress.IPv4Address("198.18.0.9"),)


def test_duplicate_peers_collapse() -> None:
    assert len(build({**BASE, "peer": ["198.18.0.2", "198.18.0.2"]}).peers) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vni": "-1"}, "vni: '-1' is not an integer from 0 to 16777215"),
        ({"vni": "x"}, "vni: 'x' is not an integer"),
        ({"port": "0"}, "port: '0' is not an integer from 1 to 65535"),
        ({"mtu": "60"}, "mtu: '60' is not an integer from 68"),
        ({"peer": ["198.18.0.1"]}, "own --local address"),
        ({"peer": ["nope"]}, "peer: 'nope' is not an IPv4 address"),
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "group or null"),
        ({"mac": "02:00:00:00:00"}, "six hex pairs"),
        ({"tap": "x" * 16}, "not an interface name"),
        ({"ageing": "0"}, "ageing: '0' is not a positive number"),
        ({"source_check": "maybe"}, "not true or false"),
        ({"address": "198.19.0.1/33"}, "not an IPv4 address with prefix"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_accepted(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build({**BASE, **override})


def test_unknown_toml_keys_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"a.toml: unknown setting\(s\) peers; known: vni, local, peer"):
        parse_toml('peers = ["198.18.0.2"]\n', "a.toml")


def test_invalid_toml_says_where() -> None:
    with pytest.raises(ConfigError, match="a.toml: not valid TOML"):
        parse_toml("vni = = 1", "a.toml")


@pytest.mark.parametrize(("override", "message"), [
    ({"etcd": 5}, "is not a list of URLs"),
    ({"etcd_password": 1234}, "must be a string"),
])
def test_etcd_settings_of_the_wrong_type_are_clear_errors(override: dict[str, object], message: str) -> None:
    settings = {"etcd": ["http://198.18.0.250:2379"], "host_id": "h1", "network": [42], "local": "198.18.0.1",
                "etcd_user": "root", "etcd_password": "pw"}
    with pytest.raises(ConfigError, match=message):
        build({**settings, **override})
