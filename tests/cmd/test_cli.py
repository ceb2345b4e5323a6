"""The `overlay` command as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from overlay import __version__
from overlay.core.keys import fingerprint, parse_private, parse_public, public_of


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
