"""A tiny JSON-lines control socket (unix, mode 0600) for a running agent.

Request ``{"cmd": "status"}``, ``{"cmd": "promote"}`` (shadow agent) or
``{"cmd": "switchover"}`` (source agent; optional ``commit_timeout``/``promote_timeout``);
the answer is one JSON object with ``"ok": true`` and the result, or ``"ok": false`` and
``"error"``.
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
        self._busy: set[asyncio.Task[Any]] = set()

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

    async def close(self, grace: float = 2.0) -> None:
        """Stop listening; requests in flight get ``grace`` seconds to answer."""
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=grace)
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._busy.add(task)  # close() lets a request in flight answer
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                handler = self.handlers[req["cmd"]]
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise TypeError(req)
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
            if task is not None:
                self._busy.discard(task)


async def request(path: str | Path, cmd: str, *, timeout: float = 30.0,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send one command (with ``args``) to an agent's control socket; return its answer.

    Raises QmpShadowError when the agent is unreachable, times out or reports an error.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, TimeoutError) as exc:
        raise QmpShadowError(f"no agent answers on control socket {path}: {exc}; is the "
                             "agent (`qmpshadow shadow`, or `qmpshadow protect` with "
                             "--control) running with that socket?") from None
    try:
        writer.write(json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n")
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
