"""The agent's local control socket: `overlay status` and `overlay fdb` ask, the agent answers.

An abstract unix socket ("@overlay/<tap>"), because abstract names belong to the network
namespace: `overlay status` run inside a namespace reaches that namespace's agent, and agents
in different namespaces never collide (a file under /run would be shared by all of them).
Protocol: one JSON request line {"cmd": "status" | "fdb"}, one JSON answer line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any, Callable

PREFIX = "overlay/"
log = logging.getLogger("overlay.control")
MAX_REQUEST = 4096


class ControlError(RuntimeError):
    """No agent answered; the message says which were looked for."""


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


async def serve(tap: str, handlers: dict[str, Callable[[], Any]]) -> asyncio.AbstractServer:
    """Answer requests for ``tap``'s agent; an unknown command gets {"error": ...}."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            try:
                cmd = json.loads(line[:MAX_REQUEST]).get("cmd")
            except (ValueError, AttributeError):
                cmd = None
                answer: Any = {"error": "send one JSON object line like {\"cmd\": \"status\"}"}
            else:
                handler = handlers.get(cmd) if isinstance(cmd, str) else None
                try:
                    answer = handler() if handler else {"error": f"unknown command {cmd!r}; known: {sorted(handlers)}"}
                except Exception as e:  # a bug must not cost the client its answer
                    log.exception("control command %r failed", cmd)
                    answer = {"error": f"the agent failed to answer {cmd!r}: {e}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_unix_server(on_client, path=address(tap))
    except OSError as e:
        raise ControlError(f"control socket @{PREFIX}{tap} is taken: is an agent for {tap} already running here? ({e.strerror})") from None


def request(cmd: str, tap: str | None = None, timeout: float = 5.0) -> Any:
    """Ask the agent of ``tap`` (or the only agent in this namespace) and return its answer."""
    if tap is None:
        agents = running_agents()
        if not agents:
            raise ControlError("no overlay agent is running in this network namespace (start one with 'overlay agent')")
        if len(agents) > 1:
            raise ControlError(f"several agents run here ({', '.join(agents)}): choose one with --tap")
        tap = agents[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(address(tap))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no overlay agent for TAP {tap} in this network namespace") from None
        try:
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
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
        raise ControlError(answer["error"])
    return answer
