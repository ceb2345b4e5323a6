"""A host's key file (overlay/io/keys.py): created once with mode 0600 in a 0700 directory,
loaded as it is after that, and refused, in one line saying how to fix it, when others may
read it, when it is not a file or when it holds no key."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest

from overlay.core.keys import encode, public_of
from overlay.io import keys
from overlay.io.keys import KeyFileError, key_path, load, load_or_create, write


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_path_is_the_host_id_in_the_state_dir() -> None:
    assert key_path("/run/overlay", "h1") == Path("/run/overlay/h1.key")
    assert key_path("/var/lib/overlay", None) == Path("/var/lib/overlay/static.key")


def test_created_once_0600_in_a_new_0700_directory_then_loaded_as_it_is(tmp_path: Path) -> None:
    old_umask = os.umask(0o000)  # a careless umask changes nothing
    try:
        path = tmp_path / "state" / "deeper" / "h1.key"
        private = load_or_create(path)
    finally:
        os.umask(old_umask)
    assert len(private) == 32 and len(public_of(private)) == 32
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(path.parent.parent) == 0o700
    assert path.read_text() == encode(private) + "\n"  # what wg genkey prints
    assert load_or_create(path) == private and load(path) == private
    assert sorted(p.name for p in path.parent.iterdir()) == ["h1.key"]  # no temporary file left


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create(tmp_path / "static.key")
    assert mode(tmp_path) == 0o755


def test_a_wg_style_key_file_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    private = keys.generate_private()
    path.write_text(encode(private) + "\n")
    path.chmod(0o600)
    assert load_or_create(path) == private
    path.write_text("  " + encode(private) + "\r\n\n")  # surrounding whitespace is not the key
    assert load(path) == private


def test_two_at_once_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and load(path) == results[0]


@pytest.mark.parametrize(
    ("file_mode", "message"),
    [
        (0o644, "is readable by others (mode 0644): chmod 600 "),
        (0o640, "is readable by its group (mode 0640): chmod 600 "),
        (0o660, "is readable and writable by its group (mode 0660): chmod 600 "),
        (0o602, "is writable by others (mode 0602): chmod 600 "),
    ],
)
def test_a_file_others_may_read_or_write_is_refused_with_the_chmod_that_fixes_it(
    tmp_path: Path, file_mode: int, message: str
) -> None:
    path = tmp_path / "h1.key"
    load_or_create(path)
    path.chmod(file_mode)
    for call in (load, load_or_create):
        with pytest.raises(KeyFileError) as e:
            call(path)
        assert str(e.value) == f"{path} {message}{path}" and e.value.kind == "unsafe"
    path.chmod(0o600)
    assert load(path)
    path.chmod(0o700)  # execute bits give nothing away
    assert load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "private key is empty"),
        (b"hello\n", "private key is not base64"),
        (b"\xff\xfe\n", "private key is not base64 (not even ASCII text)"),
        (b"AAAA\n", "private key is 3 bytes, not 32"),
        (encode(bytes(32)).encode() + b"\n", "private key is all zeros"),
        (b"[Interface]\nPrivateKey = x\n", "private key is not base64"),
        (b"A" * 5000, "more than 4096 bytes"),
    ],
)
def test_a_file_that_holds_no_key_is_refused_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "h1.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=re.escape(message)) as e:
        load_or_create(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value) and e.value.kind == "invalid"
    assert path.read_bytes() == content  # never replaced behind the operator's back


def test_what_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir()
    os.mkfifo(tmp_path / "fifo.key")
    for name, what in (("dir.key", "a directory"), ("fifo.key", "a pipe")):
        with pytest.raises(KeyFileError, match=f"is not a regular file \\({what}\\)") as e:
            load_or_create(tmp_path / name)
        assert e.value.kind == "unsafe"


def test_a_symlink_to_a_good_key_file_is_followed(tmp_path: Path) -> None:
    private = load_or_create(tmp_path / "real.key")
    (tmp_path / "link.key").symlink_to(tmp_path / "real.key")
    assert load(tmp_path / "link.key") == private


def test_missing_and_write(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    with pytest.raises(KeyFileError, match="does not exist") as e:
        load(path)
    assert e.value.kind == "missing" and not path.exists()  # load creates nothing
    first, second = keys.generate_private(), keys.generate_private()
    write(path, first)
    with pytest.raises(KeyFileError, match="exists") as e:
        write(path, second)
    assert e.value.kind == "exists" and load(path) == first
    path.chmod(0o644)
    write(path, second, replace=True)  # the old file is replaced whole, with a safe mode
    assert load(path) == second and mode(path) == 0o600


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyFileError, match="Not a directory") as e:
        load_or_create(tmp_path / "file" / "h1.key")
    assert e.value.kind == "os" and "\n" not in str(e.value)
