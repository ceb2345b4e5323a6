"""A host's private key file: found, created, checked (overlay/core/keys.py holds the form).

The file holds the base64 private key and a newline (what ``wg genkey`` prints, so either
tool's key works), mode 0600, in a directory that is 0700 when this module creates it. It is
written whole or not at all: a temporary file (mkstemp: O_EXCL, 0600) in the same directory, synced,
then linked into place (``load_or_create``: never over a key another process just wrote) or
renamed over the old one (``write``, for ``overlay key generate --force``).

Loading refuses a file that anyone but its owner may read or write, anything but a regular
file, and content that is not one key, each as a KeyFileError of one line that says how to
fix it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay.core.keys import BadKey, encode, key_file_name, parse_private

MAX_FILE = 4096  # a key file is 45 bytes; anything far larger is not one


class KeyFileError(Exception):
    """A key file that cannot be used, in one line naming it. ``kind``: "missing", "unsafe"
    (mode or type), "invalid" (content), "exists" (not overwritten) or "os" (an OS error)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def key_path(state_dir: str | Path, host_id: str | None) -> Path:
    """``<state_dir>/<host_id>.key``; host id None (static mode): ``<state_dir>/static.key``."""
    return Path(state_dir) / key_file_name(host_id)


def generate_private() -> bytes:
    """A new X25519 private key (32 bytes from the OS's random source)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def load(path: str | Path) -> bytes:
    """The private key in ``path``; KeyFileError if it is missing, unsafe or not a key."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(
                f"{path} is not a regular file ({_kind(st.st_mode)}): a key file holds one base64 private key",
                "unsafe",
            )
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise KeyFileError(f"{path} does not exist", "missing") from None
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}", "os") from None
    try:
        st = os.fstat(fd)  # the file opened, not whatever the name pointed to a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path} is not a regular file ({_kind(st.st_mode)})", "unsafe")
        _check_mode(path, st.st_mode)
        data = os.read(fd, MAX_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}", "os") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise KeyFileError(f"{path}: more than {MAX_FILE} bytes: not a key file (it holds one base64 key)", "invalid")
    try:
        return parse_private(data.decode("ascii").strip())
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: private key is not base64 (not even ASCII text)", "invalid") from None
    except BadKey as e:
        raise KeyFileError(f"{path}: {e}", "invalid") from None


def load_or_create(path: str | Path) -> bytes:
    """The private key in ``path``, created (a new random key) if the file does not exist."""
    path = Path(path)
    try:
        return load(path)
    except KeyFileError as e:
        if e.kind != "missing":
            raise
    private = generate_private()
    if not _install(path, private, replace=False):
        return load(path)  # another process created it meanwhile: that key is the host's
    return private


def write(path: str | Path, private: bytes, replace: bool = False) -> None:
    """Write a key file for ``private``; KeyFileError("exists") if one exists and not ``replace``."""
    path = Path(path)
    if not _install(path, private, replace):
        raise KeyFileError(f"{path} exists", "exists")


def _install(path: Path, private: bytes, replace: bool) -> bool:
    """Put a new key file at ``path`` atomically; False if one appeared there (not ``replace``)."""
    _make_dir(path.parent)
    content = (encode(private) + "\n").encode()
    try:  # O_EXCL, mode 0600, a name of its own
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}", "os") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike rename, never replaces
            except FileExistsError:
                return False
        _sync_dir(path.parent)
        return True
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}", "os") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _make_dir(directory: Path) -> None:
    """Create ``directory`` and missing parents, the new ones 0700."""
    missing = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        except OSError as e:
            raise KeyFileError(f"cannot create directory {d}: {e.strerror}", "os") from None
        os.chmod(d, 0o700)  # whatever the umask
    if not directory.is_dir():
        raise KeyFileError(f"{directory} is not a directory: the key file goes in one", "os")


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_mode(path: Path, mode: int) -> None:
    others = mode & 0o066  # read or write by group or others (execute bits give nothing away)
    if not others:
        return
    what = " and ".join(w for w, bits in (("readable", 0o044), ("writable", 0o022)) if others & bits)
    who = "others" if others & 0o006 else "its group"
    raise KeyFileError(f"{path} is {what} by {who} (mode {stat.S_IMODE(mode):04o}): chmod 600 {path}", "unsafe")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"
