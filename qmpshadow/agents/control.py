"""A tiny JSON-lines control socket (unix, mode 0600) for a running agent.

Request ``{"cmd": "status"}`` or ``{"cmd": "promote"}``; the answer is one JSON object with
``"ok": true`` and the result, or ``"ok": false`` and ``"error"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QmpShadowError

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 << 10


class ControlServer:
    """Serves ``handlers[cmd](request)`` on a unix socket."""

    def __init__(self, path: str | Path, handlers: dict[str, Handler]) -> None:
        self.path = str(path)
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (replacing a stale socket). Raises ConfigError when it cannot."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_REQUEST)
        except OSError as exc:
            raise ConfigError(f"cannot listen on control socket {self.path}: {exc}") from None
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                handler = self.handlers[req["cmd"]]
                answer = {"ok": True, **await handler(req)}
            except (ValueError, KeyError, TypeError):
                answer = {"ok": False, "error": f"expected one JSON object with cmd in "
                          f"{sorted(self.handlers)}, got {line[:100]!r}"}
            except QmpShadowError as exc:
                answer = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()


async def request(path: str | Path, cmd: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to an agent's control socket and return its answer.

    Raises QmpShadowError when the agent is unreachable, times out or reports an error.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, TimeoutError) as exc:
        raise QmpShadowError(f"no agent answers on control socket {path}: {exc}; is "
                             "`qmpshadow shadow` running with that --control?") from None
    try:
        writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise QmpShadowError(f"agent did not answer {cmd!r} within {timeout} s") from None
    finally:
        writer.close()
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise QmpShadowError(f"agent answered {cmd!r} with {line[:100]!r}") from None
    if not answer.get("ok"):
        raise QmpShadowError(f"{cmd} failed: {answer.get('error')}")
    return answer
