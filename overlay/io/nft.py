"""The agent's nftables table, ``inet overlay``, applied with the ``nft`` command, and the
sysctls NAT depends on (net.ipv4.ip_forward, net.bridge.bridge-nf-call-iptables, ...).

Thin: the table's contents come from overlay/core/nat.py as an ``nft -f`` script, which ``apply``
hands to ``nft`` on stdin. nft runs a script as one transaction: it applies all of it or
nothing, so when ``apply`` fails the table stays exactly as it was. Everything here acts on the
caller's network namespace (``nft`` inherits the calling thread's), is synchronous (the agent
calls it through asyncio.to_thread) and bounded in time. Failures are NftError with one line:
nft's first error, and the fix.
"""

from __future__ import annotations

import json
import subprocess

from overlay.core import nat

TIMEOUT = 10.0  # seconds for one nft command
NFT = "nft"


class NftError(RuntimeError):
    """nft failed, or a sysctl could not be read or set; the message is one line with the fix."""


def _first_error(stderr: str) -> str:
    """nft's first error line, with the script line it points at (``/dev/stdin:3:1-5: Error:
    ...`` is followed by that line and a line of carets)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Error:" in line:
            shown = lines[i + 1] if i + 1 < len(lines) and line.startswith("/dev/stdin:") else ""
            return f"{line} (in: {shown[:100]})" if shown else line
    return lines[0] if lines else "no error message"


def _hint(message: str) -> str:
    if "Operation not permitted" in message or "must be root" in message:
        return "the agent needs CAP_NET_ADMIN (run it as root)"
    if "Operation not supported" in message or "Could not process rule" in message:
        return "the kernel refused it: is an nftables module missing (nft_nat, nft_masq, nft_fib_inet, nft_ct)?"
    return "this is a bug in overlay if the script came from it: report it with the output of 'nft -c -f'"


def _run(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``nft`` with ``args`` (``script`` on stdin); NftError if it cannot be run at all."""
    try:
        return subprocess.run([NFT, *args], input=script, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        raise NftError("nft is not installed: install Debian's nftables package ('apt-get install nftables')") from None
    except PermissionError as e:
        raise NftError(f"cannot run nft ({e.strerror}): the agent needs CAP_NET_ADMIN (run it as root)") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"'nft {' '.join(args)}' did not finish within {TIMEOUT:g} s: is netlink wedged?") from None


def _checked(args: list[str], what: str, script: str | None = None) -> str:
    result = _run(args, script)
    if result.returncode != 0:
        error = _first_error(result.stderr)
        raise NftError(f"{what}: {error}; {_hint(error)}")
    return result.stdout


def available() -> str | None:
    """None if ``nft`` can be run here (and may read the ruleset), else the one-line reason."""
    try:
        _checked(["list", "tables"], "nft cannot list the tables")
    except NftError as e:
        return str(e)
    return None


def check(script: str) -> None:
    """``nft -c``: NftError if nft would refuse ``script``; nothing is changed."""
    _checked(["-c", "-f", "-"], "nft refuses the overlay table", script)


def apply(script: str) -> None:
    """Run ``script`` (from overlay.core.nat) as one nft transaction; on NftError nothing changed."""
    _checked(["-f", "-"], "nft refused the overlay table (the previous one stays)", script)


def table_json() -> object | None:
    """``nft -j list table inet overlay``, parsed; None if there is no such table."""
    result = _run(["-j", "list", "table", nat.FAMILY, nat.TABLE])
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return None
        error = _first_error(result.stderr)
        raise NftError(f"nft cannot list table {nat.FAMILY} {nat.TABLE}: {error}; {_hint(error)}")
    return _parse(result.stdout)


def remove() -> bool:
    """Delete table ``inet overlay``; True if it was there."""
    if table_json() is None:
        return False
    _checked(["-f", "-"], "nft cannot delete the overlay table", nat.removal())
    return True


def ruleset_json() -> object:
    """``nft -j list ruleset``, parsed (for overlay.core.nat.firewall_problems)."""
    return _parse(_checked(["-j", "list", "ruleset"], "nft cannot list the ruleset"))


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as e:
        raise NftError(f"nft printed JSON that does not parse ({e}): is nft older than 0.9?") from None


def _path(name: str) -> str:
    return "/proc/sys/" + (name if "/" in name else name.replace(".", "/"))


def sysctl(name: str) -> str | None:
    """The value of sysctl ``name`` (e.g. "net.ipv4.ip_forward") in this network namespace;
    None if there is none (e.g. net.bridge.* without br_netfilter)."""
    try:
        with open(_path(name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NftError(f"cannot read {name} ({e.strerror}): is /proc mounted?") from None


def set_sysctl(name: str, value: str) -> None:
    """Set sysctl ``name`` to ``value`` in this network namespace; NftError with the fix."""
    try:
        with open(_path(name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        raise NftError(f"there is no sysctl {name} on this host: is the kernel module loaded?") from None
    except OSError as e:
        raise NftError(
            f"cannot set {name}={value} ({e.strerror}): the agent needs root and /proc/sys mounted writable"
        ) from None
