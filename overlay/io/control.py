"""The agent's local control socket: `overlay status` and `overlay fdb` ask, the agent answers.

An abstract unix socket ("@overlay/<tap>"), because abstract names belong to the network
namespace: `overlay status` run inside a namespace reaches that namespace's agent, and agents
in different namespaces never collide (a file under /run would be shared by all of them).
Protocol: one JSON request line {"cmd": <name>, ...parameters}, one JSON answer line; a refusal
is {"error": <one line>, "kind": <what was wrong, or null>}.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import struct
from typing import Any, Awaitable, Callable, Union

from overlay.core.control import Refused as Refused  # handlers raise it; callers may spell it control.Refused

PREFIX = "overlay/"
log = logging.getLogger("overlay.control")
MAX_REQUEST = 4096


class ControlError(RuntimeError):
    """No agent answered, or it refused; the message says why. ``kind`` says what was wrong when
    the agent refused ("netns": no such namespace, "network": network unknown or not joined,
    "address": outside the subnet, in use or none left, "invalid": a bad request, "unknown": no
    such attachment, "broken": check found it damaged, "etcd": the registry is unreachable,
    "permission": the caller is not root) or "agent" when no agent answers; callers
    such as the CNI plugin map it to codes."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


Handler = Callable[[dict[str, Any]], Union[Any, Awaitable[Any]]]


def address(tap: str) -> str:
    return "\0" + PREFIX + tap


def running_agents() -> list[str]:
    """TAP names of the agents listening in this network namespace (from /proc/net/unix)."""
    taps = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith("@" + PREFIX):
                taps.add(parts[7][len(PREFIX) + 1 :])
    return sorted(taps)


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user id of the process at the other end of a unix socket (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return None
    return int(uid)


async def serve(
    tap: str, handlers: dict[str, Handler], privileged: frozenset[str] = frozenset()
) -> asyncio.AbstractServer:
    """Answer requests for ``tap``'s agent: each handler gets the request's parameters and may
    be a coroutine; an unknown command gets {"error": ...}. Commands in ``privileged`` change
    the host (attach plugs interfaces into namespaces): only root or the agent's own user may
    ask them; anyone may ask status (an abstract socket has no file permissions)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=5)
            except ValueError:  # longer than the reader's limit
                line = b"too long"
            try:
                request = json.loads(line[:MAX_REQUEST])
                cmd = request.pop("cmd")
            except (ValueError, AttributeError, KeyError, TypeError):
                cmd = None
                answer: Any = {"error": 'send one JSON object line like {"cmd": "status"}', "kind": "invalid"}
            else:
                handler = handlers.get(cmd) if isinstance(cmd, str) else None
                try:
                    if cmd in privileged and peer_uid(writer) not in (0, os.geteuid()):
                        raise Refused(f"{cmd} needs root (it changes network namespaces)", "permission")
                    if handler is None:
                        answer = {"error": f"unknown command {cmd!r}; known: {sorted(handlers)}", "kind": "invalid"}
                    else:
                        answer = handler(request)
                        if inspect.isawaitable(answer):
                            answer = await answer
                except Refused as e:
                    answer = {"error": str(e), "kind": e.kind}
                except Exception as e:  # a bug must not cost the client its answer
                    log.exception("control command %r failed", cmd)
                    answer = {"error": f"the agent failed to answer {cmd!r}: {e}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_unix_server(on_client, path=address(tap), limit=MAX_REQUEST)
    except OSError as e:
        raise ControlError(
            f"control socket @{PREFIX}{tap} is taken: is an agent for {tap} already running here? ({e.strerror})"
        ) from None


def request(cmd: str, tap: str | None = None, timeout: float = 5.0, **params: Any) -> Any:
    """Ask the agent of ``tap`` (or the only agent in this namespace) to do ``cmd`` with
    ``params``; its answer, or ControlError with the agent's reason."""
    if tap is None:
        agents = running_agents()
        if not agents:
            raise ControlError(
                "no overlay agent is running in this network namespace (start one with 'overlay agent')", "agent"
            )
        if len(agents) > 1:
            raise ControlError(f"several agents run here ({', '.join(agents)}): choose one with --tap")
        tap = agents[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address(tap))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no overlay agent for TAP {tap} in this network namespace", "agent") from None
        try:
            s.sendall(json.dumps({"cmd": cmd, **params}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as e:  # a wedged agent times out; a dying one resets
            raise ControlError(f"the agent for TAP {tap} did not answer: {e.strerror or e}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the agent for TAP {tap} closed without a valid answer (is it stopping?)") from None
    if isinstance(answer, dict) and "error" in answer:
        raise ControlError(answer["error"], answer.get("kind"))
    return answer
