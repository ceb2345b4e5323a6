"""The `overlay` command as a user runs it: a real process, its output and exit status; and, for
the commands that ask an agent, the same in process against a stand-in for the control socket
(what is asked, what is printed)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overlay import __version__
from overlay.core.keys import fingerprint, parse_private, parse_public, public_of
from overlay.io.control import ControlError


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "overlay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_version_names_the_release_and_the_fast_path() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"overlay {__version__} (fast path: ok)"


def test_missing_fast_path_is_one_clear_line_not_a_traceback() -> None:
    # The one fault that cannot be produced without breaking the install: block the import.
    result = run(
        code=(
            "import sys; sys.modules['overlay.fastpath._fastpath'] = None\n"
            "from overlay.cmd.cli import main; sys.exit(main(['--version']))"
        )
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlay.fastpath._fastpath" in lines[0] and "pip install ." in lines[0]


def test_help_describes_the_project() -> None:
    result = run("--help")
    assert result.returncode == 0 and "VXLAN" in result.stdout


# --- overlay key --------------------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlay: error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_generate_then_show(tmp_path: Path) -> None:
    path = tmp_path / "state" / "h1.key"
    made = run("key", "generate", "--key-file", str(path))
    assert made.returncode == 0 and "wrote a new private key" in made.stderr, made.stderr
    public = made.stdout.strip()
    assert len(public) == 44 and parse_public(public)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert public_of(parse_private(path.read_text().strip())) == parse_public(public)
    shown = run("key", "show", "--key-file", str(path))
    assert shown.returncode == 0 and shown.stdout.strip() == public and shown.stderr == ""
    as_json = json.loads(run("key", "show", "--key-file", str(path), "--json").stdout)
    assert as_json == {"key_file": str(path), "pubkey": public, "fingerprint": fingerprint(parse_public(public))}
    if shutil.which("wg"):  # the file is what wg genkey makes: wg agrees on the public key
        wg = subprocess.run(["wg", "pubkey"], input=path.read_text(), capture_output=True, text=True, check=True)
        assert wg.stdout.strip() == public


def test_key_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    first = run("key", "generate", "--key-file", str(path)).stdout.strip()
    one_line_error(run("key", "generate", "--key-file", str(path)), 1, f"{path} exists", "--force")
    assert run("key", "show", "--key-file", str(path)).stdout.strip() == first
    path.chmod(0o644)
    second = run("key", "generate", "--key-file", str(path), "--force")
    assert second.returncode == 0 and second.stdout.strip() != first and mode(path) == 0o600
    assert run("key", "show", "--key-file", str(path)).stdout.strip() == second.stdout.strip()


def test_key_show_creates_nothing_and_says_how_a_key_comes(tmp_path: Path) -> None:
    one_line_error(
        run("key", "show", "--state-dir", str(tmp_path)),
        1,
        f"{tmp_path}/static.key does not exist: the agent creates it on first start, or run 'overlay key generate",
    )
    assert list(tmp_path.iterdir()) == []


def test_key_show_refuses_a_file_others_can_read_with_the_chmod_that_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    run("key", "generate", "--key-file", str(path))
    path.chmod(0o644)
    one_line_error(
        run("key", "show", "--key-file", str(path)), 2, f"{path} is readable by others (mode 0644): chmod 600 {path}"
    )
    path.chmod(0o600)
    assert run("key", "show", "--key-file", str(path)).returncode == 0


def test_key_show_refuses_a_file_that_holds_no_key(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    path.write_text("this is not a key\n")
    path.chmod(0o600)
    line = one_line_error(run("key", "show", "--key-file", str(path)), 2, f"{path}: private key is not base64")
    assert "this is not a key" not in line  # the content of a key file is never printed
    one_line_error(run("key", "show", "--key-file", str(tmp_path)), 2, "is not a regular file (a directory)")


def test_key_files_are_found_as_the_agent_finds_them(tmp_path: Path) -> None:
    by_id = run("key", "generate", "--state-dir", str(tmp_path), "--host-id", "h1")
    static = run("key", "generate", "--state-dir", str(tmp_path))
    assert by_id.returncode == static.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h1.key", "static.key"]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'etcd = ["http://198.18.0.250:2379"]\nhost_id = "h1"\nnetwork = [42]\nstate_dir = "{tmp_path}"\n'
    )
    assert run("key", "show", "--config", str(config)).stdout == by_id.stdout
    config.write_text(f'vni = 42\nlocal = "198.18.0.1"\nkey_file = "{tmp_path}/static.key"\n')
    assert run("key", "show", "--config", str(config)).stdout == static.stdout
    one_line_error(
        run("key", "show", "--host-id=-h1", "--state-dir", str(tmp_path)), 2, "--host-id '-h1' is not a host id"
    )
    both = run("key", "show", "--host-id", "h1", "--key-file", str(tmp_path / "x.key"))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_key_help_teaches_rotation() -> None:
    generate = run("key", "generate", "--help").stdout
    assert "overlay key rotate" in generate and "--force" in generate and "next start" in generate
    rotate = run("key", "rotate", "--help").stdout
    assert "without losing traffic" in rotate and "180 s" in rotate and "--peer-key" in rotate
    show = run("key", "show", "--help").stdout
    assert "creates nothing" in show and "--state-dir" in show and "--host-id" in show


# --- the agent's encryption flags ----------------------------------------------------------------


def test_agent_encryption_flags_are_documented_and_checked_before_anything_runs() -> None:
    text = run("agent", "--help").stdout
    assert all(flag in text for flag in ("--encrypt", "--key-file PATH", "--peer-key ADDRESS=PUBKEY"))
    etcd = run(
        "agent",
        "--etcd",
        "http://127.0.0.1:9",
        "--host-id",
        "h1",
        "--local",
        "198.18.0.1",
        "--network",
        "42",
        "--encrypt",
    )
    one_line_error(etcd, 2, "use `overlay net create VNI --encrypted` or `overlay net set VNI --encrypted`")
    static = ["agent", "--vni", "42", "--local", "198.18.0.1", "--peer", "198.18.0.2", "--peer", "198.18.0.3"]
    key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
    one_line_error(
        run(*static, "--encrypt", "--peer-key", f"198.18.0.2={key}"),
        2,
        "--encrypt: peer 198.18.0.3 has no --peer-key 198.18.0.3=PUBKEY (its `overlay key show`)",
    )
    one_line_error(run(*static, "--encrypt", "--peer-key", "198.18.0.2=short"), 2, "peer_key 198.18.0.2: 'short'")


def test_status_shows_the_host_key_and_each_peers_session() -> None:
    from overlay.cmd.cli import format_status
    from overlay.core.status import Status
    from tests.core.test_status import FULL

    text = format_status(Status.from_json(FULL))
    assert "encryption  key Bg+I8vIq  encrypted networks 42" in text
    assert "NO KEY (nothing is sent to them on encrypted networks): h9" in text
    row = next(line for line in text.splitlines() if line.startswith("  198.18.0.2:4789"))
    assert row.split() == ["198.18.0.2:4789", "6hzgkHf0", "established", "0.9", "0", "7", "10"]
    assert "encryption" not in format_status(Status.from_json({**FULL, "encryption": None}))


# --- attach --name/--publish, publish, unpublish: what is asked of the agent, what is printed ----


class FakeControl:
    """Stands in for overlay.io.control.request: records each request, answers from ``answers``
    (a command's answer, or a ControlError to raise)."""

    def __init__(self, **answers: object) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str | None, dict[str, object]]] = []

    def __call__(self, cmd: str, tap: str | None = None, timeout: float = 5.0, **params: object) -> object:
        self.calls.append((cmd, tap, params))
        answer = self.answers[cmd]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeControl:
    from overlay.io import control

    fake = FakeControl()
    monkeypatch.setattr(control, "request", fake)
    return fake


def overlay_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from overlay.cmd.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def refused_in_one_line(result: tuple[int, str, str], code: int, *words: str) -> None:
    status, out, err = result
    assert (status, out) == (code, ""), result
    assert err.count("\n") == 1 and err.startswith("overlay: error: "), err
    for w in words:
        assert w in err, (w, err)


PID = str(os.getpid())  # a namespace that exists: this process's
ATTACHED = {
    "id": f"netns/{PID}/eth0",
    "vni": 42,
    "network": "blue",
    "netns": f"/proc/{PID}/ns/net",
    "ifname": "eth0",
    "host_ifname": "ovh1a2b3c4d5e6",
    "mac": "02:42:00:00:00:10",
    "address": "198.19.42.10/24",
    "gateway": "198.19.42.1",
    "mtu": 1450,
    "address6": None,
    "gateway6": None,
    "name": "web",
    "published": [
        {"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"},
        {"host_ip": "198.18.0.1", "host_port": 49153, "port": 53, "proto": "udp"},
    ],
    "dns": {"nameservers": ["198.19.42.1"], "search": ["blue"]},
}


def test_attach_sends_the_name_and_the_publications_in_their_canonical_form(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = ATTACHED
    argv = ["attach", PID, "--net", "blue", "--name", "web", "--publish", "8080:80", "--publish", "198.18.0.1::53/UDP"]
    status, out, err = overlay_in_process(capsys, *argv)
    assert status == 0 and err == ""
    ((cmd, tap, params),) = agent.calls
    assert (cmd, tap, params["netns"], params["name"]) == ("attach", None, f"/proc/{PID}/ns/net", "web")
    assert params["publish"] == ["8080:80/tcp", "198.18.0.1::53/udp"]
    assert out.splitlines() == [
        f"attached {PID} as web: eth0 02:42:00:00:00:10 198.19.42.10/24 on network blue (VNI 42), mtu 1450, "
        "gateway 198.19.42.1; host end ovh1a2b3c4d5e6",
        "  published 0.0.0.0:8080 -> 198.19.42.10:80/tcp",
        "  published 198.18.0.1:49153 -> 198.19.42.10:53/udp",
        "  dns 198.19.42.1, search blue",
    ]


def test_attach_shows_an_ipv6_publication_going_to_the_ipv6_address(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    published = [
        {"host_ip": "2001:2:0:1::1", "host_port": 8443, "port": 443, "proto": "tcp"},
        {"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"},
    ]
    agent.answers["attach"] = {**ATTACHED, "address6": "2001:2:0:42::10/64", "published": published}
    out = overlay_in_process(capsys, "attach", PID, "--net", "blue")[1].splitlines()
    assert out[1:3] == [
        "  published [2001:2:0:1::1]:8443 -> [2001:2:0:42::10]:443/tcp",
        "  published 0.0.0.0:8080 -> 198.19.42.10:80/tcp",
    ]


def test_attach_without_name_or_publish_asks_exactly_as_before(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = {**ATTACHED, "name": None, "published": [], "dns": None}
    status, out, _ = overlay_in_process(capsys, "attach", PID, "--net", "blue")
    assert status == 0 and "name" not in agent.calls[0][2] and "publish" not in agent.calls[0][2]
    assert out.startswith(f"attached {PID}: eth0 ") and len(out.splitlines()) == 1


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--name=-web"], "--name '-web' is not a DNS label: 1-63 of A-Z a-z 0-9 -"),
        (["--name", "web_1"], "--name 'web_1' is not a DNS label"),
        (["--name", "x" * 64], "is not a DNS label"),
        (["--publish", "8080:0"], "--publish '8080:0': port 0 is not a port (1 to 65535)"),
        (["--publish", "80/sctp"], "--publish '80/sctp': protocol 'sctp' is not tcp or udp"),
        (["--publish", "1:2:3:4"], "--publish '1:2:3:4' is not [HOSTIP:]HOSTPORT:PORT[/tcp|udp]"),
        (
            ["--publish", "80", "--publish", "not-a-host:1:2"],
            "host address 'not-a-host' is not an IPv4 or IPv6 address",
        ),
    ],
)
def test_a_bad_name_or_publication_is_one_line_exit_2_and_nothing_is_asked(
    agent: FakeControl, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:
    refused_in_one_line(overlay_in_process(capsys, "attach", PID, "--net", "blue", *flags), 2, said)
    assert agent.calls == []


def test_attach_warns_when_the_agent_ignored_the_publications(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    older = {k: v for k, v in ATTACHED.items() if k not in ("name", "published", "dns")}
    agent.answers["attach"] = older
    status, out, err = overlay_in_process(capsys, "attach", PID, "--net", "blue", "--publish", "80")
    assert status == 0 and out.startswith(f"attached {PID}: ")
    assert err.startswith("overlay: warning: the agent published no port") and "overlay publish" in err


PUBLISHED = {
    "id": "cni/abc/eth0",
    "name": "web",
    "address": "198.19.42.2",
    "published": {"host_ip": None, "host_port": 49153, "port": 80, "proto": "tcp"},
}


def test_publish_prints_the_host_port_chosen_and_whose_it_is(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["publish"] = PUBLISHED
    assert overlay_in_process(capsys, "publish", "web", "80") == (
        0,
        "published 0.0.0.0:49153 -> 198.19.42.2:80/tcp (web, cni/abc/eth0)\n",
        "",
    )
    assert agent.calls == [("publish", None, {"target": "web", "spec": "80/tcp"})]  # a name goes as given
    agent.answers["publish"] = {
        **PUBLISHED,
        "name": None,
        "address": "2001:2:0:42::2/64",
        "published": {"host_ip": "2001:2:0:1::1", "host_port": 8443, "port": 443, "proto": "tcp"},
    }
    status, out, _ = overlay_in_process(capsys, "publish", "cni/abc/eth0", "[2001:2:0:1::1]:8443:443", "--tap", "ovl0")
    assert out == "published [2001:2:0:1::1]:8443 -> [2001:2:0:42::2]:443/tcp (cni/abc/eth0)\n"
    assert agent.calls[-1] == ("publish", "ovl0", {"target": "cni/abc/eth0", "spec": "[2001:2:0:1::1]:8443:443/tcp"})


def test_publish_to_a_namespace_sends_its_path_as_attach_does(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["publish"] = PUBLISHED
    status, out, _ = overlay_in_process(capsys, "publish", PID, "8080:80/udp", "--json")
    assert status == 0 and json.loads(out) == PUBLISHED
    assert agent.calls == [("publish", None, {"target": f"/proc/{PID}/ns/net", "spec": "8080:80/udp"})]


def test_publish_refusals_are_one_line_a_users_mistake_exit_2(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "99999"), 2, "port 99999 is not a port")
    assert agent.calls == []
    for kind in ("unknown", "address", "invalid"):
        agent.answers["publish"] = ControlError(f"refused ({kind})", kind)
        refused_in_one_line(overlay_in_process(capsys, "publish", "web", "80"), 2, f"refused ({kind})")
    agent.answers["publish"] = ControlError("no overlay agent is running in this network namespace", "agent")
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "80"), 1, "no overlay agent")


@pytest.mark.parametrize(
    "spec, sent",
    [("8080", "8080/tcp"), ("5353/UDP", "5353/udp"), ("all", "all"), ("ALL", "all"), ("8080:80", "8080:80/tcp")],
)
def test_unpublish_takes_a_host_port_a_whole_spec_or_all(
    agent: FakeControl, capsys: pytest.CaptureFixture[str], spec: str, sent: str
) -> None:
    agent.answers["unpublish"] = {"id": "cni/abc/eth0", "unpublished": []}
    assert overlay_in_process(capsys, "unpublish", "web", spec)[0] == 0
    assert agent.calls == [("unpublish", None, {"target": "web", "spec": sent})]


@pytest.mark.parametrize(
    "spec, said",
    [
        ("0", "unpublish '0': a host port is 1 to 65535"),
        ("8080/sctp", "a protocol tcp or udp"),
        ("a:b", "or give HOSTPORT[/tcp|udp] (e.g. 8080), or all"),
    ],
)
def test_a_bad_unpublish_is_one_line_exit_2(
    agent: FakeControl, capsys: pytest.CaptureFixture[str], spec: str, said: str
) -> None:
    refused_in_one_line(overlay_in_process(capsys, "unpublish", "web", spec), 2, said)
    assert agent.calls == []


def test_unpublish_says_what_it_removed_or_that_there_was_nothing(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = [
        {"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"},
        {"host_ip": "198.18.0.1", "host_port": 5353, "port": 53, "proto": "udp"},
    ]
    agent.answers["unpublish"] = {"id": "cni/abc/eth0", "unpublished": gone}
    assert overlay_in_process(capsys, "unpublish", "web", "all")[1].splitlines() == [
        "unpublished 0.0.0.0:8080 -> 80/tcp (cni/abc/eth0)",
        "unpublished 198.18.0.1:5353 -> 53/udp (cni/abc/eth0)",
    ]
    assert json.loads(overlay_in_process(capsys, "unpublish", "web", "all", "--json")[1])["unpublished"] == gone
    agent.answers["unpublish"] = {"id": "cni/abc/eth0", "unpublished": []}
    assert overlay_in_process(capsys, "unpublish", "web", "all")[1] == "nothing was published for cni/abc/eth0\n"


def test_publish_unpublish_and_attach_help_teach_with_examples() -> None:
    publish, unpublish, attach = (
        run(*argv).stdout for argv in (["publish", "--help"], ["unpublish", "--help"], ["attach", "--help"])
    )
    assert "overlay publish web 8080:80" in publish and "random free host port" in publish
    assert "published 0.0.0.0:8080 -> 198.19.42.2:80/tcp (web, cni/c0ffee/eth0)" in publish
    assert "[HOSTIP:]HOSTPORT:PORT[/tcp|udp]" in publish and "--json" in publish and "--tap" in publish
    assert "overlay unpublish web 8080" in unpublish and "overlay unpublish web all" in unpublish
    assert "--name" in attach and "--publish SPEC" in attach and "--publish 8080:80" in attach


# --- exposed ports: attach --expose, publish --all, status ---------------------------------------


def test_attach_sends_the_exposed_ports_in_their_one_spelling_and_shows_them(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = {**ATTACHED, "published": [], "exposed": ["80/tcp", "53/udp"]}
    argv = [
        "attach",
        PID,
        "--net",
        "blue",
        "--name",
        "web",
        "--expose",
        "80",
        "--expose",
        "53/UDP",
        "--expose",
        "80/tcp",
    ]
    status, out, err = overlay_in_process(capsys, *argv)
    assert status == 0 and err == ""
    ((cmd, _, params),) = agent.calls
    assert cmd == "attach" and params["expose"] == ["80/tcp", "53/udp"]  # each once, as the registry spells it
    assert "publish" not in params
    assert out.splitlines()[1:] == ["  exposes 80/tcp, 53/udp", "  dns 198.19.42.1, search blue"]
    status, out, _ = overlay_in_process(capsys, *argv, "--json")
    assert status == 0 and json.loads(out)["exposed"] == ["80/tcp", "53/udp"]


def test_attach_shows_exposed_ports_before_the_publications(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = {**ATTACHED, "exposed": ["80/tcp"], "dns": None}
    out = overlay_in_process(capsys, "attach", PID, "--net", "blue", "--expose", "80", "--publish", "8080:80")[1]
    assert agent.calls[0][2]["expose"] == ["80/tcp"] and agent.calls[0][2]["publish"] == ["8080:80/tcp"]
    assert out.splitlines()[1:] == [
        "  exposes 80/tcp",
        "  published 0.0.0.0:8080 -> 198.19.42.10:80/tcp",
        "  published 198.18.0.1:49153 -> 198.19.42.10:53/udp",
    ]


def test_attach_without_expose_sends_none_and_shows_none(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = {**ATTACHED, "exposed": []}
    status, out, err = overlay_in_process(capsys, "attach", PID, "--net", "blue")
    assert status == 0 and err == "" and "expose" not in agent.calls[0][2] and "exposes" not in out


@pytest.mark.parametrize(
    "port, said",
    [
        ("80/sctp", "--expose '80/sctp': protocol 'sctp' is not tcp or udp (PORT[/tcp|udp], e.g. 80 or 53/udp)"),
        ("0", "--expose '0': port 0 is not a port (1 to 65535) (PORT[/tcp|udp]"),
        ("70000/udp", "--expose '70000/udp': port 70000 is not a port"),
        ("http", "--expose 'http': port 'http' is not a port"),
        ("8080:80", "--expose '8080:80'"),
    ],
)
def test_a_bad_expose_is_one_line_exit_2_and_nothing_is_asked(
    agent: FakeControl, capsys: pytest.CaptureFixture[str], port: str, said: str
) -> None:
    refused_in_one_line(overlay_in_process(capsys, "attach", PID, "--net", "blue", "--expose", port), 2, said)
    assert agent.calls == []


def test_attach_warns_when_the_agent_ignored_the_exposed_ports(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["attach"] = ATTACHED  # no "exposed": an agent from before --expose
    status, out, err = overlay_in_process(capsys, "attach", PID, "--net", "blue", "--expose", "80")
    assert status == 0 and out.startswith(f"attached {PID} as web: ")
    assert err.count("\n") == 1 and err.startswith("overlay: warning: the agent recorded no exposed port")


PUBLISHED_ALL = {
    "id": "cni/abc/eth0",
    "name": "web",
    "address": "198.19.42.2",
    "published": [
        {"host_ip": None, "host_port": 49153, "port": 80, "proto": "tcp"},
        {"host_ip": None, "host_port": 49154, "port": 53, "proto": "udp"},
    ],
}


def test_publish_all_asks_for_every_exposed_port_and_prints_one_line_each(
    agent: FakeControl, capsys: pytest.CaptureFixture[str]
) -> None:
    agent.answers["publish"] = PUBLISHED_ALL
    assert overlay_in_process(capsys, "publish", "web", "--all") == (
        0,
        "published 0.0.0.0:49153 -> 198.19.42.2:80/tcp (web, cni/abc/eth0)\n"
        "published 0.0.0.0:49154 -> 198.19.42.2:53/udp (web, cni/abc/eth0)\n",
        "",
    )
    assert agent.calls == [("publish", None, {"target": "web", "all": True})]  # no spec at all
    status, out, _ = overlay_in_process(capsys, "publish", PID, "--all", "--json", "--tap", "ovl0")
    assert status == 0 and json.loads(out) == PUBLISHED_ALL
    assert agent.calls[-1] == ("publish", "ovl0", {"target": f"/proc/{PID}/ns/net", "all": True})


def test_publish_all_with_nothing_left_says_so(agent: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    agent.answers["publish"] = {**PUBLISHED_ALL, "name": None, "published": []}
    status, out, _ = overlay_in_process(capsys, "publish", "cni/abc/eth0", "--all")
    assert status == 0 and out == (
        "nothing was published for cni/abc/eth0: it exposes no port that is not published yet\n"
    )


def test_publish_needs_a_spec_or_all_but_not_both(agent: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "80", "--all"), 2, "give a SPEC (80) or --all")
    refused_in_one_line(overlay_in_process(capsys, "publish", "web"), 2, "say what to publish", "--all")
    assert agent.calls == []


def test_publish_all_refusals_are_one_line(agent: FakeControl, capsys: pytest.CaptureFixture[str]) -> None:
    said = "cni/abc/eth0 exposes no ports: attach it with --expose PORT[/proto] (or publish one port by hand)"
    agent.answers["publish"] = ControlError(said, "invalid")
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "--all"), 2, said)
    agent.answers["publish"] = ControlError("every port cni/abc/eth0 exposes is published already (80/tcp)", "invalid")
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "--all"), 2, "published already (80/tcp)")
    agent.answers["publish"] = ControlError("missing spec", "invalid")  # an agent from before --all
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "--all"), 2, "does not know 'publish --all'")
    agent.answers["publish"] = ControlError("missing spec", "invalid")  # without --all: the agent's own words
    refused_in_one_line(overlay_in_process(capsys, "publish", "web", "80"), 2, "missing spec")


def test_status_shows_each_containers_exposed_ports_beside_its_name_and_publications() -> None:
    import copy

    from overlay.cmd.cli import format_status
    from overlay.core.status import Status
    from tests.core.test_status import FULL

    full = copy.deepcopy(FULL)
    attachments = full["attachments"]
    assert isinstance(attachments, list)
    attachments[0].update(
        name="web",
        exposed=["80/tcp", "53/udp"],
        published=[{"host_ip": None, "host_port": 8080, "port": 80, "proto": "tcp"}],
    )
    lines = format_status(Status.from_json(full)).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(str(attachments[0]["id"])))
    assert lines[at + 1] == "  name web  exposes 80/tcp, 53/udp  published 0.0.0.0:8080 -> 80/tcp"
    attachments[0].update(name=None, exposed=["80/tcp"], published=[])
    lines = format_status(Status.from_json(full)).splitlines()
    assert lines[at + 1] == "  exposes 80/tcp"
    attachments[0].update(exposed=[])
    assert "exposes" not in format_status(Status.from_json(full))


def test_expose_and_publish_all_help_teach_with_examples() -> None:
    publish, attach = (run(*argv).stdout for argv in (["publish", "--help"], ["attach", "--help"]))
    assert "overlay publish web --all" in publish and "--all" in publish and "one such line per port" in publish
    assert "--expose PORT[/tcp|udp]" in attach and "--expose 80 --expose 53/udp" in attach
    assert "exposes 80/tcp, 53/udp" in attach and "overlay publish web --all" in attach
