"""Live status for long-running commands: one rewritten line on a terminal, JSON lines
with ``--json`` (one event object per line on stdout), plain lines otherwise."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class StatusLine:
    """Render agent status events."""

    def __init__(self, *, json_mode: bool, every: float = 2.0) -> None:
        self.json_mode = json_mode
        self.tty = sys.stderr.isatty()
        self.every = every
        self._last = 0.0

    def __call__(self, doc: dict[str, Any]) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()
            return
        text = self.format(doc)
        if self.tty and doc.get("event") in ("epoch", "committed"):
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            return
        now = time.monotonic()
        if doc.get("event") not in ("epoch", "committed") or now - self._last >= self.every:
            self._last = now
            print(text, file=sys.stderr, flush=True)

    @staticmethod
    def format(doc: dict[str, Any]) -> str:
        """One line for one event."""
        ev = doc.get("event")
        if ev == "epoch":
            parts = [f"epoch {doc['epoch']}{' (full)' if doc.get('full') else ''}",
                     f"dirty {doc.get('dirty_pages', 0)} pages"]
            if "wire_bytes" in doc:
                raw = doc.get("raw_bytes") or 0
                ratio = f" ({doc['wire_bytes'] / raw:.2f} of raw)" if raw else ""
                parts.append(f"wire {_mb(doc['wire_bytes'])}{ratio}")
            if doc.get("pause_ms") is not None:
                parts.append(f"pause {doc['pause_ms']:.1f} ms")
            parts.append(f"committed {doc.get('committed', 0)} lag {doc.get('lag', 0)}")
            if doc.get("error"):
                parts.append(f"! {doc['error']}")
            return "  ".join(parts)
        if ev == "committed":
            return f"committed epoch {doc['epoch']}  ({doc.get('pages', 0)} pages)"
        rest = ", ".join(f"{k}={v}" for k, v in doc.items() if k not in ("event", "time"))
        return f"{ev}: {rest}"
