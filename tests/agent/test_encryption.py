"""Encrypted networks on a lab (issue 14): agents run as processes, as an operator starts them,
against a real etcd or with static peers and keys; the underlay is captured with tcpdump and
hostile datagrams are sent from lab hosts' own underlay addresses.

The wire (overlay/core/seal.py): an encrypted data datagram is a 16-byte header (byte 0 = 4,
receiver index, counter) + the AEAD ciphertext of the VXLAN datagram + a 16-byte tag;
handshake messages start with 1 or 2; plaintext VXLAN starts with 0x08.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from itertools import permutations
from pathlib import Path
from typing import Any, Iterator

import pytest

from overlay.core import wire
from overlay.core.keys import encode, fingerprint, parse_public, public_of
from overlay.io.keys import generate_private, load
from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import (
    VNI,
    Labs,
    capture,
    etcd_agent_argv,
    new_lab_with_etcd,
    overlay_ip,
    pcap_frames,
    ping,
    send_from,
    start_agent,
    status,
    stop_agent,
    tcp_transfer,
    udp_in,
    wait_ping,
    write_key,
)

pytestmark = [pytest.mark.root, pytest.mark.etcd]
P = "/overlay/v1"
MARKER = b"OVERLAY-SECRET-MARKER"
DATA, PLAIN = 4, 0x08  # first bytes: a sealed data datagram, plaintext VXLAN
ENCRYPTED_MTU = 1418  # 1500 - 50 (VXLAN over IPv4) - 32 (sealing)


def vtep(lab: Lab, host: int) -> str:
    return f"{lab.address(host)}:4789"


def session(lab: Lab, host: int, peer: int, tap: str | None = None) -> dict[str, Any]:
    """``host``'s session with ``peer`` (its entry in status encryption.sessions)."""
    sessions = {s["peer"]: s for s in status(lab, host, tap)["encryption"]["sessions"]}
    return sessions.get(vtep(lab, peer), {})


def handshakes(lab: Lab, host: int) -> dict[str, int]:
    return dict(status(lab, host)["encryption"]["handshakes"])


def drops(lab: Lab, host: int) -> dict[str, int]:
    return dict(status(lab, host)["drops"])


def in_echos(lab: Lab, host: int) -> int:
    """ICMP echo requests the host's kernel took in (Icmp: InEchos of /proc/net/snmp)."""
    rows = [line.split() for line in lab.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = (r[1:] for r in rows if r[0] == "Icmp:")
    return int(dict(zip(names, values))["InEchos"])


PING_2S = ["ping", "-n", "-c", "5", "-i", "0.5", "-W", "1"]  # 5 requests over 2 s, then 1 s for answers


def impostor_key() -> str:
    return encode(public_of(generate_private()))


class EtcdWorld:
    """A lab with a real etcd and agents in etcd mode (the state dir, keys included, removed after)."""

    def __init__(self, lab: Lab, etcd: etcdlab.EtcdServer, logs: Path) -> None:
        self.lab, self.etcd, self.logs = lab, etcd, logs
        self.agents: dict[int, subprocess.Popen[Any]] = {}

    def start(self, host: int, *extra: str, argv: list[str] | None = None, tap: str = "ovl0") -> None:
        argv = argv or etcd_agent_argv(self.lab, host, [self.etcd.endpoint], *extra)
        self.agents[host] = start_agent(self.lab, host, [], log_dir=self.logs, argv=argv, tap=tap)

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return etcdlab.etcdctl(self.etcd, *args, check=True)

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`overlay <args> --etcd <the lab's etcd>` run in host 1, as an operator would."""
        argv = [sys.executable, "-m", "overlay", *args, "--etcd", self.etcd.endpoint]
        result = self.lab.run(1, argv, check=False, timeout=60)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stdout, result.stderr)
        return result

    def log(self, host: int, tap: str = "ovl0") -> str:
        return (self.logs / f"agent-{self.lab.name}-h{host}-{tap}.log").read_text()

    @property
    def state_dir(self) -> Path:
        return Path(f"/tmp/overlay-state-{self.lab.name}")

    def close(self) -> None:
        """Stop every agent still running (by PID) and remove the state dir with its keys."""
        for proc in self.agents.values():
            if proc.poll() is None:
                stop_agent(proc)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def enc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdWorld]:
    """Three hosts on an encrypted network 42 (created encrypted before any agent joined it),
    an agent in etcd mode on each; each agent made its key in the state dir and published it."""
    logs = tmp_path_factory.mktemp("logs")
    with new_lab_with_etcd(hosts=3, prefix="x") as (lab, etcd):
        r = EtcdWorld(lab, etcd, logs)
        try:
            r.admin("net", "create", str(VNI), "--encrypted", "--subnet", "198.19.0.0/24")
            for h in (1, 2, 3):
                r.start(h)
            yield r
        finally:
            r.close()


def test_an_encrypted_network_carries_ping_between_every_pair_and_100_mb_byte_identical(
    enc: EtcdWorld, tmp_path: Path
) -> None:
    lab = enc.lab
    listed = {n["vni"]: n for n in json.loads(enc.admin("net", "ls", "--json").stdout)}
    assert listed[VNI]["encrypted"] is True
    for src, dst in permutations((1, 2, 3), 2):
        wait_ping(lab, src, overlay_ip(dst), timeout=20)
    for h in (1, 2, 3):
        s = status(lab, h)
        e = s["encryption"]
        assert s["agent"]["mtu"] == ENCRYPTED_MTU and e["networks"] == [VNI] and e["without_key"] == []
        own = json.loads(enc.etcdctl("get", "--print-value-only", f"{P}/hosts/h{h}").stdout)["pubkey"]
        assert e["pubkey"] == own and e["fingerprint"] == fingerprint(parse_public(own))
        key_file = enc.state_dir / f"h{h}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        for p in (1, 2, 3):
            if p != h:
                peer = session(lab, h, p)
                theirs = json.loads(enc.etcdctl("get", "--print-value-only", f"{P}/hosts/h{p}").stdout)["pubkey"]
                assert peer["state"] == "established" and peer["key"] == fingerprint(parse_public(theirs)), peer
    data = tmp_path / "payload"
    data.write_bytes(random.Random(14).randbytes(100 << 20))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    for src, dst in ((1, 2), (2, 3)):
        sealed = session(lab, src, dst)["tx_messages"]
        assert tcp_transfer(lab, src, dst, overlay_ip(dst), data) == (expected, 100 << 20)
        assert session(lab, src, dst)["tx_messages"] - sealed > (100 << 20) // 65536  # it went sealed


UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(10)
print("listening", flush=True)
seen, wanted = 0, int(sys.argv[3])
try:
    while seen < wanted:
        seen += sys.argv[4].encode() in s.recvfrom(65536)[0]
except socket.timeout:
    pass
print(seen, flush=True)
"""


def sealed_segments(payload: bytes) -> list[bytes]:
    """The datagrams in a captured UDP payload. The agent sends batches with UDP GSO, and over
    veth a batch stays one packet in the capture: its payload is the datagrams back to back, all
    of one size but the last. A batch of sealed datagrams of one session is told by its
    headers: the same receiver index, counters one apart. Anything else is one datagram."""
    if len(payload) < 32 or payload[0] != DATA:
        return [payload]
    head, counter = payload[:8], int.from_bytes(payload[8:16], "little")
    step = next(
        (
            k
            for k in range(32, len(payload) - 15)
            if payload[k : k + 8] == head and int.from_bytes(payload[k + 8 : k + 16], "little") == counter + 1
        ),
        len(payload),
    )
    parts = [payload[i : i + step] for i in range(0, len(payload), step)]
    assert all(p[:8] == head and int.from_bytes(p[8:16], "little") == counter + i for i, p in enumerate(parts)), (
        "a batch whose datagrams are not one session's, in order"
    )
    return parts


def test_the_underlay_carries_the_traffic_sealed_never_the_payload_nor_plaintext_vxlan(
    enc: EtcdWorld, tmp_path: Path
) -> None:
    lab = enc.lab
    wait_ping(lab, 1, overlay_ip(2))
    wait_ping(lab, 2, overlay_ip(1))
    secret = tmp_path / "secret"
    secret.write_bytes(MARKER * ((1 << 20) // len(MARKER)))  # 1 MiB of marker, for the TCP leg (TSO)
    udp = MARKER * 10
    sink = lab.spawn(
        2,
        [sys.executable, "-c", UDP_SINK, overlay_ip(2), "9000", "20", MARKER.decode()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    pcap = tmp_path / "underlay.pcap"
    one, two = str(lab.address(1)), str(lab.address(2))

    def sealed_from_1() -> list[bytes]:
        return [
            d
            for src, _, dst, dport, payload in udp_in(pcap_frames(pcap))
            if (src, dst, dport) == (one, two, 4789)
            for d in sealed_segments(payload)
            if d[0] == DATA
        ]

    with capture(lab, 2, "eth0", pcap, f"udp port 4789 and host {one}"):
        send_from(lab, 1, overlay_ip(1), overlay_ip(2), [udp] * 20, port=9000)
        out, _ = sink.communicate(timeout=30)
        assert int(out.strip()) == 20  # every marker datagram crossed the overlay meanwhile
        assert tcp_transfer(lab, 1, 2, overlay_ip(2), secret)[1] == secret.stat().st_size
        # The 20 UDP datagrams (14+20+8+210 bytes inside each) and the TCP leg's ~760 segments.
        inside = 8 + 14 + 20 + 8 + len(udp) + 32
        wait_for(
            lambda: sum(len(d) >= inside for d in sealed_from_1()) >= 20 + 700, 10, "the sealed datagrams captured"
        )
    raw = pcap.read_bytes()
    datagrams = [d for *_, payload in udp_in(pcap_frames(pcap)) for d in sealed_segments(payload)]
    assert MARKER not in raw and MARKER[:8] not in raw  # not the payload, not even a piece of it
    first = {d[0] for d in datagrams}
    assert first <= {1, 2, DATA}, first  # data and handshakes only
    assert [d for d in datagrams if d[0] == PLAIN and d[4:7] == VNI.to_bytes(3, "big")] == []
    assert sum(len(d) - 32 for d in sealed_from_1()) > secret.stat().st_size + 20 * len(udp)


def test_plaintext_vxlan_from_a_members_own_address_is_dropped_not_delivered(enc: EtcdWorld, tmp_path: Path) -> None:
    """Host 3 is a member of network 42; a plaintext VXLAN datagram from its very address (an
    ICMP echo request to host 1, with the marker as payload) is dropped as not_encrypted: host 1's
    TAP never sees it and its kernel never answers, while a genuine ping after it does cross."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    lab = enc.lab
    wait_ping(lab, 3, overlay_ip(1))
    frame = bytes(
        Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:01")
        / IP(src=overlay_ip(3), dst=overlay_ip(1))
        / ICMP(type=8, id=0x4242, seq=1)
        / Raw(MARKER)
    )
    before, echos = drops(lab, 1), in_echos(lab, 1)
    pcap = tmp_path / "tap.pcap"
    with capture(lab, 1, "ovl0", pcap, "icmp"):
        send_from(lab, 3, lab.address(3), lab.address(1), [wire.encode(VNI, frame)] * 5)
        wait_for(lambda: drops(lab, 1)["not_encrypted"] - before["not_encrypted"] >= 5, 10, "not_encrypted drops")
        assert ping(lab, 3, overlay_ip(1)).returncode == 0  # the genuine path, after the forgeries
        wait_for(lambda: len(pcap_frames(pcap)) >= 2, 10, "the genuine ping in the capture of host 1's TAP")
    assert drops(lab, 1)["not_encrypted"] - before["not_encrypted"] == 5
    assert MARKER not in pcap.read_bytes()
    assert in_echos(lab, 1) - echos == 1  # the genuine ping's request only


def test_replayed_or_altered_ciphertext_from_the_genuine_peer_is_dropped(enc: EtcdWorld, tmp_path: Path) -> None:
    lab = enc.lab
    wait_ping(lab, 2, overlay_ip(1))
    pcap = tmp_path / "h1.pcap"
    echo_request = 8 + 14 + 20 + 8 + 56 + 32  # ping's default 56 bytes, in VXLAN, sealed

    def captured() -> list[bytes]:
        return [
            p
            for src, _, _, dport, p in udp_in(pcap_frames(pcap))
            if src == str(lab.address(2)) and dport == 4789 and p[0] == DATA and len(p) == echo_request
        ]

    with capture(lab, 1, "eth0", pcap, f"udp and src host {lab.address(2)} and dst port 4789"):
        assert ping(lab, 2, overlay_ip(1)).returncode == 0
        wait_for(captured, 10, "host 2's sealed echo request in the capture")
    genuine = captured()[-1]
    before, echos = drops(lab, 1), in_echos(lab, 1)
    send_from(lab, 2, lab.address(2), lab.address(1), [genuine])
    wait_for(lambda: drops(lab, 1)["replayed"] > before["replayed"], 10, "the replay to be counted")
    altered = bytearray(genuine)
    altered[16 + 20] ^= 0x01  # one bit of the ciphertext
    send_from(lab, 2, lab.address(2), lab.address(1), [bytes(altered)])
    wait_for(lambda: drops(lab, 1)["auth_failed"] > before["auth_failed"], 10, "the altered datagram to be counted")
    after = drops(lab, 1)
    assert after["replayed"] - before["replayed"] == 1 and after["auth_failed"] - before["auth_failed"] == 1
    assert ping(lab, 2, overlay_ip(1)).returncode == 0  # the session is untouched, and in order after them:
    assert in_echos(lab, 1) - echos == 1  # only that ping's request reached host 1's kernel


def test_a_host_whose_registry_key_is_an_impostors_exchanges_no_frame(enc: EtcdWorld) -> None:
    """hosts/h3 keeps its address and lease but names an impostor's key: the registry says X,
    host 3 holds Y. Hosts 1 and 2 handshake to X at once, which host 3 cannot answer (it rejects
    them); the sessions made with the old key are dropped when no session with X is made within
    the rekey timeout (5 s), and nothing crosses after that until the genuine key is back."""
    lab = enc.lab
    for src, dst in ((1, 3), (3, 1), (2, 3)):
        wait_ping(lab, src, overlay_ip(dst))
    key = f"{P}/hosts/h3"
    genuine = enc.etcdctl("get", "--print-value-only", key).stdout.strip()
    value = json.loads(genuine)
    impostor = impostor_key()
    value["pubkey"] = impostor
    rejected_3, unsent_1 = handshakes(lab, 3)["rejected"], drops(lab, 1)["no_session"]
    enc.etcdctl("put", "--ignore-lease", key, json.dumps(value))
    try:
        for h in (1, 2):
            wait_for(
                lambda h=h: session(lab, h, 3).get("key") == fingerprint(parse_public(impostor)),
                10,
                f"host {h} to take the impostor's key for host 3",
            )
        for h in (1, 2):  # the old key's sessions go once X answered nothing for the rekey timeout
            wait_for(
                lambda h=h: session(lab, h, 3).get("state") != "established", 15, f"host {h} to drop host 3's sessions"
            )
        received_3 = {h: session(lab, 3, h)["rx_messages"] for h in (1, 2)}
        pings = {
            (src, dst): lab.spawn(src, PING_2S + [overlay_ip(dst)], stdout=subprocess.PIPE, text=True)
            for src, dst in ((1, 3), (3, 1), (2, 3))
        }
        for (src, dst), proc in pings.items():
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode != 0 and " 0 received" in out, (src, dst, out)
        wait_for(lambda: handshakes(lab, 3)["rejected"] > rejected_3, 10, "host 3 to reject the handshakes for X")
        for h in (1, 2):
            assert session(lab, h, 3)["state"] != "established"
            assert session(lab, 3, h)["rx_messages"] == received_3[h]  # not one datagram opened on host 3
        assert drops(lab, 1)["no_session"] > unsent_1  # host 1 held its frames for host 3 back
        wait_ping(lab, 1, overlay_ip(2))  # the others are unaffected
    finally:
        enc.etcdctl("put", "--ignore-lease", key, genuine)
    for src, dst in ((1, 3), (3, 1), (2, 3), (3, 2)):
        wait_ping(lab, src, overlay_ip(dst))  # the genuine key back: new sessions


def test_a_malformed_pubkey_in_etcd_is_refused_and_the_agent_keeps_running(enc: EtcdWorld) -> None:
    lab = enc.lab
    before = status(lab, 1)["registry"]["refused"]
    key = f"{P}/hosts/h9"
    enc.etcdctl("put", key, json.dumps({"address": "198.18.0.9", "port": 4789, "pubkey": "not-base64!"}))
    try:
        wait_for(lambda: status(lab, 1)["registry"]["refused"] > before, 10, "the bad host value to be refused")
        assert all(p.poll() is None for p in enc.agents.values())
        assert "198.18.0.9:4789" not in {s["peer"] for s in status(lab, 1)["encryption"]["sessions"]}
        log = enc.log(1)
        assert f"ignoring {key}" in log and "pubkey" in log and "Traceback" not in log
        wait_ping(lab, 1, overlay_ip(2))
    finally:
        enc.etcdctl("del", key)


# --- static mode: two hosts with each other's keys on the command line -----------------------


def static_flags(lab: Lab, keys: Path, host: int) -> list[str]:
    """``host``'s flags in a static pair whose keys are ``keys``/h1.key and h2.key."""
    peer = 3 - host
    public = encode(public_of(load(keys / f"h{peer}.key")))
    return ["--encrypt", "--key-file", str(keys / f"h{host}.key"), "--peer-key", f"{lab.address(peer)}={public}"]


def static_pair(lab: Lab, keys: Path, *extra: str) -> dict[int, subprocess.Popen[Any]]:
    """Agents on hosts 1 and 2 of ``lab``, each with its new key and the other's public key."""
    for h in (1, 2):
        write_key(keys / f"h{h}.key")
    return {h: start_agent(lab, h, [3 - h], *static_flags(lab, keys, h), *extra, log_dir=keys) for h in (1, 2)}


STREAM_SOURCE = """
import hashlib, json, random, socket, sys, time
block = random.Random(6).randbytes(1 << 16)
h, sent = hashlib.sha256(), 0
end = time.monotonic() + float(sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    while time.monotonic() < end:
        s.sendall(block)
        h.update(block)
        sent += len(block)
print(json.dumps({"sha256": h.hexdigest(), "bytes": sent}), flush=True)
"""

STREAM_SINK = """
import hashlib, json, socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
srv.settimeout(30)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
h, n, gaps, last, start = hashlib.sha256(), 0, [0.0], None, time.monotonic()
intervals = {}  # 0.5 s intervals since the connection came -> bytes received in it
while chunk := conn.recv(1 << 16):
    now = time.monotonic()
    if last is not None:
        gaps.append(now - last)
    last = now
    h.update(chunk)
    n += len(chunk)
    i = int((now - start) / 0.5)
    intervals[i] = intervals.get(i, 0) + len(chunk)
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "max_gap": max(gaps), "intervals": intervals}), flush=True)
"""


def test_rekeying_under_a_running_tcp_stream_loses_nothing_and_never_stalls_it(labs: Labs, tmp_path: Path) -> None:
    lab = labs(hosts=2, prefix="xr")
    static_pair(lab, tmp_path, "--rekey-after", "3")
    wait_ping(lab, 1, overlay_ip(2))
    before = {h: handshakes(lab, h)["rekeys"] for h in (1, 2)}
    sink = lab.spawn(2, [sys.executable, "-c", STREAM_SINK, overlay_ip(2), "5003"], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
    sent = json.loads(lab.run(1, [sys.executable, "-c", STREAM_SOURCE, overlay_ip(2), "5003", "16"], timeout=60).stdout)
    out, _ = sink.communicate(timeout=30)
    got = json.loads(out)
    assert (got["sha256"], got["bytes"]) == (sent["sha256"], sent["bytes"]) and sent["bytes"] > 16 << 20
    carried = {int(k) for k, v in got["intervals"].items() if v > 0}
    assert set(range(max(carried) + 1)) == carried, sorted(got["intervals"].items())  # every 0.5 s carried data
    assert got["max_gap"] < 1.0, got["max_gap"]
    rekeys = {h: handshakes(lab, h)["rekeys"] - before[h] for h in (1, 2)}
    initiator = max(rekeys, key=lambda h: rekeys[h])
    assert rekeys[initiator] >= 2, rekeys
    assert session(lab, initiator, 3 - initiator)["rekeys"] >= 2


RENEGOTIATE = 20  # s: WireGuard starts a new handshake 15 s after data that got no answer


@pytest.mark.parametrize("first", ["restarted", "survivor"])
def test_an_agent_restart_renegotiates_a_session(labs: Labs, tmp_path: Path, first: str) -> None:
    """Host 2's agent stops and starts again with the same key, while host 1 still holds the
    session of the old one, whose datagrams the new agent cannot open. "restarted": host 2 sends
    first, so it starts the handshake. "survivor": host 2 sends nothing of its own (IPv6 off, so
    its new TAP does not even announce itself: a host whose containers only answer) and host 1
    pings it: host 1 has to find out that its session is dead and make a new one."""
    lab = labs(hosts=2, prefix="xs")
    agents = static_pair(lab, tmp_path)
    wait_ping(lab, 1, overlay_ip(2))
    completed = handshakes(lab, 1)["completed"]
    old = session(lab, 1, 2)
    assert old["state"] == "established"
    if first == "survivor":
        for which in ("all", "default"):
            lab.run(2, ["sysctl", "-q", "-w", f"net.ipv6.conf.{which}.disable_ipv6=1"])
    assert stop_agent(agents[2]) == 0
    start_agent(lab, 2, [1], *static_flags(lab, tmp_path, 2), log_dir=tmp_path)  # the same key
    src, dst = (2, 1) if first == "restarted" else (1, 2)
    try:
        wait_ping(lab, src, overlay_ip(dst), timeout=RENEGOTIATE)
    except TimeoutError:
        pytest.fail(
            f"no ping from host {src} to host {dst} within {RENEGOTIATE} s of the restart: host 1 still "
            f"seals with {session(lab, 1, 2)}, handshakes {handshakes(lab, 1)}; host 2 dropped "
            f"{drops(lab, 2)['auth_failed']} datagrams as auth_failed, its session {session(lab, 2, 1)}"
        )
    wait_ping(lab, dst, overlay_ip(src))
    assert handshakes(lab, 1)["completed"] > completed  # a new session, with the same key
    assert handshakes(lab, 2)["completed"] >= 1 and session(lab, 2, 1)["state"] == "established"
    assert session(lab, 1, 2)["state"] == "established" and session(lab, 1, 2)["key"] == old["key"]


# --- a plaintext network next to an encrypted one, with a kernel vxlan device ------------------

KERNEL = 3


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[EtcdWorld]:
    """Hosts 1 and 2 run one agent each serving network 42 (encrypted) and 43 (plaintext) on one
    port; host 3 runs a kernel vxlan device on VNI 43, declared in etcd as a host of network 43
    (no pubkey: it cannot encrypt) by an operator."""
    with new_lab_with_etcd(hosts=3, prefix="xk") as (lab, etcd):
        r = EtcdWorld(lab, etcd, tmp_path)
        try:
            r.admin("net", "create", "42", "--encrypted", "--subnet", "198.19.42.0/24")
            r.admin("net", "create", "43", "--subnet", "198.19.43.0/24")
            k = str(lab.address(KERNEL))
            r.etcdctl("put", f"{P}/hosts/h{KERNEL}", json.dumps({"address": k, "port": 4789}))
            r.etcdctl("put", f"{P}/networks/43/members/h{KERNEL}", "{}")
            for h in (1, 2):
                argv = [
                    sys.executable,
                    "-m",
                    "overlay",
                    "agent",
                    "--etcd",
                    etcd.endpoint,
                    "--host-id",
                    f"h{h}",
                    "--local",
                    str(lab.address(h)),
                    "--network",
                    "42",
                    "--network",
                    "43",
                    "--tap",
                    "ovl",
                    "--state-dir",
                    str(r.state_dir),
                ]
                r.start(h, argv=argv, tap="ovl-42")
                for vni in (42, 43):
                    lab.run(h, ["ip", "addr", "add", f"198.19.{vni}.{h}/24", "dev", f"ovbr{vni}"])
            vx = ["ip", "link", "add", "vx0", "type", "vxlan", "id", "43", "dstport", "4789", "local", k, "nolearning"]
            lab.run(KERNEL, vx)
            for h in (1, 2):
                lab.run(
                    KERNEL, ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", str(lab.address(h))]
                )
            lab.run(KERNEL, ["ethtool", "-K", "vx0", "tx", "off"])  # finished inner checksums: test_interop.py
            lab.run(KERNEL, ["ip", "link", "set", "vx0", "mtu", str(ENCRYPTED_MTU), "up"])
            lab.run(KERNEL, ["ip", "addr", "add", "198.19.43.3/24", "dev", "vx0"])
            yield r
        finally:
            r.close()


def test_a_plaintext_network_next_to_an_encrypted_one_still_interoperates_with_kernel_vxlan(
    mixed: EtcdWorld, tmp_path: Path
) -> None:
    lab = mixed.lab
    wait_ping(lab, 1, "198.19.42.2")  # network 42, sealed
    for src, dst in ((1, "198.19.43.3"), (KERNEL, "198.19.43.1"), (2, "198.19.43.3"), (KERNEL, "198.19.43.2")):
        wait_ping(lab, src, dst)
    data = tmp_path / "payload"
    data.write_bytes(random.Random(43).randbytes(4 << 20))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    assert tcp_transfer(lab, KERNEL, 1, "198.19.43.1", data) == (expected, 4 << 20)
    assert tcp_transfer(lab, 1, KERNEL, "198.19.43.3", data) == (expected, 4 << 20)
    s = status(lab, 1, tap="ovl-42")
    assert s["encryption"]["networks"] == [42]
    sealed = session(lab, 1, 2, tap="ovl-42")
    assert sealed["state"] == "established" and sealed["tx_messages"] > 0
    assert s["drops"]["not_encrypted"] == 0  # the kernel's plaintext is for 43, which is plaintext


# --- bad input ---------------------------------------------------------------------------------


def agent_alone(*flags: str) -> subprocess.CompletedProcess[str]:
    """`overlay agent` with flags it refuses before touching any device or socket."""
    return subprocess.run(
        [sys.executable, "-m", "overlay", "agent", "--vni", "42", "--local", "198.18.0.1", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_a_key_file_others_can_read_is_refused_in_one_line_saying_chmod_600(tmp_path: Path) -> None:
    key = tmp_path / "static.key"
    write_key(key)
    key.chmod(0o644)
    peer = impostor_key()
    result = agent_alone(
        "--peer", "198.18.0.2", "--encrypt", "--key-file", str(key), "--peer-key", f"198.18.0.2={peer}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(key) in result.stderr and "chmod 600" in result.stderr
    assert key.stat().st_mode & 0o777 == 0o644  # not "fixed" behind the operator's back


@pytest.mark.parametrize(
    "peer_key",
    [
        "198.18.0.2=not-a-key",
        "198.18.0.2",
        "198.18.0.2=" + "A" * 43 + "=",  # 32 zero bytes: not a real key
        "198.18.0.2=" + encode(bytes(range(32)))[:-2] + "==",  # base64, but of 31 bytes
        "198.18.0.300=" + encode(bytes(range(32))),
        "198.18.0.3=" + encode(bytes(range(32))),  # not one of the --peer addresses
    ],
)
def test_a_peer_key_that_does_not_parse_is_refused_in_one_line(tmp_path: Path, peer_key: str) -> None:
    key = tmp_path / "static.key"
    write_key(key)
    result = agent_alone("--peer", "198.18.0.2", "--encrypt", "--key-file", str(key), "--peer-key", peer_key)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "peer_key" in result.stderr, result.stderr


def test_a_running_host_rotates_its_key_without_losing_a_datagram(enc: EtcdWorld) -> None:
    """`overlay key rotate` on host 2 while host 1 pings it 200 times: every echo answered, the
    new key published (host ls), written to the key file, and the peers' sessions made with it."""
    lab = enc.lab
    for src, dst in ((1, 2), (2, 1), (3, 2)):
        wait_ping(lab, src, overlay_ip(dst))
    before = session(lab, 1, 2)["key"]
    pinger = lab.spawn(
        1, ["ping", "-n", "-c", "200", "-i", "0.02", "-W", "1", overlay_ip(2)], stdout=subprocess.PIPE, text=True
    )
    assert pinger.stdout is not None
    assert pinger.stdout.readline().startswith("PING") and "bytes from" in pinger.stdout.readline()  # it runs
    rotated = lab.run(2, [sys.executable, "-m", "overlay", "key", "rotate", "--json"], check=False, timeout=30)
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    out, _ = pinger.communicate(timeout=60)
    assert "200 received" in out, out
    assert new["fingerprint"] != before
    assert fingerprint(public_of(load(new["key_file"]))) == new["fingerprint"]  # written, mode 0600
    assert new["fingerprint"] in enc.admin("host", "ls").stdout
    for h in (1, 3):
        wait_for(lambda h=h: session(lab, h, 2).get("key") == new["fingerprint"], 10, f"host {h} to know the new key")
        wait_ping(lab, h, overlay_ip(2))
        wait_for(
            lambda h=h: session(lab, h, 2).get("state") == "established", 10, f"host {h}'s session with the new key"
        )
