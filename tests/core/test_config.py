"""Agent configuration (overlay/core/config.py): TOML + flags, and the messages for bad values."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from overlay.core.config import ConfigError, build, parse_toml

BASE = {"vni": "42", "local": "198.18.0.1"}


def test_minimal_settings_get_sane_defaults() -> None:
    cfg = build(BASE)
    assert (cfg.vni, cfg.tap, cfg.port, cfg.mtu, cfg.mac, cfg.source_check, cfg.ageing) == (
        42,
        "ovl0",
        4789,
        None,
        None,
        True,
        300.0,
    )


def test_toml_keys_are_the_flag_names() -> None:
    data = parse_toml(
        'vni = 7\nlocal = "198.18.0.1"\npeer = ["198.18.0.2", "198.18.0.3"]\n'
        'address = "198.19.0.1/24"\nmac = "02:00:00:00:00:01"\nsource_check = false\n',
        "a.toml",
    )
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
        ({"peer": ["nope"]}, "peer: 'nope' is not an IPv4 or IPv6 address"),
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"etcd": 5}, "is not a list of URLs"),
        ({"etcd_password": 1234}, "must be a string"),
    ],
)
def test_etcd_settings_of_the_wrong_type_are_clear_errors(override: dict[str, object], message: str) -> None:
    settings = {
        "etcd": ["http://198.18.0.250:2379"],
        "host_id": "h1",
        "network": [42],
        "local": "198.18.0.1",
        "etcd_user": "root",
        "etcd_password": "pw",
    }
    with pytest.raises(ConfigError, match=message):
        build({**settings, **override})


# --- containers, metrics and probes ------------------------------------------------------------

ETCD = {"etcd": ["http://198.18.0.250:2379"], "host_id": "h1", "network": [42], "local": "198.18.0.1"}


def test_the_bridge_is_off_in_static_mode_and_on_in_etcd_mode() -> None:
    assert build(BASE).bridge is False
    assert build(ETCD).bridge is True
    assert build({**BASE, "bridge": True}).bridge is True


def test_no_bridge_in_etcd_mode() -> None:
    assert build({**ETCD, "bridge": False}).bridge is False  # --no-bridge
    assert build({**ETCD, "bridge": "off"}).bridge is False
    with pytest.raises(ConfigError, match="bridge: 'sometimes' is not true or false"):
        build({**ETCD, "bridge": "sometimes"})


def test_defaults_of_state_dir_metrics_and_probes() -> None:
    for cfg in (build(BASE), build(ETCD)):
        assert cfg.state_dir == "/run/overlay"
        assert cfg.metrics is None and cfg.metrics_address == ("127.0.0.1", 9465)
        assert cfg.probe_port is None and cfg.probe == 4799


@pytest.mark.parametrize("base", [BASE, ETCD])
def test_state_dir_must_be_an_absolute_path(base: dict[str, object]) -> None:
    assert build({**base, "state_dir": "/var/lib/overlay"}).state_dir == "/var/lib/overlay"
    for bad in ("run/overlay", "", "./state", 5):
        with pytest.raises(ConfigError, match=r"state_dir: .* is not an absolute directory path like /run/overlay"):
            build({**base, "state_dir": bad})


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("off", None),
        ("OFF", None),
        ("127.0.0.1:9465", ("127.0.0.1", 9465)),
        ("198.18.0.1:80", ("198.18.0.1", 80)),
        (":9000", ("127.0.0.1", 9000)),
        ("[::1]:9465", ("::1", 9465)),
    ],
)
def test_metrics_endpoints(given: str, address: tuple[str, int] | None) -> None:
    for base in (BASE, ETCD):
        cfg = build({**base, "metrics": given})
        assert cfg.metrics == given and cfg.metrics_address == address


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("127.0.0.1", r"metrics: '127.0.0.1': no port; write IP:PORT"),
        ("localhost:9465", r"metrics: 'localhost:9465': 'localhost' is not an IP address"),
        ("127.0.0.1:0", r"metrics: '127.0.0.1:0': the port must be a number from 1 to 65535"),
        ("127.0.0.1:65536", r"the port must be a number from 1 to 65535"),
        ("127.0.0.1:http", r"the port must be a number from 1 to 65535"),
        ("::1:9465", r"put an IPv6 address in brackets"),
        ("[127.0.0.1]:9465", r"brackets are for IPv6 addresses"),
        ("", r"metrics: '': no port"),
        (9465, r"metrics: 9465 is not HOST:PORT \(e.g. 127.0.0.1:9465\) or \"off\""),
        (False, r"metrics: False is not HOST:PORT"),
    ],
)
def test_bad_metrics_endpoints_say_what_is_accepted(given: object, message: str) -> None:
    for base in (BASE, ETCD):
        with pytest.raises(ConfigError, match=message):
            build({**base, "metrics": given})


def test_probe_port_from_0_which_turns_probes_off_to_65535() -> None:
    assert build({**BASE, "probe_port": "0"}).probe == 0
    assert build({**ETCD, "probe_port": 0}).probe == 0
    assert build({**BASE, "probe_port": "65535"}).probe == 65535
    assert build({**ETCD, "probe_port": 4800}).probe == 4800
    for bad in ("-1", "65536", "x", True, 1.5):
        with pytest.raises(ConfigError, match=r"probe_port: .* is not an integer from 0 to 65535"):
            build({**BASE, "probe_port": bad})


def test_toml_accepts_bridge_state_dir_metrics_and_probe_port() -> None:
    text = (
        'etcd = ["http://198.18.0.250:2379"]\nhost_id = "h1"\nnetwork = [42]\nlocal = "198.18.0.1"\n'
        'bridge = false\nstate_dir = "/var/lib/overlay"\nmetrics = "off"\nprobe_port = 0\n'
    )
    cfg = build(parse_toml(text, "a.toml"))
    assert (cfg.bridge, cfg.state_dir, cfg.metrics_address, cfg.probe) == (False, "/var/lib/overlay", None, 0)
    static = build(
        parse_toml(
            'vni = 7\nlocal = "198.18.0.1"\nbridge = true\nmetrics = "198.18.0.1:9100"\nprobe_port = 4800\n', "b.toml"
        )
    )
    assert (static.bridge, static.metrics_address, static.probe) == (True, ("198.18.0.1", 9100), 4800)


def test_flags_override_the_files_bridge_and_metrics() -> None:
    data = parse_toml('vni = 7\nlocal = "198.18.0.1"\nbridge = true\nmetrics = "off"\n', "a.toml")
    cfg = build({**data, "bridge": False, "metrics": "127.0.0.1:9999"})
    assert cfg.bridge is False and cfg.metrics_address == ("127.0.0.1", 9999)


# --- encryption: --encrypt, --key-file, --peer-key ----------------------------------------------

KEY2 = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="  # RFC 7748's two public keys
KEY3 = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
PEERS = {**BASE, "peer": ["198.18.0.2", "198.18.0.3"]}


def test_encryption_is_off_by_default_and_the_key_file_is_in_the_state_dir() -> None:
    static, etcd = build(BASE), build(ETCD)
    assert (static.encrypt, static.key_file, static.peer_keys) == (False, None, ())
    assert static.key_path == "/run/overlay/static.key" and etcd.key_path == "/run/overlay/h1.key"
    assert build({**ETCD, "state_dir": "/var/lib/overlay/"}).key_path == "/var/lib/overlay/h1.key"
    assert build({**ETCD, "key_file": "/etc/overlay/h1.key"}).key_path == "/etc/overlay/h1.key"
    assert build({**BASE, "key_file": "/etc/overlay/k"}).key_file == "/etc/overlay/k"


def test_encrypt_with_a_key_for_every_peer() -> None:
    cfg = build({**PEERS, "encrypt": True, "peer_key": ["198.18.0.3=" + KEY3, "198.18.0.2=" + KEY2]})
    assert cfg.encrypt is True
    assert cfg.peer_keys == (  # in the order of the peers
        (ipaddress.IPv4Address("198.18.0.2"), base64.b64decode(KEY2)),
        (ipaddress.IPv4Address("198.18.0.3"), base64.b64decode(KEY3)),
    )
    v6 = build(
        {
            "vni": 1,
            "local": "2001:2:0:1::1",
            "peer": ["2001:2:0:1::2"],
            "encrypt": "on",
            "peer_key": f"2001:2:0:1:0::2={KEY2}",
        }
    )
    assert v6.peer_keys == ((ipaddress.IPv6Address("2001:2:0:1::2"), base64.b64decode(KEY2)),)
    assert build({**BASE, "encrypt": True}).encrypt is True  # no peers yet: nothing to key


def test_toml_takes_encrypt_key_file_and_peer_key() -> None:
    text = (
        'vni = 7\nlocal = "198.18.0.1"\npeer = ["198.18.0.2"]\nencrypt = true\n'
        f'key_file = "/var/lib/overlay/static.key"\npeer_key = ["198.18.0.2={KEY2}"]\n'
    )
    cfg = build(parse_toml(text, "a.toml"))
    assert cfg.encrypt and cfg.key_path == "/var/lib/overlay/static.key" and len(cfg.peer_keys) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"encrypt": True, "peer_key": ["198.18.0.2=" + KEY2]},
            "--encrypt: peer 198.18.0.3 has no --peer-key 198.18.0.3=PUBKEY (its `overlay key show`)",
        ),
        ({"encrypt": True}, "--encrypt: peer 198.18.0.2 has no --peer-key 198.18.0.2=PUBKEY"),
        ({"encrypt": "maybe"}, "encrypt: 'maybe' is not true or false"),
        (
            {"encrypt": True, "peer_key": ["198.18.0.2"]},
            "peer_key: '198.18.0.2' is not ADDRESS=PUBKEY, like 198.18.0.2=",
        ),
        ({"encrypt": True, "peer_key": [f"peer2={KEY2}"]}, "peer_key: 'peer2' (before '=' in "),
        (
            {"encrypt": True, "peer_key": ["198.18.0.2=no pe"]},
            "peer_key 198.18.0.2: 'no pe' (after the first '='): public key is not base64",
        ),
        (
            {"encrypt": True, "peer_key": ["198.18.0.2=AAAA"]},
            "peer_key 198.18.0.2: 'AAAA' (after the first '='): public key is 3 bytes, not 32",
        ),
        (
            {"encrypt": True, "peer_key": [f"198.18.0.9={KEY2}"]},
            "peer_key 198.18.0.9: not one of the --peer addresses (198.18.0.2, 198.18.0.3)",
        ),
        (
            {"encrypt": True, "peer_key": [f"198.18.0.2={KEY2}", f"198.18.0.2={KEY3}", f"198.18.0.3={KEY3}"]},
            "peer_key 198.18.0.2: given twice with different keys",
        ),
        ({"encrypt": True, "peer_key": 5}, "peer_key: expected a list of ADDRESS=PUBKEY"),
        (
            {"peer_key": [f"198.18.0.2={KEY2}", f"198.18.0.3={KEY3}"]},
            "--peer-key without --encrypt: the traffic would still be plaintext",
        ),
        (
            {"key_file": "keys/h1.key"},
            "key_file: 'keys/h1.key' is not an absolute file path like /var/lib/overlay/h1.key",
        ),
        ({"key_file": "/var/lib/overlay/"}, "key_file: '/var/lib/overlay/' is not an absolute file path"),
        ({"key_file": 7}, "key_file: 7 is not an absolute file path"),
    ],
)
def test_bad_encryption_settings_are_one_line_naming_the_bad_part(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build({**PEERS, **override})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_peer_keys_without_encrypt_are_kept_unused_when_encrypt_is_false() -> None:
    cfg = build({**PEERS, "encrypt": False, "peer_key": [f"198.18.0.2={KEY2}"]})
    assert cfg.encrypt is False and len(cfg.peer_keys) == 1
    same = build(
        {**PEERS, "encrypt": True, "peer_key": [f"198.18.0.2={KEY2}", f" 198.18.0.2 = {KEY2} ", f"198.18.0.3={KEY3}"]}
    )
    assert len(same.peer_keys) == 2  # the same key twice is one


def test_in_etcd_mode_encryption_is_the_registrys() -> None:
    with pytest.raises(ConfigError) as e:
        build({**ETCD, "encrypt": True})
    assert "use `overlay net create VNI --encrypted` or `overlay net set VNI --encrypted`" in str(e.value)
    with pytest.raises(ConfigError, match="--peer-key is for static mode"):
        build({**ETCD, "peer_key": [f"198.18.0.2={KEY2}"]})
    assert build({**ETCD, "encrypt": False}).encrypt is False  # a file that says false is fine
    assert build({**ETCD, "key_file": "/var/lib/overlay/h1.key"}).key_path == "/var/lib/overlay/h1.key"
