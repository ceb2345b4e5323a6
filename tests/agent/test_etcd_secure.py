"""An agent against a real etcd that wants TLS with client certificates, and user/password auth."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from overlay.lab import Lab, wait_for
from overlay.lab import etcd as etcdlab
from tests.labkit import Labs, etcd_agent_argv, overlay_ip, start_agent, status, wait_ping

pytestmark = [pytest.mark.root, pytest.mark.etcd]  # and openssl: scripts/setup installs it
ADDRESS = "198.18.0.250"


def make_certs(d: Path) -> dict[str, str]:
    """A CA, a server certificate for ADDRESS and a client certificate, all made here."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=overlay test CA",
    )
    for name, ext in (("server", f"subjectAltName=IP:{ADDRESS}"), ("client", "extendedKeyUsage=clientAuth")):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    return {n: str(d / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def secure_etcd(lab: Lab, certs: dict[str, str]) -> etcdlab.EtcdServer:
    lab.add_service("etcd1", 250)
    url = f"https://{ADDRESS}:2379"
    etcd = etcdlab.EtcdServer(
        "etcd1",
        lab=lab,
        extra_args=[
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--cert-file",
            certs["server.pem"],
            "--key-file",
            certs["server.key"],
            "--client-cert-auth",
            "--trusted-ca-file",
            certs["ca.pem"],
        ],
    )
    etcd.start()
    wait_for(lambda: ctl(etcd, certs, "endpoint", "health").returncode == 0, 20, "etcd with TLS to be healthy")
    return etcd


def ctl(etcd: etcdlab.EtcdServer, certs: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return etcdlab.etcdctl(
        f"https://{ADDRESS}:2379",
        "--cacert",
        certs["ca.pem"],
        "--cert",
        certs["client.pem"],
        "--key",
        certs["client.key"],
        *args,
        namespace=etcd.namespace,
    )


def test_agents_over_tls_with_client_certificates(labs: Labs, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    lab = labs(hosts=2, prefix="s")
    etcd = secure_etcd(lab, certs)
    try:
        tls = ["--etcd-ca", certs["ca.pem"], "--etcd-cert", certs["client.pem"], "--etcd-key", certs["client.key"]]
        for h in (1, 2):
            start_agent(lab, h, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, h, [f"https://{ADDRESS}:2379"], *tls))
        wait_ping(lab, 1, overlay_ip(2))
        assert status(lab, 1)["registry"]["connected"]
        assert "/overlay/v1/hosts/h2" in ctl(etcd, certs, "get", "--prefix", "--keys-only", "/overlay").stdout
        # Without the client certificate etcd refuses, and the agent says so in one line.
        argv = etcd_agent_argv(
            lab, 1, [f"https://{ADDRESS}:2379"], "--etcd-ca", certs["ca.pem"], "--tap", "ovl3", "--port", "4791"
        )
        argv[argv.index("h1")] = "h9"
        refused = lab.run(1, argv, check=False, timeout=90)
        assert refused.returncode == 1 and "no etcd answered" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        etcd.stop()


def test_agents_with_user_and_password(labs: Labs, tmp_path: Path) -> None:
    lab, etcd = labs.with_etcd(hosts=2, prefix="u")
    for args in (("user", "add", "root:rootpw"), ("user", "grant-role", "root", "root"), ("auth", "enable")):
        etcdlab.etcdctl(etcd, *args, check=True)
    auth = ["--etcd-user", "root", "--etcd-password", "rootpw"]
    for h in (1, 2):
        start_agent(lab, h, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, h, [etcd.endpoint], *auth))
    wait_ping(lab, 1, overlay_ip(2))
    argv = etcd_agent_argv(
        lab,
        1,
        [etcd.endpoint],
        "--etcd-user",
        "root",
        "--etcd-password",
        "wrong",
        "--tap",
        "ovl3",
        "--port",
        "4791",
    )
    refused = lab.run(1, argv, check=False, timeout=60)
    assert refused.returncode == 1 and "refused the user name or password" in refused.stderr


def test_operator_commands_over_tls(labs: Labs, tmp_path: Path) -> None:
    import sys

    certs = make_certs(tmp_path)
    lab = labs(hosts=1, prefix="t")
    etcd = secure_etcd(lab, certs)
    try:
        tls = [
            "--etcd",
            f"https://{ADDRESS}:2379",
            "--etcd-ca",
            certs["ca.pem"],
            "--etcd-cert",
            certs["client.pem"],
            "--etcd-key",
            certs["client.key"],
        ]
        overlay = [sys.executable, "-m", "overlay"]
        lab.run(1, [*overlay, "net", "create", "42", *tls])
        assert '"vni": 42' in lab.run(1, [*overlay, "net", "ls", "--json", *tls]).stdout
    finally:
        etcd.stop()


def test_a_role_limited_to_the_prefix_is_enough_and_a_role_without_it_is_refused_at_once(
    labs: Labs, tmp_path: Path
) -> None:
    """Least privilege as deploy/etcd/README.md sets it up: readwrite on <prefix>/ and nothing else."""
    lab, etcd = labs.with_etcd(hosts=2, prefix="r")
    for args in (
        ("user", "add", "root:rootpw"),
        ("user", "grant-role", "root", "root"),
        ("role", "add", "overlay"),
        ("role", "grant-permission", "overlay", "readwrite", "--prefix=true", "/overlay/v1/"),
        ("user", "add", "agent:agentpw"),
        ("user", "grant-role", "agent", "overlay"),
        ("user", "add", "nobody:nobodypw"),
        ("auth", "enable"),
    ):
        etcdlab.etcdctl(etcd, *args, check=True)
    auth = ["--etcd-user", "agent", "--etcd-password", "agentpw"]
    for h in (1, 2):
        start_agent(lab, h, [], log_dir=tmp_path, argv=etcd_agent_argv(lab, h, [etcd.endpoint], *auth))
    wait_ping(lab, 1, overlay_ip(2))
    argv = etcd_agent_argv(
        lab,
        1,
        [etcd.endpoint],
        "--etcd-user",
        "nobody",
        "--etcd-password",
        "nobodypw",
        "--tap",
        "ovl3",
        "--port",
        "4791",
        "--host-id",
        "h9",
    )
    refused = lab.run(1, argv, check=False, timeout=60)
    assert refused.returncode == 1 and "denied access under /overlay/v1/" in refused.stderr
