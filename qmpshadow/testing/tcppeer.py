"""The peer of the network output-commit tests: a TCP server that checks a counter stream,
plus a raw capture that checks what was said on the wire.

Run inside the test's namespace::

    python -m qmpshadow.testing.tcppeer --listen 10.77.0.1:5000 --iface br0 --out FILE

It accepts connections on ``--listen`` and reads ``SEQ <n> <anything>`` lines; every 0.2 s it
writes a JSON summary to ``--out``: the counters received (``seqs``), lines that do not parse
(``bad_lines``), connections accepted, and from an ``AF_PACKET`` capture of the TCP segments
sent to that port: ``dup_bytes`` (stream bytes seen again with the same value, e.g. a
retransmission) and ``contradict_bytes`` (stream bytes seen again with a *different* value:
two versions of the same output — what a failover without output commit produces when the
shadow re-sends, from its checkpoint, bytes the dead primary had already sent).
Stdlib only; the capture needs root (it runs in the test's namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

ETH_P_IP = 0x0800


class Peer:
    """State shared by the server and the capture threads."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.seqs: list[int] = []
        self.bad_lines: list[str] = []
        self.connections = 0
        self.segments = 0
        self.dup_bytes = 0
        self.contradict_bytes = 0
        self.first_contradiction: dict[str, Any] | None = None
        self._bytes: dict[tuple[bytes, int, int], int] = {}

    def serve(self, host: str) -> None:
        srv = socket.create_server((host, self.port), reuse_port=False)
        while True:
            conn, _ = srv.accept()
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        while data := conn.recv(65536):
            buf += data
            *lines, buf = buf.split(b"\n")
            with self.lock:
                for raw in lines:
                    parts = raw.decode(errors="replace").split()
                    if len(parts) >= 2 and parts[0] == "SEQ" and parts[1].isdigit():
                        self.seqs.append(int(parts[1]))
                    else:
                        self.bad_lines.append(raw.decode(errors="replace")[:80])

    def capture(self, iface: str) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        s.bind((iface, ETH_P_IP))
        while True:
            frame = s.recv(65536)
            self._segment(frame[14:])

    def _segment(self, ip: bytes) -> None:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            return
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from(">H", ip, 2)[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            return
        sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
        if dport != self.port:
            return
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if not payload:
            return
        key = ip[12:16]
        with self.lock:
            self.segments += 1
            for i, b in enumerate(payload):
                k = (key, sport, (seq + i) & 0xFFFFFFFF)
                old = self._bytes.get(k)
                if old is None:
                    self._bytes[k] = b
                elif old == b:
                    self.dup_bytes += 1
                else:
                    self.contradict_bytes += 1
                    if self.first_contradiction is None:
                        self.first_contradiction = {"seq": (seq + i) & 0xFFFFFFFF,
                                                    "was": old, "now": b}

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {"seqs": list(self.seqs), "bad_lines": list(self.bad_lines),
                    "connections": self.connections, "segments": self.segments,
                    "dup_bytes": self.dup_bytes, "contradict_bytes": self.contradict_bytes,
                    "first_contradiction": self.first_contradiction, "time": time.time()}


def main() -> None:
    """Entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--iface", required=True)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    peer = Peer(int(port))
    threading.Thread(target=peer.capture, args=(args.iface,), daemon=True).start()
    threading.Thread(target=peer.serve, args=(host,), daemon=True).start()
    tmp = args.out.with_suffix(".tmp")
    while True:
        tmp.write_text(json.dumps(peer.summary()))
        os.replace(tmp, args.out)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
