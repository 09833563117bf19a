"""``qmpshadow stream inspect``: read a stream from a file or a live unix socket and summarise.

A live source may be a COLO primary: the inspector then acts as the COLO secondary
(answers READY, REPLY, RECEIVED, LOADED) for ``max_checkpoints`` checkpoints and then
closes the connection, which leaves the primary running (its next checkpoint request fails
before it stops the VM; ``x-colo-lost-heartbeat`` tidies its COLO state).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QmpShadowError
from ..migstream import StreamParser
from ..migstream.colo import ColoSecondary, encode_colo
from ..migstream.events import ColoVmstate, EndOfStream, Event, _NeedData
from ..migstream.summary import StreamSummary

CHUNK = 4 << 20
ProgressFn = Callable[[int, int | None], None]


def parse_source(source: str) -> tuple[str, str]:
    """Split SOURCE into ("file", path) or ("unix", path). Raises ConfigError."""
    if source.startswith("unix:"):
        path = source[5:]
        if not path:
            raise ConfigError("expected unix:PATH, got an empty path after 'unix:'")
        return "unix", path
    if ":" in source.split("/")[0] and not Path(source).exists():
        raise ConfigError(
            f"unknown source {source!r}: expected a file path or unix:PATH (a socket to "
            "listen on for a migration)")
    return "file", source


def _drain(parser: StreamParser, summary: StreamSummary, sink: Callable[[Event], None] | None
           ) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = parser.next_event()
        if isinstance(ev, _NeedData):
            return out
        summary.feed(ev)
        if sink is not None:
            sink(ev)
        out.append(ev)


def inspect_file(path: str, *, keep_pages: bool = False,
                 progress: ProgressFn | None = None,
                 sink: Callable[[Event], None] | None = None) -> StreamSummary:
    """Summarise a recorded stream file. Raises ConfigError, StreamFormatError."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigError(f"cannot open stream file {path!r}: {exc.strerror}") from None
    summary = StreamSummary(keep_pages=keep_pages)
    parser = StreamParser()
    total = os.fstat(f.fileno()).st_size
    done = 0
    with f:
        while chunk := f.read(CHUNK):
            parser.receive_data(chunk)
            done += len(chunk)
            _drain(parser, summary, sink)
            if progress:
                progress(done, total)
    parser.receive_data(b"")
    _drain(parser, summary, sink)
    return summary


async def inspect_unix(path: str, *, keep_pages: bool = False, max_checkpoints: int = 3,
                       timeout: float = 120.0, on_listen: Callable[[], None] | None = None,
                       progress: ProgressFn | None = None,
                       sink: Callable[[Event], None] | None = None,
                       record_to: str | None = None) -> StreamSummary:
    """Listen on unix socket ``path`` for one migration and summarise it.

    Acts as COLO secondary when the stream enables COLO, for ``max_checkpoints``
    checkpoints. ``record_to`` also writes the received bytes to that file. Raises
    QmpShadowError on timeout, StreamFormatError on bad bytes, ConfigError when the
    recording cannot be written.
    """
    try:
        record = open(record_to, "wb") if record_to else None  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot write recording {record_to!r}: {exc.strerror}") from None
    summary = StreamSummary(keep_pages=keep_pages)
    done = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = StreamParser()
        colo = ColoSecondary()
        received = 0
        try:
            while True:
                chunk = await reader.read(CHUNK)
                if record is not None:
                    record.write(chunk)
                parser.receive_data(chunk)
                received += len(chunk)
                if progress:
                    progress(received, None)
                finished = False
                for ev in _drain(parser, summary, sink):
                    answers = colo.on_event(ev, colo_enabled=parser.colo_enabled)
                    for msg in answers:
                        writer.write(encode_colo(msg))
                    if answers:
                        await writer.drain()
                    if isinstance(ev, ColoVmstate) and colo.checkpoints >= max_checkpoints:
                        finished = True
                    if isinstance(ev, EndOfStream):
                        finished = True
                if finished or not chunk:
                    break
            if not done.done():
                done.set_result(None)
        except (QmpShadowError, OSError) as exc:
            if not done.done():
                done.set_exception(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path)
    try:
        if on_listen:
            on_listen()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            raise QmpShadowError(
                f"no complete migration stream arrived on unix:{path} within {timeout:g} s "
                "(start the migration with migrate uri=unix:PATH, or raise --timeout)"
            ) from None
    finally:
        server.close()
        await server.wait_closed()
        if record is not None:
            record.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return summary


def format_human(doc: dict[str, Any]) -> str:
    """Human-readable report of a summary document."""
    lines = []
    caps = ", ".join(doc["capabilities"]) or "none"
    lines.append(f"stream version {doc['version']}  machine {doc['machine_type']}  "
                 f"page size {doc['page_size']}  capabilities: {caps}")
    secs = doc["sections"]
    lines.append(f"sections: {secs}  commands: "
                 + (", ".join(c["command"] for c in doc["commands"]) or "none")
                 + f"  complete: {doc['complete']}")
    lines.append("")
    lines.append(f"{'RAM block':<28}{'length':>12}{'pages':>10}{'zero':>10}{'xbzrle':>8}"
                 f"{'records':>10}")
    for b in doc["ram_blocks"]:
        recs = b["page_records"] + b["zero_records"] + b["xbzrle_records"]
        lines.append(f"{b['id']:<28}{b['length']:>12}{b['pages']:>10}{b['zero_pages']:>10}"
                     f"{b['xbzrle_records']:>8}{recs:>10}")
    lines.append("")
    devices = doc["devices"]
    lines.append(f"devices: {len(devices)}"
                 + (f", vmdesc {doc['vmdesc_size']} bytes" if doc["vmdesc_size"] else ""))
    for d in devices:
        lines.append(f"  {d['name'] + '/' + str(d['instance']):<40}{d['size']:>8} bytes  "
                     f"v{d['version']}")
    if doc["colo"]:
        lines.append("")
        lines.append(f"COLO checkpoints: {doc['colo_checkpoints']}")
        for cp in doc["checkpoints"]:
            lines.append(f"  #{cp['index']}: {cp['page_records']} dirty pages, "
                         f"{cp['zero_records']} zero, {cp['xbzrle_records']} xbzrle, "
                         f"device state {cp['device_state_size']} bytes "
                         f"({cp['devices']} sections)")
    if "pages" in doc:
        lines.append("")
        lines.append("pages:")
        for p in doc["pages"]:
            cp = f" checkpoint {p['checkpoint']}" if "checkpoint" in p else ""
            lines.append(f"  {p['block']} 0x{p['offset']:x} {p['kind']}{cp}")
    return "\n".join(lines)


__all__ = ["format_human", "inspect_file", "inspect_unix", "parse_source"]
